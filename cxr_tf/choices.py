"""The closed sets of names the CLIs accept, without importing TensorFlow.

The Keras registries (`cxr_tf.layers.POOLING_CLASSES`,
`cxr_tf.models.config.BACKBONES`, the backbones' `FEATURE_STRIDE`,
`cxr_tf.layers.info_mask.VARIANTS`) are the implementation; this module
repeats their names so that a command can refuse a typo in a fraction of a
second instead of after TensorFlow's import. tests/test_choices.py asserts
that the two agree, so neither can drift.
"""

# cxr_tf.layers.POOLING_CLASSES, in its order.
POOLING_NAMES = ("pcam", "avg", "max", "linear", "exp", "lse", "lse_lba", "attention")

# Backbone name -> output stride of its feature map (the models' FEATURE_STRIDE).
BACKBONE_STRIDES = {
    "resnet34": 32,
    "densenet121": 32,
    "resnet50": 32,
    "infomask": 4,
    "compact": 8,
}
BACKBONES = tuple(BACKBONE_STRIDES)
# Backbones with keras.applications ImageNet weights.
IMAGENET_BACKBONES = ("densenet121", "resnet50")

# Every input side is a multiple of this (cxr_tf.models.localizer): the
# stride-32 trunks need it, and one rule for all keeps a model's input size
# independent of its backbone.
IMAGE_SIZE_MULTIPLE = 32
MIN_IMAGE_SIZE = 32

# cxr_tf.layers.info_mask.VARIANTS.
INFOMASK_VARIANTS = ("infomask", "featuremask", "regl1")

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
    stride = BACKBONE_STRIDES.get(backbone)
    if stride is None:
        return f"unknown backbone {backbone!r}"
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
