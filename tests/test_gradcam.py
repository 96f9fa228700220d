"""Tests of cxr_tf.gradcam against a NumPy Grad-CAM of the backbone features."""

import numpy as np
import pytest
import tensorflow as tf

from cxr_tf.gradcam import GradCAM
from cxr_tf.models import ModelConfig
from cxr_tf.models import build_model


@pytest.fixture(scope="module")
def pcam_model():
    return build_model(ModelConfig(image_size=64, num_classes=3, pooling="lse"))


def _images(seed=0):
    return np.random.RandomState(seed).randn(2, 64, 64, 1).astype(np.float32)


def test_matches_numpy_reference(pcam_model):
    images = _images()
    maps, logits = GradCAM(pcam_model).maps_and_logits(images)
    # Reference: features from a sub-model up to the target layer, gradients
    # of the pooling head by a separate tape, then the Grad-CAM formula.
    import keras

    from cxr_tf import layers as cxr_layers
    from cxr_tf.models import gradcam_target_layer

    target = pcam_model.get_layer(gradcam_target_layer(pcam_model))
    features = tf.constant(keras.Model(pcam_model.inputs, target.output)(images))
    pooling_types = tuple(cxr_layers.POOLING_CLASSES.values())
    (head,) = [l for l in pcam_model.layers if isinstance(l, pooling_types)]
    expected = []
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(features)
        head_logits, _ = head(features)
        per_class = [head_logits[:, k] for k in range(3)]
    for k in range(3):
        grads = tape.gradient(per_class[k], features).numpy()
        weights = grads.mean(axis=(1, 2), keepdims=True)
        expected.append(np.maximum((weights * features.numpy()).sum(-1), 0.0))
    expected = np.stack(expected, axis=-1)
    assert maps.shape == (2, 2, 2, 3)
    np.testing.assert_allclose(maps, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        logits, pcam_model(images)["logits"].numpy(), rtol=1e-5, atol=1e-5
    )
    assert maps.max() > 0


@pytest.mark.slow
def test_loaded_model_gives_same_maps(pcam_model, tmp_path):
    import keras

    path = str(tmp_path / "m.keras")
    pcam_model.save(path)
    loaded = keras.saving.load_model(path, compile=False)
    images = _images(1)
    np.testing.assert_allclose(
        GradCAM(loaded)(images), GradCAM(pcam_model)(images), rtol=1e-4, atol=1e-5
    )


def test_infomask_model_maps():
    from cxr_tf.models import gradcam_target_layer

    model = build_model(ModelConfig(backbone="infomask", image_size=64, num_classes=2))
    cam = GradCAM(model)
    assert cam.target_layer == gradcam_target_layer(model)
    maps = cam(_images())
    assert maps.shape[0] == 2 and maps.shape[-1] == 2
    assert np.all(maps >= 0) and np.all(np.isfinite(maps))


def test_unknown_layer_is_named(pcam_model):
    with pytest.raises(ValueError, match="nope"):
        GradCAM(pcam_model, target_layer="nope")
