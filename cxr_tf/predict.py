"""Predicts films: `python -m cxr_tf.predict --model=M --output_dir=O IMAGE_OR_DIR...`.

Writes O/predictions.jsonl (one line per image: probabilities and boxes in
the original image's pixels, x, y top-left) and O/overlays/<name>.png. PNG,
JPEG and DICOM are read; a file that cannot be read is reported and skipped.
"""

import json
import sys

from absl import flags

from cxr_tf import choices
from cxr_tf import cli
from cxr_tf import model_dir

_MODEL = flags.DEFINE_string("model", None, "Model directory or .keras file.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Output directory.")
_CHECKPOINT = flags.DEFINE_enum(
    "checkpoint",
    "final",
    list(model_dir.CHECKPOINTS),
    "Which model of a model directory.",
)
_MAP = flags.DEFINE_enum(
    "map",
    "model",
    list(choices.MAP_SOURCES),
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
_BBOX_LIST = flags.DEFINE_string(
    "bbox_list",
    None,
    "BBox_List_2017.csv-style table: its boxes are drawn (green) on the "
    "overlays of the films whose file name is its Image Index.",
)
_RESUME = flags.DEFINE_bool(
    "resume",
    False,
    "Keep the films already in --output_dir's predictions.jsonl and predict "
    "only the others (a line torn by a killed run is dropped and redone).",
)
_NUM_WORKERS = flags.DEFINE_integer(
    "num_workers",
    0,
    "Threads per stage (loading films; boxes and overlays); 0: one per CPU core.",
)


def main(argv):
    inputs = cli.check_inputs(argv[1:])
    cli.check_model(_MODEL, _CHECKPOINT.value, "checkpoint")
    cli.check_writable_dir(_OUTPUT_DIR)
    cli.check_file(_BBOX_LIST)
    from cxr_tf import predict_lib  # pylint: disable=import-outside-toplevel

    config = cli.make_config(
        predict_lib.PredictConfig,
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
        bbox_list=_BBOX_LIST.value,
        resume=_RESUME.value,
        num_workers=_NUM_WORKERS.value,
    )
    with cli.user_errors(
        FileNotFoundError, " ".join(inputs), "give PNG, JPEG or DICOM files or folders"
    ):
        summary = predict_lib.predict(config, inputs)
    for item in summary["failed"]:
        print(f"SKIPPED {item['image']}: {item['reason']}", file=sys.stderr)
    print(json.dumps({k: summary[k] for k in ("predicted", "predictions")}))


if __name__ == "__main__":
    flags.mark_flags_as_required(["model", "output_dir"])
    cli.run(main)
