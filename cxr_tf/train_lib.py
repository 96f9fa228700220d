"""Training logic, flag-free: config, distribution strategy, callbacks, resume."""

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile

from absl import logging
import numpy as np

from cxr_tf import errors
from cxr_tf import model_dir as model_dir_lib
from cxr_tf.data import schema

FINAL_MODEL = model_dir_lib.FINAL_MODEL
BEST_CHECKPOINT = model_dir_lib.BEST_CHECKPOINT
LATEST_CHECKPOINT = model_dir_lib.LATEST_CHECKPOINT
BACKUP_DIR = "backup"
LOG_DIR = "logs"

OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("constant", "cosine", "step", "exponential")
STRATEGIES = ("mirrored", "multi_worker", "default")
MIXED_PRECISION = ("none", "mixed_float16", "mixed_bfloat16")
JIT_COMPILE = ("auto", "true", "false")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; written as JSON next to its outputs.

    Attributes:
      data_dir: directory of ingested TFRecords (`{split}-*.tfrecord.gz`).
      model_dir: output directory (config, checkpoints, logs, final model).
      backbone: a `cxr_tf.models.config.BACKBONES` name.
      pooling: a `cxr_tf.layers.POOLING_NAMES` name.
      pooling_options: extra pooling arguments as sorted (name, value) pairs.
      image_size: square network input side in pixels.
      weights: None or "imagenet" (keras.applications backbones only).
      findings: the findings to train on, a subset of `schema.FINDINGS` in
        canonical order (the InfoMask setup trains on Pneumonia alone).
      batch_size: global batch size, split across replicas.
      epochs: number of epochs.
      steps_per_epoch: steps per epoch; None counts the train split and uses
        ceil(examples / batch_size).
      validation_steps: batches of the val split per evaluation; None = all.
      optimizer: one of `OPTIMIZERS`.
      learning_rate: peak learning rate.
      lr_schedule: one of `LR_SCHEDULES`.
      lr_warmup_steps: linear warm-up steps (cosine schedule).
      lr_decay_epochs: epochs at which the step schedule multiplies the rate by
        `lr_decay_factor`.
      lr_decay_factor: factor of the step and exponential (per epoch)
        schedules.
      weight_decay: decoupled weight decay (adamw, sgd).
      momentum: SGD momentum.
      loss: a `cxr_tf.losses.get_loss` name.
      mixed_precision: one of `MIXED_PRECISION`.
      seed: global random seed.
      strategy: "mirrored" (all local GPUs or `num_cpu_devices` logical CPUs),
        "multi_worker" (MultiWorkerMirroredStrategy from TF_CONFIG) or
        "default" (no distribution).
      num_cpu_devices: logical CPU devices to create (0 = leave as is).
      jit_compile: "auto" (XLA where Keras supports it: not on CPU-only
        machines), "true" or "false".
      augment: random augmentation of training images.
      flip: horizontal flips among the augmentations (off by default: the
        heart is on the left).
      shuffle_buffer: training shuffle buffer (examples).
      backup_every_steps: steps between fault-tolerance backups.
      num_overlay_images: validation images whose maps go to TensorBoard.
      infomask_variant: InfoMask backbone variant.
      infomask_alpha: weight of the InfoMask KL (or L1) term.
      infomask_tau: InfoMask mask offset.
      allow_upscale: train on records stored smaller than `image_size`
        (upscaled, with a warning) instead of refusing them.
      verbose: Keras progress output (1 = progress bar, 2 = one line/epoch).
    """

    data_dir: str
    model_dir: str
    backbone: str = "resnet34"
    pooling: str = "pcam"
    pooling_options: tuple = ()
    image_size: int = 512
    weights: str | None = None
    findings: tuple = schema.FINDINGS
    batch_size: int = 16
    epochs: int = 10
    steps_per_epoch: int | None = None
    validation_steps: int | None = None
    optimizer: str = "adam"
    learning_rate: float = 1e-4
    lr_schedule: str = "constant"
    lr_warmup_steps: int = 0
    lr_decay_epochs: tuple = ()
    lr_decay_factor: float = 0.1
    weight_decay: float = 0.0
    momentum: float = 0.9
    loss: str = "balanced_bce"
    mixed_precision: str = "none"
    seed: int = 0
    strategy: str = "mirrored"
    num_cpu_devices: int = 0
    jit_compile: str = "auto"
    augment: bool = True
    flip: bool = False
    shuffle_buffer: int = 1024
    backup_every_steps: int = 50
    num_overlay_images: int = 4
    infomask_variant: str = "infomask"
    infomask_alpha: float = 0.01  # As ModelConfig (docs/design/infomask.md).
    infomask_tau: float = 0.2
    allow_upscale: bool = False
    verbose: int = 1

    def __post_init__(self):
        if isinstance(self.pooling_options, dict):
            object.__setattr__(
                self, "pooling_options", tuple(sorted(self.pooling_options.items()))
            )
        for name in ("findings", "lr_decay_epochs"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        object.__setattr__(
            self,
            "pooling_options",
            tuple(tuple(item) for item in self.pooling_options),
        )
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _check_choice("strategy", self.strategy, STRATEGIES)
        _check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        _check_choice("jit_compile", self.jit_compile, JIT_COMPILE)
        for name in ("batch_size", "epochs", "backup_every_steps"):
            _check_positive_int(name, getattr(self, name))
        for name in ("steps_per_epoch", "validation_steps"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name))
        if not isinstance(self.num_cpu_devices, int) or self.num_cpu_devices < 0:
            raise ValueError(
                "`num_cpu_devices` must be an int >= 0. "
                f"Received: num_cpu_devices={self.num_cpu_devices!r}"
            )
        if not self.learning_rate > 0:
            raise ValueError(
                "`learning_rate` must be > 0. "
                f"Received: learning_rate={self.learning_rate!r}"
            )
        if not self.findings:
            raise ValueError("`findings` must name at least one finding.")
        canonical = tuple(schema.canonical_finding(f) for f in self.findings)
        if len(set(canonical)) != len(canonical):
            raise ValueError(
                f"`findings` has duplicates. Received: findings={self.findings!r}"
            )
        # Canonical order keeps label columns and model outputs aligned with
        # the TFRecord label vector.
        object.__setattr__(
            self, "findings", tuple(f for f in schema.FINDINGS if f in canonical)
        )
        if not self.data_dir:
            raise ValueError("`data_dir` must be a directory of TFRecords.")
        if not self.model_dir:
            raise ValueError("`model_dir` must be an output directory.")
        # Validates backbone, image size, weights.
        self.model_config()

    def model_config(self):
        """Returns the `ModelConfig` this run builds."""
        from cxr_tf.models.config import ModelConfig

        return ModelConfig(
            backbone=self.backbone,
            pooling=self.pooling,
            num_classes=len(self.findings),
            image_size=self.image_size,
            channels=1,
            weights=self.weights,
            pooling_options=self.pooling_options,
            infomask_variant=self.infomask_variant,
            infomask_alpha=self.infomask_alpha,
            infomask_tau=self.infomask_tau,
        )

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["pooling_options"] = dict(self.pooling_options)
        d["findings"] = list(self.findings)
        d["lr_decay_epochs"] = list(self.lr_decay_epochs)
        return d

    @classmethod
    def from_dict(cls, d):
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(
                f"Unknown TrainConfig fields {sorted(unknown)}; "
                f"expected a subset of {sorted(fields)}"
            )
        return cls(**d)


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(
            f"`{name}` must be one of {choices}. Received: {name}={value!r}"
        )


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int. Received: {name}={value!r}")


def parse_options(items):
    """Parses ["gamma=10", ...] into a dict of ints, floats or strings.

    Raises:
      ValueError: an item is not name=value.
    """
    options = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(
                f"`pooling_options` entries must be name=value. Received: {item!r}"
            )
        for cast in (int, float):
            try:
                options[name] = cast(value)
                break
            except ValueError:
                continue
        else:
            options[name] = value
    return options


# ---------------------------------------------------------------------------
# Devices and strategy.


def configure_devices(num_cpu_devices):
    """Splits the CPU into logical devices; must run before TF touches devices.

    Args:
      num_cpu_devices: number of logical CPU devices (0 leaves the default).

    Raises:
      RuntimeError: devices were already initialised with another layout.
    """
    import tensorflow as tf

    if not num_cpu_devices:
        return
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0],
            [tf.config.LogicalDeviceConfiguration() for _ in range(num_cpu_devices)],
        )
    except RuntimeError as e:
        existing = tf.config.list_logical_devices("CPU")
        if len(existing) != num_cpu_devices:
            raise RuntimeError(
                f"Cannot create {num_cpu_devices} logical CPU devices: TensorFlow "
                f"already initialised {len(existing)}. Set `num_cpu_devices` before "
                "anything runs on a device."
            ) from e


def make_strategy(name, num_cpu_devices=0):
    """Creates the distribution strategy.

    Args:
      name: "mirrored", "multi_worker" or "default".
      num_cpu_devices: logical CPU devices to mirror over when > 0 (testing).

    Returns:
      A `tf.distribute.Strategy`.
    """
    import tensorflow as tf

    _check_choice("strategy", name, STRATEGIES)
    if name == "multi_worker":
        # Before devices initialise: the strategy starts the collective server.
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        configure_devices(num_cpu_devices)
        return strategy
    configure_devices(num_cpu_devices)
    if name == "default":
        return tf.distribute.get_strategy()
    if num_cpu_devices:
        devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    else:
        devices = [d.name for d in tf.config.list_logical_devices("GPU")]
    if len(devices) <= 1:
        # One device: mirroring would only add overhead.
        logging.info("One device (%s): not distributing.", devices or "CPU")
        return tf.distribute.get_strategy()
    return tf.distribute.MirroredStrategy(devices=devices)


def is_chief(strategy):
    """True on the worker that writes outputs (always true outside multi-worker)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "cluster_spec", None):
        return True
    spec = resolver.cluster_spec().as_dict()
    if not spec:
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type == "chief":
        return True
    return "chief" not in spec and task_type == "worker" and task_id == 0


# ---------------------------------------------------------------------------
# Data.


def count_examples(data_dir, split):
    """Counts the records of one split, preferring the ingest report.

    Args:
      data_dir: directory of ingested TFRecords.
      split: "train", "val" or "test".

    Returns:
      The number of examples.

    Raises:
      FileNotFoundError: no TFRecord of the split.
    """
    import tensorflow as tf

    report = os.path.join(data_dir, schema.INGEST_REPORT)
    if os.path.isfile(report):
        with open(report) as f:
            payload = json.load(f)
        count = _find_split_count(payload, split)
        if count is not None:
            return count
    files = tf.io.gfile.glob(
        os.path.join(data_dir, schema.TFRECORD_PATTERN.format(split=split))
    )
    if not files:
        raise FileNotFoundError(
            f"No {schema.TFRECORD_PATTERN.format(split=split)} files in {data_dir}"
        )
    ds = tf.data.TFRecordDataset(sorted(files), compression_type="GZIP")
    return int(ds.reduce(np.int64(0), lambda n, _: n + 1).numpy())


def _find_split_count(payload, split):
    # The ingest report format belongs to the ingest helper; accept the
    # plausible layouts rather than failing when it changes.
    for key in ("written", "splits", "split_counts", "counts", "examples"):
        value = payload.get(key) if isinstance(payload, dict) else None
        if isinstance(value, dict) and split in value:
            entry = value[split]
            if isinstance(entry, int):
                return entry
            if isinstance(entry, dict):
                for sub in ("examples", "count", "num_examples", "images"):
                    if isinstance(entry.get(sub), int):
                        return entry[sub]
    return None


def input_config(config, training):
    """The `InputConfig` of the input pipeline for this run."""
    from cxr_tf.data import input_pipeline

    return input_pipeline.InputConfig(
        image_size=config.image_size,
        batch_size=config.batch_size,
        normalization=config.model_config().normalization,
        augment=bool(config.augment and training),
        flip=bool(config.flip and training),
        shuffle_buffer=config.shuffle_buffer,
        seed=config.seed,
    )


def finding_indices(findings):
    """Columns of `findings` in the 14-finding label vector."""
    return [schema.FINDINGS.index(f) for f in findings]


def select_labels(labels, findings):
    """Keeps the label columns of `findings` (a TF op, usable in tf.data)."""
    import tensorflow as tf

    if tuple(findings) == schema.FINDINGS:
        return labels
    return tf.gather(labels, finding_indices(findings), axis=-1)


def make_dataset(config, split, training, with_info=False, batch_size=None):
    """The run's dataset of (image, {"logits": labels}) (or with_info features).

    Args:
      config: a `TrainConfig`.
      split: "train", "val" or "test".
      training: shuffle, augment and repeat.
      with_info: pass the input pipeline's info features through.
      batch_size: overrides the config's batch size.

    Returns:
      A `tf.data.Dataset`.
    """
    import tensorflow as tf

    from cxr_tf.data import input_pipeline

    cfg = input_config(config, training)
    if batch_size is not None:
        cfg = dataclasses.replace(cfg, batch_size=batch_size)
    ds = input_pipeline.build_dataset(
        config.data_dir, split, cfg, training=training, with_info=with_info
    )
    findings = config.findings

    if with_info:
        ds = ds.map(lambda f, y: (f, select_labels(y, findings)))
    else:
        ds = ds.map(lambda x, y: (x, {"logits": select_labels(y, findings)}))
    if training:
        if ds.cardinality() != tf.data.INFINITE_CARDINALITY:
            ds = ds.repeat()
        options = tf.data.Options()
        # Small data sets have fewer files than workers: shard by element.
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.DATA
        )
        ds = ds.with_options(options)
    return ds.prefetch(tf.data.AUTOTUNE)


# ---------------------------------------------------------------------------
# Optimizer and schedule.


def make_learning_rate(config, steps_per_epoch):
    """A float or `keras.optimizers.schedules.LearningRateSchedule`."""
    import keras

    total = config.epochs * steps_per_epoch
    lr = config.learning_rate
    if config.lr_schedule == "constant":
        return lr
    if config.lr_schedule == "cosine":
        warmup = min(config.lr_warmup_steps, max(total - 1, 0))
        return keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0 if warmup else lr,
            decay_steps=max(total - warmup, 1),
            warmup_target=lr if warmup else None,
            warmup_steps=warmup,
        )
    if config.lr_schedule == "step":
        boundaries = [int(e * steps_per_epoch) for e in sorted(config.lr_decay_epochs)]
        if not boundaries:
            raise ValueError(
                "`lr_schedule='step'` needs `lr_decay_epochs`. "
                f"Received: lr_decay_epochs={config.lr_decay_epochs!r}"
            )
        values = [lr * config.lr_decay_factor**i for i in range(len(boundaries) + 1)]
        return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
    return keras.optimizers.schedules.ExponentialDecay(
        lr, decay_steps=steps_per_epoch, decay_rate=config.lr_decay_factor
    )


def make_optimizer(config, steps_per_epoch):
    """The run's Keras optimizer."""
    import keras

    lr = make_learning_rate(config, steps_per_epoch)
    if config.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate=lr)
    if config.optimizer == "adamw":
        return keras.optimizers.AdamW(
            learning_rate=lr, weight_decay=config.weight_decay
        )
    return keras.optimizers.SGD(
        learning_rate=lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay or None,
    )


def resolve_jit_compile(config, strategy):
    """The `jit_compile` argument of `model.compile` for this run."""
    if config.jit_compile == "false":
        return False
    if config.jit_compile == "true":
        return True
    return "auto"


# ---------------------------------------------------------------------------
# Callbacks.


def _summary_metadata(plugin):
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = plugin
    return metadata


def write_scalar(tag, value, step):
    """Writes a TensorBoard scalar with core TF ops (no tensorboard package).

    `tf.summary.scalar` lives in the tensorboard package, which the project
    does not need otherwise; the event format is the same.
    """
    import tensorflow as tf

    return tf.summary.write(
        tag,
        tf.constant(float(value), tf.float32),
        step=step,
        metadata=_summary_metadata("scalars"),
    )


def write_images(tag, images, step):
    """Writes RGB images (N, H, W, 3) in [0, 1] as a TensorBoard image summary."""
    import tensorflow as tf

    images = np.asarray(images)
    pngs = [
        tf.io.encode_png(tf.constant(np.round(np.clip(i, 0, 1) * 255).astype(np.uint8)))
        for i in images
    ]
    height, width = images.shape[1:3]
    tensor = tf.stack([tf.constant(str(width)), tf.constant(str(height))] + pngs)
    return tf.summary.write(
        tag, tensor, step=step, metadata=_summary_metadata("images")
    )


def current_learning_rate(optimizer):
    """The optimizer's learning rate at its current step, as a float."""
    return float(np.asarray(optimizer.learning_rate))


def check_keras_file(path):
    """Raises when `path` is not a whole `.keras` archive (cut or corrupt).

    Keras itself answers "File not found" for a `.keras` file that is not a
    zip archive; this names the file as damaged instead. Every member's CRC
    is checked (a read of the file).

    Raises:
      cxr_tf.errors.UserFileError: the file is truncated or corrupt.
    """
    import zipfile

    from cxr_tf import errors

    fix = (
        "the file is truncated or corrupt: train again (a rerun of the same "
        "command rewrites it from the backup), or load another checkpoint "
        "(best or latest)"
    )
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise errors.UserFileError(
            f"damaged .keras model ({type(e).__name__}: {e})", path, fix
        ) from e
    if bad is not None:
        raise errors.UserFileError(
            f"damaged .keras model (member {bad} fails its CRC)", path, fix
        )


def save_model_atomic(model, path):
    """Saves a `.keras` file via a temporary name so a kill never leaves half."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path[:-len('.keras')]}.tmp-{os.getpid()}.keras"
    model.save(tmp)
    os.replace(tmp, path)


_TEMPORARY = re.compile(r"^tmp-(\d+)\.weights\.h5$|\.tmp-(\d+)(?:\.keras)?$")


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # Someone else's live process.
        return True
    return True


def remove_stale_temporaries(directory, started=True):
    """Deletes the temporary files a killed save left in `directory`.

    Saves write `tmp-<pid>.weights.h5`, `<name>.tmp-<pid>.keras` or
    `<name>.tmp-<pid>` and rename it into place; a kill in between leaves
    the temporary file. One is stale when its process is gone, or, before
    this process has saved anything (`started=False`), when it carries this
    process's id (a restarted container can hand out the same id).

    Args:
      directory: folder to clean (nothing happens when it does not exist).
      started: False at the start of a run, before this process saved.

    Returns:
      The paths removed.
    """
    if not os.path.isdir(directory):
        return []
    removed = []
    for name in sorted(os.listdir(directory)):
        match = _TEMPORARY.search(name)
        if not match:
            continue
        pid = int(match.group(1) or match.group(2))
        if pid == os.getpid() and started:
            continue
        if pid != os.getpid() and _process_alive(pid):
            continue
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            os.remove(path)
            removed.append(path)
    if removed:
        logging.info("Removed temporary files of an interrupted save: %s", removed)
    return removed


def save_backup(model, backup_dir, step, write=True):
    """Writes the fault-tolerance state (weights, optimizer, step) atomically.

    The weights go to `tmp-<pid>.weights.h5`, renamed to
    `step-<step>.weights.h5`; then `state.json` is replaced to point at it,
    and older weights and stale temporary files are deleted.

    Args:
      model: the compiled, built model.
      backup_dir: directory of the backup.
      step: the global step reached.
      write: False on non-chief workers (they save to a scratch dir).
    """
    target = backup_dir if write else tempfile.mkdtemp(prefix="cxr_backup_")
    os.makedirs(target, exist_ok=True)
    weights = os.path.join(target, f"step-{step}.weights.h5")
    tmp = os.path.join(target, f"tmp-{os.getpid()}.weights.h5")
    try:
        model.save_weights(tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, weights)
    model_dir_lib.atomic_write_text(
        os.path.join(target, "state.json"),
        json.dumps({"step": step, "weights": os.path.basename(weights)}),
    )
    # Only after state.json points at the new file is the old one removable.
    for name in os.listdir(target):
        if name.startswith("step-") and name != os.path.basename(weights):
            os.remove(os.path.join(target, name))
    remove_stale_temporaries(target)
    if not write:
        shutil.rmtree(target, ignore_errors=True)


def restore_backup(model, backup_dir):
    """Loads the last backup into a compiled model; returns its step (0 if none).

    Raises:
      cxr_tf.errors.UserFileError: the backup is unreadable, incomplete or
        inconsistent; the message names the file.
    """
    from cxr_tf import errors

    state_path = os.path.join(backup_dir, "state.json")
    if not os.path.isfile(state_path):
        return 0
    fix = (
        f"delete {backup_dir} to train from the start (checkpoints/ keeps the "
        "model of the last finished epoch)"
    )
    try:
        with open(state_path) as f:
            state = json.load(f)
        weights = os.path.join(backup_dir, state["weights"])
        expected_step = int(state["step"])
    except (ValueError, KeyError, TypeError) as e:
        raise errors.UserFileError(
            f"unreadable backup state ({type(e).__name__}: {e})", state_path, fix
        ) from e
    if not os.path.isfile(weights):
        raise errors.UserFileError(
            f"backup weights named by {state_path} are missing", weights, fix
        )
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    try:
        model.load_weights(weights)
    except (OSError, ValueError, KeyError) as e:
        raise errors.UserFileError(
            f"corrupt backup weights ({type(e).__name__}: {e})", weights, fix
        ) from e
    step = int(model.optimizer.iterations.numpy())
    if step != expected_step:
        raise errors.UserFileError(
            f"backup weights hold step {step} but {state_path} says {expected_step}",
            weights,
            fix,
        )
    return step


def overlay_grid(images, maps, probabilities, findings, max_classes=1):
    """RGB overlays (N, S, S, 3) in [0, 1] of each image's top finding's map.

    Args:
      images: (N, S, S, 1) network inputs (normalised; rescaled per image).
      maps: (N, h, w, K) localization maps.
      probabilities: (N, K).
      findings: K names (unused in pixels; kept for symmetry with visualize).
      max_classes: findings per image (the most probable ones).

    Returns:
      float32 array (N, S, S*max_classes, 3).
    """
    import matplotlib

    cmap = matplotlib.colormaps["jet"]
    del findings
    out = []
    for image, image_maps, probs in zip(images, maps, probabilities):
        gray = image[..., 0].astype(np.float64)
        gray = (gray - gray.min()) / max(gray.max() - gray.min(), 1e-8)
        size = gray.shape
        panels = []
        for k in np.argsort(-probs)[:max_classes]:
            m = _resize_bilinear(image_maps[..., k], size)
            m = (m - m.min()) / max(m.max() - m.min(), 1e-8)
            heat = cmap(m)[..., :3]
            panels.append(0.6 * gray[..., None] + 0.4 * heat)
        out.append(np.concatenate(panels, axis=1))
    return np.asarray(out, dtype=np.float32)


def _resize_bilinear(array, size):
    import tensorflow as tf

    return tf.image.resize(array[None, ..., None], size, method="bilinear").numpy()[
        0, ..., 0
    ]


# ---------------------------------------------------------------------------
# The run.


def _prebuild_for_multi_worker(model, strategy, dataset):
    """Builds the compiled loss from a local batch, then skips Keras's build.

    Keras 3.15's `fit` all-reduces the first distributed batch to build the
    compiled loss/metrics symbolically (`_maybe_symbolic_build`); under
    MultiWorkerMirroredStrategy that reduce fails ("Attempt to convert a
    value (PerReplica ...)"). Only the shapes matter, so a local batch does.
    Also reshapes the step's logs for Keras's multi-worker reduce (below).
    """
    for batch in dataset.take(1):
        with strategy.scope():
            model._symbolic_build(data_batch=batch)  # pylint: disable=protected-access
    model._maybe_symbolic_build = (  # pylint: disable=protected-access
        lambda iterator=None, data_batch=None: None
    )
    # Keras then reduces every per-replica log value with
    # `strategy.reduce("MEAN", v, axis=0)`, which rejects scalars: give each
    # value a length-1 axis (the reduce returns the scalar mean).
    import tensorflow as tf

    train_step = model.train_step

    def train_step_with_vector_logs(data):
        logs = train_step(data)
        return {k: tf.reshape(v, [1]) for k, v in logs.items()}

    model.train_step = train_step_with_vector_logs


@dataclasses.dataclass
class TrainResult:
    """What `train` returns."""

    model_dir: str
    steps: int
    initial_step: int
    history: dict
    final_model: str
    best_val_mean_auc: float | None


def check_stored_size(config):
    """Checks the records' stored size against the network size.

    Records stored larger than `image_size` are letterboxed down, as in the
    papers' setup (films stored at 1024, fed at 512); the stored size goes
    into config.json so predict and the served model shrink raw films the
    same way. Records stored smaller would be upscaled: refused unless
    `allow_upscale`, since it usually means a mistaken `--image_size`.

    Args:
      config: a `TrainConfig`.

    Returns:
      `model_dir.training_data(config.data_dir)`.

    Raises:
      UserValueError: records stored smaller than `image_size`.
    """
    data = model_dir_lib.training_data(config.data_dir)
    stored = data["ingest_image_size"]
    if stored is not None and stored < config.image_size:
        message = (
            f"records are stored at {stored} px, smaller than "
            f"--image_size={config.image_size}"
        )
        if not config.allow_upscale:
            raise errors.UserValueError(
                f"{message}: training would upscale them",
                f"--data_dir={config.data_dir}",
                f"re-ingest with --image_size>={config.image_size}, train with "
                f"--image_size<={stored}, or pass --allow_upscale",
            )
        logging.warning("%s; upscaling them (--allow_upscale).", message)
    elif stored is not None and stored != config.image_size:
        logging.info(
            "Records stored at %d px, letterboxed to %d px; config.json records "
            "the stored size for predict and export.",
            stored,
            config.image_size,
        )
    return data


def train(config):
    """Trains a model as configured; resumes from `model_dir/backup` if present.

    Args:
      config: a `TrainConfig`.

    Returns:
      A `TrainResult`.

    Raises:
      FileNotFoundError: no training TFRecords in `data_dir`.
      FloatingPointError: the loss became NaN/inf; the last good checkpoints
        and backup are kept.
      cxr_tf.errors.UserFileError: a record file is truncated or corrupt, or
        the backup is unreadable; the message names the file.
    """
    from cxr_tf.data import input_pipeline

    # A damaged shard surfaces as a DataLossError without a file name wherever
    # the data is read (counting, fit, validation); it is named here.
    with input_pipeline.naming_damaged_files(config.data_dir, ("train", "val")):
        return _train(config)


def _train(config):
    import keras
    import tensorflow as tf

    from cxr_tf import callbacks as callbacks_lib
    from cxr_tf import losses
    from cxr_tf.models import build_model

    if not tf.io.gfile.glob(
        os.path.join(config.data_dir, schema.TFRECORD_PATTERN.format(split="train"))
    ):
        raise errors.UserFileError(
            f"no training records {schema.TFRECORD_PATTERN.format(split='train')}",
            f"--data_dir={config.data_dir}",
            "point --data_dir at the output folder of `python -m pipeline.ingest`",
        )
    # The strategy first: reading a record (check_stored_size, when there is
    # no ingest report) starts the runtime, after which logical devices and
    # the multi-worker collectives can no longer be set up.
    strategy = make_strategy(config.strategy, config.num_cpu_devices)
    data = check_stored_size(config)
    chief = is_chief(strategy)
    keras.utils.set_random_seed(config.seed)
    if config.mixed_precision != "none":
        keras.mixed_precision.set_global_policy(config.mixed_precision)

    steps_per_epoch = config.steps_per_epoch or max(
        1, math.ceil(count_examples(config.data_dir, "train") / config.batch_size)
    )
    total_steps = config.epochs * steps_per_epoch
    model_config = config.model_config()
    model_dir = config.model_dir
    if chief:
        os.makedirs(model_dir, exist_ok=True)
        model_dir_lib.write_config(
            model_dir, model_config, config.findings, config, data=data
        )
        with open(os.path.join(model_dir, "train_config.json"), "w") as f:
            json.dump(
                {**config.to_dict(), "resolved_steps_per_epoch": steps_per_epoch},
                f,
                indent=2,
                sort_keys=True,
            )
    logging.info(
        "Training %s/%s at %d px: %d epochs x %d steps, global batch %d on %d "
        "replica(s).",
        config.backbone,
        config.pooling,
        config.image_size,
        config.epochs,
        steps_per_epoch,
        config.batch_size,
        strategy.num_replicas_in_sync,
    )

    jit = resolve_jit_compile(config, strategy)
    with strategy.scope():
        model = build_model(model_config)
        loss_fn = losses.get_loss(config.loss)
        model.compile(
            optimizer=make_optimizer(config, steps_per_epoch),
            loss={"logits": loss_fn},
            jit_compile=jit,
        )
        model.optimizer.build(model.trainable_variables)
    backup_dir = os.path.join(model_dir, BACKUP_DIR)
    if chief:
        checkpoints = os.path.dirname(os.path.join(model_dir, BEST_CHECKPOINT))
        for folder in (model_dir, backup_dir, checkpoints):
            remove_stale_temporaries(folder, started=False)
    initial_step = restore_backup(model, backup_dir)
    if initial_step:
        logging.info(
            "Resuming from step %d of %d (%s).", initial_step, total_steps, backup_dir
        )

    train_ds = make_dataset(config, "train", training=True)
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        _prebuild_for_multi_worker(model, strategy, train_ds)
    val_ds = make_dataset(config, "val", training=False)
    if config.validation_steps:
        val_ds = val_ds.take(config.validation_steps)
    overlay_images = None
    if config.num_overlay_images:
        for images, _ in make_dataset(
            config, "val", training=False, batch_size=config.num_overlay_images
        ).take(1):
            overlay_images = images

    guard = callbacks_lib.NaNGuardCallback()
    log_dir = os.path.join(model_dir, LOG_DIR) if chief else tempfile.mkdtemp()
    history_log = callbacks_lib.HistoryLog(
        os.path.join(model_dir, callbacks_lib.HISTORY_FILE), guard, write=chief
    )
    callbacks = [
        guard,
        callbacks_lib.StepBackup(
            backup_dir, config.backup_every_steps, guard, chief
        ),
        callbacks_lib.ValidationCallback(
            val_ds,
            config.findings,
            loss_fn,
            os.path.join(log_dir, "validation"),
            overlay_images,
            jit_compile=(jit is True),
            guard=guard,
            write=chief,
        ),
        # After validation: the epoch's row carries val_loss and val_mean_auc.
        history_log,
        callbacks_lib.ProgressLogger(steps_per_epoch, config.epochs, initial_step),
    ]
    if chief:
        callbacks += [
            callbacks_lib.LatestCheckpoint(
                os.path.join(model_dir, LATEST_CHECKPOINT), guard
            ),
            callbacks_lib.BestCheckpoint(
                os.path.join(model_dir, BEST_CHECKPOINT),
                guard,
                os.path.join(model_dir, "checkpoints", "best.json"),
            ),
            callbacks_lib.TrainSummary(os.path.join(log_dir, "train")),
        ]

    epoch, done = divmod(initial_step, steps_per_epoch)
    while epoch < config.epochs and not guard.triggered:
        # A resumed epoch runs only its remaining steps; the rest run whole.
        remaining = steps_per_epoch - done
        if done:
            end_epoch = epoch + 1
            steps = remaining
        else:
            end_epoch = config.epochs
            steps = steps_per_epoch
        model.fit(
            train_ds,
            epochs=end_epoch,
            initial_epoch=epoch,
            steps_per_epoch=steps,
            callbacks=callbacks,
            verbose=config.verbose,
            shuffle=False,
        )
        epoch, done = divmod(int(model.optimizer.iterations.numpy()), steps_per_epoch)

    steps_done = int(model.optimizer.iterations.numpy())
    if guard.triggered:
        raise FloatingPointError(
            f"Training stopped: the loss became {guard.value} at step {guard.step}. "
            f"Kept the last good state: backup {backup_dir} (resume with the same "
            f"command after fixing the cause, e.g. a lower learning rate), "
            f"checkpoints in {os.path.join(model_dir, 'checkpoints')}."
        )
    final_path = os.path.join(model_dir, FINAL_MODEL)
    if chief:
        save_model_atomic(model, final_path)
        # Every epoch of every run so far; a rerun of a finished training
        # rewrites the same rows.
        history_log.save(steps_done)
    else:
        scratch = tempfile.mkdtemp()
        save_model_atomic(model, os.path.join(scratch, FINAL_MODEL))
        shutil.rmtree(scratch, ignore_errors=True)
    if chief and model_config.backbone == "infomask":
        # A mask's values end at 1 - tau, so no fixed threshold fits every
        # model: choose its box threshold on val, as evaluate does for IoP.
        from cxr_tf import evaluate_lib  # pylint: disable=g-import-not-at-top

        evaluate_lib.store_box_threshold(
            model_dir, config.data_dir, "val", batch_size=config.batch_size
        )
    best = None
    best_state = os.path.join(model_dir, "checkpoints", "best.json")
    if os.path.isfile(best_state):
        with open(best_state) as f:
            best = json.load(f)["val_mean_auc"]
    logging.info(
        "Finished %d steps (%d this run). Final model %s; best val mean AUC %s.",
        steps_done,
        steps_done - initial_step,
        final_path,
        best,
    )
    return TrainResult(
        model_dir=model_dir,
        steps=steps_done,
        initial_step=initial_step,
        history=history_log.history,
        final_model=final_path,
        best_val_mean_auc=best,
    )
