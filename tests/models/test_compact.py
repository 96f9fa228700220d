"""Tests for the compact demo backbone."""

import numpy as np
import pytest

from cxr_tf.data import schema
from cxr_tf.models import ModelConfig
from cxr_tf.models import build_model
from cxr_tf.models import compact
from cxr_tf.models import gradcam_target_layer


def test_compact_trunk_stride_and_width():
    model = compact.Compact((64, 64, 1))
    assert model.output.shape == (None, 64 // compact.FEATURE_STRIDE, 8, 128)


def test_compact_rejects_bad_input_shape():
    with pytest.raises(ValueError, match="input_shape"):
        compact.Compact((64, 64))


def test_compact_localizer_maps_and_normalization(tmp_path):
    config = ModelConfig(backbone="compact", pooling="pcam", image_size=64)
    assert config.normalization == schema.FIXED
    model = build_model(config)
    images = np.random.default_rng(0).normal(size=(2, 64, 64, 1)).astype("float32")
    out = model(images, training=False)
    assert tuple(out["localization_maps"].shape) == (2, 8, 8, 14)
    maps = np.asarray(out["localization_maps"])
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    assert gradcam_target_layer(model) == "features"
    assert model.get_layer("features").output.shape[1:3] == (8, 8)
    path = tmp_path / "m.keras"
    model.save(path)
    import keras

    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(
        np.asarray(loaded(images, training=False)["logits"]),
        np.asarray(out["logits"]),
        rtol=1e-5,
        atol=1e-5,
    )
