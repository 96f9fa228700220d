"""Tests of every pooling head: NumPy references, save/load, config, errors."""

import numpy as np
import pytest

import keras

from cxr_tf import layers
from cxr_tf.layers import _cam_head

B, H, W, C, K = 2, 3, 4, 5, 3


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _softmax_hw(x):
    """softmax over axes 1, 2 of (B, H, W, D)."""
    e = np.exp(x - x.max(axis=(1, 2), keepdims=True))
    return e / e.sum(axis=(1, 2), keepdims=True)


def _fc(pooled, kernel, bias):
    return pooled @ kernel + bias


def _per_class_pool(weights, x, kernel, bias):
    """Literal: x_k = sum_ij a_ijk X_ij (a C-vector per class), then w_k.x_k+b_k."""
    logits = np.zeros((x.shape[0], kernel.shape[1]))
    for k in range(kernel.shape[1]):
        pooled = np.einsum("bhw,bhwc->bc", weights[..., k], x)
        logits[:, k] = pooled @ kernel[:, k] + bias[k]
    return logits


def reference(name, layer, x):
    """NumPy (float64) logits of pooling `name`, written from the formulas."""
    kernel = np.asarray(layer.kernel, np.float64)
    bias = np.asarray(layer.bias, np.float64)
    s = x @ kernel + bias
    if name == "pcam":
        p = _sigmoid(s)
        return _per_class_pool(p / p.sum(axis=(1, 2), keepdims=True), x, kernel, bias)
    if name == "avg":
        return _fc(x.mean(axis=(1, 2)), kernel, bias)
    if name == "max":
        return _fc(x.max(axis=(1, 2)), kernel, bias)
    if name == "linear":
        w = x / x.sum(axis=(1, 2), keepdims=True)
        return _fc((w * x).sum(axis=(1, 2)), kernel, bias)
    if name == "exp":
        w = np.exp(x) / np.exp(x).sum(axis=(1, 2), keepdims=True)
        return _fc((w * x).sum(axis=(1, 2)), kernel, bias)
    if name == "lse":
        g = layer.gamma
        return _fc(np.log(np.exp(g * x).mean(axis=(1, 2))) / g, kernel, bias)
    if name == "lse_lba":
        r = layer.gamma0 + np.exp(np.asarray(layer.beta, np.float64))
        return np.log(np.exp(r * s).mean(axis=(1, 2))) / r
    if name == "attention":
        v = np.asarray(layer.attention_v, np.float64)
        u = np.asarray(layer.attention_u, np.float64)
        scores = np.tanh(x @ v) @ u
        a = np.exp(scores) / np.exp(scores).sum(axis=(1, 2), keepdims=True)
        return _per_class_pool(a, x, kernel, bias)
    raise AssertionError(name)


def _features(name, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, H, W, C))
    # Linear pooling is defined for the non-negative (post-ReLU) features.
    return np.abs(x) if name == "linear" else x


def _built(name, **options):
    layer = layers.get_pooling(name, K, **options)
    layer.build((None, H, W, C))
    rng = np.random.default_rng(1)
    for weight in layer.weights:
        weight.assign(rng.normal(size=weight.shape).astype("float32"))
    return layer


def test_pooling_names_match_contract():
    assert layers.POOLING_NAMES == (
        "pcam",
        "avg",
        "max",
        "linear",
        "exp",
        "lse",
        "lse_lba",
        "attention",
    )


@pytest.mark.parametrize("name", layers.POOLING_NAMES)
def test_matches_numpy_reference(name):
    layer = _built(name)
    x = _features(name)
    logits, maps = layer(x.astype("float32"))
    np.testing.assert_allclose(logits, reference(name, layer, x), atol=1e-5, rtol=1e-5)
    s = x @ np.asarray(layer.kernel, np.float64) + np.asarray(layer.bias, np.float64)
    expected_map = _sigmoid(s) if name == "pcam" else s
    np.testing.assert_allclose(maps, expected_map, atol=1e-5, rtol=1e-5)
    assert logits.shape == (B, K) and maps.shape == (B, H, W, K)
    assert layer.map_kind == ("probability" if name == "pcam" else "cam")


@pytest.mark.parametrize(
    "name, options",
    [("lse", {"gamma": 0.5}), ("lse", {"gamma": 3.0}), ("lse_lba", {"gamma0": 0.5})],
)
def test_lse_options_reach_the_formula(name, options):
    layer = _built(name, **options)
    x = _features(name, seed=3)
    logits, _ = layer(x.astype("float32"))
    np.testing.assert_allclose(logits, reference(name, layer, x), atol=1e-5, rtol=1e-5)


def test_lse_tends_to_avg_and_max():
    x = _features("lse", seed=4).astype("float32")
    kernel = np.random.default_rng(5).normal(size=(C, K)).astype("float32")
    outputs = {}
    for name, options in [
        ("avg", {}),
        ("max", {}),
        ("lse_small", {"gamma": 1e-2}),
        ("lse_big", {"gamma": 1e4}),
    ]:
        layer = layers.get_pooling(name.split("_")[0], K, **options)
        layer.build(x.shape)
        layer.kernel.assign(kernel)
        outputs[name] = np.asarray(layer(x)[0])
    np.testing.assert_allclose(outputs["lse_small"], outputs["avg"], atol=2e-2)
    np.testing.assert_allclose(outputs["lse_big"], outputs["max"], atol=1e-3)


@pytest.mark.parametrize("name", ["exp", "lse", "lse_lba", "attention", "pcam"])
def test_finite_for_huge_features(name):
    layer = _built(name)
    x = (_features(name) * 1e4).astype("float32")
    logits, maps = layer(x)
    assert np.all(np.isfinite(logits)) and np.all(np.isfinite(maps))


def test_linear_pooling_all_zero_channel_is_zero():
    layer = _built("linear")
    logits, _ = layer(np.zeros((B, H, W, C), "float32"))
    np.testing.assert_allclose(logits, np.broadcast_to(layer.bias, (B, K)), atol=1e-6)


def _model_with(layer):
    inputs = keras.Input((H, W, C))
    logits, maps = layer(inputs)
    return keras.Model(inputs, {"logits": logits, "maps": maps})


@pytest.mark.parametrize("name", layers.POOLING_NAMES)
def test_save_and_load_keras_file(name, tmp_path):
    model = _model_with(_built(name))
    for weight in model.weights:
        # Weights away from their initial values prove they were saved.
        weight.assign(weight + 0.25)
    x = _features(name).astype("float32")
    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    before, after = model(x), loaded(x)
    for key in ("logits", "maps"):
        np.testing.assert_allclose(after[key], before[key], atol=1e-6)
    assert type(loaded.layers[-1]) is type(model.layers[-1])


@pytest.mark.parametrize("name", layers.POOLING_NAMES)
def test_config_round_trip(name):
    options = {
        "lse": {"gamma": 2.5},
        "lse_lba": {"gamma0": 1.5},
        "linear": {"epsilon": 1e-4},
        "attention": {"attention_dim": 7},
    }.get(name, {})
    layer = layers.get_pooling(name, 4, name="head", **options)
    config = layer.get_config()
    clone = type(layer).from_config(config)
    assert clone.get_config() == config
    assert config["num_classes"] == 4
    for key, value in options.items():
        assert config[key] == value
    revived = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(layer)
    )
    assert type(revived) is type(layer) and revived.get_config() == config


@pytest.mark.parametrize("name", layers.POOLING_NAMES)
def test_mixed_precision_is_finite(name):
    layer = layers.get_pooling(name, K, dtype="mixed_float16")
    x = _features(name, seed=7).astype("float32") * 30.0
    logits, maps = layer(x)
    assert layer.compute_dtype == "float16" and layer.kernel.dtype == "float32"
    assert np.all(np.isfinite(np.asarray(logits, np.float32)))
    assert np.all(np.isfinite(np.asarray(maps, np.float32)))
    full = type(layer).from_config({**layer.get_config(), "dtype": "float32"})
    full.build(x.shape)
    full.set_weights(layer.get_weights())
    np.testing.assert_allclose(
        np.asarray(logits, np.float32), full(x)[0], rtol=2e-2, atol=0.5
    )


@pytest.mark.parametrize("name", layers.POOLING_NAMES)
def test_compute_output_shape_matches_call(name):
    layer = layers.get_pooling(name, K)
    logits, maps = layer(np.ones((B, H, W, C), "float32"))
    assert layer.compute_output_shape((B, H, W, C)) == (
        tuple(logits.shape),
        tuple(maps.shape),
    )


@pytest.mark.parametrize("name", layers.POOLING_NAMES)
@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "14", None])
def test_bad_num_classes_is_named(name, bad):
    with pytest.raises(ValueError, match=f"num_classes={bad!r}"):
        layers.get_pooling(name, bad)


@pytest.mark.parametrize(
    "name, option, bad",
    [
        ("lse", "gamma", 0.0),
        ("lse", "gamma", -1.0),
        ("lse", "gamma", float("inf")),
        ("lse_lba", "gamma0", 0),
        ("lse_lba", "gamma0", "5"),
        ("linear", "epsilon", -1e-3),
        ("attention", "attention_dim", 0),
        ("attention", "attention_dim", 2.0),
    ],
)
def test_bad_option_values_are_named(name, option, bad):
    with pytest.raises(ValueError, match=f"{option}={bad!r}"):
        layers.get_pooling(name, K, **{option: bad})


def test_unknown_pooling_name_is_named():
    with pytest.raises(ValueError, match="name='gap'"):
        layers.get_pooling("gap", K)
    with pytest.raises(ValueError, match="name='gap'"):
        layers.pooling_options("gap")


def test_unknown_option_is_named():
    with pytest.raises(ValueError, match="'gama'"):
        layers.get_pooling("lse", K, gama=2.0)
    # gamma belongs to lse, not to pcam.
    with pytest.raises(ValueError, match="'gamma'.*pooling 'pcam'"):
        layers.get_pooling("pcam", K, gamma=2.0)


def test_features_without_channels_are_rejected():
    layer = layers.get_pooling("avg", K)
    with pytest.raises(ValueError, match="channel"):
        layer.build((None, H, W, None))


def test_spatial_softmax_weights_sum_to_one():
    scores = np.array([[[[1e4, -1e4]], [[-1e4, -1e4]]]], "float32")
    weights = np.asarray(_cam_head.spatial_softmax_weights(scores))
    np.testing.assert_allclose(weights.sum(axis=(1, 2)), 1.0, atol=1e-6)
    np.testing.assert_allclose(weights[0, :, 0, 1], [0.5, 0.5], atol=1e-6)


@pytest.fixture
def mixed_float16_policy():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def test_global_mixed_precision_policy_trains_finite(mixed_float16_policy):
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    outputs = [
        layers.get_pooling(name, K, name=name)(h) for name in layers.POOLING_NAMES
    ]
    logits = [keras.layers.Activation("linear", dtype="float32")(o[0]) for o in outputs]
    model = keras.Model(inputs, logits)
    assert all(layer.compute_dtype == "float16" for layer in model.layers[2:10])
    model.compile(optimizer="adam", loss=["mse"] * len(logits))
    x = np.random.default_rng(8).normal(size=(4, 8, 8, 1)).astype("float32") * 100
    history = model.fit(x, [np.ones((4, K), "float32")] * len(logits), verbose=0)
    assert np.isfinite(history.history["loss"][0])
