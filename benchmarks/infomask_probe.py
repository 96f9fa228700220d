"""Training dynamics of the InfoMask network over its first steps, as JSON.

    taskset -c 0,1 python benchmarks/infomask_probe.py --recipe=paper \
        --variant=infomask --image_size=64 --steps=40 --learning_rate=3e-3
    taskset -c 0,1 python benchmarks/infomask_probe.py --recipe=stable ...

Data: toy films (--image_size px, Gaussian noise of sd --noise, half of them
with one SQUARE x SQUARE square of +--brightness, label = square present), the
setting of the PCAM toy test; they are already "normalised" (zero mean).
Model: `build_infomask_model(ModelConfig(backbone="infomask", ...), recipe)`
with one output: "paper" is the paper's text read literally
(`infomask_net.PAPER`), "stable" its image mask with group norm, softplus
attention and a leaky clip (`infomask_net.STABLE`), "stable_batch_norm" the
same with batch norm, "features" what `build_model` builds
(`infomask_net.FEATURES`: the mask on the compact trunk's stride-8
features, whose mask-weighted average feeds the dense logit; its trunk
counts as the "encoder" below, and the mask is repeated up to the film's
size for the contrast).
Training: Adam at --learning_rate (linear warm-up
over --warmup_steps), BCE on the logit plus the mask's KL / L1 term, batches
of --batch_size drawn from --train_films films.

At each logged step (0, 1, 2, 3, 5, 10, 20, ..., and the last), on a fixed
probe batch, before that step's update:
  activation_rms / dead_fraction: per conv (after its ReLU), the RMS of the
    output and the fraction of channels that are 0 on every pixel of the
    batch;
  attention_positive: fraction of pixels where the attention's
    pre-activation is > 0 (where a ReLU attention passes a gradient);
  mask_mean / mask_std / mask_zero: the mask over the batch's pixels;
  grad_norm: global gradient norm per block (encoder, attention = the
    InfoMask layer's weights, classifier convs (image-mask recipes), dense
    head).
  mask_contrast: over the batch's films with a square, the mean mask inside
    minus outside the square.
At the end, on --test_films held-out films: accuracy, AUC, mask_contrast.
"""

import dataclasses
import json
import time

from absl import app
from absl import flags
import numpy as np

RECIPES = ("paper", "stable", "stable_batch_norm", "features")
_RECIPE = flags.DEFINE_enum("recipe", "features", list(RECIPES), "Network recipe.")
# Layer-name prefixes of the compact trunk (`resnet.COMPACT`).
TRUNK_PREFIXES = ("cstem", "cpool", "cstage")
_VARIANT = flags.DEFINE_enum(
    "variant", "infomask", ["infomask", "featuremask", "regl1"], "Mask variant."
)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 64, "Film side (multiple of 32).")
_SQUARE = flags.DEFINE_integer("square", 12, "Side of the bright square.")
_NOISE = flags.DEFINE_float("noise", 0.15, "Standard deviation of the film noise.")
_BRIGHTNESS = flags.DEFINE_float("brightness", 1.0, "Added to the square's pixels.")
_STEPS = flags.DEFINE_integer("steps", 40, "Training steps.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Films per step.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 3e-3, "Adam peak rate.")
_WARMUP_STEPS = flags.DEFINE_integer("warmup_steps", 0, "Linear warm-up steps.")
_ALPHA = flags.DEFINE_float("alpha", 0.01, "KL / L1 weight.")
_TAU = flags.DEFINE_float("tau", 0.2, "Mask offset.")
_TRAIN_FILMS = flags.DEFINE_integer("train_films", 256, "Training films.")
_TEST_FILMS = flags.DEFINE_integer("test_films", 64, "Held-out films.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of data, weights and noise.")


def toy_films(count, size, square, rng, noise=0.15, brightness=1.0):
    """(images (N, S, S, 1), labels (N, 1), corners (N, 2)); odd films have a square."""
    images = rng.normal(0.0, noise, size=(count, size, size, 1))
    labels = (np.arange(count) % 2).astype("float32")
    corners = rng.integers(0, size - square + 1, size=(count, 2))
    for image, label, (y, x) in zip(images, labels, corners):
        if label:
            image[y : y + square, x : x + square] += brightness
    return images.astype("float32"), labels[:, None], corners


def square_contrast(masks, labels, corners, square, size=None):
    """Mean over films with a square of mean(mask inside) - mean(mask outside).

    A mask coarser than the film (the "features" recipe's stride-8 grid) is
    repeated up to the film's `size` first, so every pixel counts once.
    """
    values = []
    for mask, label, (y, x) in zip(masks, labels[:, 0], corners):
        if size and mask.shape[0] != size:
            factor = size // mask.shape[0]
            mask = np.repeat(np.repeat(mask, factor, 0), factor, 1)
        if label:
            inside = np.zeros(mask.shape[:2], bool)
            inside[y : y + square, x : x + square] = True
            m = mask[..., 0]
            values.append(float(m[inside].mean() - m[~inside].mean()))
    return float(np.mean(values))


def auc(scores, labels):
    """Rank AUC (ties count one half)."""
    scores, labels = np.asarray(scores), np.asarray(labels).astype(bool)
    pos, neg = scores[labels], scores[~labels]
    greater = (pos[:, None] > neg[None, :]).sum()
    greater += 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def block_of(path):
    """Block name of a variable path ("encoder": also the "features" trunk)."""
    if "infomask" in path.split("/")[0]:
        return "attention"
    for block in ("encoder", "classifier_dense", "classifier"):
        if path.startswith(block):
            return "head" if block == "classifier_dense" else block
    if path.startswith(TRUNK_PREFIXES):
        return "encoder"
    return "other"


def post_relu_layers(model):
    """Names of the tensors after each conv's ReLU, in order."""
    names = {layer.name for layer in model.layers}
    out = [  # The "features" recipe's compact trunk, in graph order.
        layer.name
        for layer in model.layers
        if layer.name.startswith(TRUNK_PREFIXES) and layer.name.endswith("_relu")
    ]
    for prefix in ("encoder", "classifier"):
        i = 1
        while f"{prefix}_conv{i}" in names:
            relu = f"{prefix}_relu{i}"
            out.append(relu if relu in names else f"{prefix}_conv{i}")
            i += 1
    return out


def build_probe(model):
    """A model returning the post-ReLU convs, encoder features and mask."""
    import keras  # pylint: disable=import-outside-toplevel

    names = post_relu_layers(model)
    layer = model.get_layer("infomask")
    features = layer.input[0]
    mask = layer.output[1]
    outputs = {n: model.get_layer(n).output for n in names}
    outputs["_features"] = features
    outputs["_mask"] = mask
    return keras.Model(model.input, outputs), names, layer


def measure(probe, names, layer, images, labels, corners, square):
    """The per-step activation and mask figures of one batch (no update)."""
    from keras import ops  # pylint: disable=import-outside-toplevel

    out = probe(images, training=False)
    figures = {"activation_rms": {}, "dead_fraction": {}}
    for n in names:
        a = np.asarray(out[n])
        figures["activation_rms"][n] = round(float(np.sqrt(np.mean(a**2))), 5)
        alive = (a > 0).any(axis=(0, 1, 2))
        figures["dead_fraction"][n] = round(float(1.0 - alive.mean()), 4)
    features = out["_features"]
    pre = ops.matmul(features, layer.attention_kernel) + layer.attention_bias
    figures["attention_positive"] = round(float(np.mean(np.asarray(pre) > 0)), 5)
    mask = np.asarray(out["_mask"])
    figures["mask_mean"] = round(float(mask.mean()), 5)
    figures["mask_std"] = round(float(mask.std()), 5)
    figures["mask_zero"] = round(float(np.mean(mask <= 0)), 5)
    figures["mask_contrast"] = round(
        square_contrast(mask, labels, corners, square, images.shape[1]), 5
    )
    return figures


def run(recipe_name, variant, image_size, square, steps, batch_size, learning_rate,
        warmup_steps, alpha, tau, train_films, test_films, seed, noise=0.15,
        brightness=1.0):
    """Trains and measures; returns the JSON-able dict."""
    # pylint: disable=import-outside-toplevel
    import keras
    import tensorflow as tf

    from cxr_tf.models import ModelConfig
    from cxr_tf.models import infomask_net
    from cxr_tf.models.localizer import build_infomask_model

    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    train_x, train_y, train_corners = toy_films(
        train_films, image_size, square, rng, noise, brightness
    )
    test_x, test_y, test_corners = toy_films(
        test_films, image_size, square, rng, noise, brightness
    )
    recipe = {
        "paper": infomask_net.PAPER,
        "stable": infomask_net.STABLE,
        "stable_batch_norm": dataclasses.replace(
            infomask_net.STABLE, normalization="batch"
        ),
        "features": infomask_net.FEATURES,
    }[recipe_name]
    config = ModelConfig(
        backbone="infomask",
        image_size=image_size,
        num_classes=1,
        infomask_variant=variant,
        infomask_alpha=alpha,
        infomask_tau=tau,
    )
    model = build_infomask_model(config, recipe)
    probe, names, layer = build_probe(model)
    optimizer = keras.optimizers.Adam(learning_rate)
    bce = keras.losses.BinaryCrossentropy(from_logits=True)
    variables = model.trainable_variables
    blocks = [block_of(v.path) for v in variables]

    @tf.function
    def step(images, labels, rate):
        optimizer.learning_rate.assign(rate)
        with tf.GradientTape() as tape:
            out = model(images, training=True)
            classification = bce(labels, out["logits"])
            regulariser = tf.add_n(model.losses) if model.losses else 0.0
            loss = classification + regulariser
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(grads, variables))
        return loss, grads

    probe_batch = train_x[:batch_size]
    logged = sorted({0, 1, 2, 3, 5, *range(10, steps, 10), steps})
    history = []
    start = time.time()
    order = rng.permutation(train_films)
    cursor = 0
    for i in range(steps + 1):
        record = None
        if i in logged:
            record = {
                "step": i,
                **measure(
                    probe, names, layer, probe_batch, train_y[:batch_size],
                    train_corners[:batch_size], square,
                ),
            }
        if i == steps:
            history.append(record)
            break
        if cursor + batch_size > train_films:
            order, cursor = rng.permutation(train_films), 0
        idx = order[cursor : cursor + batch_size]
        cursor += batch_size
        rate = learning_rate
        if warmup_steps:
            rate *= min(1.0, (i + 1) / warmup_steps)
        loss, grads = step(train_x[idx], train_y[idx], np.float32(rate))
        if record is not None:
            norms = {}
            for block, g in zip(blocks, grads):
                # None: FeatureMask's log-variance, unused without sampling.
                value = 0.0 if g is None else float(np.sum(np.asarray(g) ** 2))
                norms[block] = norms.get(block, 0.0) + value
            record["loss"] = round(float(loss), 5)
            record["grad_norm"] = {
                b: float(f"{np.sqrt(v):.3g}") for b, v in norms.items()
            }
            history.append(record)
    seconds = time.time() - start
    out = model.predict(test_x, batch_size=64, verbose=0)
    masks = np.asarray(probe.predict(test_x, batch_size=64, verbose=0)["_mask"])
    logits = out["logits"][:, 0]
    return {
        "config": {
            "recipe": recipe_name, "variant": variant, "image_size": image_size,
            "square": square, "noise": noise, "brightness": brightness,
            "steps": steps, "batch_size": batch_size,
            "learning_rate": learning_rate, "warmup_steps": warmup_steps,
            "alpha": alpha, "tau": tau, "train_films": train_films,
            "test_films": test_films, "seed": seed,
        },
        "history": history,
        "test": {
            "accuracy": float(np.mean((logits > 0) == (test_y[:, 0] > 0))),
            "auc": auc(logits, test_y[:, 0]),
            "mask_contrast": square_contrast(
                masks, test_y, test_corners, square, image_size
            ),
            "mask_std": float(masks.std()),
            "mask_max": float(masks.max()),
        },
        "train_seconds": round(seconds, 1),
    }


def main(argv):
    del argv
    result = run(
        _RECIPE.value, _VARIANT.value, _IMAGE_SIZE.value, _SQUARE.value, _STEPS.value,
        _BATCH_SIZE.value, _LEARNING_RATE.value, _WARMUP_STEPS.value, _ALPHA.value,
        _TAU.value, _TRAIN_FILMS.value, _TEST_FILMS.value, _SEED.value, _NOISE.value,
        _BRIGHTNESS.value,
    )
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    app.run(main)
