"""Names shared by every stage: findings, TFRecord feature keys, normalisation."""

import dataclasses

from cxr_tf import choices
from serving import contract

# Canonical order of Wang et al. 2017; the first 8 have ground-truth boxes.
# Written once, in the serving contract, which a client carries alone.
FINDINGS = contract.FINDINGS
NUM_FINDINGS = len(FINDINGS)
BOXED_FINDINGS = FINDINGS[:8]
NO_FINDING = "No Finding"

# Spellings seen in real files, mapped to the canonical names.
FINDING_ALIASES = {
    "Infiltrate": "Infiltration",
    "Pleural Thickening": "Pleural_Thickening",
    "Pleural_thickening": "Pleural_Thickening",
}

SPLITS = ("train", "val", "test")

# tf.train.Example keys (the conventional TF Object Detection API names).
KEY_IMAGE = "image/encoded"
KEY_HEIGHT = "image/height"
KEY_WIDTH = "image/width"
KEY_FORMAT = "image/format"
KEY_IMAGE_ID = "image/id"
KEY_ORIGINAL_HEIGHT = "image/original_height"
KEY_ORIGINAL_WIDTH = "image/original_width"
KEY_PATIENT_ID = "patient/id"
KEY_LABELS = "image/class/multilabel"
KEY_BBOX_XMIN = "image/object/bbox/xmin"
KEY_BBOX_YMIN = "image/object/bbox/ymin"
KEY_BBOX_XMAX = "image/object/bbox/xmax"
KEY_BBOX_YMAX = "image/object/bbox/ymax"
KEY_BBOX_LABEL = "image/object/class/label"
KEY_VIEW_POSITION = "image/view_position"
KEY_PATIENT_AGE = "patient/age"
KEY_PATIENT_SEX = "patient/sex"

# File name endings read as films (PNG, JPEG, DICOM), case-insensitive.
IMAGE_EXTENSIONS = contract.IMAGE_EXTENSIONS
TFRECORD_PATTERN = "{split}-*.tfrecord.gz"
INGEST_REPORT = "ingest_report.json"


def canonical_finding(name):
    """Returns the canonical spelling of a finding name, or raises ValueError.

    Args:
      name: a finding label as written in a data set file.

    Returns:
      The name as spelled in `FINDINGS`.

    Raises:
      ValueError: the name is not one of the 14 findings.
    """
    cleaned = name.strip()
    cleaned = FINDING_ALIASES.get(cleaned, cleaned)
    if cleaned not in FINDINGS:
        raise ValueError(
            f"Unknown finding label {name!r}. Expected one of {FINDINGS} "
            f"(or an alias in {sorted(FINDING_ALIASES)})."
        )
    return cleaned


@dataclasses.dataclass(frozen=True)
class Normalization:
    """Pixel normalisation, on the 0..255 grayscale scale: (x - mean) / std."""

    mean: float
    std: float


# keras.applications backbones get the ImageNet statistics; for a single
# grayscale channel the channel means and stds are averaged. With ImageNet
# weights the model maps back to what each trunk was trained with: DenseNet's
# "torch" convention (per-channel mean/std) or ResNet-50's "caffe" one (BGR,
# mean subtraction only); see cxr_tf/models/applications.py.
IMAGENET_GRAY = Normalization(mean=0.449 * 255.0, std=0.226 * 255.0)
# Our own backbones use the fixed convention of the public PCAM code.
FIXED = Normalization(mean=128.0, std=64.0)

# A backbone's registry entry (`cxr_tf.choices.BACKBONE_REGISTRY`) names one.
NORMALIZATIONS = {"fixed": FIXED, "imagenet_gray": IMAGENET_GRAY}


def normalization_for(backbone):
    """Returns the `Normalization` a backbone is trained with.

    Raises:
      ValueError: unknown backbone.
    """
    spec = choices.BACKBONE_REGISTRY.get(backbone)
    if spec is None:
        raise ValueError(
            f"Unknown `backbone`. Expected one of "
            f"{sorted(choices.BACKBONES)}. Received: backbone={backbone!r}"
        )
    return NORMALIZATIONS[spec.normalization]
