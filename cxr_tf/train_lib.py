"""A training run: builds the model, fits it with resume and checkpoints.

The run's parts live in their own modules: `train_config` (TrainConfig),
`distribute` (devices, strategies), `train_data` (datasets, the stored size
check), `checkpoints` (atomic saves, backups), `summaries` (TensorBoard) and
`callbacks`. The names below are re-exported as the run's public surface.
"""

import dataclasses
import json
import math
import os
import shutil
import tempfile

from absl import logging

from cxr_tf import choices
from cxr_tf import errors
from cxr_tf import model_dir as model_dir_lib
from cxr_tf.data import schema
from cxr_tf import distribute
from cxr_tf import train_data
from cxr_tf.checkpoints import BACKUP_DIR
from cxr_tf.checkpoints import check_keras_file
from cxr_tf.checkpoints import remove_stale_temporaries
from cxr_tf.checkpoints import restore_backup
from cxr_tf.checkpoints import save_backup
from cxr_tf.checkpoints import save_model_atomic
from cxr_tf.train_config import JIT_COMPILE
from cxr_tf.train_config import LR_SCHEDULES
from cxr_tf.train_config import MIXED_PRECISION
from cxr_tf.train_config import OPTIMIZERS
from cxr_tf.train_config import STRATEGIES
from cxr_tf.train_config import TrainConfig
from cxr_tf.train_config import parse_options
from cxr_tf.train_data import check_stored_size
from cxr_tf.train_data import count_examples

FINAL_MODEL = model_dir_lib.FINAL_MODEL
BEST_CHECKPOINT = model_dir_lib.BEST_CHECKPOINT
LATEST_CHECKPOINT = model_dir_lib.LATEST_CHECKPOINT
LOG_DIR = "logs"

__all__ = [
    "BACKUP_DIR",
    "BEST_CHECKPOINT",
    "FINAL_MODEL",
    "JIT_COMPILE",
    "LATEST_CHECKPOINT",
    "LOG_DIR",
    "LR_SCHEDULES",
    "MIXED_PRECISION",
    "OPTIMIZERS",
    "STRATEGIES",
    "TrainConfig",
    "TrainResult",
    "check_keras_file",
    "check_stored_size",
    "count_examples",
    "make_learning_rate",
    "make_optimizer",
    "parse_options",
    "remove_stale_temporaries",
    "restore_backup",
    "save_backup",
    "save_model_atomic",
    "train",
]


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


@dataclasses.dataclass
class TrainResult:
    """What `train` returns."""

    model_dir: str
    steps: int
    initial_step: int
    history: dict
    final_model: str
    best_val_mean_auc: float | None


def _model_label(model):
    """A `ModelConfig`'s model as the log names it: "backbone/pooling".

    An InfoMask network has no pooling head (its `choices.Backbone` has no
    trunk), so it is named by backbone and variant: "infomask (variant V)".
    """
    if choices.BACKBONE_REGISTRY[model.backbone].trunk is None:
        return f"{model.backbone} (variant {model.infomask_variant})"
    return f"{model.backbone}/{model.pooling}"


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
    strategy = distribute.make_strategy(config.strategy, config.num_cpu_devices)
    data = check_stored_size(config)
    chief = distribute.is_chief(strategy)
    keras.utils.set_random_seed(config.seed)
    if config.mixed_precision != "none":
        keras.mixed_precision.set_global_policy(config.mixed_precision)

    steps_per_epoch = config.steps_per_epoch or max(
        1, math.ceil(count_examples(config.data_dir, "train") / config.batch_size)
    )
    total_steps = config.epochs * steps_per_epoch
    model_dir = config.model_dir
    if chief:
        os.makedirs(model_dir, exist_ok=True)
        model_dir_lib.write_config(
            model_dir, config.model, config.findings, config, data=data
        )
        with open(os.path.join(model_dir, "train_config.json"), "w") as f:
            json.dump(
                {**config.to_dict(), "resolved_steps_per_epoch": steps_per_epoch},
                f,
                indent=2,
                sort_keys=True,
            )
    logging.info(
        "Training %s at %d px: %d epochs x %d steps, global batch %d on %d "
        "replica(s).",
        _model_label(config.model),
        config.model.image_size,
        config.epochs,
        steps_per_epoch,
        config.batch_size,
        strategy.num_replicas_in_sync,
    )

    jit = distribute.resolve_jit_compile(config, strategy)
    with strategy.scope():
        model = build_model(config.model)
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

    train_ds = train_data.make_dataset(config, "train", training=True)
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        distribute.prebuild_for_multi_worker(model, strategy, train_ds)
    val_ds = train_data.make_dataset(config, "val", training=False)
    if config.validation_steps:
        val_ds = val_ds.take(config.validation_steps)
    overlay_images = None
    if config.num_overlay_images:
        for images, _ in train_data.make_dataset(
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
    if chief:
        from cxr_tf import evaluate_lib  # pylint: disable=g-import-not-at-top

        # Evaluate's IoP threshold of the final and best models, chosen on val
        # once here rather than in every evaluation. A mask's values end at
        # 1 - tau, so no fixed box threshold fits every InfoMask model: the
        # final model gets one per finding, chosen on val
        # (`evaluate_lib.choose_mask_box_thresholds`).
        evaluate_lib.store_mask_threshold_choices(
            model_dir,
            config.data_dir,
            "val",
            batch_size=config.batch_size,
            box_threshold_of="final" if config.model.backbone == "infomask" else None,
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
