"""Exports a trained model for TF Serving: `python -m cxr_tf.export --model=M --export_dir=E`.

Writes E/<version>/ (saved_model.pb, variables/, assets/, assets.extra/) with
the signatures serving_default (encoded PNG/JPEG bytes), predict_pixels
(preprocessed float32 pixels) and model_info (finding names, thresholds,
preprocessing). The version directory appears atomically (written under a
temporary name, then renamed), so a server watching E never loads half of it.
"""

import json
import os
import types

from absl import flags
from absl import logging

from cxr_tf import choices
from cxr_tf import cli
from cxr_tf import errors
from cxr_tf import model_dir


def define_flags(fv):
    """Defines the flags of `cxr_tf.export` on the registry `fv`; returns holders.

    The command defines them on `flags.FLAGS`; `config_from_argv` on a
    registry of its own, for a process whose own flags share names.

    Returns:
      A namespace with one `FlagHolder` per flag, named after the flag.
    """
    f = types.SimpleNamespace()
    f.model = flags.DEFINE_string(
        "model",
        None,
        "Trained .keras file, or a model directory (model.keras + config.json).",
        flag_values=fv,
    )
    f.export_dir = flags.DEFINE_string(
        "export_dir",
        None,
        "TF Serving model base path; the export goes to E/<version>.",
        flag_values=fv,
    )
    f.version = flags.DEFINE_integer(
        "version", None, "Version number (default: one more than the newest in E).",
        flag_values=fv,
    )
    f.threshold = flags.DEFINE_float(
        "threshold",
        None,
        "Map threshold for boxes, every finding (default: the model's own, chosen "
        "on validation at training, else 0.9 for probability maps, 180 on the "
        "0..255 scale for CAMs).",
        flag_values=fv,
    )
    f.class_threshold = flags.DEFINE_multi_string(
        "class_threshold", [], "FINDING=VALUE, a per-finding threshold (repeatable).",
        flag_values=fv,
    )
    f.max_boxes = flags.DEFINE_integer(
        "max_boxes", 10, "Boxes kept per finding.",
        flag_values=fv,
    )
    f.box_work_size = flags.DEFINE_integer(
        "box_work_size",
        choices.DEFAULT_BOX_WORK_SIZE,
        "Find regions at this longer side at most (as predict; 0: at the image "
        "size, exact, with a cost that grows with the film).",
        flag_values=fv,
    )
    f.model_config = flags.DEFINE_string(
        "model_config", None, "config.json to use when none sits next to the model.",
        flag_values=fv,
    )
    f.overwrite = flags.DEFINE_bool(
        "overwrite", False, "Replace an existing version.",
        flag_values=fv,
    )
    f.checkpoint = flags.DEFINE_enum(
        "checkpoint",
        "final",
        list(model_dir.CHECKPOINTS),
        "Which model of a model directory (the evaluated one: give the same "
        "--checkpoint as to cxr_tf.evaluate, or --model=<its .keras file>).",
        flag_values=fv,
    )
    f.metrics = flags.DEFINE_string(
        "metrics",
        None,
        "metrics.json of this model's evaluation, carried by the model card "
        "(default: metrics.json in the model directory, if any).",
        flag_values=fv,
    )
    return f


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


def check_paths(f):
    """Checks the model and the export folder before TF loads."""
    path = cli.require(f.model)
    if not os.path.exists(path):
        raise errors.UserFileError(
            "no such model", f"--model={path}", "give a folder written by `cxr_tf.train`"
        )
    if f.model_config.value:
        cli.check_file(f.model_config)
    else:
        cli.check_model(f.model, f.checkpoint.value, "checkpoint")
    cli.check_file(f.metrics)
    cli.check_writable_dir(f.export_dir)


def config_from_flags(f):
    """Checks the paths and builds the `ExportConfig` of parsed flags `f`."""
    class_thresholds = _class_thresholds(f.class_threshold.value)
    check_paths(f)
    from cxr_tf import export_lib  # pylint: disable=import-outside-toplevel

    return cli.make_config(
        export_lib.ExportConfig,
        model_path=f.model.value,
        export_dir=f.export_dir.value,
        version=f.version.value,
        threshold=f.threshold.value,
        class_thresholds=class_thresholds,
        max_boxes=f.max_boxes.value,
        box_work_size=f.box_work_size.value or None,
        model_config_path=f.model_config.value,
        checkpoint=f.checkpoint.value,
        metrics_path=f.metrics.value,
        overwrite=f.overwrite.value,
    )


def config_from_argv(argv):
    """The `ExportConfig` that `python -m cxr_tf.export ARGV` would export.

    As `cli.config_from_argv`: a mistake is a one-line `cxr_tf.errors.UserError`.
    """
    return cli.config_from_argv(
        define_flags, config_from_flags, argv, "cxr_tf.export"
    )


def export(config):
    """Exports `config` as the command does; returns the version folder.

    Raises:
      cxr_tf.errors.UserError: the model cannot be read, or the version
        exists; one line naming --model or --export_dir.
    """
    from cxr_tf import export_lib  # pylint: disable=import-outside-toplevel

    logging.info("Export config: %s", json.dumps(config.to_dict(), sort_keys=True))
    with (
        cli.user_errors(
            (FileNotFoundError, ValueError),
            f"--model={config.model_path}",
            "give a folder written by `cxr_tf.train`",
        ),
        cli.user_errors(
            FileExistsError,
            f"--export_dir={config.export_dir}",
            "pass --overwrite or another --version",
        ),
    ):
        return export_lib.export_saved_model(config)


def main(argv):
    cli.reject_arguments(argv)
    print(export(config_from_flags(_FLAGS)))
    return 0


if __name__ == "__main__":
    _FLAGS = define_flags(flags.FLAGS)
    flags.mark_flags_as_required(["model", "export_dir"])
    cli.run(main)
