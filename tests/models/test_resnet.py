"""Tests for cxr_tf.models.resnet."""

import numpy as np
import pytest

from cxr_tf.models import resnet

# torchvision.models.resnet34(): 21,797,672 parameters, of which the fc head
# (512 * 1000 + 1000) is 513,000.
TORCHVISION_RESNET34_NO_FC = 21_797_672 - 513_000
# The stem conv is 7 x 7 x C x 64: two channels fewer remove 2 * 49 * 64.
STEM_PER_CHANNEL = 7 * 7 * 64


def _count(weights):
    return sum(int(np.prod(w.shape)) for w in weights)


@pytest.mark.parametrize("channels", [3, 1])
def test_parameter_count_matches_torchvision(channels):
    model = resnet.ResNet34((64, 64, channels))
    expected = TORCHVISION_RESNET34_NO_FC - (3 - channels) * STEM_PER_CHANNEL
    assert _count(model.trainable_weights) == expected
    # BatchNorm moving mean and variance: two per channel of every BN layer,
    # i.e. as many as the BN scales and offsets.
    bn_trainable = sum(
        _count(layer.trainable_weights)
        for layer in model.layers
        if layer.__class__.__name__ == "BatchNormalization"
    )
    assert _count(model.non_trainable_weights) == bn_trainable


def test_feature_map_is_stride_32_with_512_channels():
    model = resnet.ResNet34((64, 64, 1))
    assert model.output.shape == (None, 2, 2, 512)
    images = np.random.default_rng(0).normal(size=(2, 64, 64, 1)).astype("float32")
    features = np.asarray(model(images, training=False))
    assert features.shape == (2, 2, 2, 512)
    assert np.all(features >= 0.0)  # block outputs are ReLUs
    assert np.all(np.isfinite(features))


def test_dynamic_input_size():
    model = resnet.ResNet34((None, None, 1))
    images = np.zeros((1, 96, 64, 1), "float32")
    assert tuple(model(images).shape) == (1, 3, 2, 512)


def test_invalid_input_shape_names_value():
    with pytest.raises(ValueError, match=r"input_shape=\(64, 64\)"):
        resnet.ResNet34((64, 64))
