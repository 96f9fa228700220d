"""Predicts films: `python -m cxr_tf.predict --model=M --output_dir=O IMAGE_OR_DIR...`.

Writes O/predictions.jsonl (one line per image: probabilities and boxes in
the original image's pixels, x, y top-left) and O/overlays/<name>.png. PNG,
JPEG and DICOM are read; a file that cannot be read is reported and skipped.
"""

import json
import sys

from absl import app
from absl import flags

from cxr_tf import predict_lib

_MODEL = flags.DEFINE_string("model", None, "Model directory or .keras file.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Output directory.")
_CHECKPOINT = flags.DEFINE_enum(
    "checkpoint",
    "final",
    ["final", "best", "latest"],
    "Which model of a model directory.",
)
_MAP = flags.DEFINE_enum(
    "map",
    "model",
    list(predict_lib.MAP_SOURCES),
    "model: the model's own maps; gradcam: Grad-CAM at the backbone features.",
)
_POSITIVE_THRESHOLD = flags.DEFINE_float(
    "positive_threshold", 0.5, "Probability from which a finding is present."
)
_BOX_THRESHOLD = flags.DEFINE_float(
    "box_threshold",
    None,
    "Map threshold for boxes (default: the model's own, chosen on validation at "
    "training, else 0.9 for probability maps, 180 for CAMs).",
)
_BOX_FINDINGS = flags.DEFINE_enum(
    "box_findings",
    "positive",
    ["positive", "all"],
    "Boxes for present findings only, or for all findings.",
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Images per forward pass.")
_OVERLAYS = flags.DEFINE_bool("overlays", True, "Write an overlay PNG per image.")
_DICOM_ORIENTATION = flags.DEFINE_enum(
    "dicom_orientation",
    "auto",
    ["auto", "header"],
    "auto: follow PhotometricInterpretation, but invert a chest DICOM whose "
    "content is plainly a negative (wrong header; flagged in its record). "
    "header: follow PhotometricInterpretation only.",
)


def main(argv):
    inputs = argv[1:]
    if not inputs:
        raise app.UsageError("Give at least one image file or directory.")
    config = predict_lib.PredictConfig(
        model=_MODEL.value,
        output_dir=_OUTPUT_DIR.value,
        checkpoint=_CHECKPOINT.value,
        map_source=_MAP.value,
        positive_threshold=_POSITIVE_THRESHOLD.value,
        box_threshold=_BOX_THRESHOLD.value,
        box_findings=_BOX_FINDINGS.value,
        batch_size=_BATCH_SIZE.value,
        overlays=_OVERLAYS.value,
        dicom_orientation=_DICOM_ORIENTATION.value,
    )
    try:
        summary = predict_lib.predict(config, inputs)
    except FileNotFoundError as e:
        raise app.UsageError(str(e)) from None
    for item in summary["failed"]:
        print(f"SKIPPED {item['image']}: {item['reason']}", file=sys.stderr)
    print(json.dumps({k: summary[k] for k in ("predicted", "predictions")}))


if __name__ == "__main__":
    flags.mark_flags_as_required(["model", "output_dir"])
    app.run(main)
