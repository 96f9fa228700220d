"""The compact trunk of the CPU demo: the `resnet.COMPACT` preset (stride 8)."""


from cxr_tf.models import resnet

COMPACT_STAGES = resnet.COMPACT.stage_blocks
COMPACT_FILTERS = resnet.COMPACT.stage_filters
STEM_FILTERS = resnet.COMPACT.stem_filters
FEATURE_STRIDE = resnet.COMPACT.feature_stride


def compact_trunk(inputs):
    """`resnet.resnet_trunk(inputs, resnet.COMPACT)`.

    Layout: a 3x3/2 stem conv (32 filters) and a 3x3/2 max pool, then basic
    blocks in three stages of 2 blocks with 32, 64, 128 filters; only stage 2
    halves the resolution, so the output stride is 8.

    Args:
      inputs: a symbolic `(B, H, W, C)` tensor, channels-last.

    Returns:
      The `(B, H/8, W/8, 128)` feature map tensor (H, W multiples of 8).
    """
    return resnet.resnet_trunk(inputs, resnet.COMPACT)


def trunk_features(inputs, config):  # pylint: disable=unused-argument
    """The "compact" entry of `cxr_tf.choices.BACKBONE_REGISTRY`."""
    return compact_trunk(inputs)


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
    return resnet.standalone(resnet.COMPACT, input_shape, name)
