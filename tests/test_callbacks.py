"""Tests of cxr_tf.callbacks and the backup files of cxr_tf.train_lib."""

import json
import logging
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from cxr_tf import callbacks
from cxr_tf import errors
from cxr_tf import train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _progress_lines(caplog):
    return [r.getMessage() for r in caplog.records if "steps/s" in r.getMessage()]


def test_progress_logs_by_time_with_rate_and_eta(caplog):
    clock = _FakeClock()
    progress = callbacks.ProgressLogger(
        steps_per_epoch=100, epochs=2, initial_step=0, interval=15.0, clock=clock
    )
    # On absl's logger itself: an earlier test in the process may have set
    # absl's verbosity (a logger level) above INFO.
    caplog.set_level(logging.INFO, logger="absl")
    progress.on_train_begin()
    progress.on_epoch_begin(0)
    # The first step (tracing, compilation) is always reported.
    clock.now += 20.0
    progress.on_train_batch_end(0, {"loss": np.float32(0.75)})
    assert len(_progress_lines(caplog)) == 1
    assert "Epoch 1/2 step 1/100" in _progress_lines(caplog)[0]
    assert "loss 0.7500" in _progress_lines(caplog)[0]
    # 2 steps/s: 29 steps within 14.5 s stay silent, the 30th (15 s) logs.
    for batch in range(1, 30):
        clock.now += 0.5
        progress.on_train_batch_end(batch, {"loss": 0.5})
    assert len(_progress_lines(caplog)) == 1
    clock.now += 0.5
    progress.on_train_batch_end(30, {"loss": 0.5})
    line = _progress_lines(caplog)[-1]
    assert "step 31/100 (step 31/200 of the run): 2.00 steps/s" in line
    # 69 steps left in the epoch at 2/s: 34.5 s; 169 in the run: 84.5 s.
    assert "epoch ETA 0:00:34" in line or "epoch ETA 0:00:35" in line
    assert "run ETA 0:01:24" in line or "run ETA 0:01:25" in line
    # A slow stretch: one step 40 s later logs at once, whatever the count.
    clock.now += 40.0
    progress.on_train_batch_end(31, {"loss": 0.5})
    assert len(_progress_lines(caplog)) == 3
    assert "0.03 steps/s" in _progress_lines(caplog)[-1]


def test_progress_counts_steps_across_epochs_and_resumes():
    clock = _FakeClock()
    # Resumed at step 7 of 10-step epochs: 3 steps finish epoch 1.
    progress = callbacks.ProgressLogger(10, 3, initial_step=7, clock=clock)
    progress.on_train_begin()
    progress.on_epoch_begin(0)
    for batch in range(3):
        progress.on_train_batch_end(batch)
    assert progress.step == 10
    progress.on_train_begin()
    for epoch in (1, 2):
        progress.on_epoch_begin(epoch)
        for batch in range(10):
            progress.on_train_batch_end(batch)
    assert progress.step == 30
    # steps_per_execution=5: Keras reports batches 4 and 9.
    progress = callbacks.ProgressLogger(10, 1, clock=clock)
    progress.on_train_begin()
    progress.on_epoch_begin(0)
    progress.on_train_batch_end(4)
    progress.on_train_batch_end(9)
    assert progress.step == 10


def _fit(model, path, initial_epoch, epochs):
    guard = callbacks.NaNGuardCallback()
    log = callbacks.HistoryLog(path, guard)
    x = np.ones((8, 2), np.float32)
    model.fit(
        x,
        x[:, :1],
        batch_size=4,
        epochs=epochs,
        initial_epoch=initial_epoch,
        callbacks=[guard, log],
        verbose=0,
    )
    return log


def test_history_spans_resumes_and_survives_a_finished_rerun(tmp_path):
    path = str(tmp_path / "history.json")
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    _fit(model, path, 0, 2)
    first = json.load(open(path))
    assert first["epochs"] == [1, 2] and first["epoch_steps"] == [2, 4]
    assert len(first["history"]["loss"]) == 2
    # A resumed run (new process: a new callback) appends epoch 3.
    log = _fit(model, path, 2, 3)
    log.save(6)
    resumed = json.load(open(path))
    assert resumed["epochs"] == [1, 2, 3] and resumed["steps"] == 6
    assert resumed["history"]["loss"][:2] == first["history"]["loss"]
    # Rerunning the finished training fits nothing and keeps every epoch.
    rerun = callbacks.HistoryLog(path, callbacks.NaNGuardCallback())
    rerun.save(6)
    assert json.load(open(path)) == resumed
    assert rerun.history["loss"] == resumed["history"]["loss"]
    # An epoch run again (killed after its last backup) replaces its row.
    _fit(model, path, 2, 3)
    again = json.load(open(path))
    assert again["epochs"] == [1, 2, 3]


def test_history_reads_files_without_epoch_numbers(tmp_path):
    path = tmp_path / "history.json"
    path.write_text(json.dumps({"steps": 4, "history": {"loss": [0.9, 0.8]}}))
    rows = callbacks.read_history(str(path))
    assert rows == [{"epoch": 1, "loss": 0.9}, {"epoch": 2, "loss": 0.8}]


class _FakeModel:
    """Writes weights files like a Keras model; can die half-way through."""

    def __init__(self, die=False):
        self.die = die

    def save_weights(self, path):
        with open(path, "wb") as f:
            f.write(b"\x89HDF" + b"x" * 1000)
            f.flush()
            if self.die:
                os.kill(os.getpid(), 9)


def test_kill_during_first_backup_leaves_no_temporary_for_ever(tmp_path):
    backup = tmp_path / "backup"
    code = (
        "import sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from tests.test_callbacks import _FakeModel\n"
        "from cxr_tf import train_lib\n"
        "train_lib.save_backup(_FakeModel(die=True), sys.argv[2], 1)\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run(
        [sys.executable, "-c", code, REPO, str(backup)], env=env, timeout=120
    )
    assert proc.returncode == -9
    left = sorted(os.listdir(backup))
    assert len(left) == 1 and left[0].startswith("tmp-"), left
    assert train_lib.restore_backup(None, str(backup)) == 0  # No state yet.
    # The next run cleans it at its start, and every save cleans dead ones.
    (backup / "checkpoints.tmp-999999999").write_text("x")
    removed = train_lib.remove_stale_temporaries(str(backup), started=False)
    assert sorted(os.path.basename(p) for p in removed) == sorted(
        left + ["checkpoints.tmp-999999999"]
    )
    (backup / left[0]).write_bytes(b"half")
    train_lib.save_backup(_FakeModel(), str(backup), 2)
    assert sorted(os.listdir(backup)) == ["state.json", "step-2.weights.h5"]


def test_temporaries_of_live_processes_are_kept(tmp_path):
    live = tmp_path / f"tmp-{os.getppid()}.weights.h5"
    live.write_bytes(b"x")
    own = tmp_path / f"model.tmp-{os.getpid()}.keras"
    own.write_bytes(b"x")
    assert train_lib.remove_stale_temporaries(str(tmp_path)) == []
    # Before this process saved anything, its own id marks a dead namesake.
    assert train_lib.remove_stale_temporaries(str(tmp_path), started=False) == [
        str(own)
    ]
    assert live.exists()


@pytest.mark.parametrize(
    "state, weights, match",
    [
        ("{not json", None, "unreadable backup state"),
        ('{"step": 3, "weights": "step-3.weights.h5"}', None, "are missing"),
        ('{"step": 3, "weights": "step-3.weights.h5"}', b"cut", "corrupt backup"),
    ],
)
def test_damaged_backup_is_named(tmp_path, state, weights, match):
    (tmp_path / "state.json").write_text(state)
    if weights is not None:
        (tmp_path / "step-3.weights.h5").write_bytes(weights)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(errors.UserFileError, match=match) as info:
        train_lib.restore_backup(model, str(tmp_path))
    assert str(tmp_path) in str(info.value) and "delete" in info.value.fix


def test_cut_keras_file_is_named_as_damaged(tmp_path):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    path = str(tmp_path / "model.keras")
    train_lib.save_model_atomic(model, path)
    train_lib.check_keras_file(path)  # Whole: no error.
    assert os.listdir(tmp_path) == ["model.keras"]  # No temporary left.
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 3])
    with pytest.raises(errors.UserFileError, match="damaged .keras model") as info:
        train_lib.check_keras_file(path)
    assert info.value.where == path and "File not found" not in str(info.value)
