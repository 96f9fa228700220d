"""Training callbacks: NaN guard, step backups, validation, checkpoints, history, progress.

Imported by `train_lib.train` when a run starts (importing it loads Keras and
TensorFlow); module level so tests and other trainers can use each one.
"""

import json
import math
import os
import time

from absl import logging
import keras
import numpy as np
from scipy import special
import tensorflow as tf

from cxr_tf.checkpoints import save_backup
from cxr_tf.checkpoints import save_model_atomic
from cxr_tf.model_dir import atomic_write_text
from cxr_tf.summaries import current_learning_rate
from cxr_tf.summaries import overlay_grid
from cxr_tf.summaries import write_images
from cxr_tf.summaries import write_scalar

HISTORY_FILE = "history.json"


class NaNGuardCallback(keras.callbacks.Callback):
    """TerminateOnNaN that also records the step and blocks checkpoints."""

    def __init__(self):
        super().__init__()
        self.triggered = False
        self.step = None
        self.value = None

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None or self.triggered:
            return
        loss = float(loss)
        if not math.isfinite(loss):
            self.triggered = True
            self.step = int(self.model.optimizer.iterations.numpy())
            self.value = loss
            logging.error(
                "Loss became %s at step %d: stopping (the last good "
                "checkpoints are kept).",
                loss,
                self.step,
            )
            self.model.stop_training = True


class StepBackup(keras.callbacks.Callback):
    """Saves weights + optimizer state every N steps, atomically.

    Unlike `keras.callbacks.BackupAndRestore`, which restarts an
    interrupted epoch from its first batch, the state here carries the
    global step (the optimizer's `iterations`) so a resumed run finishes
    with exactly the planned number of steps.
    """

    def __init__(self, backup_dir, every_steps, guard, write):
        super().__init__()
        self.backup_dir = backup_dir
        self.every_steps = every_steps
        self.guard = guard
        self.write = write

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        if step % self.every_steps == 0:
            self.save(step)

    def on_epoch_end(self, epoch, logs=None):
        self.save(int(self.model.optimizer.iterations.numpy()))

    def save(self, step):
        if self.guard.triggered:
            return
        save_backup(self.model, self.backup_dir, step, write=self.write)


class ValidationCallback(keras.callbacks.Callback):
    """Val loss and per-class AUC each epoch; map overlays to TensorBoard.

    Adds `val_loss` and `val_mean_auc` to the epoch logs, so callbacks
    after it (checkpoints, TensorBoard, history) see them.
    """

    def __init__(
        self,
        dataset,
        findings,
        loss_fn,
        log_dir,
        overlay_images,
        jit_compile,
        guard,
        write,
    ):
        super().__init__()
        self.dataset = dataset
        self.findings = tuple(findings)
        self.loss_fn = loss_fn
        self.overlay_images = overlay_images
        self.jit_compile = jit_compile
        self.guard = guard
        self.write = write
        self.writer = tf.summary.create_file_writer(log_dir) if write else None
        self._predict = None

    def _predict_fn(self):
        if self._predict is None:
            model = self.model

            @tf.function(jit_compile=self.jit_compile, reduce_retracing=True)
            def predict(images):
                out = model(images, training=False)
                return out["logits"], out["localization_maps"]

            self._predict = predict
        return self._predict

    def evaluate(self):
        """Runs the model on the val set: (labels, logits), both (N, K)."""
        predict = self._predict_fn()
        labels, logits = [], []
        for images, targets in self.dataset:
            batch_logits, _ = predict(images)
            labels.append(targets["logits"].numpy())
            logits.append(batch_logits.numpy())
        if not labels:
            raise ValueError("The validation split yielded no batches.")
        return np.concatenate(labels), np.concatenate(logits).astype(np.float64)

    def on_epoch_end(self, epoch, logs=None):
        if self.guard.triggered:
            return
        from cxr_tf.metrics import classification

        logs = logs if logs is not None else {}
        start = time.time()
        labels, logits = self.evaluate()
        loss = float(
            self.loss_fn(labels.astype(np.float32), logits.astype(np.float32))
        )
        probs = special.expit(logits)
        aucs = classification.auroc_per_class(labels, probs, self.findings)
        values = [v for v in aucs.values() if v is not None]
        mean_auc = float(np.mean(values)) if values else float("nan")
        logs["val_loss"] = loss
        logs["val_mean_auc"] = mean_auc
        logging.info(
            "Epoch %d validation: loss %.4f, mean AUC %.4f over %d classes "
            "(%.1f s)",
            epoch + 1,
            loss,
            mean_auc,
            len(values),
            time.time() - start,
        )
        if self.writer is None:
            return
        step = int(self.model.optimizer.iterations.numpy())
        with self.writer.as_default(step=step):
            write_scalar("epoch_loss", loss, step)
            for name, value in aucs.items():
                if value is not None:
                    write_scalar(f"auc/{name}", value, step)
            write_scalar("auc/mean", mean_auc, step)
            if self.overlay_images is not None:
                images, probs_o, maps = self._overlay_inputs()
                write_images(
                    "localization_maps",
                    overlay_grid(images, maps, probs_o, self.findings),
                    step,
                )
        self.writer.flush()

    def _overlay_inputs(self):
        images = self.overlay_images
        logits, maps = self._predict_fn()(images)
        return images.numpy(), special.expit(logits.numpy()), maps.numpy()


class TrainSummary(keras.callbacks.Callback):
    """Training loss and learning rate to TensorBoard (batch and epoch)."""

    def __init__(self, log_dir, every_steps=10):
        super().__init__()
        self.writer = tf.summary.create_file_writer(log_dir)
        self.every_steps = every_steps

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        loss = (logs or {}).get("loss")
        if loss is None or step % self.every_steps:
            return
        with self.writer.as_default(step=step):
            write_scalar("batch_loss", loss, step)
            write_scalar(
                "learning_rate", current_learning_rate(self.model.optimizer), step
            )

    def on_epoch_end(self, epoch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        logs = logs or {}
        with self.writer.as_default(step=step):
            if "loss" in logs:
                write_scalar("epoch_loss", logs["loss"], step)
            write_scalar(
                "learning_rate", current_learning_rate(self.model.optimizer), step
            )
        self.writer.flush()


class LatestCheckpoint(keras.callbacks.Callback):
    """Saves the whole model at the end of each finished epoch."""

    def __init__(self, path, guard):
        super().__init__()
        self.path = path
        self.guard = guard

    def on_epoch_end(self, epoch, logs=None):
        if not self.guard.triggered:
            save_model_atomic(self.model, self.path)


class BestCheckpoint(keras.callbacks.Callback):
    """Keeps the model of the best validation mean AUC (survives resume)."""

    def __init__(self, path, guard, state_path):
        super().__init__()
        self.path = path
        self.guard = guard
        self.state_path = state_path
        self.best = -math.inf
        if os.path.isfile(state_path):
            with open(state_path) as f:
                self.best = json.load(f)["val_mean_auc"]

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get("val_mean_auc")
        if self.guard.triggered or value is None or not math.isfinite(value):
            return
        if value > self.best:
            logging.info(
                "Validation mean AUC improved %.4f -> %.4f: saving %s",
                self.best,
                value,
                self.path,
            )
            self.best = value
            save_model_atomic(self.model, self.path)
            atomic_write_text(
                self.state_path,
                json.dumps({"val_mean_auc": value, "epoch": epoch + 1}),
            )


def _as_float(value):
    # Multi-worker runs hand length-1 vectors (see train_lib); others scalars.
    return float(np.mean(np.asarray(value, dtype=np.float64)))


def read_history(path):
    """The per-epoch rows of a history.json: [{"epoch": n, "loss": ...}, ...].

    Files written before rows carried their epoch number hold columns only;
    their rows are numbered 1, 2, ... Returns [] when there is no file.
    """
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        payload = json.load(f)
    columns = payload.get("history", {})
    length = max((len(v) for v in columns.values()), default=0)
    epochs = payload.get("epochs") or list(range(1, length + 1))
    steps = payload.get("epoch_steps") or [None] * len(epochs)
    rows = []
    for i, (epoch, step) in enumerate(zip(epochs, steps)):
        row = {"epoch": int(epoch)}
        if step is not None:
            row["step"] = int(step)
        for key, values in columns.items():
            if i < len(values) and values[i] is not None:
                row[key] = values[i]
        rows.append(row)
    return rows


def history_payload(rows, steps):
    """history.json's content: one column per metric, aligned with `epochs`."""
    keys = sorted({k for row in rows for k in row} - {"epoch", "step"})
    return {
        "steps": int(steps),
        "epochs": [row["epoch"] for row in rows],
        "epoch_steps": [row.get("step") for row in rows],
        "history": {k: [row.get(k) for row in rows] for k in keys},
    }


class HistoryLog(keras.callbacks.Callback):
    """Writes history.json at the end of every epoch, keeping earlier runs' epochs.

    A resumed run appends to the epochs the killed run finished; an epoch run
    again (killed after its last backup but before its end) replaces its row.
    Rerunning a finished training leaves the file as it was.

    Args:
      path: the history.json to extend.
      guard: the run's `NaNGuardCallback` (an epoch with a NaN loss is not
        recorded).
      write: False on non-chief workers.
    """

    def __init__(self, path, guard, write=True):
        super().__init__()
        self.path = path
        self.guard = guard
        self.write = write
        self.rows = read_history(path) if write else []

    @property
    def history(self):
        """The columns of every recorded epoch, {"loss": [...], ...}."""
        return history_payload(self.rows, 0)["history"]

    def on_epoch_end(self, epoch, logs=None):
        if self.guard.triggered:
            return
        step = int(self.model.optimizer.iterations.numpy())
        row = {"epoch": epoch + 1, "step": step}
        row.update({k: _as_float(v) for k, v in (logs or {}).items()})
        self.rows = [r for r in self.rows if r["epoch"] < epoch + 1] + [row]
        self.save(step)

    def save(self, steps):
        """Writes the file (atomically); `steps` is the run's global step."""
        if self.write:
            atomic_write_text(
                self.path, json.dumps(history_payload(self.rows, steps), indent=2)
            )


def _clock(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressLogger(keras.callbacks.Callback):
    """Logs progress inside an epoch: step, steps/s and ETA, by wall time.

    A line is logged after the first step of each `fit` call (its time
    includes tracing and compilation) and then whenever `interval` seconds
    have passed since the last line, however many steps that took. The rate
    is that of the steps since the last line; the ETAs count training steps
    only (validation at epoch ends comes on top).

    Args:
      steps_per_epoch: steps in a full epoch.
      epochs: epochs of the whole run.
      initial_step: the global step the run starts (resumes) from.
      interval: seconds between lines.
      clock: a monotonic clock in seconds (tests pass a fake one).
    """

    def __init__(
        self, steps_per_epoch, epochs, initial_step=0, interval=15.0, clock=None
    ):
        super().__init__()
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = steps_per_epoch * epochs
        self.epochs = epochs
        self.step = initial_step
        self.interval = interval
        self.clock = clock or time.monotonic
        self.lines = 0
        self._batches = 0
        self._first = True
        self._last_time = self._last_step = None

    def on_train_begin(self, logs=None):
        self._first = True
        self._last_time, self._last_step = self.clock(), self.step

    def on_epoch_begin(self, epoch, logs=None):
        self._batches = 0

    def on_train_batch_end(self, batch, logs=None):
        # `batch` counts from 0 in each epoch of this fit call; with
        # steps_per_execution > 1 it jumps by more than one.
        self.step += batch + 1 - self._batches
        self._batches = batch + 1
        now = self.clock()
        if self._last_time is None:
            self._last_time, self._last_step = now, self.step
            return
        elapsed = now - self._last_time
        if not self._first and elapsed < self.interval:
            return
        self._first = False
        rate = (self.step - self._last_step) / max(elapsed, 1e-9)
        epoch, in_epoch = divmod(self.step, self.steps_per_epoch)
        if in_epoch == 0:
            epoch, in_epoch = epoch - 1, self.steps_per_epoch
        loss = (logs or {}).get("loss")
        loss_text = f", loss {_as_float(loss):.4f}" if loss is not None else ""
        if rate > 0:
            eta_epoch = _clock((self.steps_per_epoch - in_epoch) / rate)
            eta_run = _clock((self.total_steps - self.step) / rate)
        else:
            eta_epoch = eta_run = "unknown"
        logging.info(
            "Epoch %d/%d step %d/%d (step %d/%d of the run): %.2f steps/s%s; "
            "epoch ETA %s, run ETA %s (training steps only)",
            epoch + 1,
            self.epochs,
            in_epoch,
            self.steps_per_epoch,
            self.step,
            self.total_steps,
            rate,
            loss_text,
            eta_epoch,
            eta_run,
        )
        self.lines += 1
        self._last_time, self._last_step = now, self.step
