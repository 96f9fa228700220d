"""Trains a localizer: `python -m cxr_tf.train --flagfile=configs/X.flags`.

Every flag can be given in the flagfile or on the command line; later flags
override earlier ones. Rerunning the same command after an interruption
resumes from the last backup and stops at the same total number of steps.
"""

import fnmatch
import json
import os
import sys

from absl import app
from absl import flags
from absl import logging

from cxr_tf import choices
from cxr_tf import cli
from cxr_tf import errors
from cxr_tf.data import schema

_CPU_TUNING = flags.DEFINE_bool(
    "cpu_tuning",
    False,
    "On machines without a GPU: TensorFlow's oneDNN kernels on "
    "(TF_ENABLE_ONEDNN_OPTS=1 unless the environment sets it) and one inter-op "
    "thread (single-device runs). Measured faster on a loaded machine, slightly "
    "slower on an idle one (docs/design/speed.md), hence opt-in.",
)
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Directory of ingested TFRecords ({split}-*.tfrecord.gz)."
)
_MODEL_DIR = flags.DEFINE_string(
    "model_dir", None, "Output directory: config, checkpoints, logs, model."
)
_BACKBONE = flags.DEFINE_enum(
    "backbone", "resnet34", list(choices.BACKBONES), "Backbone network."
)
_POOLING = flags.DEFINE_enum(
    "pooling", "pcam", list(choices.POOLING_NAMES), "Global pooling."
)
_POOLING_OPTIONS = flags.DEFINE_list(
    "pooling_options", [], "Pooling keyword options as name=value (e.g. gamma=10)."
)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 512, "Network input side (px).")
_WEIGHTS = flags.DEFINE_enum(
    "weights", "none", ["none", "imagenet"], "Initial weights (applications only)."
)
_FINDINGS = flags.DEFINE_list(
    "findings", list(schema.FINDINGS), "Findings to train on (default: all 14)."
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Global batch size.")
_EPOCHS = flags.DEFINE_integer("epochs", 10, "Number of epochs.")
_STEPS_PER_EPOCH = flags.DEFINE_integer(
    "steps_per_epoch", None, "Steps per epoch (default: one pass over train)."
)
_VALIDATION_STEPS = flags.DEFINE_integer(
    "validation_steps", None, "Validation batches per epoch (default: all)."
)
_OPTIMIZER = flags.DEFINE_enum(
    "optimizer", "adam", list(choices.OPTIMIZERS), "Optimizer."
)
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 1e-4, "Peak learning rate.")
_LR_SCHEDULE = flags.DEFINE_enum(
    "lr_schedule", "constant", list(choices.LR_SCHEDULES), "Learning-rate schedule."
)
_LR_WARMUP_STEPS = flags.DEFINE_integer(
    "lr_warmup_steps", 0, "Linear warm-up steps (cosine)."
)
_LR_DECAY_EPOCHS = flags.DEFINE_list(
    "lr_decay_epochs", [], "Epochs at which the step schedule decays."
)
_LR_DECAY_FACTOR = flags.DEFINE_float(
    "lr_decay_factor", 0.1, "Decay factor (step: per boundary; exponential: /epoch)."
)
_WEIGHT_DECAY = flags.DEFINE_float("weight_decay", 0.0, "Weight decay (adamw, sgd).")
_MOMENTUM = flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
_LOSS = flags.DEFINE_enum(
    "loss", "balanced_bce", ["balanced_bce", "bce"], "Classification loss."
)
_MIXED_PRECISION = flags.DEFINE_enum(
    "mixed_precision", "none", list(choices.MIXED_PRECISION), "Dtype policy."
)
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_STRATEGY = flags.DEFINE_enum(
    "strategy",
    "mirrored",
    list(choices.STRATEGIES),
    "mirrored: all local GPUs (or --num_cpu_devices logical CPUs); "
    "multi_worker: MultiWorkerMirroredStrategy from TF_CONFIG; default: none.",
)
_NUM_CPU_DEVICES = flags.DEFINE_integer(
    "num_cpu_devices", 0, "Logical CPU devices to split the CPU into (testing)."
)
_JIT_COMPILE = flags.DEFINE_enum(
    "jit_compile",
    "auto",
    list(choices.JIT_COMPILE),
    "XLA: auto (on where Keras supports it, not on CPU-only machines), true, false.",
)
_AUGMENT = flags.DEFINE_bool("augment", True, "Augment training images.")
_FLIP = flags.DEFINE_bool("flip", False, "Random left-right flips when augmenting.")
_SHUFFLE_BUFFER = flags.DEFINE_integer("shuffle_buffer", 1024, "Shuffle buffer.")
_BACKUP_EVERY_STEPS = flags.DEFINE_integer(
    "backup_every_steps", 50, "Steps between fault-tolerance backups."
)
_NUM_OVERLAY_IMAGES = flags.DEFINE_integer(
    "num_overlay_images", 4, "Validation images whose maps go to TensorBoard."
)
_INFOMASK_VARIANT = flags.DEFINE_enum(
    "infomask_variant",
    "infomask",
    list(choices.INFOMASK_VARIANTS),
    "InfoMask variant (backbone=infomask).",
)
_INFOMASK_ALPHA = flags.DEFINE_float(
    "infomask_alpha", 0.01, "InfoMask KL (or L1) weight (docs/design/infomask.md)."
)
_INFOMASK_TAU = flags.DEFINE_float("infomask_tau", 0.2, "InfoMask mask offset.")
_INFOMASK_WIDTH = flags.DEFINE_float(
    "infomask_width",
    1.0,
    "Multiplier of the InfoMask network's filter counts (1.0: the paper's; "
    "configs/infomask_demo.flags uses less on CPU).",
)
_ALLOW_UPSCALE = flags.DEFINE_bool(
    "allow_upscale",
    False,
    "Train on records stored smaller than --image_size (upscaled, with a "
    "warning) instead of refusing them.",
)
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Print the resolved config as JSON and exit without training."
)
_VERBOSE = flags.DEFINE_integer(
    "verbose", 1, "Keras output: 1 progress bar, 2 one line per epoch, 0 quiet."
)


def config_from_flags():
    """Builds the `TrainConfig` (and its `ModelConfig`) from the parsed flags."""
    from cxr_tf import train_lib  # pylint: disable=import-outside-toplevel
    from cxr_tf.models import ModelConfig  # pylint: disable=import-outside-toplevel

    model = cli.make_config(
        ModelConfig,
        backbone=_BACKBONE.value,
        pooling=_POOLING.value,
        num_classes=len(_FINDINGS.value),
        image_size=_IMAGE_SIZE.value,
        weights=None if _WEIGHTS.value == "none" else _WEIGHTS.value,
        pooling_options=train_lib.parse_options(_POOLING_OPTIONS.value),
        infomask_variant=_INFOMASK_VARIANT.value,
        infomask_alpha=_INFOMASK_ALPHA.value,
        infomask_tau=_INFOMASK_TAU.value,
        infomask_width=_INFOMASK_WIDTH.value,
    )
    return cli.make_config(
        train_lib.TrainConfig,
        data_dir=_DATA_DIR.value,
        model_dir=_MODEL_DIR.value,
        model=model,
        findings=tuple(_FINDINGS.value),
        batch_size=_BATCH_SIZE.value,
        epochs=_EPOCHS.value,
        steps_per_epoch=_STEPS_PER_EPOCH.value,
        validation_steps=_VALIDATION_STEPS.value,
        optimizer=_OPTIMIZER.value,
        learning_rate=_LEARNING_RATE.value,
        lr_schedule=_LR_SCHEDULE.value,
        lr_warmup_steps=_LR_WARMUP_STEPS.value,
        lr_decay_epochs=tuple(float(e) for e in _LR_DECAY_EPOCHS.value),
        lr_decay_factor=_LR_DECAY_FACTOR.value,
        weight_decay=_WEIGHT_DECAY.value,
        momentum=_MOMENTUM.value,
        loss=_LOSS.value,
        mixed_precision=_MIXED_PRECISION.value,
        seed=_SEED.value,
        strategy=_STRATEGY.value,
        num_cpu_devices=_NUM_CPU_DEVICES.value,
        jit_compile=_JIT_COMPILE.value,
        augment=_AUGMENT.value,
        flip=_FLIP.value,
        shuffle_buffer=_SHUFFLE_BUFFER.value,
        backup_every_steps=_BACKUP_EVERY_STEPS.value,
        num_overlay_images=_NUM_OVERLAY_IMAGES.value,
        allow_upscale=_ALLOW_UPSCALE.value,
        verbose=_VERBOSE.value,
    )


def tune_for_cpu(config):
    """Applies the measured CPU settings; a no-op where a GPU is visible.

    Must run before TensorFlow is first imported (oneDNN is chosen at import).
    One inter-op thread only for single-device runs: replicas on several
    logical CPU devices, or collectives between workers, need ops to run
    side by side.
    """
    if "tensorflow" not in sys.modules:
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        return
    if config.strategy == "multi_worker" or config.num_cpu_devices > 1:
        return
    try:
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError as e:  # The runtime already started: keep its pools.
        logging.warning("Inter-op threads left as they are: %s", e)


def check_flags():
    """Checks what the flags alone can tell; raises `errors.UserError`."""
    cli.check_image_size(_IMAGE_SIZE, _BACKBONE.value)
    if _WEIGHTS.value == "imagenet" and _BACKBONE.value not in choices.IMAGENET_BACKBONES:
        raise errors.UserValueError(
            f"no ImageNet weights for backbone {_BACKBONE.value!r}",
            "--weights=imagenet",
            f"use --backbone={' or --backbone='.join(choices.IMAGENET_BACKBONES)} "
            "or --weights=none",
        )
    unknown = [f for f in _FINDINGS.value if f not in schema.FINDINGS]
    if unknown or not _FINDINGS.value:
        raise errors.UserValueError(
            f"unknown finding(s) {unknown}" if unknown else "no finding given",
            "--findings",
            f"use names of {', '.join(schema.FINDINGS)}",
        )


def check_paths():
    """Checks the input records and the output folder before TF loads."""
    pattern = schema.TFRECORD_PATTERN.format(split="train")
    cli.check_dir(
        _DATA_DIR,
        contains=lambda names: any(fnmatch.fnmatch(n, pattern) for n in names),
        hint=f"expected {pattern} files; run `python -m pipeline.ingest` first",
    )
    cli.check_writable_dir(_MODEL_DIR)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    check_flags()
    if not _DRY_RUN.value:
        check_paths()
    config = config_from_flags()
    if _DRY_RUN.value:
        print(json.dumps(config.to_dict(), indent=2, sort_keys=True))
        return
    logging.info("Train config: %s", config.to_dict())
    if _CPU_TUNING.value:
        tune_for_cpu(config)
    try:
        from cxr_tf import train_lib  # pylint: disable=import-outside-toplevel

        result = train_lib.train(config)
    except FloatingPointError as e:
        logging.error("%s", e)
        print(f"ERROR: {e}", file=sys.stderr)
        sys.exit(3)
    print(
        f"Trained {result.steps} steps ({result.steps - result.initial_step} in this "
        f"run); model {result.final_model}; best val mean AUC "
        f"{result.best_val_mean_auc}"
    )


if __name__ == "__main__":
    flags.mark_flags_as_required(["data_dir", "model_dir"])
    cli.run(main)
