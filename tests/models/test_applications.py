"""Tests for cxr_tf.models.applications."""

import h5py
import keras
import numpy as np
import pytest
from keras.src.legacy.saving import legacy_h5_format
from keras.src.utils import file_utils

from cxr_tf.data import schema
from cxr_tf.models import applications

GRAY = schema.IMAGENET_GRAY


def _gray_images(seed=0, shape=(2, 8, 8, 1)):
    raw = np.random.default_rng(seed).uniform(0, 255, size=shape).astype("float32")
    return raw, (raw - GRAY.mean) / GRAY.std


@pytest.mark.parametrize(
    "mode, reference",
    [
        ("torch", keras.applications.densenet.preprocess_input),
        ("caffe", keras.applications.resnet50.preprocess_input),
    ],
)
def test_imagenet_input_matches_keras_preprocessing(mode, reference):
    raw, normalised = _gray_images()
    layer = applications.ImageNetInput(mode, mean=GRAY.mean, std=GRAY.std)
    got = np.asarray(layer(normalised))
    expected = np.asarray(reference(np.concatenate([raw] * 3, axis=-1)))
    assert got.shape == (2, 8, 8, 3)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_imagenet_input_three_channels_keeps_colour_order():
    rng = np.random.default_rng(1)
    raw = rng.uniform(0, 255, size=(2, 4, 4, 3)).astype("float32")
    layer = applications.ImageNetInput("caffe", mean=GRAY.mean, std=GRAY.std)
    got = np.asarray(layer((raw - GRAY.mean) / GRAY.std))
    expected = np.asarray(keras.applications.resnet50.preprocess_input(raw.copy()))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-3)


def test_imagenet_input_config_round_trip():
    layer = applications.ImageNetInput("torch", mean=1.5, std=2.0, name="x")
    clone = applications.ImageNetInput.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    assert (clone.mode, clone.mean, clone.std) == ("torch", 1.5, 2.0)


def test_imagenet_input_invalid_arguments():
    with pytest.raises(ValueError, match="mode='tf'"):
        applications.ImageNetInput("tf", mean=0.0, std=1.0)
    with pytest.raises(ValueError, match="std=0"):
        applications.ImageNetInput("torch", mean=0.0, std=0)


@pytest.mark.parametrize(
    "backbone, channels", [("densenet121", 1024), ("resnet50", 2048)]
)
def test_grayscale_random_init_feature_map(backbone, channels):
    model = applications.build_application(backbone, (64, 64, 1), name="trunk")
    assert model.name == "trunk"
    assert model.input.shape == (None, 64, 64, 1)
    assert model.output.shape == (None, 2, 2, channels)
    out = np.asarray(model(np.zeros((2, 64, 64, 1), "float32")))
    assert out.shape == (2, 2, 2, channels) and np.all(np.isfinite(out))


def test_invalid_arguments_name_value():
    with pytest.raises(ValueError, match="backbone='vgg16'"):
        applications.build_application("vgg16", (64, 64, 1))
    with pytest.raises(ValueError, match="weights='places365'"):
        applications.build_application("resnet50", (64, 64, 1), weights="places365")
    with pytest.raises(ValueError, match=r"input_shape=\(64, 64, 2\)"):
        applications.build_application("resnet50", (64, 64, 2))


@pytest.mark.slow
@pytest.mark.parametrize(
    "backbone, preprocess",
    [
        ("densenet121", keras.applications.densenet.preprocess_input),
        ("resnet50", keras.applications.resnet50.preprocess_input),
    ],
)
def test_imagenet_path_loads_weights_and_maps_gray(
    backbone, preprocess, tmp_path, monkeypatch
):
    # Stand-in for the ImageNet download: a reference network with its own
    # random weights, saved in the legacy h5 layout keras.applications loads.
    constructor, _ = applications.APPLICATIONS[backbone]
    keras.utils.set_random_seed(3)
    reference = constructor(include_top=False, weights=None, input_shape=(64, 64, 3))
    path = tmp_path / f"{backbone}_notop.h5"
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, reference)
    requested = []

    def fake_get_file(fname=None, origin=None, **kwargs):
        requested.append(origin)
        return str(path)

    monkeypatch.setattr(file_utils, "get_file", fake_get_file)
    model = applications.build_application(backbone, (64, 64, 1), weights="imagenet")
    assert len(requested) == 1 and "notop" in requested[0]
    assert model.get_layer("imagenet_input") is not None
    assert model.input.shape == (None, 64, 64, 1)
    raw, normalised = _gray_images(seed=2, shape=(2, 64, 64, 1))
    got = np.asarray(model(normalised, training=False))
    expected = np.asarray(
        reference(preprocess(np.concatenate([raw] * 3, axis=-1)), training=False)
    )
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # Built into a caller's graph, the same weights load and the output stays
    # connected to the caller's input.
    inputs = keras.Input((64, 64, 1))
    inner = applications.build_application(
        backbone, (64, 64, 1), weights="imagenet", input_tensor=inputs
    )
    outer = keras.Model(inputs, keras.layers.Identity()(inner.output))
    got = np.asarray(outer(normalised, training=False))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
