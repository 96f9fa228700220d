"""Which classification block can fit the demo's films? Prints JSON.

    python -m benchmarks.infomask_classifier_probe --records=DIR \
        --blocks=paper_group,deep_group,deep_batch --epochs=4 --output=F.json

Issue 13: the InfoMask network stays at chance on the demo's films. This
probe takes the mask out: each block classifies the whole film, with a
global average pooling and a 14-way dense layer on top, as the InfoMask
network's classification block does. A block that cannot fit the films
without a mask cannot fit them behind one.

Blocks (name = layout_normalisation):
  layout "paper": the paper's classification block (conv 128, pool, conv 64,
    conv 64, pool; `infomask_net.CLASSIFIER_LAYOUT`) at --width (0.25 as in
    configs/infomask_demo.flags); receptive field 14 px.
  layout "paperw1": the same at width 1.0 (the paper's filter counts).
  layout "deep": conv 32, pool, conv 32, pool, conv 64, pool, conv 64, pool,
    conv 128; receptive field 78 px, four poolings as in a ResNet stem.
  layout "compact": the compact ResNet trunk of the PCAM demo
    (`resnet.COMPACT`, stride 8, its own batch norm: name it
    "compact_batch").
  normalisation "group" (8 groups, what `infomask_net.STABLE` uses),
    "batch" (momentum 0.9, `infomask_net.BATCH_NORM_MOMENTUM`) or "none"
    (Glorot kernels with biases, the paper's bare convs). With a norm, convs
    are He-initialised without bias, as in `infomask_net`.
Training: Adam with 20 warm-up steps to 3e-3 and a cosine decay over the
run, batch-balanced BCE, no augmentation: configs/infomask_demo.flags. Each
epoch, the validation split's mean AUROC over the defined findings.
TensorFlow runs on --threads threads, so a probe can share the machine.

With --mask=infomask the block classifies the masked film instead: the
InfoMask network's encoder (group norm, --width) and `InfoMask` layer
(`infomask_net.STABLE`'s attention and clip, KL weight 0.01, tau 0.2) come
first, as in `build_model`. Each epoch then also reports the mask's mean
inside and outside the truth boxes of the boxed validation films (at the
network input, in inference). --encoder=compact computes the mask from the
compact ResNet trunk instead (stride 8, receptive field over 100 px);
--variant=featuremask makes the mask deterministic (no noise, no KL);
--input_scale=unit feeds films scaled to [0, 1] instead of the standard
(x - 128) / 64, so that a masked-out pixel turns black rather than the
mean grey.
"""

import argparse
import json
import os
import sys
import time

_LAYOUTS = {
    "paper": None,  # infomask_net.CLASSIFIER_LAYOUT at --width
    "paperw1": None,  # the same at width 1.0
    "deep": (32, "pool", 32, "pool", 64, "pool", 64, "pool", 128),
    "compact": None,  # resnet.COMPACT, batch norm only
}
_ENCODERS = ("paper", "compact")
_INPUT_SCALES = {"standard": (128.0, 64.0), "unit": (0.0, 255.0)}
_NORMS = ("group", "batch", "none")


def _compact(inputs, prefix):
    import dataclasses  # pylint: disable=import-outside-toplevel

    from cxr_tf.models import resnet  # pylint: disable=import-outside-toplevel

    preset = dataclasses.replace(
        resnet.COMPACT,
        stem_name=f"{prefix}_stem",
        pool_name=f"{prefix}_pool",
        block_name=prefix + "_stage{stage}_block{block}",
    )
    return resnet.resnet_trunk(inputs, preset)


def build_block(name, image_size, width, mask=False, encoder="paper",
                variant="infomask"):
    """A whole-film classifier: `name`'s conv stack, global average pool, dense(14).

    With `mask`, returns (model of the logits, model of [logits, mask]),
    the block behind the InfoMask mask computed by `encoder` ("paper": the
    InfoMask encoder at `width`; "compact": the compact ResNet trunk), of
    `variant` ("infomask" or "featuremask").
    """
    import keras  # pylint: disable=import-outside-toplevel

    from cxr_tf.data import schema  # pylint: disable=import-outside-toplevel
    from cxr_tf.models import infomask_net  # pylint: disable=import-outside-toplevel

    layout_name, norm = name.split("_")
    layout = _LAYOUTS[layout_name] or infomask_net.CLASSIFIER_LAYOUT
    # `width` scales the paper's block and the mask's encoder; "paperw1" and
    # "deep" blocks keep their own filter counts.
    block_width = width if layout_name == "paper" else 1.0
    inputs = keras.Input((image_size, image_size, 1))
    x = inputs
    if mask:
        from cxr_tf import layers as cxr_layers  # pylint: disable=import-outside-toplevel

        recipe = infomask_net.STABLE
        if encoder == "compact":
            features = _compact(inputs, "encoder")
        else:
            features = infomask_net.encoder_trunk(inputs, recipe.normalization, width)
        x, soft_mask = cxr_layers.InfoMask(
            variant=variant,
            alpha=0.01,
            tau=0.2,
            attention_activation=recipe.attention_activation,
            clip_gradient_leak=recipe.clip_gradient_leak,
            attention_bias_initializer=keras.initializers.Constant(
                recipe.attention_bias
            ),
            name="infomask",
        )([features, inputs])
    if layout_name == "compact":
        layout = ()
        x = _compact(x, "classifier")
    for index, entry in enumerate(layout):
        if entry == "pool":
            x = keras.layers.MaxPooling2D(2)(x)
            continue
        filters = infomask_net.scaled_filters(entry, block_width)
        if norm == "none":
            x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
            continue
        x = keras.layers.Conv2D(
            filters, 3, padding="same", use_bias=False, kernel_initializer="he_normal"
        )(x)
        if norm == "batch":
            x = keras.layers.BatchNormalization(
                momentum=infomask_net.BATCH_NORM_MOMENTUM
            )(x)
        else:
            x = keras.layers.GroupNormalization(infomask_net.GROUPS)(x)
        x = keras.layers.ReLU(name=f"relu{index}")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    logits = keras.layers.Dense(schema.NUM_FINDINGS)(x)
    model = keras.Model(inputs, logits, name=name)
    if mask:
        return model, keras.Model(inputs, [logits, soft_mask])
    return model


def _mask_inside_outside(mask, features, image_size):
    """Mean mask inside and outside the truth boxes, per boxed film of a batch."""
    import numpy as np  # pylint: disable=import-outside-toplevel

    pairs = []
    for i in range(len(mask)):
        count = int(features["num_boxes"][i])
        if not count:
            continue
        truth = np.zeros(mask.shape[1:3], bool)
        for box in features["boxes"][i, :count].numpy():
            y0, x0, y1, x1 = np.round(box * image_size).astype(int)
            truth[max(y0, 0) : max(y1, y0 + 1), max(x0, 0) : max(x1, x0 + 1)] = True
        if truth.all():
            continue
        pairs.append((mask[i, ..., 0][truth].mean(), mask[i, ..., 0][~truth].mean()))
    return pairs


def probe(name, records, image_size, width, epochs, batch_size, seed, mask=False,
          encoder="paper", variant="infomask", input_scale="standard"):
    """Trains block `name` on records' train split; val mean AUROC per epoch."""
    import keras  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel

    from cxr_tf import losses  # pylint: disable=import-outside-toplevel
    from cxr_tf import train_data  # pylint: disable=import-outside-toplevel
    from cxr_tf.data import input_pipeline  # pylint: disable=import-outside-toplevel
    from cxr_tf.data import schema  # pylint: disable=import-outside-toplevel
    from cxr_tf.metrics import classification  # pylint: disable=import-outside-toplevel

    keras.utils.set_random_seed(seed)
    config = input_pipeline.InputConfig(
        image_size=image_size,
        batch_size=batch_size,
        normalization=schema.Normalization(*_INPUT_SCALES[input_scale]),
        seed=seed,
    )
    train = input_pipeline.build_dataset(records, "train", config, training=True)
    val = input_pipeline.build_dataset(
        records, "val", config, training=False, with_info=True
    )
    films = train_data.count_examples(records, "train")
    steps = max(1, films // batch_size)
    if mask:
        model, with_mask = build_block(
            name, image_size, width, mask=True, encoder=encoder, variant=variant
        )
    else:
        model = with_mask = build_block(name, image_size, width)
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, steps * epochs, warmup_target=3e-3, warmup_steps=20
    )
    model.compile(keras.optimizers.Adam(schedule), losses.get_loss("balanced_bce"))
    out = {
        "block": name,
        "mask": variant if mask else None,
        "encoder": encoder if mask else None,
        "input_scale": input_scale,
        "parameters": model.count_params(),
        "epochs": [],
    }
    for _ in range(epochs):
        start = time.perf_counter()
        history = model.fit(train, steps_per_epoch=steps, epochs=1, verbose=0)
        labels, scores, pairs = [], [], []
        for features, batch_labels in val:
            labels.append(batch_labels.numpy())
            if mask:
                logits, soft = with_mask(features["image"], training=False)
                pairs += _mask_inside_outside(soft.numpy(), features, image_size)
            else:
                logits = model(features["image"], training=False)
            scores.append(logits.numpy())
        per_class = classification.auroc_per_class(
            np.concatenate(labels), np.concatenate(scores), list(schema.FINDINGS)
        )
        epoch = {
            "train_loss": round(float(history.history["loss"][-1]), 4),
            "val_mean_auc": round(classification.mean_auroc(per_class), 4),
            "seconds": round(time.perf_counter() - start, 1),
        }
        if pairs:
            inside, outside = np.mean(pairs, axis=0)
            epoch.update(mask_inside=round(float(inside), 4),
                         mask_outside=round(float(outside), 4),
                         boxed_films=len(pairs))
        out["epochs"].append(epoch)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", required=True, help="Ingested TFRecords.")
    parser.add_argument(
        "--blocks", default="paper_group,paper_batch,paperw1_batch,deep_group,"
        "deep_batch,deep_none", help="Comma-separated layout_normalisation names.",
    )
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mask", choices=("none", "infomask"), default="none",
                        help="Put the InfoMask encoder and mask before each block.")
    parser.add_argument("--encoder", choices=_ENCODERS, default="paper",
                        help="What computes the mask (with --mask=infomask).")
    parser.add_argument("--variant", choices=("infomask", "featuremask"),
                        default="infomask", help="The mask's variant.")
    parser.add_argument("--input_scale", choices=tuple(_INPUT_SCALES),
                        default="standard", help="standard: (x - 128) / 64; unit: x / 255.")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    blocks = args.blocks.split(",")
    for name in blocks:
        layout, _, norm = name.partition("_")
        if layout not in _LAYOUTS or norm not in _NORMS or (
            layout == "compact" and norm != "batch"
        ):
            parser.error(
                f"--blocks: {name!r} is not layout_normalisation with layout in "
                f"{sorted(_LAYOUTS)} and normalisation in {list(_NORMS)}"
            )
    if not os.path.isdir(args.records):
        parser.error(f"--records={args.records} is not a folder")
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    from benchmarks import _common  # pylint: disable=import-outside-toplevel

    result = {
        "what": __doc__.splitlines()[0],
        "records": os.path.abspath(args.records),
        "settings": {k: v for k, v in vars(args).items() if k != "output"},
        "cores": _common.cores(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "blocks": [],
    }
    for name in blocks:
        result["blocks"].append(
            probe(name, args.records, args.image_size, args.width, args.epochs,
                  args.batch_size, args.seed, mask=args.mask == "infomask",
                  encoder=args.encoder, variant=args.variant,
                  input_scale=args.input_scale)
        )
        if args.output:
            with open(args.output, "w") as f:
                f.write(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["blocks"][-1]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
