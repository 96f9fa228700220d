"""The registries of backbones and poolings, and the CLIs' closed sets of names.

This module is the one home of the names: a backbone or pooling exists when
it has an entry here, and the Keras side (`cxr_tf.models.localizer`,
`cxr_tf.layers.get_pooling`, `cxr_tf.data.schema.normalization_for`) looks
its implementation up from the entry. It imports nothing heavy, so a command
refuses a typo in a fraction of a second instead of after TensorFlow's
import. tests/test_choices.py builds every entry and checks it against what
the entry claims (stride, map kind).
"""

import dataclasses
import importlib


@dataclasses.dataclass(frozen=True)
class Backbone:
    """What the rest of the package needs to know about one backbone.

    Attributes:
      trunk: "module:function" of the trunk builder, called as
        `function(inputs, config)` with a symbolic `(B, S, S, C)` image tensor
        and the `ModelConfig`; it returns the `(B, S/stride, S/stride, C')`
        feature map, its layers built into the caller's graph. None for
        "infomask", whose whole network is built by
        `cxr_tf.models.localizer` (its mask is not a pooling head).
      stride: how many times the trunk reduces the image.
      normalization: the pixel normalisation it is trained with, a name of
        `cxr_tf.data.schema.NORMALIZATIONS` ("fixed" or "imagenet_gray").
      imagenet_weights: whether `weights="imagenet"` exists for it.
      description: a few words for reports and help.
    """

    trunk: str | None
    stride: int
    normalization: str
    imagenet_weights: bool = False
    description: str = ""


BACKBONE_REGISTRY = {
    "resnet34": Backbone(
        "cxr_tf.models.resnet:trunk_features", 32, "fixed",
        description="ResNet-34",
    ),
    "densenet121": Backbone(
        "cxr_tf.models.applications:trunk_features", 32, "imagenet_gray", True,
        "DenseNet-121",
    ),
    "resnet50": Backbone(
        "cxr_tf.models.applications:trunk_features", 32, "imagenet_gray", True,
        "ResNet-50",
    ),
    "infomask": Backbone(
        None, 8, "fixed", description="InfoMask mask on the compact trunk's features"
    ),
    "compact": Backbone(
        "cxr_tf.models.compact:trunk_features", 8, "fixed",
        description="compact stride-8 trunk",
    ),
}
BACKBONES = tuple(BACKBONE_REGISTRY)
# Backbone name -> output stride of its feature map.
BACKBONE_STRIDES = {name: spec.stride for name, spec in BACKBONE_REGISTRY.items()}
# Backbones with keras.applications ImageNet weights.
IMAGENET_BACKBONES = tuple(
    name for name, spec in BACKBONE_REGISTRY.items() if spec.imagenet_weights
)

# Pooling name -> "module:class" of its layer (`cxr_tf.layers.get_pooling`).
POOLING_REGISTRY = {
    "pcam": "cxr_tf.layers.pcam_pooling:PCAMPooling",
    "avg": "cxr_tf.layers.average_pooling:AveragePooling",
    "max": "cxr_tf.layers.max_pooling:MaxPooling",
    "linear": "cxr_tf.layers.linear_pooling:LinearPooling",
    "exp": "cxr_tf.layers.exponential_pooling:ExponentialPooling",
    "lse": "cxr_tf.layers.lse_pooling:LSEPooling",
    "lse_lba": "cxr_tf.layers.lse_lba_pooling:LSELBAPooling",
    "attention": "cxr_tf.layers.attention_pooling:AttentionPooling",
}
POOLING_NAMES = tuple(POOLING_REGISTRY)


def load(path):
    """Imports the object a registry entry names ("package.module:attribute")."""
    module_name, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


# Every input side is a multiple of this (cxr_tf.models.localizer): the
# stride-32 trunks need it, and one rule for all keeps a model's input size
# independent of its backbone.
IMAGE_SIZE_MULTIPLE = 32
MIN_IMAGE_SIZE = 32

# cxr_tf.layers.info_mask.VARIANTS.
INFOMASK_VARIANTS = ("infomask", "featuremask", "regl1")

# The longer side above which predict and the served model find box regions
# on a shrunk copy (cxr_tf.localization.working_hw): exact for films up to
# 2048 px (NIH films are 1024), a bounded cost for a 7000 px film.
DEFAULT_BOX_WORK_SIZE = 2048

# Where localization maps come from (cxr_tf.predict_lib.MAP_SOURCES).
MAP_SOURCES = ("model", "gradcam")

# cxr_tf.train_lib's training choices.
OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("constant", "cosine", "step", "exponential")
STRATEGIES = ("mirrored", "multi_worker", "default")
MIXED_PRECISION = ("none", "mixed_float16", "mixed_bfloat16")
JIT_COMPILE = ("auto", "true", "false")


def image_size_problem(backbone, size):
    """What is wrong with `size` as `backbone`'s input side, or None.

    Args:
      backbone: a name of `BACKBONES`.
      size: the square input side in pixels.

    Returns:
      None when the backbone accepts `size`, else a short description.
    """
    if backbone not in BACKBONE_REGISTRY:
        return f"unknown backbone {backbone!r}"
    stride = BACKBONE_REGISTRY[backbone].stride
    if not isinstance(size, int) or size < MIN_IMAGE_SIZE:
        return f"image size {size!r} is below {MIN_IMAGE_SIZE}"
    if size % IMAGE_SIZE_MULTIPLE:
        return (
            f"image size {size} is not a multiple of {IMAGE_SIZE_MULTIPLE} "
            f"({backbone} reduces the image {stride} times)"
        )
    return None


def image_size_hint(size):
    """A fix for a rejected `size`: the nearest accepted sides."""
    if not isinstance(size, int) or size < MIN_IMAGE_SIZE:
        return f"use a multiple of {IMAGE_SIZE_MULTIPLE}, at least {MIN_IMAGE_SIZE}"
    lower = size // IMAGE_SIZE_MULTIPLE * IMAGE_SIZE_MULTIPLE
    candidates = [s for s in (lower, lower + IMAGE_SIZE_MULTIPLE) if s >= MIN_IMAGE_SIZE]
    return "use " + " or ".join(str(s) for s in candidates)
