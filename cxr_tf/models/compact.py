"""A compact ResNet-style trunk for the CPU demo (stride 8, not from a paper)."""

import keras

from cxr_tf.models import resnet

# Widths and depth chosen for the 2-core demo budget (measured, see
# BUILD_NOTES): a few hundred thousand parameters train in minutes on CPU.
COMPACT_STAGES = (2, 2, 2)
COMPACT_FILTERS = (32, 64, 128)
STEM_FILTERS = 32
# Stride 8 keeps a 16x16 map at 128 px: ResNet-34's stride 32 gives 4x4,
# too coarse to box lesions with.
FEATURE_STRIDE = 8


def compact_trunk(inputs):
    """Applies the compact trunk's layers to a symbolic tensor.

    Layout: a 3x3/2 stem conv (32 filters) and a 3x3/2 max pool, then basic
    blocks (ResNet-34's block: two 3x3 convs, BatchNorm + ReLU, identity or
    1x1 projection shortcut) in three stages of 2 blocks with 32, 64, 128
    filters; only stage 2 halves the resolution, so the output stride is 8. Layers are built
    into the caller's graph (no nested model).

    Args:
      inputs: a symbolic `(B, H, W, C)` tensor, channels-last.

    Returns:
      The `(B, H/8, W/8, 128)` feature map tensor (H, W multiples of 8).
    """
    x = resnet._conv_bn(inputs, STEM_FILTERS, 3, 2, name="cstem")
    # Pooling early keeps the costly full-width convs off the 1/2 grid.
    x = keras.layers.ZeroPadding2D(1, name="cpool_pad")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, name="cpool")(x)
    for stage, (blocks, filters) in enumerate(
        zip(COMPACT_STAGES, COMPACT_FILTERS), start=1
    ):
        for block in range(blocks):
            strides = 2 if (block == 0 and stage == 2) else 1
            x = resnet._basic_block(
                x, filters, strides, name=f"cstage{stage}_block{block + 1}"
            )
    return x


def Compact(input_shape=(None, None, 1), name="compact"):  # noqa: N802
    """Builds the compact trunk as a standalone model.

    Args:
      input_shape: `(height, width, channels)`; height and width may be None.
      name: name of the returned model.

    Returns:
      A functional `keras.Model` mapping `(B, H, W, C)` images to the
      stride-8 feature map `(B, H/8, W/8, 128)`.

    Raises:
      ValueError: `input_shape` is not a 3-tuple with a positive channel count.
    """
    if len(input_shape) != 3 or not input_shape[-1] or input_shape[-1] < 1:
        raise ValueError(
            "`input_shape` must be (height, width, channels) with channels >= 1. "
            f"Received: input_shape={input_shape!r}"
        )
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    return keras.Model(inputs, compact_trunk(inputs), name=name)
