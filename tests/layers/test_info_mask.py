"""InfoMask: NumPy reference, sampling only in training, variants, saving."""

import math

import numpy as np
import pytest

import keras

from cxr_tf.layers import InfoMask

B, h, w, C = 2, 4, 4, 3
H, W, CI = 16, 16, 2


def _resize_bilinear(x, height, width):
    """Half-pixel-centre bilinear resize of (B, h, w, D), as tf.image.resize."""

    def axis_weights(size_in, size_out):
        src = (np.arange(size_out) + 0.5) * size_in / size_out - 0.5
        low = np.floor(src)
        frac = src - low
        lo = np.clip(low, 0, size_in - 1).astype(int)
        hi = np.clip(low + 1, 0, size_in - 1).astype(int)
        matrix = np.zeros((size_out, size_in))
        matrix[np.arange(size_out), lo] += 1 - frac
        matrix[np.arange(size_out), hi] += frac
        return matrix

    rows = axis_weights(x.shape[1], height)
    cols = axis_weights(x.shape[2], width)
    return np.einsum("ih,bhwd,jw->bijd", rows, x, cols)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(B, h, w, C)).astype("float32")
    images = rng.normal(size=(B, H, W, CI)).astype("float32")
    return features, images


def _layer(variant="infomask", alpha=0.5, tau=0.2, seed=3, **kwargs):
    layer = InfoMask(variant=variant, alpha=alpha, tau=tau, seed=seed, **kwargs)
    layer.build([(None, h, w, C), (None, H, W, CI)])
    rng = np.random.default_rng(11)
    for weight in layer.weights:
        if weight.trainable:
            weight.assign(rng.normal(size=weight.shape).astype("float32"))
    return layer


def _reference(layer, features, images):
    """(masked, mask, mu, logvar) at inference, float64, from the paper's steps."""

    def value(weight):
        return np.asarray(weight, np.float64)

    a = np.maximum(
        features @ value(layer.attention_kernel) + value(layer.attention_bias), 0.0
    )
    a = _resize_bilinear(a, H, W)
    mu = a * value(layer.mu_kernel)[0, 0] + value(layer.mu_bias)[0]
    logvar = a * value(layer.logvar_kernel)[0, 0] + value(layer.logvar_bias)[0]
    mask = np.clip(_sigmoid(mu) - layer.tau, 0.0, 1.0)
    return images * mask, mask, mu, logvar


def test_inference_matches_numpy_reference_and_kl():
    layer = _layer()
    features, images = _inputs()
    masked, mask = layer([features, images], training=False)
    expected_masked, expected_mask, mu, logvar = _reference(layer, features, images)
    np.testing.assert_allclose(mask, expected_mask, atol=1e-5)
    np.testing.assert_allclose(masked, expected_masked, atol=1e-5)
    assert mask.shape == (B, H, W, 1) and masked.shape == (B, H, W, CI)
    kl = 0.5 * (mu**2 + np.exp(logvar) - 1.0 - logvar)
    (loss,) = layer.losses
    np.testing.assert_allclose(loss, 0.5 * kl.mean(), rtol=1e-5)
    assert np.all(mask >= 0) and np.all(mask <= 1 - layer.tau + 1e-7)


def test_training_samples_z_with_the_learned_mean_and_sigma():
    layer = InfoMask(alpha=0.5, tau=0.0, seed=1)
    layer.build([(None, h, w, C), (None, 32, 32, 1)])
    # A = ReLU(0 . X + 1) = 1 everywhere, so mu = 0.3 and sigma = 0.5 at every
    # pixel and logit(M) = z holds 2 x 32 x 32 draws of N(0.3, 0.5^2).
    layer.attention_kernel.assign(np.zeros((C, 1)))
    layer.attention_bias.assign([1.0])
    layer.mu_kernel.assign([[0.3]])
    layer.mu_bias.assign([0.0])
    layer.logvar_kernel.assign([[2.0 * math.log(0.5)]])
    layer.logvar_bias.assign([0.0])
    features = np.ones((B, h, w, C), "float32")
    images = np.ones((B, 32, 32, 1), "float32")
    _, mask = layer([features, images], training=True)
    m = np.asarray(mask, np.float64)
    z = np.log(m / (1.0 - m))
    assert abs(z.mean() - 0.3) < 0.05, z.mean()
    assert abs(z.std() - 0.5) < 0.05, z.std()
    _, mask_again = layer([features, images], training=True)
    assert not np.allclose(mask, mask_again)
    _, mask_eval = layer([features, images], training=False)
    np.testing.assert_allclose(mask_eval, _sigmoid(0.3), atol=1e-6)
    # KL of N(0.3, 0.25) to N(0, 1), identical at every pixel.
    kl = 0.5 * (0.09 + 0.25 - 1.0 - 2.0 * math.log(0.5))
    np.testing.assert_allclose(layer.losses[-1], 0.5 * kl, rtol=1e-5)


def test_same_seed_gives_same_training_masks():
    features, images = _inputs(1)
    first = _layer(seed=42)([features, images], training=True)[1]
    second = _layer(seed=42)([features, images], training=True)[1]
    np.testing.assert_allclose(first, second)


def test_featuremask_is_deterministic_and_has_no_loss():
    layer = _layer(variant="featuremask")
    features, images = _inputs(2)
    train_masked, train_mask = layer([features, images], training=True)
    eval_masked, eval_mask = layer([features, images], training=False)
    np.testing.assert_allclose(train_mask, eval_mask)
    np.testing.assert_allclose(train_masked, eval_masked)
    np.testing.assert_allclose(
        eval_mask, _reference(layer, features, images)[1], atol=1e-5
    )
    assert layer.losses == []


def test_regl1_adds_alpha_times_mean_mask():
    layer = _layer(variant="regl1", alpha=0.7)
    features, images = _inputs(3)
    _, mask = layer([features, images], training=True)
    (loss,) = layer.losses
    np.testing.assert_allclose(loss, 0.7 * np.abs(np.asarray(mask)).mean(), rtol=1e-5)
    _, mask = layer([features, images], training=False)
    np.testing.assert_allclose(mask, _reference(layer, features, images)[1], atol=1e-5)


def _model(layer):
    feats = keras.Input((h, w, C))
    imgs = keras.Input((H, W, CI))
    masked, mask = layer([feats, imgs])
    pooled = keras.layers.GlobalAveragePooling2D()(masked)
    logit = keras.layers.Dense(1)(pooled)
    return keras.Model([feats, imgs], {"logit": logit, "mask": mask})


@pytest.mark.parametrize("variant", ["infomask", "featuremask", "regl1"])
def test_save_and_load_keras_file(variant, tmp_path):
    model = _model(_layer(variant=variant))
    features, images = _inputs(4)
    path = tmp_path / f"{variant}.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    before = model([features, images], training=False)
    after = loaded([features, images], training=False)
    for key in ("logit", "mask"):
        np.testing.assert_allclose(after[key], before[key], atol=1e-6)
    restored = [layer for layer in loaded.layers if isinstance(layer, InfoMask)]
    assert restored[0].get_config() == model.layers[2].get_config()


def test_model_loss_includes_the_kl_term():
    keras.utils.set_random_seed(0)
    layer = _layer(alpha=0.5)
    model = _model(layer)
    model.compile(optimizer="sgd", loss={"logit": "mse"})
    features, images = _inputs(5)
    target = np.ones((B, 1), "float32")
    out = model([features, images], training=False)
    mse = float(np.mean((np.asarray(out["logit"]) - target) ** 2))
    kl_term = float(model.losses[0])
    assert kl_term > 0
    evaluated = model.evaluate([features, images], {"logit": target}, verbose=0)
    total = evaluated[0] if isinstance(evaluated, list) else evaluated
    np.testing.assert_allclose(total, mse + kl_term, rtol=1e-5)
    history = model.fit(
        [features, images], {"logit": target}, epochs=2, batch_size=B, verbose=0
    )
    assert np.all(np.isfinite(history.history["loss"]))


def test_softplus_attention_matches_numpy_reference():
    layer = _layer("featuremask", attention_activation="softplus")
    features, images = _inputs(8)
    kernel = np.asarray(layer.attention_kernel, np.float64)
    pre = features @ kernel + np.asarray(layer.attention_bias, np.float64)
    a = _resize_bilinear(np.log1p(np.exp(pre)), H, W)
    mu = a * float(layer.mu_kernel[0, 0]) + float(layer.mu_bias[0])
    expected = np.clip(_sigmoid(mu) - layer.tau, 0.0, 1.0)
    _, mask = layer([features, images], training=False)
    np.testing.assert_allclose(np.asarray(mask), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("leak", [0.0, 0.1])
def test_clip_leaks_gradient_only_in_the_backward_pass(leak):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    layer = InfoMask(clip_gradient_leak=leak)
    values = tf.constant([-0.3, 0.0001, 0.5, 1.4])
    with tf.GradientTape() as tape:
        tape.watch(values)
        clipped = layer.clip(values)
    # Forward: eq. 4's clip exactly, whatever the leak.
    np.testing.assert_array_equal(np.asarray(clipped), np.clip(values, 0.0, 1.0))
    grad = np.asarray(tape.gradient(clipped, values))
    np.testing.assert_allclose(grad, [leak, 1.0, 1.0, leak], rtol=1e-6)


def test_regl1_mask_at_zero_still_gets_the_classifier_gradient():
    # All of sigmoid(z) below tau: M = 0 everywhere. The exact clip passes no
    # gradient to the attention; the leaky clip does, and the L1 term adds
    # none at M = 0 (it cannot push the mask lower).
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    features, images = _inputs(9)
    grads = {}
    for leak in (0.0, 0.1):
        layer = _layer("regl1", clip_gradient_leak=leak)
        layer.mu_bias.assign([-3.0])
        layer.mu_kernel.assign([[0.0]])
        with tf.GradientTape() as tape:
            masked, mask = layer([features, images], training=False)
            loss = -tf.reduce_sum(masked * images) + tf.add_n(layer.losses)
        assert float(np.max(np.asarray(mask))) == 0.0
        grad = tape.gradient(loss, layer.mu_bias)
        grads[leak] = float(np.asarray(grad)[0])
    assert grads[0.0] == 0.0
    # Raising the mask lowers this loss: the leaked gradient says so.
    assert grads[0.1] < 0.0


def test_config_round_trip():
    layer = InfoMask(
        variant="regl1",
        alpha=0.1,
        tau=0.3,
        seed=7,
        attention_activation="softplus",
        clip_gradient_leak=0.2,
        name="mask",
    )
    config = layer.get_config()
    expected = {
        "variant": "regl1",
        "alpha": 0.1,
        "tau": 0.3,
        "seed": 7,
        "attention_activation": "softplus",
        "clip_gradient_leak": 0.2,
    }
    for key, value in expected.items():
        assert config[key] == value
    assert InfoMask.from_config(config).get_config() == config


def test_mixed_precision_is_finite():
    layer = InfoMask(seed=0, dtype="mixed_float16")
    features, images = _inputs(6)
    masked, mask = layer([features * 100.0, images], training=True)
    assert mask.dtype == "float16"
    for value in (masked, mask, *layer.losses):
        assert np.all(np.isfinite(np.asarray(value, np.float32)))


def test_compute_output_shape():
    layer = InfoMask()
    assert layer.compute_output_shape([(B, h, w, C), (B, H, W, CI)]) == (
        (B, H, W, CI),
        (B, H, W, 1),
    )


@pytest.mark.parametrize(
    "kwargs, text",
    [
        ({"variant": "info"}, "variant='info'"),
        ({"alpha": -0.1}, "alpha=-0.1"),
        ({"alpha": float("nan")}, "alpha=nan"),
        ({"tau": 1.0}, "tau=1.0"),
        ({"tau": -0.2}, "tau=-0.2"),
        ({"seed": 1.5}, "seed=1.5"),
        ({"attention_activation": "tanh"}, "attention_activation='tanh'"),
        ({"clip_gradient_leak": 1.5}, "clip_gradient_leak=1.5"),
        ({"clip_gradient_leak": -0.1}, "clip_gradient_leak=-0.1"),
    ],
)
def test_bad_arguments_are_named(kwargs, text):
    with pytest.raises(ValueError, match=text):
        InfoMask(**kwargs)


def test_single_input_is_rejected():
    with pytest.raises(ValueError, match="encoder_features, images"):
        InfoMask().build((None, H, W, CI))


def test_num_masks_gives_each_mask_its_own_parameters_and_kl():
    # K masks are K one-mask layers side by side: mask k equals the
    # one-mask layer built from column k of every weight, and the KL is
    # their mean.
    k_masks = 3
    layer = _layer(num_masks=k_masks)
    features, images = _inputs()
    masked, masks = layer([features, images], training=False)
    assert masks.shape == (B, H, W, k_masks)
    assert masked.shape == (B, H, W, k_masks, CI)
    kls = []
    for k in range(k_masks):
        single = _layer()
        for mine, theirs in zip(single.weights, layer.weights):
            mine.assign(np.asarray(theirs)[..., k : k + 1])
        one_masked, one_mask = single([features, images], training=False)
        np.testing.assert_allclose(masks[..., k : k + 1], one_mask, atol=1e-6)
        np.testing.assert_allclose(masked[..., k, :], one_masked, atol=1e-6)
        kls.append(float(single.losses[0]))
    np.testing.assert_allclose(float(layer.losses[0]), np.mean(kls), rtol=1e-5)
    clone = InfoMask.from_config(layer.get_config())
    assert clone.num_masks == k_masks


@pytest.mark.parametrize("num_masks", [0, 1.5, True])
def test_num_masks_must_be_a_positive_int(num_masks):
    with pytest.raises(ValueError, match="num_masks"):
        InfoMask(num_masks=num_masks)
