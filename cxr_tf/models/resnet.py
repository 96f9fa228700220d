"""One parametric ResNet trunk (He et al. 2016) and its presets: ResNet-34, compact.

`resnet_trunk(inputs, preset)` builds a stem conv, a 3x3/2 max pool and
stages of basic blocks (two 3x3 convs with BatchNorm + ReLU, identity or 1x1
projection shortcut) from a `ResNetPreset`. `RESNET34` is torchvision's
resnet34 without its head (the PCAM paper's backbone); `COMPACT` is the
stride-8 trunk of the CPU demo (not from a paper).
"""

import dataclasses
import math

import keras

# torchvision's BatchNorm defaults (eps 1e-5, running-average momentum 0.1),
# so the block matches the ResNet-34 the PCAM paper trained.
_BN_EPSILON = 1e-5
_BN_MOMENTUM = 0.9


@dataclasses.dataclass(frozen=True)
class ResNetPreset:
    """The layout of a ResNet trunk.

    Attributes:
      stem_filters: filters of the stem conv.
      stem_kernel: its kernel side (stride 2).
      stage_blocks: basic blocks per stage.
      stage_filters: filters per stage.
      stage_strides: stride of each stage's first block.
      stem_name: layer-name prefix of the stem conv.
      pool_name: layer-name prefix of the max pool.
      block_name: layer-name format of a block, with {stage} and {block}.
      first_stage: the number of the first stage in the block names.
    """

    stem_filters: int
    stem_kernel: int
    stage_blocks: tuple
    stage_filters: tuple
    stage_strides: tuple
    stem_name: str
    pool_name: str
    block_name: str
    first_stage: int

    @property
    def feature_stride(self):
        """Input pixels per feature-map pixel: 4 (stem, pool) x the stages'."""
        return 4 * math.prod(self.stage_strides)

    @property
    def channels(self):
        return self.stage_filters[-1]


RESNET34 = ResNetPreset(
    stem_filters=64,
    stem_kernel=7,
    stage_blocks=(3, 4, 6, 3),
    stage_filters=(64, 128, 256, 512),
    stage_strides=(1, 2, 2, 2),
    stem_name="stem",
    pool_name="pool",
    block_name="conv{stage}_block{block}",
    first_stage=2,
)
# Widths and depth chosen for the 2-core demo budget: a few hundred thousand
# parameters train in minutes on CPU. Stride 8 keeps a 16x16 map at 128 px
# (ResNet-34's stride 32 gives 4x4, too coarse to box lesions with); the 3x3
# stem and early pooling keep the costly full-width convs off the 1/2 grid.
COMPACT = ResNetPreset(
    stem_filters=32,
    stem_kernel=3,
    stage_blocks=(2, 2, 2),
    stage_filters=(32, 64, 128),
    stage_strides=(1, 2, 1),
    stem_name="cstem",
    pool_name="cpool",
    block_name="cstage{stage}_block{block}",
    first_stage=1,
)
RESNET34_STAGES = RESNET34.stage_blocks
RESNET34_FILTERS = RESNET34.stage_filters
FEATURE_STRIDE = RESNET34.feature_stride


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
    return standalone(RESNET34, input_shape, name)


def standalone(preset, input_shape, name):
    """`resnet_trunk(inputs, preset)` as a `keras.Model` on its own input.

    Raises:
      ValueError: `input_shape` is not a 3-tuple with a positive channel count.
    """
    if len(input_shape) != 3 or not input_shape[-1] or input_shape[-1] < 1:
        raise ValueError(
            "`input_shape` must be (height, width, channels) with channels >= 1. "
            f"Received: input_shape={input_shape!r}"
        )
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    return keras.Model(inputs, resnet_trunk(inputs, preset), name=name)


def resnet_trunk(inputs, preset):
    """Applies the layers of a ResNet `preset` to a symbolic tensor.

    Builds the layers into the caller's graph (no nested model), so that
    `model.get_layer(...)` reaches every layer of the caller's model.

    Args:
      inputs: a symbolic `(B, H, W, C)` tensor, channels-last.
      preset: a `ResNetPreset`.

    Returns:
      The `(B, H/s, W/s, preset.channels)` feature map tensor, s =
      `preset.feature_stride` (H, W multiples of s).
    """
    x = _conv_bn(inputs, preset.stem_filters, preset.stem_kernel, 2, name=preset.stem_name)
    # Zero padding before the pool equals torchvision's -inf padding because
    # the input is post-ReLU (non-negative).
    x = keras.layers.ZeroPadding2D(1, name=f"{preset.pool_name}_pad")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, name=preset.pool_name)(x)
    for index, (blocks, filters, stride) in enumerate(
        zip(preset.stage_blocks, preset.stage_filters, preset.stage_strides)
    ):
        stage = preset.first_stage + index
        for block in range(blocks):
            x = _basic_block(
                x,
                filters,
                stride if block == 0 else 1,
                name=preset.block_name.format(stage=stage, block=block + 1),
            )
    return x


def resnet34_trunk(inputs):
    """`resnet_trunk(inputs, RESNET34)`: the `(B, H/32, W/32, 512)` features."""
    return resnet_trunk(inputs, RESNET34)


def trunk_features(inputs, config):  # pylint: disable=unused-argument
    """The "resnet34" entry of `cxr_tf.choices.BACKBONE_REGISTRY`."""
    return resnet34_trunk(inputs)
