"""The InfoMask paper's baseline encoder and classifier (Taghanaki et al. 2019, s. 4)."""

import dataclasses

import keras

# Section 4: "an encoder p(z|X) of the form [conv(64, 3x3, relu), conv(64),
# maxpooling(2x2), conv(128), conv(128), maxpooling(2x2), conv(256),
# conv(16)]" and "a classification block p(Y|z) of [conv(128, 3x3, relu),
# maxpooling(2x2), conv(64), conv(64), maxpooling(2x2), global average
# pooling, softmax]". Entries are filters, or "pool" for a 2x2 max pool.
ENCODER_LAYOUT = (64, 64, "pool", 128, 128, "pool", 256, 16)
CLASSIFIER_LAYOUT = (128, "pool", 64, 64, "pool")
# Both blocks shrink the image by 2 * 2.
FEATURE_STRIDE = 4


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What the paper leaves open in the network around the mask.

    Attributes:
      normalization: "group" (conv -> group norm -> ReLU, He-initialised
        kernels, no bias), "batch" (the same with batch norm) or "none"
        (the paper's bare conv(n, 3x3, relu)).
      attention_activation: the `InfoMask` attention, "relu" or "softplus".
      clip_gradient_leak: the `InfoMask` clip's backward leak.
      attention_bias: start value of the `InfoMask` attention conv's bias.
      mask_site: "image" (the paper: the encoder's mask multiplies the
        film, and the classification block reads the masked film) or
        "features" (`build_model`'s: one mask per finding on the compact
        ResNet trunk's feature map, each finding's logit a dense unit on
        the mask-weighted average of the features, so a mask is the only
        path from the features to its logit). The compact trunk has its
        own batch norm: "features" reads only the `InfoMask` fields.
    """

    normalization: str
    attention_activation: str
    clip_gradient_leak: float
    attention_bias: float = 0.0
    mask_site: str = "image"


# The paper's text, read literally (Keras defaults where it says nothing).
PAPER = Recipe(
    normalization="none", attention_activation="relu", clip_gradient_leak=0.0
)
# What `build_model` builds: the changes that let it train, measured in
# docs/design/infomask.md with benchmarks/infomask_probe.py.
STABLE = Recipe(
    normalization="group",
    attention_activation="softplus",
    clip_gradient_leak=0.1,
    attention_bias=1.0,
)
# What `build_model` builds (docs/design/infomask.md, "The mask on the
# trunk's features"): STABLE's mask, on the compact trunk's stride-8 map.
FEATURES = Recipe(
    normalization="batch",
    attention_activation="softplus",
    clip_gradient_leak=0.1,
    attention_bias=1.0,
    mask_site="features",
)
NORMALIZATIONS = ("none", "batch", "group")
# Batch-norm statistics must settle within the few dozen steps of a CPU run
# (Keras's 0.99 left inference accuracy at chance after 30 steps); group norm
# has no statistics to settle: the same in training and inference.
BATCH_NORM_MOMENTUM = 0.9
GROUPS = 8


def scaled_filters(filters, width=1.0):
    """A layout entry's filter count times `width`, rounded to a multiple of 8.

    `width` < 1 is the CPU demo's (configs/infomask_demo.flags): the paper's
    64-128 filters at full resolution cost ~9x the compact trunk per pixel.
    The multiple of `GROUPS` keeps every group-norm group whole.

    Args:
      filters: the paper's filter count.
      width: the multiplier (1.0: the paper's count, unchanged).

    Returns:
      int: the scaled count, at least `GROUPS`; `filters` itself for 1.0.
    """
    if width == 1.0:
        return filters
    return max(GROUPS, int(round(filters * width / GROUPS)) * GROUPS)


def _norm_layer(normalization, name):
    if normalization == "batch":
        return keras.layers.BatchNormalization(momentum=BATCH_NORM_MOMENTUM, name=name)
    return keras.layers.GroupNormalization(GROUPS, name=name)


def _conv_stack(inputs, layout, prefix, normalization, width=1.0):
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"`normalization` must be one of {NORMALIZATIONS}. "
            f"Received: normalization={normalization!r}"
        )
    x = inputs
    conv_index = pool_index = 0
    for entry in layout:
        if entry == "pool":
            pool_index += 1
            x = keras.layers.MaxPooling2D(2, name=f"{prefix}_pool{pool_index}")(x)
            continue
        conv_index += 1
        entry = scaled_filters(entry, width)
        # "same" padding (the paper gives none) keeps the grid at exactly
        # H/4 so the mask's upsampling and the maps line up with pixels.
        if normalization == "none":  # The paper's conv(n, 3x3, relu).
            x = keras.layers.Conv2D(
                entry,
                3,
                padding="same",
                activation="relu",
                name=f"{prefix}_conv{conv_index}",
            )(x)
            continue
        x = keras.layers.Conv2D(
            entry,
            3,
            padding="same",
            use_bias=False,
            kernel_initializer="he_normal",
            name=f"{prefix}_conv{conv_index}",
        )(x)
        x = _norm_layer(normalization, f"{prefix}_norm{conv_index}")(x)
        x = keras.layers.ReLU(name=f"{prefix}_relu{conv_index}")(x)
    return x


def _standalone(trunk, input_shape, input_name, name, normalization):
    """`trunk` as a functional model, after checking `input_shape`."""
    if len(input_shape) != 3 or not input_shape[-1] or input_shape[-1] < 1:
        raise ValueError(
            "`input_shape` must be (height, width, channels) with channels >= 1. "
            f"Received: input_shape={input_shape!r}"
        )
    inputs = keras.Input(shape=tuple(input_shape), name=input_name)
    return keras.Model(inputs, trunk(inputs, normalization), name=name)


def InfoMaskEncoder(  # noqa: N802
    input_shape=(None, None, 1), name="encoder", normalization=STABLE.normalization
):
    """Builds the encoder whose features parameterise the InfoMask mask.

    Args:
      input_shape: `(height, width, channels)`; height and width multiples of
        4 (None allowed).
      name: name of the returned model.
      normalization: "group", "batch" or "none" (see `Recipe`).

    Returns:
      A functional `keras.Model` mapping images `(B, H, W, C)` to features
      `(B, H/4, W/4, 16)` (ReLU), the input of `cxr_tf.layers.InfoMask`.

    Raises:
      ValueError: bad `input_shape`.
    """
    return _standalone(encoder_trunk, input_shape, "image", name, normalization)


def InfoMaskClassifier(  # noqa: N802
    input_shape=(None, None, 1), name="classifier", normalization=STABLE.normalization
):
    """Builds the convolutional part of the InfoMask classification block.

    The block's global average pooling and output layer are added by
    `cxr_tf.models.build_model` (a K-way sigmoid head replaces the paper's
    two-class softmax), so this model's output is the last feature map: the
    Grad-CAM target of the paper's GradCAM baseline.

    Args:
      input_shape: `(height, width, channels)` of the masked image.
      name: name of the returned model.
      normalization: as in `InfoMaskEncoder`.

    Returns:
      A functional `keras.Model` mapping masked images `(B, H, W, C)` to
      features `(B, H/4, W/4, 64)`.

    Raises:
      ValueError: bad `input_shape`.
    """
    return _standalone(
        classifier_trunk, input_shape, "masked_image", name, normalization
    )


def encoder_trunk(inputs, normalization=STABLE.normalization, width=1.0):
    """Applies the `InfoMaskEncoder` layers to a symbolic tensor, in place.

    Args:
      inputs: a symbolic `(B, H, W, C)` image tensor.
      normalization: as in `InfoMaskEncoder`.
      width: filter-count multiplier (`scaled_filters`).

    Returns:
      The `(B, H/4, W/4, scaled_filters(16, width))` feature tensor (layers
      named "encoder_*").
    """
    return _conv_stack(inputs, ENCODER_LAYOUT, "encoder", normalization, width)


def classifier_trunk(inputs, normalization=STABLE.normalization, width=1.0):
    """Applies the `InfoMaskClassifier` layers to a symbolic tensor, in place.

    Args:
      inputs: a symbolic `(B, H, W, C)` masked-image tensor.
      normalization: as in `InfoMaskEncoder`.
      width: filter-count multiplier (`scaled_filters`).

    Returns:
      The `(B, H/4, W/4, scaled_filters(64, width))` feature tensor (layers
      named "classifier_*").
    """
    return _conv_stack(inputs, CLASSIFIER_LAYOUT, "classifier", normalization, width)
