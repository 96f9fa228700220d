"""Evaluates a model: `python -m cxr_tf.evaluate --model_dir=M --data_dir=T --output_dir=E`.

Or a predictions file: `--predictions=P.jsonl --bbox_list=BBox_List_2017.csv
[--data_entry=Data_Entry_2017.csv] --output_dir=E`. Writes metrics.json,
roc.png, localization_accuracy.png (and predictions.jsonl for a model).
"""

import json

from absl import app
from absl import flags

from cxr_tf import evaluate_lib
from cxr_tf import predict_lib

_MODEL_DIR = flags.DEFINE_string("model_dir", None, "Trained model directory.")
_CHECKPOINT = flags.DEFINE_enum(
    "checkpoint", "best", ["best", "final", "latest"], "Which model of model_dir."
)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Ingested TFRecords.")
_SPLIT = flags.DEFINE_enum("split", "test", ["train", "val", "test"], "Split.")
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
    "map", "model", list(predict_lib.MAP_SOURCES), "Localization map source."
)
_BOX_THRESHOLDS = flags.DEFINE_list(
    "box_thresholds",
    [],
    "Map thresholds for boxes (default: the model's own, chosen on validation "
    "at training; else 0.9 probability maps, 180,60 CAMs).",
)
_IOBB_THRESHOLDS = flags.DEFINE_list(
    "iobb_thresholds",
    [str(t) for t in evaluate_lib.IOBB_THRESHOLDS],
    "T of the localization accuracy (IoBB > T, IoU > T).",
)
_MASK_THRESHOLDS = flags.DEFINE_list(
    "mask_thresholds", [], "Candidate IoP mask thresholds (default: a grid)."
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Images per forward pass.")
_MAX_IMAGES = flags.DEFINE_integer("max_images", None, "Evaluate at most N images.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        config = evaluate_lib.EvalConfig(
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
            box_thresholds=tuple(float(t) for t in _BOX_THRESHOLDS.value),
            iobb_thresholds=tuple(float(t) for t in _IOBB_THRESHOLDS.value),
            mask_thresholds=tuple(float(t) for t in _MASK_THRESHOLDS.value),
            batch_size=_BATCH_SIZE.value,
            max_images=_MAX_IMAGES.value,
        )
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    metrics = evaluate_lib.evaluate(config)
    print(json.dumps(evaluate_lib.headline(metrics), indent=2))


if __name__ == "__main__":
    flags.mark_flags_as_required(["output_dir"])
    app.run(main)
