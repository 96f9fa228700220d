"""Exports a trained model for TF Serving: `python -m cxr_tf.export --model=M --export_dir=E`.

Writes E/<version>/ (saved_model.pb, variables/, assets/, assets.extra/) with
the signatures serving_default (encoded PNG/JPEG bytes), predict_pixels
(preprocessed float32 pixels) and model_info (finding names, thresholds,
preprocessing). The version directory appears atomically (written under a
temporary name, then renamed), so a server watching E never loads half of it.
"""

import json
import os

from absl import app
from absl import flags
from absl import logging

from cxr_tf import choices
from cxr_tf import cli
from cxr_tf import errors
from cxr_tf import model_dir

_MODEL = flags.DEFINE_string(
    "model",
    None,
    "Trained .keras file, or a model directory (model.keras + config.json).",
)
_EXPORT_DIR = flags.DEFINE_string(
    "export_dir", None, "TF Serving model base path; the export goes to E/<version>."
)
_VERSION = flags.DEFINE_integer(
    "version", None, "Version number (default: one more than the newest in E)."
)
_THRESHOLD = flags.DEFINE_float(
    "threshold",
    None,
    "Map threshold for boxes, every finding (default: the model's own, chosen "
    "on validation at training, else 0.9 for probability maps, 180 on the "
    "0..255 scale for CAMs).",
)
_CLASS_THRESHOLD = flags.DEFINE_multi_string(
    "class_threshold", [], "FINDING=VALUE, a per-finding threshold (repeatable)."
)
_MAX_BOXES = flags.DEFINE_integer("max_boxes", 10, "Boxes kept per finding.")
_BOX_WORK_SIZE = flags.DEFINE_integer(
    "box_work_size",
    choices.DEFAULT_BOX_WORK_SIZE,
    "Find regions at this longer side at most (as predict; 0: at the image "
    "size, exact, with a cost that grows with the film).",
)
_MODEL_CONFIG = flags.DEFINE_string(
    "model_config", None, "config.json to use when none sits next to the model."
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing version.")
_CHECKPOINT = flags.DEFINE_enum(
    "checkpoint",
    "final",
    list(model_dir.CHECKPOINTS),
    "Which model of a model directory (the evaluated one: give the same "
    "--checkpoint as to cxr_tf.evaluate, or --model=<its .keras file>).",
)
_METRICS = flags.DEFINE_string(
    "metrics",
    None,
    "metrics.json of this model's evaluation, carried by the model card "
    "(default: metrics.json in the model directory, if any).",
)


def _class_thresholds(values):
    pairs = {}
    for item in values:
        name, sep, value = item.partition("=")
        try:
            pairs[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise errors.UserValueError(
                f"not FINDING=NUMBER: {item!r}",
                "--class_threshold",
                "write e.g. --class_threshold=Effusion=0.8",
            )
    return pairs


def check_paths():
    """Checks the model and the export folder before TF loads."""
    path = cli.require(_MODEL)
    if not os.path.exists(path):
        raise errors.UserFileError(
            "no such model", f"--model={path}", "give a folder written by `cxr_tf.train`"
        )
    if _MODEL_CONFIG.value:
        cli.check_file(_MODEL_CONFIG)
    else:
        cli.check_model(_MODEL, _CHECKPOINT.value, "checkpoint")
    cli.check_file(_METRICS)
    cli.check_writable_dir(_EXPORT_DIR)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    class_thresholds = _class_thresholds(_CLASS_THRESHOLD.value)
    check_paths()
    from cxr_tf import export_lib  # pylint: disable=import-outside-toplevel

    config = cli.make_config(
        export_lib.ExportConfig,
        model_path=_MODEL.value,
        export_dir=_EXPORT_DIR.value,
        version=_VERSION.value,
        threshold=_THRESHOLD.value,
        class_thresholds=class_thresholds,
        max_boxes=_MAX_BOXES.value,
        box_work_size=_BOX_WORK_SIZE.value or None,
        model_config_path=_MODEL_CONFIG.value,
        checkpoint=_CHECKPOINT.value,
        metrics_path=_METRICS.value,
        overwrite=_OVERWRITE.value,
    )
    logging.info("Export config: %s", json.dumps(config.to_dict(), sort_keys=True))
    with (
        cli.user_errors(
            (FileNotFoundError, ValueError),
            f"--model={_MODEL.value}",
            "give a folder written by `cxr_tf.train`",
        ),
        cli.user_errors(
            FileExistsError,
            f"--export_dir={_EXPORT_DIR.value}",
            "pass --overwrite or another --version",
        ),
    ):
        path = export_lib.export_saved_model(config)
    print(path)
    return 0


if __name__ == "__main__":
    flags.mark_flags_as_required(["model", "export_dir"])
    cli.run(main)
