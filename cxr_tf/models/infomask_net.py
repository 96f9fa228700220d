"""The InfoMask paper's baseline encoder and classifier (Taghanaki et al. 2019, s. 4)."""

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


def _conv_stack(inputs, layout, prefix):
    x = inputs
    conv_index = pool_index = 0
    for entry in layout:
        if entry == "pool":
            pool_index += 1
            x = keras.layers.MaxPooling2D(2, name=f"{prefix}_pool{pool_index}")(x)
        else:
            conv_index += 1
            # "same" padding (the paper gives none) keeps the grid at exactly
            # H/4 so the mask's upsampling and the maps line up with pixels.
            x = keras.layers.Conv2D(
                entry,
                3,
                padding="same",
                activation="relu",
                name=f"{prefix}_conv{conv_index}",
            )(x)
    return x


def _check_input_shape(input_shape):
    if len(input_shape) != 3 or not input_shape[-1] or input_shape[-1] < 1:
        raise ValueError(
            "`input_shape` must be (height, width, channels) with channels >= 1. "
            f"Received: input_shape={input_shape!r}"
        )


def InfoMaskEncoder(input_shape=(None, None, 1), name="encoder"):  # noqa: N802
    """Builds the encoder whose features parameterise the InfoMask mask.

    Args:
      input_shape: `(height, width, channels)`; height and width multiples of
        4 (None allowed).
      name: name of the returned model.

    Returns:
      A functional `keras.Model` mapping images `(B, H, W, C)` to features
      `(B, H/4, W/4, 16)` (ReLU), the input of `cxr_tf.layers.InfoMask`.

    Raises:
      ValueError: bad `input_shape`.
    """
    _check_input_shape(input_shape)
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    return keras.Model(inputs, encoder_trunk(inputs), name=name)


def InfoMaskClassifier(input_shape=(None, None, 1), name="classifier"):  # noqa: N802
    """Builds the convolutional part of the InfoMask classification block.

    The block's global average pooling and output layer are added by
    `cxr_tf.models.build_model` (a K-way sigmoid head replaces the paper's
    two-class softmax), so this model's output is the last feature map: the
    Grad-CAM target of the paper's GradCAM baseline.

    Args:
      input_shape: `(height, width, channels)` of the masked image.
      name: name of the returned model.

    Returns:
      A functional `keras.Model` mapping masked images `(B, H, W, C)` to
      features `(B, H/4, W/4, 64)`.

    Raises:
      ValueError: bad `input_shape`.
    """
    _check_input_shape(input_shape)
    inputs = keras.Input(shape=tuple(input_shape), name="masked_image")
    return keras.Model(inputs, classifier_trunk(inputs), name=name)


def encoder_trunk(inputs):
    """Applies the `InfoMaskEncoder` layers to a symbolic tensor, in place.

    Args:
      inputs: a symbolic `(B, H, W, C)` image tensor.

    Returns:
      The `(B, H/4, W/4, 16)` feature tensor (layers named "encoder_*").
    """
    return _conv_stack(inputs, ENCODER_LAYOUT, "encoder")


def classifier_trunk(inputs):
    """Applies the `InfoMaskClassifier` layers to a symbolic tensor, in place.

    Args:
      inputs: a symbolic `(B, H, W, C)` masked-image tensor.

    Returns:
      The `(B, H/4, W/4, 64)` feature tensor (layers named "classifier_*").
    """
    return _conv_stack(inputs, CLASSIFIER_LAYOUT, "classifier")
