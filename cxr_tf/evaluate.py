"""Evaluates a model: `python -m cxr_tf.evaluate --model_dir=M --data_dir=T --output_dir=E`.

Or a predictions file: `--predictions=P.jsonl --bbox_list=BBox_List_2017.csv
[--data_entry=Data_Entry_2017.csv] --output_dir=E`. Writes metrics.json,
roc.png, localization_accuracy.png and localization_accuracy_iou.png (and,
for a model, predictions.jsonl and overlays/ of boxed films with their truth).
"""

import fnmatch
import json

from absl import app
from absl import flags

from cxr_tf import choices
from cxr_tf import cli
from cxr_tf import errors
from cxr_tf import model_dir
from cxr_tf.data import schema

# evaluate_lib.IOBB_THRESHOLDS, repeated so --help needs no SciPy import.
_DEFAULT_IOBB_THRESHOLDS = ("0.1", "0.25", "0.5", "0.75", "0.9")

_MODEL_DIR = flags.DEFINE_string("model_dir", None, "Trained model directory.")
_CHECKPOINT = flags.DEFINE_enum(
    "checkpoint", "best", list(model_dir.CHECKPOINTS), "Which model of model_dir."
)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Ingested TFRecords.")
_SPLIT = flags.DEFINE_enum("split", "test", list(schema.SPLITS), "Split.")
_VAL_SPLIT = flags.DEFINE_string(
    "val_split", "val", "Split that chooses the IoP mask threshold ('' to skip)."
)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Output directory.")
_PREDICTIONS = flags.DEFINE_string(
    "predictions", None, "predictions.jsonl to evaluate instead of a model."
)
_BBOX_LIST = flags.DEFINE_string("bbox_list", None, "Box list CSV (predictions).")
_DATA_ENTRY = flags.DEFINE_string(
    "data_entry", None, "Label table CSV (predictions; enables AUROC)."
)
_MAP = flags.DEFINE_enum(
    "map", "model", list(choices.MAP_SOURCES), "Localization map source."
)
_BOX_THRESHOLDS = flags.DEFINE_list(
    "box_thresholds",
    [],
    "Map thresholds for boxes (default: the model's own, chosen on validation "
    "at training; else 0.9 probability maps, 180,60 CAMs).",
)
_IOBB_THRESHOLDS = flags.DEFINE_list(
    "iobb_thresholds",
    list(_DEFAULT_IOBB_THRESHOLDS),
    "T of the localization accuracy (IoBB > T, IoU > T).",
)
_MASK_THRESHOLDS = flags.DEFINE_list(
    "mask_thresholds", [], "Candidate IoP mask thresholds (default: a grid)."
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Images per forward pass.")
_MAX_IMAGES = flags.DEFINE_integer("max_images", None, "Evaluate at most N images.")
_NUM_OVERLAYS = flags.DEFINE_integer(
    "num_overlays", 8, "Overlays (maps, predicted and truth boxes) of N boxed images."
)


def _floats(holder):
    try:
        return tuple(float(t) for t in holder.value)
    except ValueError:
        raise errors.UserValueError(
            f"not a number in {holder.value}", f"--{holder.name}", "give numbers"
        ) from None


def check_paths():
    """Checks the model or predictions and the folders before TF loads."""
    cli.check_writable_dir(_OUTPUT_DIR)
    if _PREDICTIONS.value:
        cli.check_file(_PREDICTIONS)
        cli.require(_BBOX_LIST)
        cli.check_file(_BBOX_LIST)
        cli.check_file(_DATA_ENTRY)
        return
    if not _MODEL_DIR.value:
        raise errors.UserValueError(
            "nothing to evaluate",
            "--model_dir",
            "give --model_dir and --data_dir, or --predictions and --bbox_list",
        )
    cli.check_model(_MODEL_DIR, _CHECKPOINT.value, "checkpoint")
    pattern = schema.TFRECORD_PATTERN.format(split=_SPLIT.value)
    cli.check_dir(
        _DATA_DIR,
        contains=lambda names: any(fnmatch.fnmatch(n, pattern) for n in names),
        hint=f"expected {pattern} files; run `python -m pipeline.ingest` first",
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    check_paths()
    box_thresholds = _floats(_BOX_THRESHOLDS)
    iobb_thresholds = _floats(_IOBB_THRESHOLDS)
    mask_thresholds = _floats(_MASK_THRESHOLDS)
    from cxr_tf import evaluate_lib  # pylint: disable=import-outside-toplevel

    config = cli.make_config(
        evaluate_lib.EvalConfig,
        output_dir=_OUTPUT_DIR.value,
        model_dir=_MODEL_DIR.value,
        checkpoint=_CHECKPOINT.value,
        data_dir=_DATA_DIR.value,
        split=_SPLIT.value,
        val_split=_VAL_SPLIT.value or None,
        predictions=_PREDICTIONS.value,
        bbox_list=_BBOX_LIST.value,
        data_entry=_DATA_ENTRY.value,
        map_source=_MAP.value,
        box_thresholds=box_thresholds,
        iobb_thresholds=iobb_thresholds,
        mask_thresholds=mask_thresholds,
        batch_size=_BATCH_SIZE.value,
        max_images=_MAX_IMAGES.value,
        num_overlays=_NUM_OVERLAYS.value,
    )
    metrics = evaluate_lib.evaluate(config)
    print(json.dumps(evaluate_lib.headline(metrics), indent=2))


if __name__ == "__main__":
    flags.mark_flags_as_required(["output_dir"])
    cli.run(main)
