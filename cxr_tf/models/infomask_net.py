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
      batch_norm: conv -> batch norm -> ReLU with He-initialised kernels and
        no bias (True), or the paper's bare conv(n, 3x3, relu) (False).
      attention_activation: the `InfoMask` attention, "relu" or "softplus".
      clip_gradient_leak: the `InfoMask` clip's backward leak.
      attention_bias: start value of the `InfoMask` attention conv's bias.
    """

    batch_norm: bool
    attention_activation: str
    clip_gradient_leak: float
    attention_bias: float = 0.0


# The paper's text, read literally (Keras defaults where it says nothing).
PAPER = Recipe(batch_norm=False, attention_activation="relu", clip_gradient_leak=0.0)
# What `build_model` builds: the changes that let it train, measured in
# docs/design/infomask.md with benchmarks/infomask_probe.py.
STABLE = Recipe(
    batch_norm=True,
    attention_activation="softplus",
    clip_gradient_leak=0.1,
    attention_bias=1.0,
)
# Batch-norm statistics must settle within the few dozen steps of a CPU run:
# with Keras's 0.99 the moving averages still hold the initial statistics
# after 30 steps and inference accuracy was at chance (0.5) where training
# AUC was 1.0 (docs/design/infomask.md).
BATCH_NORM_MOMENTUM = 0.9
BATCH_NORM = STABLE.batch_norm


def _conv_stack(inputs, layout, prefix, batch_norm):
    x = inputs
    conv_index = pool_index = 0
    for entry in layout:
        if entry == "pool":
            pool_index += 1
            x = keras.layers.MaxPooling2D(2, name=f"{prefix}_pool{pool_index}")(x)
            continue
        conv_index += 1
        # "same" padding (the paper gives none) keeps the grid at exactly
        # H/4 so the mask's upsampling and the maps line up with pixels.
        if not batch_norm:  # The paper's conv(n, 3x3, relu), Keras defaults.
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
        x = keras.layers.BatchNormalization(
            momentum=BATCH_NORM_MOMENTUM, name=f"{prefix}_bn{conv_index}"
        )(x)
        x = keras.layers.ReLU(name=f"{prefix}_relu{conv_index}")(x)
    return x


def _check_input_shape(input_shape):
    if len(input_shape) != 3 or not input_shape[-1] or input_shape[-1] < 1:
        raise ValueError(
            "`input_shape` must be (height, width, channels) with channels >= 1. "
            f"Received: input_shape={input_shape!r}"
        )


def InfoMaskEncoder(  # noqa: N802
    input_shape=(None, None, 1), name="encoder", batch_norm=BATCH_NORM
):
    """Builds the encoder whose features parameterise the InfoMask mask.

    Args:
      input_shape: `(height, width, channels)`; height and width multiples of
        4 (None allowed).
      name: name of the returned model.
      batch_norm: conv -> batch norm -> ReLU (True), or the paper's bare
        conv(n, 3x3, relu) (False).

    Returns:
      A functional `keras.Model` mapping images `(B, H, W, C)` to features
      `(B, H/4, W/4, 16)` (ReLU), the input of `cxr_tf.layers.InfoMask`.

    Raises:
      ValueError: bad `input_shape`.
    """
    _check_input_shape(input_shape)
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    return keras.Model(inputs, encoder_trunk(inputs, batch_norm), name=name)


def InfoMaskClassifier(  # noqa: N802
    input_shape=(None, None, 1), name="classifier", batch_norm=BATCH_NORM
):
    """Builds the convolutional part of the InfoMask classification block.

    The block's global average pooling and output layer are added by
    `cxr_tf.models.build_model` (a K-way sigmoid head replaces the paper's
    two-class softmax), so this model's output is the last feature map: the
    Grad-CAM target of the paper's GradCAM baseline.

    Args:
      input_shape: `(height, width, channels)` of the masked image.
      name: name of the returned model.
      batch_norm: as in `InfoMaskEncoder`.

    Returns:
      A functional `keras.Model` mapping masked images `(B, H, W, C)` to
      features `(B, H/4, W/4, 64)`.

    Raises:
      ValueError: bad `input_shape`.
    """
    _check_input_shape(input_shape)
    inputs = keras.Input(shape=tuple(input_shape), name="masked_image")
    return keras.Model(inputs, classifier_trunk(inputs, batch_norm), name=name)


def encoder_trunk(inputs, batch_norm=BATCH_NORM):
    """Applies the `InfoMaskEncoder` layers to a symbolic tensor, in place.

    Args:
      inputs: a symbolic `(B, H, W, C)` image tensor.
      batch_norm: as in `InfoMaskEncoder`.

    Returns:
      The `(B, H/4, W/4, 16)` feature tensor (layers named "encoder_*").
    """
    return _conv_stack(inputs, ENCODER_LAYOUT, "encoder", batch_norm)


def classifier_trunk(inputs, batch_norm=BATCH_NORM):
    """Applies the `InfoMaskClassifier` layers to a symbolic tensor, in place.

    Args:
      inputs: a symbolic `(B, H, W, C)` masked-image tensor.
      batch_norm: as in `InfoMaskEncoder`.

    Returns:
      The `(B, H/4, W/4, 64)` feature tensor (layers named "classifier_*").
    """
    return _conv_stack(inputs, CLASSIFIER_LAYOUT, "classifier", batch_norm)
