"""Losses: NumPy references, the batch balance of Wang et al., edge batches."""

import numpy as np
import pytest

import keras

from cxr_tf import losses


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def _batch(seed=0, shape=(4, 5)):
    rng = np.random.default_rng(seed)
    y = (rng.random(shape) < 0.3).astype("float32")
    logits = rng.normal(0.0, 3.0, size=shape).astype("float32")
    return y, logits


def _bce_elements(y, logits):
    x = logits.astype(np.float64)
    return -(y * _log_sigmoid(x) + (1 - y) * _log_sigmoid(-x))


def test_bce_matches_numpy_and_keras():
    y, logits = _batch()
    value = losses.get_loss("bce")(y, logits)
    np.testing.assert_allclose(value, _bce_elements(y, logits).mean(), rtol=1e-6)
    keras_value = keras.losses.BinaryCrossentropy(from_logits=True)(y, logits)
    np.testing.assert_allclose(value, keras_value, rtol=1e-5)


def _balanced_reference(y, logits, per_class):
    """Wang et al. 2017 W-CEL, divided by the number of labels."""
    x = logits.astype(np.float64)
    y = y.astype(np.float64)
    axis = 0 if per_class else None
    num_pos = y.sum(axis=axis)
    num_neg = (1 - y).sum(axis=axis)
    total = num_pos + num_neg
    with np.errstate(divide="ignore"):
        beta_p = np.where(num_pos > 0, total / num_pos, 0.0)
        beta_n = np.where(num_neg > 0, total / num_neg, 0.0)
    loss_p = (y * -np.log(1 / (1 + np.exp(-x)))) * beta_p
    loss_n = ((1 - y) * -np.log(1 - 1 / (1 + np.exp(-x)))) * beta_n
    return (loss_p.sum() + loss_n.sum()) / y.size


@pytest.mark.parametrize("per_class", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balanced_bce_matches_numpy(per_class, seed):
    y, logits = _batch(seed)
    if per_class:
        # Every column needs both kinds for the per-class betas to differ.
        y[0], y[1] = 1.0, 0.0
    loss = losses.get_loss("balanced_bce", per_class=per_class)
    np.testing.assert_allclose(
        loss(y, logits), _balanced_reference(y, logits, per_class), rtol=1e-5
    )


def test_balanced_bce_is_mean_positive_plus_mean_negative():
    y, logits = _batch(3)
    elements = _bce_elements(y, logits)
    expected = elements[y == 1].mean() + elements[y == 0].mean()
    np.testing.assert_allclose(losses.BalancedBinaryCrossentropy()(y, logits), expected)


@pytest.mark.parametrize("fill", [0.0, 1.0])
@pytest.mark.parametrize("per_class", [False, True])
def test_balanced_bce_one_sided_batch_is_finite(fill, per_class):
    y = np.full((3, 4), fill, "float32")
    logits = np.array([[1e4, -1e4, 0.5, -2.0]] * 3, "float32")
    value = float(losses.BalancedBinaryCrossentropy(per_class=per_class)(y, logits))
    assert np.isfinite(value)
    # Only one side exists: the loss is that side's plain mean.
    np.testing.assert_allclose(value, _bce_elements(y, logits).mean(), rtol=1e-5)


@pytest.mark.parametrize("name", losses.LOSS_NAMES)
def test_extreme_logits_are_finite_with_finite_gradient(name):
    import tensorflow as tf

    kwargs = {"class_weights": [1.0, 2.0]} if name == "weighted_bce" else {}
    loss = losses.get_loss(name, **kwargs)
    y = np.array([[1.0, 0.0], [0.0, 1.0]], "float32")
    logits = tf.Variable([[-1e4, 1e4], [1e30, -1e30]])
    with tf.GradientTape() as tape:
        value = loss(y, logits)
    grad = tape.gradient(value, logits)
    assert np.isfinite(float(value)) and np.all(np.isfinite(grad))


def test_balanced_bce_betas_get_no_gradient():
    import tensorflow as tf

    y, logits = _batch(4)
    variable = tf.Variable(logits)
    with tf.GradientTape() as tape:
        value = losses.BalancedBinaryCrossentropy()(y, variable)
    grad = tape.gradient(value, variable)
    num_pos, num_neg = y.sum(), (1 - y).sum()
    beta = np.where(y == 1, y.size / num_pos, y.size / num_neg)
    prob = 1 / (1 + np.exp(-logits.astype(np.float64)))
    expected = beta * (prob - y) / y.size
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-7)


def test_weighted_bce_matches_numpy():
    y, logits = _batch(5, shape=(3, 4))
    class_weights = [0.5, 1.0, 2.0, 4.0]
    positive_weights = [3.0, 1.0, 0.0, 2.0]
    x = logits.astype(np.float64)
    elements = -(
        np.array(positive_weights) * y * _log_sigmoid(x) + (1 - y) * _log_sigmoid(-x)
    )
    expected = (elements * np.array(class_weights)).mean()
    loss = losses.get_loss(
        "weighted_bce",
        class_weights=class_weights,
        positive_weights=positive_weights,
    )
    np.testing.assert_allclose(loss(y, logits), expected, rtol=1e-5)
    only_class = losses.WeightedBinaryCrossentropy(class_weights=class_weights)
    np.testing.assert_allclose(
        only_class(y, logits),
        (_bce_elements(y, logits) * np.array(class_weights)).mean(),
        rtol=1e-5,
    )


def test_sample_weights_scale_images():
    y, logits = _batch(6)
    sample_weight = np.array([1.0, 0.0, 2.0, 1.0], "float32")
    loss = losses.BinaryCrossentropyFromLogits()
    per_image = _bce_elements(y, logits).mean(axis=1)
    np.testing.assert_allclose(
        loss(y, logits, sample_weight=sample_weight),
        (per_image * sample_weight).sum() / len(per_image),
        rtol=1e-5,
    )


def test_float16_logits_are_computed_in_float32():
    y, logits = _batch(7)
    value = losses.BalancedBinaryCrossentropy()(y, logits.astype("float16"))
    assert value.dtype == "float32"
    expected = _balanced_reference(y, logits.astype("float16"), per_class=False)
    np.testing.assert_allclose(value, expected, rtol=1e-4)


@pytest.mark.parametrize(
    "loss",
    [
        losses.BinaryCrossentropyFromLogits(),
        losses.BalancedBinaryCrossentropy(per_class=True, name="wcel"),
        losses.WeightedBinaryCrossentropy(class_weights=[1.0, 2.0]),
        losses.InfoMaskLoss(),
    ],
)
def test_config_round_trip(loss):
    config = loss.get_config()
    clone = type(loss).from_config(config)
    assert clone.get_config() == config
    revived = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(loss)
    )
    assert type(revived) is type(loss) and revived.get_config() == config


def test_compiled_model_saves_with_the_loss(tmp_path):
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    model.compile(optimizer="sgd", loss=losses.get_loss("balanced_bce"))
    x = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
    y = np.tile([[1.0, 0.0]], (8, 1)).astype("float32")
    model.fit(x, y, epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.loss, losses.BalancedBinaryCrossentropy)
    np.testing.assert_allclose(
        loaded.evaluate(x, y, verbose=0), model.evaluate(x, y, verbose=0), rtol=1e-5
    )


def test_unknown_loss_name_is_named():
    with pytest.raises(ValueError, match="name='focal'"):
        losses.get_loss("focal")


@pytest.mark.parametrize(
    "kwargs, text",
    [
        ({}, "positive_weights=None"),
        ({"class_weights": [1.0, -1.0]}, r"class_weights=\[1.0, -1.0\]"),
        ({"class_weights": "ab"}, "class_weights='ab'"),
        ({"positive_weights": [float("nan")]}, r"positive_weights=\[nan\]"),
    ],
)
def test_bad_weights_are_named(kwargs, text):
    with pytest.raises(ValueError, match=text):
        losses.get_loss("weighted_bce", **kwargs)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="per_class=1"):
        losses.get_loss("balanced_bce", per_class=1)
    with pytest.raises(ValueError, match="gamma"):
        losses.get_loss("bce", gamma=2.0)
