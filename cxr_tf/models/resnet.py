"""ResNet-34 (He et al. 2016) as a Keras 3 functional feature extractor."""

import keras

# torchvision's BatchNorm defaults (eps 1e-5, running-average momentum 0.1),
# so the block matches the ResNet-34 the PCAM paper trained.
_BN_EPSILON = 1e-5
_BN_MOMENTUM = 0.9

RESNET34_STAGES = (3, 4, 6, 3)
RESNET34_FILTERS = (64, 128, 256, 512)
FEATURE_STRIDE = 32


def _conv_bn(x, filters, kernel_size, strides, name, activation=True):
    """Conv (no bias: BatchNorm carries the offset) + BatchNorm (+ ReLU)."""
    if kernel_size > 1:
        # Explicit symmetric padding as in torchvision: "same" padding pads
        # the bottom/right more than the top/left for strided convs.
        x = keras.layers.ZeroPadding2D(kernel_size // 2, name=f"{name}_pad")(x)
    x = keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding="valid",
        use_bias=False,
        kernel_initializer="he_normal",
        name=f"{name}_conv",
    )(x)
    x = keras.layers.BatchNormalization(
        epsilon=_BN_EPSILON, momentum=_BN_MOMENTUM, name=f"{name}_bn"
    )(x)
    if activation:
        x = keras.layers.ReLU(name=f"{name}_relu")(x)
    return x


def _basic_block(x, filters, strides, name):
    """Two 3x3 convs with an identity (or 1x1 projection) shortcut."""
    if strides != 1 or x.shape[-1] != filters:
        shortcut = _conv_bn(x, filters, 1, strides, name=f"{name}_0", activation=False)
    else:
        shortcut = x
    y = _conv_bn(x, filters, 3, strides, name=f"{name}_1")
    y = _conv_bn(y, filters, 3, 1, name=f"{name}_2", activation=False)
    y = keras.layers.Add(name=f"{name}_add")([shortcut, y])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def ResNet34(input_shape=(None, None, 1), name="resnet34"):  # noqa: N802
    """Builds the ResNet-34 trunk without its ImageNet head.

    Layout of torchvision's `resnet34`: a 7x7/2 stem conv, a 3x3/2 max pool,
    then basic blocks [3, 4, 6, 3] with 64, 128, 256, 512 filters; stages 2-4
    halve the resolution in their first block. 21,284,672 trainable
    parameters for 3-channel input (torchvision's 21,797,672 minus the
    513,000 of the fc head); 6,272 fewer for one channel.

    Args:
      input_shape: `(height, width, channels)`, channels-last; height and
        width may be None. Give static sizes for XLA.
      name: name of the returned model.

    Returns:
      A functional `keras.Model` mapping images `(B, H, W, C)` to the stride-32
      feature map `(B, ceil(H/32), ceil(W/32), 512)` (exactly H/32 when H is a
      multiple of 32).

    Raises:
      ValueError: `input_shape` is not a 3-tuple with a positive channel count.
    """
    if len(input_shape) != 3 or not input_shape[-1] or input_shape[-1] < 1:
        raise ValueError(
            "`input_shape` must be (height, width, channels) with channels >= 1. "
            f"Received: input_shape={input_shape!r}"
        )
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    return keras.Model(inputs, resnet34_trunk(inputs), name=name)


def resnet34_trunk(inputs):
    """Applies the ResNet-34 layers of `ResNet34` to a symbolic tensor.

    Builds the layers into the caller's graph (no nested model), so that
    `model.get_layer(...)` reaches every ResNet layer of the caller's model.

    Args:
      inputs: a symbolic `(B, H, W, C)` tensor.

    Returns:
      The `(B, H/32, W/32, 512)` feature map tensor.
    """
    x = _conv_bn(inputs, 64, 7, 2, name="stem")
    # Zero padding before the pool equals torchvision's -inf padding because
    # the input is post-ReLU (non-negative).
    x = keras.layers.ZeroPadding2D(1, name="pool_pad")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, name="pool")(x)
    for stage, (blocks, filters) in enumerate(
        zip(RESNET34_STAGES, RESNET34_FILTERS), start=2
    ):
        for block in range(blocks):
            strides = 2 if (block == 0 and stage > 2) else 1
            x = _basic_block(x, filters, strides, name=f"conv{stage}_block{block + 1}")
    return x
