"""Tests for cxr_tf.models.infomask_net."""

import numpy as np
import pytest

from cxr_tf.models import infomask_net


def _conv_params(layout, channels):
    total = 0
    for entry in layout:
        if entry != "pool":
            total += 3 * 3 * channels * entry + entry
            channels = entry
    return total


def _norm_params(layout, channels, per_channel):
    # Conv without bias, then a norm: group norm has gamma and beta per
    # channel, batch norm also a moving mean and variance.
    total = 0
    for entry in layout:
        if entry != "pool":
            total += 3 * 3 * channels * entry + per_channel * entry
            channels = entry
    return total


def test_encoder_shape_and_parameters():
    model = infomask_net.InfoMaskEncoder((64, 64, 1), normalization="none")
    assert model.output.shape == (None, 16, 16, 16)
    # conv(64) conv(64) pool conv(128) conv(128) pool conv(256) conv(16).
    assert model.count_params() == _conv_params((64, 64, 128, 128, 256, 16), 1)
    assert model.count_params() == 591_056
    features = np.asarray(model(np.ones((2, 64, 64, 1), "float32")))
    assert np.all(features >= 0.0)


@pytest.mark.parametrize("normalization, per_channel", [("group", 2), ("batch", 4)])
def test_normalised_encoder_shape_and_parameters(normalization, per_channel):
    model = infomask_net.InfoMaskEncoder((64, 64, 1), normalization=normalization)
    assert model.output.shape == (None, 16, 16, 16)
    layout = (64, 64, 128, 128, 256, 16)
    assert model.count_params() == _norm_params(layout, 1, per_channel)
    names = [layer.name for layer in model.layers]
    assert names[1:4] == ["encoder_conv1", "encoder_norm1", "encoder_relu1"]
    rng = np.random.default_rng(0)
    features = np.asarray(model(rng.normal(size=(2, 64, 64, 1)), training=True))
    assert np.all(features >= 0.0)
    # Normalised before each ReLU: the features do not shrink with depth
    # (the paper's bare stack: RMS 0.158 -> 0.024, issue 13).
    assert 0.3 < np.sqrt(np.mean(features**2)) < 1.5


def test_default_is_the_stable_recipe_and_unknown_normalization_is_named():
    assert infomask_net.STABLE.normalization == "group"
    with pytest.raises(ValueError, match="normalization='layer'"):
        infomask_net.InfoMaskEncoder((64, 64, 1), normalization="layer")


def test_classifier_shape_and_parameters():
    model = infomask_net.InfoMaskClassifier((64, 64, 1), normalization="none")
    assert model.output.shape == (None, 16, 16, 64)
    assert model.count_params() == _conv_params((128, 64, 64), 1)
    # The paper: about 700,000 parameters in all; encoder + classifier convs
    # are 703,056 before the mask and output layers.
    encoder = infomask_net.InfoMaskEncoder((64, 64, 1), normalization="none")
    assert 650_000 < model.count_params() + encoder.count_params() < 750_000
    stable = infomask_net.InfoMaskClassifier((64, 64, 1))
    assert stable.count_params() == _norm_params((128, 64, 64), 1, 2)


@pytest.mark.parametrize(
    "builder", [infomask_net.InfoMaskEncoder, infomask_net.InfoMaskClassifier]
)
def test_invalid_input_shape_names_value(builder):
    with pytest.raises(ValueError, match=r"input_shape=\(64, 64, 0\)"):
        builder((64, 64, 0))


def test_scaled_filters_keep_the_papers_counts_at_width_one_and_whole_groups():
    assert [infomask_net.scaled_filters(f) for f in (16, 64, 256)] == [16, 64, 256]
    assert [infomask_net.scaled_filters(f, 0.25) for f in (16, 64, 128, 256)] == [
        8,
        16,
        32,
        64,
    ]


def test_width_scales_every_conv_of_the_model():
    import keras

    from cxr_tf.models import ModelConfig, build_model

    from cxr_tf.models import infomask_net
    from cxr_tf.models.localizer import build_infomask_model

    config = ModelConfig(backbone="infomask", image_size=32, infomask_width=0.25)
    model = build_infomask_model(config, infomask_net.STABLE)
    convs = {
        layer.name: layer.filters
        for layer in model.layers
        if isinstance(layer, keras.layers.Conv2D) and layer.name.startswith(
            ("encoder", "classifier")
        )
    }
    assert convs["encoder_conv1"] == 16 and convs["encoder_conv6"] == 8, convs
    assert convs["classifier_conv1"] == 32 and convs["classifier_conv3"] == 16, convs
    out = model(np.zeros((1, 32, 32, 1), np.float32))
    assert out["localization_maps"].shape == (1, 8, 8, config.num_classes)
