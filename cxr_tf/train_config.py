"""`TrainConfig`: every setting of a training run, checked, flag-free."""

import dataclasses


from cxr_tf import choices
from cxr_tf import config_dict
from cxr_tf.data import schema
from cxr_tf.models.config import ModelConfig


# The names live in cxr_tf.choices (the CLI checks them before TF loads).
OPTIMIZERS = choices.OPTIMIZERS
LR_SCHEDULES = choices.LR_SCHEDULES
STRATEGIES = choices.STRATEGIES
MIXED_PRECISION = choices.MIXED_PRECISION
JIT_COMPILE = choices.JIT_COMPILE


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; written as JSON next to its outputs.

    Attributes:
      data_dir: directory of ingested TFRecords (`{split}-*.tfrecord.gz`).
      model_dir: output directory (config, checkpoints, logs, final model).
      model: the `ModelConfig` of the network trained (a dict, as `to_dict`
        writes it, is read with `ModelConfig.from_dict`); every model setting
        lives there. Its `num_classes` must equal the number of `findings`
        and its `channels` must be 1 (the records hold grayscale films).
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
      allow_upscale: train on records stored smaller than `model.image_size`
        (upscaled, with a warning) instead of refusing them.
      verbose: Keras progress output (1 = progress bar, 2 = one line/epoch).
    """

    data_dir: str
    model_dir: str
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
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
    allow_upscale: bool = False
    verbose: int = 1

    def __post_init__(self):
        if isinstance(self.model, dict):
            object.__setattr__(self, "model", ModelConfig.from_dict(self.model))
        if not isinstance(self.model, ModelConfig):
            raise ValueError(
                "`model` must be a ModelConfig (or its dict). "
                f"Received: model={self.model!r}"
            )
        for name in ("findings", "lr_decay_epochs"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_choice("strategy", self.strategy, STRATEGIES)
        check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        check_choice("jit_compile", self.jit_compile, JIT_COMPILE)
        for name in ("batch_size", "epochs", "backup_every_steps"):
            config_dict.check_int(name, getattr(self, name))
        for name in ("steps_per_epoch", "validation_steps"):
            config_dict.check_int(name, getattr(self, name), optional=True)
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
        # The model checked its own fields; what training adds is checked here.
        if self.model.num_classes != len(self.findings):
            raise ValueError(
                f"`model.num_classes` must equal the number of `findings` "
                f"({len(self.findings)}: {', '.join(self.findings)}). "
                f"Received: model.num_classes={self.model.num_classes!r}"
            )
        if self.model.channels != 1:
            raise ValueError(
                "`model.channels` must be 1: the records hold grayscale films. "
                f"Received: model.channels={self.model.channels!r}"
            )

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        d["findings"] = list(self.findings)
        d["lr_decay_epochs"] = list(self.lr_decay_epochs)
        return d

    @classmethod
    def from_dict(cls, d):
        return config_dict.from_dict(cls, d)


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(
            f"`{name}` must be one of {choices}. Received: {name}={value!r}"
        )


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
