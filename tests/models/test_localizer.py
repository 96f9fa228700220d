"""Tests for cxr_tf.models.localizer (build_model and its helpers)."""

import dataclasses
import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import special

from cxr_tf import layers as cxr_layers
from cxr_tf.models import BACKBONES
from cxr_tf.models import ModelConfig
from cxr_tf.models import build_model
from cxr_tf.models import gradcam_target_layer
from cxr_tf.models import map_kind_for
from cxr_tf.models import localizer

SIZE = 64
K = 14
FEATURES = {
    "resnet34": 512,
    "densenet121": 1024,
    "resnet50": 2048,
    "infomask": 128,  # The compact trunk's features, before the masks.
    "compact": 128,
}


def _images(seed=0, batch=2, channels=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch, SIZE, SIZE, channels)).astype("float32")


def _grid(backbone):
    return SIZE // {"infomask": 8, "compact": 8}.get(backbone, 32)


def _check_outputs(outputs, backbone, batch=2):
    assert set(outputs) == set(localizer.OUTPUT_KEYS)
    logits = np.asarray(outputs["logits"])
    probabilities = np.asarray(outputs["probabilities"])
    maps = np.asarray(outputs["localization_maps"])
    for value in (logits, probabilities, maps):
        assert value.dtype == np.float32
        assert np.all(np.isfinite(value))
    grid = _grid(backbone)
    assert logits.shape == (batch, K)
    assert maps.shape == (batch, grid, grid, K)
    np.testing.assert_allclose(probabilities, special.expit(logits), atol=1e-6)


def _save_load_same_outputs(model, tmp_path, images):
    path = tmp_path / f"{model.name}.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    before = model(images, training=False)
    after = loaded(images, training=False)
    assert isinstance(after, dict) and set(after) == set(before)
    for key in before:
        np.testing.assert_allclose(
            np.asarray(after[key]), np.asarray(before[key]), atol=1e-5, err_msg=key
        )
    assert gradcam_target_layer(loaded) == gradcam_target_layer(model)
    return loaded


@pytest.mark.parametrize(
    "backbone",
    [
        "resnet34",
        "infomask",
        "compact",
        pytest.param("densenet121", marks=pytest.mark.slow),
        pytest.param("resnet50", marks=pytest.mark.slow),
    ],
)
def test_build_run_save_load(backbone, tmp_path):
    config = ModelConfig(backbone=backbone, image_size=SIZE)
    model = build_model(config)
    assert model.input.shape == (None, SIZE, SIZE, 1)
    images = _images()
    _check_outputs(model(images, training=False), backbone)
    _save_load_same_outputs(model, tmp_path, images)


@pytest.mark.parametrize("backbone", ["densenet121", "resnet50"])
def test_application_backbones_build_and_run_on_grayscale(backbone):
    model = build_model(ModelConfig(backbone=backbone, pooling="lse", image_size=SIZE))
    _check_outputs(model(_images(), training=False), backbone)


@pytest.mark.parametrize("pooling", cxr_layers.POOLING_NAMES)
def test_every_pooling_builds_with_resnet34(pooling):
    config = ModelConfig(pooling=pooling, image_size=SIZE)
    model = build_model(config)
    outputs = model(_images(), training=False)
    _check_outputs(outputs, "resnet34")
    expected_kind = "probability" if pooling == "pcam" else "cam"
    assert map_kind_for(config) == expected_kind
    if expected_kind == "probability":
        maps = np.asarray(outputs["localization_maps"])
        assert maps.min() >= 0.0 and maps.max() <= 1.0


def test_pooling_options_reach_the_layer_and_survive_serialization():
    config = ModelConfig(pooling="lse", pooling_options={"gamma": 3.5}, image_size=SIZE)
    assert config.pooling_options == (("gamma", 3.5),)
    model = build_model(config)
    clone = keras.Model.from_config(model.get_config())
    for built in (model, clone):
        [pooling] = [
            layer for layer in built.layers if isinstance(layer, cxr_layers.LSEPooling)
        ]
        assert pooling.gamma == 3.5


@pytest.mark.parametrize("variant", ["infomask", "featuremask", "regl1"])
def test_infomask_maps_are_the_per_finding_masks(variant):
    config = ModelConfig(backbone="infomask", infomask_variant=variant, image_size=SIZE)
    model = build_model(config)
    assert map_kind_for(config) == "probability"
    images = _images(2)
    maps = np.asarray(model(images, training=False)["localization_maps"])
    mask_model = keras.Model(model.input, model.get_layer("infomask").output[1])
    masks = np.asarray(mask_model(images, training=False))
    # One mask per finding, on the trunk's stride-8 grid: the maps.
    assert masks.shape == (2, SIZE // 8, SIZE // 8, K)
    np.testing.assert_allclose(maps, masks, atol=1e-6)
    assert maps.min() >= 0.0 and maps.max() <= 1.0 - config.infomask_tau + 1e-6


def test_infomask_logit_reads_the_features_its_mask_keeps():
    model = build_model(ModelConfig(backbone="infomask", image_size=SIZE))
    probe = keras.Model(
        model.input,
        [
            model.get_layer("features").output,
            model.get_layer("infomask").output[1],
            model.output["logits"],
        ],
    )
    features, masks, logits = map(np.asarray, probe(_images(5), training=False))
    pooled = np.einsum("bhwk,bhwc->bkc", masks, features) / (
        masks.sum(axis=(1, 2))[..., None] + 1e-3
    )
    dense = model.get_layer("classifier_dense")
    kernel, bias = (np.asarray(w) for w in dense.weights)
    np.testing.assert_allclose(
        logits, (pooled * kernel).sum(-1) + bias, rtol=1e-4, atol=1e-5
    )


def test_infomask_regulariser_and_sampling_only_when_training():
    model = build_model(ModelConfig(backbone="infomask", image_size=SIZE))
    images = _images(3)
    first = np.asarray(model(images, training=False)["logits"])
    again = np.asarray(model(images, training=False)["logits"])
    np.testing.assert_array_equal(first, again)
    sampled = [np.asarray(model(images, training=True)["logits"]) for _ in range(2)]
    assert not np.allclose(sampled[0], sampled[1])
    assert len(model.losses) == 1
    assert np.isfinite(float(model.losses[0])) and float(model.losses[0]) >= 0.0


@pytest.mark.parametrize(
    "backbone",
    [
        "resnet34",
        "infomask",
        "compact",
        pytest.param("densenet121", marks=pytest.mark.slow),
        pytest.param("resnet50", marks=pytest.mark.slow),
    ],
)
def test_gradcam_target_layer_outputs_backbone_features(backbone):
    model = build_model(ModelConfig(backbone=backbone, image_size=SIZE))
    name = gradcam_target_layer(model)
    assert name == "features"
    grad_model = keras.Model(model.input, [model.get_layer(name).output, model.output])
    features, outputs = grad_model(_images(4), training=False)
    grid = _grid(backbone)
    assert tuple(features.shape) == (2, grid, grid, FEATURES[backbone])
    np.testing.assert_allclose(
        np.asarray(outputs["logits"]),
        np.asarray(model(_images(4), training=False)["logits"]),
        atol=1e-5,
    )


def test_gradcam_target_layer_rejects_foreign_model():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs), name="foreign")
    with pytest.raises(ValueError, match="'foreign'"):
        gradcam_target_layer(model)


@pytest.fixture
def mixed_precision():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    yield
    keras.config.set_dtype_policy(previous)


@pytest.mark.parametrize("backbone", ["resnet34", "infomask"])
def test_outputs_are_float32_under_mixed_precision(backbone, mixed_precision):
    model = build_model(ModelConfig(backbone=backbone, image_size=SIZE))
    assert model.get_layer(gradcam_target_layer(model)).compute_dtype == "float16"
    _check_outputs(model(_images(), training=False), backbone)


def test_three_channel_input():
    model = build_model(ModelConfig(image_size=SIZE, channels=3, pooling="avg"))
    assert model.input.shape == (None, SIZE, SIZE, 3)
    _check_outputs(model(_images(channels=3), training=False), "resnet34")


def test_config_round_trip_rebuilds_the_same_model():
    config = ModelConfig(
        backbone="resnet34",
        pooling="attention",
        num_classes=K,
        image_size=SIZE,
        pooling_options={"attention_dim": 16},
    )
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert ModelConfig.from_dict(json.loads(config.to_json())) == config
    rebuilt = build_model(ModelConfig.from_dict(config.to_dict()))
    original = build_model(config)
    assert rebuilt.count_params() == original.count_params()
    assert rebuilt.name == original.name == "resnet34_attention"
    assert {k: tuple(v.shape) for k, v in rebuilt.output.items()} == {
        k: tuple(v.shape) for k, v in original.output.items()
    }


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"pooling": "bogus_pool"}, "bogus_pool"),
        ({"image_size": 80}, "image_size=80"),
        ({"pooling": "lse", "pooling_options": {"gama": 2.0}}, "gama"),
        ({"pooling": "lse", "pooling_options": {"gamma": -1.0}}, "-1.0"),
        (
            {"backbone": "infomask", "infomask_variant": "bogus_variant"},
            "bogus_variant",
        ),
        ({"backbone": "infomask", "infomask_tau": 1.5}, "1.5"),
        ({"backbone": "infomask", "infomask_width": 0.0}, "infomask_width=0.0"),
        ({"backbone": "infomask", "infomask_width": 0.5}, "infomask_width=0.5"),
    ],
)
def test_invalid_configs_name_the_value(changes, message):
    # Some values are refused by ModelConfig itself, others by build_model.
    with pytest.raises(ValueError, match=message):
        build_model(dataclasses.replace(ModelConfig(image_size=SIZE), **changes))


def test_invalid_config_fields_name_the_value():
    with pytest.raises(ValueError, match="vgg16"):
        ModelConfig(backbone="vgg16")
    with pytest.raises(ValueError, match="unknown_field"):
        ModelConfig.from_dict({"unknown_field": 1})
    with pytest.raises(TypeError, match="backbone"):
        build_model({"backbone": "resnet34"})


def test_backbones_cover_the_config():
    assert set(FEATURES) == set(BACKBONES)


@pytest.mark.slow
@pytest.mark.parametrize("backbone", BACKBONES)
def test_xla_compiled_predict_matches_eager(backbone):
    model = build_model(ModelConfig(backbone=backbone, image_size=SIZE))
    model.compile(jit_compile=True)
    images = _images(5)
    compiled = model.predict_on_batch(images)
    eager = model(images, training=False)
    for key in localizer.OUTPUT_KEYS:
        np.testing.assert_allclose(
            np.asarray(compiled[key]), np.asarray(eager[key]), atol=1e-4, rtol=1e-4
        )


def _gradients(model, images, labels):
    with tf.GradientTape() as tape:
        logits = model(images, training=True)["logits"]
        loss = keras.ops.mean(
            keras.losses.binary_crossentropy(labels, logits, from_logits=True)
        )
        loss = loss + sum(model.losses)
    return tape.gradient(loss, model.trainable_variables)


@pytest.mark.parametrize(
    "backbone", ["infomask", pytest.param("resnet34", marks=pytest.mark.slow)]
)
def test_every_trainable_variable_gets_a_gradient(backbone):
    # For InfoMask this checks the mask parameters learn through the masked
    # image the classifier sees, not only through the KL term.
    model = build_model(ModelConfig(backbone=backbone, image_size=SIZE))
    rng = np.random.default_rng(6)
    labels = (rng.uniform(size=(2, K)) > 0.5).astype("float32")
    grads = _gradients(model, _images(6), labels)
    for variable, grad in zip(model.trainable_variables, grads):
        assert grad is not None, variable.path
        assert float(np.max(np.abs(np.asarray(grad)))) > 0.0, variable.path


@pytest.mark.slow
def test_fit_with_a_loss_on_the_logits_only():
    model = build_model(ModelConfig(image_size=SIZE))
    model.compile(
        optimizer="adam",
        loss={"logits": keras.losses.BinaryCrossentropy(from_logits=True)},
    )
    rng = np.random.default_rng(7)
    labels = (rng.uniform(size=(2, K)) > 0.5).astype("float32")
    history = model.fit(_images(7), {"logits": labels}, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
