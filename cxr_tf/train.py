"""Trains a localizer: `python -m cxr_tf.train --flagfile=configs/X.flags`.

Every flag can be given in the flagfile or on the command line; later flags
override earlier ones. Rerunning the same command after an interruption
resumes from the last backup and stops at the same total number of steps.
"""

import fnmatch
import json
import os
import sys
import types

from absl import flags
from absl import logging

from cxr_tf import choices
from cxr_tf import cli
from cxr_tf import errors
from cxr_tf.data import schema


def define_flags(fv):
    """Defines every training flag on the absl registry `fv`; returns their holders.

    `python -m cxr_tf.train` defines them on `flags.FLAGS`; `config_from_argv`
    on a registry of its own, so an orchestrator whose own flags share names
    (--data_dir, --image_size, --seed) reads a training flagfile as the
    command line does.

    Returns:
      A namespace with one `FlagHolder` per flag, named after the flag.
    """
    f = types.SimpleNamespace()
    f.cpu_tuning = flags.DEFINE_bool(
        "cpu_tuning",
        False,
        "On machines without a GPU: TensorFlow's oneDNN kernels on "
        "(TF_ENABLE_ONEDNN_OPTS=1 unless the environment sets it) and one inter-op "
        "thread (single-device runs). Measured faster on a loaded machine, slightly "
        "slower on an idle one (docs/design/speed.md), hence opt-in.",
        flag_values=fv,
    )
    f.data_dir = flags.DEFINE_string(
        "data_dir", None, "Directory of ingested TFRecords ({split}-*.tfrecord.gz).",
        flag_values=fv,
    )
    f.model_dir = flags.DEFINE_string(
        "model_dir", None, "Output directory: config, checkpoints, logs, model.",
        flag_values=fv,
    )
    f.backbone = flags.DEFINE_enum(
        "backbone", "resnet34", list(choices.BACKBONES), "Backbone network.",
        flag_values=fv,
    )
    f.pooling = flags.DEFINE_enum(
        "pooling", "pcam", list(choices.POOLING_NAMES), "Global pooling.",
        flag_values=fv,
    )
    f.pooling_options = flags.DEFINE_list(
        "pooling_options", [], "Pooling keyword options as name=value (e.g. gamma=10).",
        flag_values=fv,
    )
    f.image_size = flags.DEFINE_integer(
        "image_size", 512, "Network input side (px).",
        flag_values=fv,
    )
    f.weights = flags.DEFINE_enum(
        "weights", "none", ["none", "imagenet"], "Initial weights (applications only).",
        flag_values=fv,
    )
    f.findings = flags.DEFINE_list(
        "findings", list(schema.FINDINGS), "Findings to train on (default: all 14).",
        flag_values=fv,
    )
    f.batch_size = flags.DEFINE_integer(
        "batch_size", 16, "Global batch size.",
        flag_values=fv,
    )
    f.epochs = flags.DEFINE_integer("epochs", 10, "Number of epochs.", flag_values=fv)
    f.steps_per_epoch = flags.DEFINE_integer(
        "steps_per_epoch", None, "Steps per epoch (default: one pass over train).",
        flag_values=fv,
    )
    f.validation_steps = flags.DEFINE_integer(
        "validation_steps", None, "Validation batches per epoch (default: all).",
        flag_values=fv,
    )
    f.optimizer = flags.DEFINE_enum(
        "optimizer", "adam", list(choices.OPTIMIZERS), "Optimizer.",
        flag_values=fv,
    )
    f.learning_rate = flags.DEFINE_float(
        "learning_rate", 1e-4, "Peak learning rate.",
        flag_values=fv,
    )
    f.lr_schedule = flags.DEFINE_enum(
        "lr_schedule",
        "constant",
        list(choices.LR_SCHEDULES),
        "Learning-rate schedule.",
        flag_values=fv,
    )
    f.lr_warmup_steps = flags.DEFINE_integer(
        "lr_warmup_steps", 0, "Linear warm-up steps (cosine).",
        flag_values=fv,
    )
    f.lr_decay_epochs = flags.DEFINE_list(
        "lr_decay_epochs", [], "Epochs at which the step schedule decays.",
        flag_values=fv,
    )
    f.lr_decay_factor = flags.DEFINE_float(
        "lr_decay_factor",
        0.1,
        "Decay factor (step: per boundary; exponential: /epoch).",
        flag_values=fv,
    )
    f.weight_decay = flags.DEFINE_float(
        "weight_decay", 0.0, "Weight decay (adamw, sgd).",
        flag_values=fv,
    )
    f.momentum = flags.DEFINE_float("momentum", 0.9, "SGD momentum.", flag_values=fv)
    f.loss = flags.DEFINE_enum(
        "loss", "balanced_bce", ["balanced_bce", "bce"], "Classification loss.",
        flag_values=fv,
    )
    f.mixed_precision = flags.DEFINE_enum(
        "mixed_precision", "none", list(choices.MIXED_PRECISION), "Dtype policy.",
        flag_values=fv,
    )
    f.seed = flags.DEFINE_integer("seed", 0, "Random seed.", flag_values=fv)
    f.strategy = flags.DEFINE_enum(
        "strategy",
        "mirrored",
        list(choices.STRATEGIES),
        "mirrored: all local GPUs (or --num_cpu_devices logical CPUs); "
        "multi_worker: MultiWorkerMirroredStrategy from TF_CONFIG; default: none.",
        flag_values=fv,
    )
    f.num_cpu_devices = flags.DEFINE_integer(
        "num_cpu_devices", 0, "Logical CPU devices to split the CPU into (testing).",
        flag_values=fv,
    )
    f.jit_compile = flags.DEFINE_enum(
        "jit_compile",
        "auto",
        list(choices.JIT_COMPILE),
        "XLA: auto (on where Keras supports it, not on CPU-only machines), "
        "true, false.",
        flag_values=fv,
    )
    f.augment = flags.DEFINE_bool(
        "augment", True, "Augment training images.",
        flag_values=fv,
    )
    f.flip = flags.DEFINE_bool(
        "flip", False, "Random left-right flips when augmenting.",
        flag_values=fv,
    )
    f.shuffle_buffer = flags.DEFINE_integer(
        "shuffle_buffer", 1024, "Shuffle buffer.",
        flag_values=fv,
    )
    f.backup_every_steps = flags.DEFINE_integer(
        "backup_every_steps", 50, "Steps between fault-tolerance backups.",
        flag_values=fv,
    )
    f.num_overlay_images = flags.DEFINE_integer(
        "num_overlay_images", 4, "Validation images whose maps go to TensorBoard.",
        flag_values=fv,
    )
    f.infomask_variant = flags.DEFINE_enum(
        "infomask_variant",
        "infomask",
        list(choices.INFOMASK_VARIANTS),
        "InfoMask variant (backbone=infomask).",
        flag_values=fv,
    )
    f.infomask_alpha = flags.DEFINE_float(
        "infomask_alpha", 0.01, "InfoMask KL (or L1) weight (docs/design/infomask.md).",
        flag_values=fv,
    )
    f.infomask_tau = flags.DEFINE_float(
        "infomask_tau", 0.2, "InfoMask mask offset.",
        flag_values=fv,
    )
    f.allow_upscale = flags.DEFINE_bool(
        "allow_upscale",
        False,
        "Train on records stored smaller than --image_size (upscaled, with a "
        "warning) instead of refusing them.",
        flag_values=fv,
    )
    f.dry_run = flags.DEFINE_bool(
        "dry_run",
        False,
        "Print the resolved config as JSON and exit without training.",
        flag_values=fv,
    )
    f.verbose = flags.DEFINE_integer(
        "verbose", 1, "Keras output: 1 progress bar, 2 one line per epoch, 0 quiet.",
        flag_values=fv,
    )
    return f


def config_from_flags(f):
    """Builds the `TrainConfig` (and its `ModelConfig`) from parsed flags.

    Args:
      f: the holders `define_flags` returned, their registry parsed.
    """
    from cxr_tf import train_lib  # pylint: disable=import-outside-toplevel
    from cxr_tf.models import ModelConfig  # pylint: disable=import-outside-toplevel

    model = cli.make_config(
        ModelConfig,
        backbone=f.backbone.value,
        pooling=f.pooling.value,
        num_classes=len(f.findings.value),
        image_size=f.image_size.value,
        weights=None if f.weights.value == "none" else f.weights.value,
        pooling_options=train_lib.parse_options(f.pooling_options.value),
        infomask_variant=f.infomask_variant.value,
        infomask_alpha=f.infomask_alpha.value,
        infomask_tau=f.infomask_tau.value,
    )
    return cli.make_config(
        train_lib.TrainConfig,
        data_dir=f.data_dir.value,
        model_dir=f.model_dir.value,
        model=model,
        findings=tuple(f.findings.value),
        batch_size=f.batch_size.value,
        epochs=f.epochs.value,
        steps_per_epoch=f.steps_per_epoch.value,
        validation_steps=f.validation_steps.value,
        optimizer=f.optimizer.value,
        learning_rate=f.learning_rate.value,
        lr_schedule=f.lr_schedule.value,
        lr_warmup_steps=f.lr_warmup_steps.value,
        lr_decay_epochs=tuple(float(e) for e in f.lr_decay_epochs.value),
        lr_decay_factor=f.lr_decay_factor.value,
        weight_decay=f.weight_decay.value,
        momentum=f.momentum.value,
        loss=f.loss.value,
        mixed_precision=f.mixed_precision.value,
        seed=f.seed.value,
        strategy=f.strategy.value,
        num_cpu_devices=f.num_cpu_devices.value,
        jit_compile=f.jit_compile.value,
        augment=f.augment.value,
        flip=f.flip.value,
        shuffle_buffer=f.shuffle_buffer.value,
        backup_every_steps=f.backup_every_steps.value,
        num_overlay_images=f.num_overlay_images.value,
        allow_upscale=f.allow_upscale.value,
        verbose=f.verbose.value,
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


def check_flags(f):
    """Checks what the flags alone can tell; raises `errors.UserError`."""
    cli.check_image_size(f.image_size, f.backbone.value)
    imagenet = choices.IMAGENET_BACKBONES
    if f.weights.value == "imagenet" and f.backbone.value not in imagenet:
        raise errors.UserValueError(
            f"no ImageNet weights for backbone {f.backbone.value!r}",
            "--weights=imagenet",
            f"use --backbone={' or --backbone='.join(choices.IMAGENET_BACKBONES)} "
            "or --weights=none",
        )
    unknown = [n for n in f.findings.value if n not in schema.FINDINGS]
    if unknown or not f.findings.value:
        raise errors.UserValueError(
            f"unknown finding(s) {unknown}" if unknown else "no finding given",
            "--findings",
            f"use names of {', '.join(schema.FINDINGS)}",
        )


def check_paths(f):
    """Checks the input records and the output folder before TF loads."""
    pattern = schema.TFRECORD_PATTERN.format(split="train")
    cli.check_dir(
        f.data_dir,
        contains=lambda names: any(fnmatch.fnmatch(n, pattern) for n in names),
        hint=f"expected {pattern} files; run `python -m pipeline.ingest` first",
    )
    cli.check_writable_dir(f.model_dir)


def config_from_argv(argv, paths=True):
    """The `TrainConfig` that `python -m cxr_tf.train ARGV` would train with.

    The flags are parsed on a registry of their own (`cli.parse_argv`) with
    the command's checks and its one-line errors, so a flagfile means here
    what it means on the command line, in a process whose flags share names.

    Args:
      argv: the flags, e.g. ["--flagfile=configs/demo.flags", "--epochs=1",
        "--data_dir=T", "--model_dir=M"]; later ones win.
      paths: also check the data and model folders (`check_paths`).

    Raises:
      cxr_tf.errors.UserError: a flag, a value or a path is wrong; the
        message is the line the command would print.
    """
    f = cli.parse_argv(define_flags, argv, "cxr_tf.train")
    cli.require(f.data_dir)
    cli.require(f.model_dir)
    check_flags(f)
    if paths:
        check_paths(f)
    return config_from_flags(f)


def main(argv):
    cli.reject_arguments(argv)
    f = _FLAGS
    check_flags(f)
    if not f.dry_run.value:
        check_paths(f)
    config = config_from_flags(f)
    if f.dry_run.value:
        print(json.dumps(config.to_dict(), indent=2, sort_keys=True))
        return
    logging.info("Train config: %s", config.to_dict())
    if f.cpu_tuning.value:
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
    _FLAGS = define_flags(flags.FLAGS)
    flags.mark_flags_as_required(["data_dir", "model_dir"])
    cli.run(main)
