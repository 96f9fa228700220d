"""PCAM pooling: eq. (1) literally, extreme logits, gradients, and a toy that learns."""

import numpy as np
import pytest
import tensorflow as tf

import keras

from cxr_tf.layers import PCAMPooling


def _literal_pcam(x, kernel, bias):
    """Eq. (1) as written, in float64: K pooled C-vectors through the same fc."""
    s = x @ kernel + bias
    p = 1.0 / (1.0 + np.exp(-s))
    weights = p / p.sum(axis=(1, 2), keepdims=True)
    logits = np.empty((x.shape[0], kernel.shape[1]))
    for k in range(kernel.shape[1]):
        pooled = np.einsum("bhw,bhwc->bc", weights[..., k], x)
        logits[:, k] = pooled @ kernel[:, k] + bias[k]
    return logits, p


def _stable_pcam(s):
    """sum_ij softmax_ij(log_sigmoid(s)) s_ij in float64, for extreme s."""
    log_p = -np.logaddexp(0.0, -s)
    log_w = log_p - log_p.max(axis=(1, 2), keepdims=True)
    weights = np.exp(log_w) / np.exp(log_w).sum(axis=(1, 2), keepdims=True)
    return (weights * s).sum(axis=(1, 2))


def _layer(channels, num_classes, seed=0, dtype=None):
    layer = PCAMPooling(num_classes, dtype=dtype)
    layer.build((None, None, None, channels))
    rng = np.random.default_rng(seed)
    layer.kernel.assign(rng.normal(size=(channels, num_classes)))
    layer.bias.assign(rng.normal(size=(num_classes,)))
    return layer


def test_linearity_identity_matches_literal_formula():
    layer = _layer(channels=6, num_classes=4)
    x = np.random.default_rng(1).normal(size=(3, 5, 7, 6))
    logits, maps = layer(x.astype("float32"))
    expected_logits, expected_p = _literal_pcam(
        x, np.asarray(layer.kernel, np.float64), np.asarray(layer.bias, np.float64)
    )
    np.testing.assert_allclose(logits, expected_logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(maps, expected_p, atol=1e-6)


def test_one_position_positive_dominates():
    # MIL behaviour: one confident instance makes the bag confident.
    layer = PCAMPooling(1)
    layer.build((None, 4, 4, 1))
    layer.kernel.assign([[1.0]])
    x = np.full((1, 4, 4, 1), -8.0, "float32")
    x[0, 2, 1, 0] = 8.0
    logits, maps = layer(x)
    assert float(logits[0, 0]) > 7.0
    assert np.unravel_index(np.argmax(maps[0, ..., 0]), (4, 4)) == (2, 1)


@pytest.mark.parametrize("scale", [1e4, -1e4, 1e30, -1e30])
def test_extreme_logits_are_finite_and_correct(scale):
    # C = 1, w = 1, b = 0, so s = X: logits of +-1e4 (and +-1e30) exactly.
    layer = PCAMPooling(2)
    layer.build((None, 3, 3, 1))
    layer.kernel.assign([[1.0, -1.0]])
    rng = np.random.default_rng(2)
    offsets = rng.uniform(-3.0, 3.0, size=(2, 3, 3, 1))
    x = (scale + offsets * abs(scale) * 1e-4).astype("float32")
    with tf.GradientTape() as tape:
        features = tf.constant(x)
        tape.watch(features)
        logits, maps = layer(features)
        total = tf.reduce_sum(logits)
    grads = tape.gradient(total, [features, layer.kernel])
    for value in [logits, maps, *grads]:
        assert np.all(np.isfinite(value)), value
    s = x.astype(np.float64) * np.array([1.0, -1.0])
    expected = _stable_pcam(s)
    np.testing.assert_allclose(logits, expected, rtol=1e-6)
    # Both signs in one class: the positives take all the weight.
    mixed = np.where(rng.random((2, 3, 3, 1)) < 0.5, -1e4, 1e4).astype("float32")
    mixed[:, 0, 0, 0] = 1e4
    logits, _ = layer(mixed)
    np.testing.assert_allclose(logits[:, 0], 1e4, rtol=1e-6)


def test_extreme_logits_mixed_precision_are_finite():
    layer = _layer(channels=3, num_classes=2, dtype="mixed_float16")
    layer.kernel.assign([[1.0, -1.0], [0.0, 0.0], [0.0, 0.0]])
    layer.bias.assign([0.0, 0.0])
    x = np.zeros((2, 4, 4, 3), "float32")
    x[..., 0] = np.random.default_rng(3).choice([-1e4, -5e3, 1e4], size=(2, 4, 4))
    logits, maps = layer(x)
    assert logits.dtype == "float16"
    assert np.all(np.isfinite(np.asarray(logits, np.float32)))
    expected = _stable_pcam(x[..., :1].astype(np.float64) * np.array([1.0, -1.0]))
    np.testing.assert_allclose(np.asarray(logits, np.float32), expected, rtol=1e-3)


def test_gradient_matches_central_differences():
    layer = _layer(channels=4, num_classes=3, seed=4, dtype="float64")
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 3, 3, 4))
    direction = rng.normal(size=(2, 3))

    def objective(features):
        return float(np.sum(np.asarray(layer(features)[0]) * direction))

    features = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(features)
        value = tf.reduce_sum(layer(features)[0] * direction)
    grad_x, grad_kernel, grad_bias = tape.gradient(
        value, [features, layer.kernel, layer.bias]
    )

    eps = 1e-6
    numeric = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[index] = eps
        numeric[index] = (objective(x + step) - objective(x - step)) / (2 * eps)
    np.testing.assert_allclose(grad_x, numeric, rtol=1e-6, atol=1e-8)

    kernel = np.asarray(layer.kernel)
    numeric = np.zeros_like(kernel)
    for index in np.ndindex(kernel.shape):
        for sign in (1, -1):
            changed = kernel.copy()
            changed[index] += sign * eps
            layer.kernel.assign(changed)
            numeric[index] += sign * objective(x) / (2 * eps)
    layer.kernel.assign(kernel)
    np.testing.assert_allclose(grad_kernel, numeric, rtol=1e-6, atol=1e-8)

    bias = np.asarray(layer.bias)
    numeric = np.zeros_like(bias)
    for index in np.ndindex(bias.shape):
        for sign in (1, -1):
            changed = bias.copy()
            changed[index] += sign * eps
            layer.bias.assign(changed)
            numeric[index] += sign * objective(x) / (2 * eps)
    layer.bias.assign(bias)
    np.testing.assert_allclose(grad_bias, numeric, rtol=1e-6, atol=1e-8)


IMAGE, SQUARE, STRIDE = 32, 6, 4


def _toy_images(count, rng):
    """Dark noisy images; half hold a bright SQUARE x SQUARE square."""
    images = rng.normal(0.0, 0.15, size=(count, IMAGE, IMAGE, 1))
    labels = (np.arange(count) % 2).astype("float32")
    corners = rng.integers(0, IMAGE - SQUARE + 1, size=(count, 2))
    for image, label, (y, x) in zip(images, labels, corners):
        if label:
            image[y : y + SQUARE, x : x + SQUARE] += 1.0
    return images.astype("float32"), labels[:, None], corners


def test_toy_training_localizes_the_square():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    train_x, train_y, _ = _toy_images(512, rng)
    test_x, test_y, test_corners = _toy_images(100, rng)

    inputs = keras.Input((IMAGE, IMAGE, 1))
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    h = keras.layers.MaxPooling2D(2)(h)
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(h)
    h = keras.layers.MaxPooling2D(2)(h)
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(h)
    logits, maps = PCAMPooling(1)(h)
    model = keras.Model(inputs, {"logits": logits, "maps": maps})
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss={"logits": keras.losses.BinaryCrossentropy(from_logits=True)},
    )
    model.fit(train_x, {"logits": train_y}, batch_size=32, epochs=6, verbose=0)

    out = model.predict(test_x, batch_size=100, verbose=0)
    accuracy = np.mean((out["logits"][:, 0] > 0) == (test_y[:, 0] > 0))
    assert accuracy >= 0.9, accuracy
    positives = np.flatnonzero(test_y[:, 0])
    hits, contrast = 0, []
    for i in positives:
        prob = out["maps"][i, ..., 0]
        cell = np.unravel_index(np.argmax(prob), prob.shape)
        y, x = test_corners[i]
        inside = np.zeros(prob.shape, bool)
        inside[
            y // STRIDE : (y + SQUARE - 1) // STRIDE + 1,
            x // STRIDE : (x + SQUARE - 1) // STRIDE + 1,
        ] = True
        hits += inside[cell]
        contrast.append(prob[inside].mean() - prob[~inside].mean())
    assert hits / len(positives) >= 0.8, hits / len(positives)
    # Not just a peak: the probability map is high on the square, low elsewhere.
    assert np.mean(contrast) >= 0.6, np.mean(contrast)
