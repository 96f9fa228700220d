"""End-to-end tests of `python -m pipeline.run` on tiny synthetic data."""

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from pipeline import base

REPO = pathlib.Path(__file__).resolve().parents[2]
STEPS = ("synthetic", "ingest", "statistics", "train", "evaluate", "push")


def _tiny_flags(tmp_path, steps=2, extra=()):
    # Small data lacks rare findings in some splits: a curated schema that only
    # checks labels, sizes and patient leaks (the default demands all 14).
    schema_path = tmp_path / "schema.json"
    schema_path.write_text(
        json.dumps(
            {
                "required_splits": ["train", "val", "test"],
                "required_findings_per_split": [],
                "label_domain": [0, 1],
                "image_max_side": 64,
                "patient_disjoint_splits": True,
            }
        )
    )
    flags = [
        "--synthetic_patients=40",
        "--synthetic_image_size=64",
        "--image_size=64",
        f"--train_flagfile={REPO / 'configs' / 'demo.flags'}",
        "--train_arg=--image_size=64",
        "--train_arg=--epochs=1",
        f"--train_arg=--steps_per_epoch={steps}",
        "--train_arg=--batch_size=8",
        "--train_arg=--jit_compile=false",
        f"--schema={schema_path}",
        f"--pipeline_root={tmp_path / 'root'}",
        f"--serving_model_dir={tmp_path / 'serving'}",
        "--min_mean_auc=0",
        "--min_localization_accuracy=0",
        "--ingest_arg=--num_workers=1",
        "--direct_num_workers=1",
    ]
    return flags + list(extra)


def _run(flags, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.run", *flags],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(
        (
            pathlib.Path(flags_value(flags, "pipeline_root")) / "last_run.json"
        ).read_text()
    )


def flags_value(flags, name):
    return next(f.split("=", 1)[1] for f in flags if f.startswith(f"--{name}="))


def _config(tmp_path, data):
    from pipeline import run

    return run.PipelineConfig(
        pipeline_root=str(tmp_path / "root"),
        serving_model_dir=str(tmp_path / "serving"),
        train_flagfile=str(REPO / "configs" / "demo.flags"),
        data_dir=str(data),
    )


def test_last_run_reflects_a_failed_run_and_times_each_step(
    tmp_path, monkeypatch, caplog
):
    from cxr_tf import errors
    from pipeline import run

    data = tmp_path / "raw"
    data.mkdir()
    (data / "Data_Entry_2017.csv").write_text("Image Index\n")
    root = tmp_path / "root"
    root.mkdir()
    (root / "last_run.json").write_text(json.dumps({"status": "succeeded"}))
    shard = str(data / "train-00001-of-00002.tfrecord.gz")

    def ingest_fails(fn, config, log_path=None, name=None):
        raise errors.UserFileError("damaged TFRecord file: truncated record", shard)

    monkeypatch.setattr(run.child, "run", ingest_fails)
    caplog.set_level("INFO", logger="absl")  # Whatever absl's verbosity.
    with pytest.raises(base.StepUserError, match="train-00001-of-00002"):
        run.run_pipeline(_config(tmp_path, data))
    report = json.loads((root / "last_run.json").read_text())
    assert report["status"] == "failed" and report["failed_step"] == "ingest"
    assert shard in report["error"] and "\n" not in report["error"]
    assert report["runs"]["ingest"]["action"] == "failed"
    assert "pipeline step 1/5: ingest" in caplog.text

    # Ingest now works; statistics fails: ingest is timed, statistics named.
    monkeypatch.setattr(run.child, "run", lambda *a, **k: None)

    def statistics_fails(*args):
        raise base.AnomaliesFoundError("label_domain: value 2 in train")

    monkeypatch.setattr(run.statistics, "run_statistics", statistics_fails)
    with pytest.raises(base.StepFailedError, match="label_domain"):
        run.run_pipeline(_config(tmp_path, data))
    report = json.loads((root / "last_run.json").read_text())
    assert report["failed_step"] == "statistics"
    assert report["runs"]["ingest"]["action"] == "ran"
    assert report["runs"]["ingest"]["seconds"] >= 0
    assert set(report["steps"]) == {"ingest"}
    assert "AnomaliesFoundError: label_domain" in report["error"]
    # The summary table names every step with what it did.
    table = caplog.text[caplog.text.rindex("steps:") :]
    for line in ("ingest       ran", "statistics   failed", "train        not run"):
        assert line in table, table


def test_a_bad_training_flagfile_fails_before_any_child_starts(
    tmp_path, monkeypatch
):
    from cxr_tf import errors
    from pipeline import run

    flagfile = tmp_path / "bad.flags"
    flagfile.write_text("--backbone=compact\n--pooling=pcma\n")

    def no_child(*args, **kwargs):
        raise AssertionError("a child process was started")

    monkeypatch.setattr(run.child, "run", no_child)
    config = run.PipelineConfig(
        pipeline_root=str(tmp_path / "root"),
        serving_model_dir=str(tmp_path / "serving"),
        train_flagfile=str(flagfile),
        synthetic_patients=4,
    )
    with pytest.raises(errors.UserError) as info:
        run.run_pipeline(config)
    # The line `python -m cxr_tf.train --flagfile=bad.flags` prints.
    message = str(info.value)
    assert message.startswith("unknown value 'pcma' (--pooling): use one of pcam")
    assert "\n" not in message
    assert not (tmp_path / "root").exists()
    # An override from --train_arg is read the same way.
    with pytest.raises(errors.UserError, match="Received: batch_size=0"):
        run.run_pipeline(
            dataclasses.replace(
                config,
                train_flagfile=str(REPO / "configs" / "demo.flags"),
                train_args=("--batch_size=0",),
            )
        )


@pytest.mark.slow
def test_pipeline_runs_caches_and_reruns_what_changed(tmp_path):
    flags = _tiny_flags(tmp_path)
    first = _run(flags, tmp_path)
    assert set(first["steps"]) == set(STEPS)
    assert first["pushed"]["pushed"] is True and first["pushed"]["version"] == 1
    version_dir = tmp_path / "serving" / "1"
    assert (version_dir / "saved_model.pb").is_file()
    assert not [p for p in (tmp_path / "serving").iterdir() if p.name.startswith(".")]
    for step in STEPS:
        record = json.loads(
            (pathlib.Path(first["steps"][step]["uri"]) / base.RECORD_FILE).read_text()
        )
        assert record["status"] == "succeeded"
        for key in (
            "inputs",
            "outputs",
            "parameters",
            "code_version",
            "start_time",
            "end_time",
        ):
            assert key in record

    _assert_served(tmp_path / "serving", first)

    # Unchanged: every step is reused, nothing is pushed again.
    second = _run(flags, tmp_path)
    assert {s: v["run_id"] for s, v in second["steps"].items()} == {
        s: v["run_id"] for s, v in first["steps"].items()
    }
    assert {s: v["start"] for s, v in second["steps"].items()} == {
        s: v["start"] for s, v in first["steps"].items()
    }
    assert second["wall_seconds"] < 30, second["wall_seconds"]
    assert sorted(p.name for p in (tmp_path / "serving").iterdir()) == ["1"]

    # A training flag changed: only train, evaluate and push run again.
    third = _run(_tiny_flags(tmp_path, steps=3), tmp_path)
    for step in ("synthetic", "ingest", "statistics"):
        assert third["steps"][step] == first["steps"][step], step
    for step in ("train", "evaluate", "push"):
        assert third["steps"][step]["run_id"] != first["steps"][step]["run_id"], step
    # A worse model is never pushed. Whichever of the two trained models is
    # worse gets compared with the better one once that one is pushed:
    # re-evaluating the first model against a pushed better second model
    # (evaluate and push forced, training reused) must refuse it.
    if third["pushed"]["pushed"]:
        assert third["pushed"]["version"] == 2
        fourth = _run(flags + ["--force_steps=evaluate,push"], tmp_path)
        assert fourth["steps"]["train"] == first["steps"]["train"]
        refused = fourth["pushed"]
    else:
        refused = third["pushed"]
    assert refused["pushed"] is False
    assert any("worse than the pushed model" in r for r in refused["reasons"]), refused
    assert len(list((tmp_path / "serving").iterdir())) == (
        2 if third["pushed"]["pushed"] else 1
    )


def _assert_served(serving_dir, report):
    """The local PredictionService answers from the pushed version."""
    from serving import client as client_lib  # pylint: disable=import-outside-toplevel
    from serving import local_server  # pylint: disable=import-outside-toplevel

    image = next(
        (pathlib.Path(report["steps"]["synthetic"]["uri"]) / "images").glob("*.png")
    )
    server = local_server.LocalServer(serving_dir, port=0).start()
    try:
        with client_lib.CxrClient(f"127.0.0.1:{server.port}", timeout=60) as client:
            (result,) = list(client.predict_files([str(image)]))
        assert len(result["probabilities"]) == 14
        assert all(0.0 <= p <= 1.0 for p in result["probabilities"].values())
    finally:
        server.stop()


def _statistics_done(root):
    return (
        any(
            json.loads(p.read_text()).get("status") == "succeeded"
            for p in (root / "statistics").glob(f"*/{base.RECORD_FILE}")
        )
        if (root / "statistics").is_dir()
        else False
    )


@pytest.mark.slow
def test_killed_during_train_resumes_without_redoing_earlier_steps(tmp_path):
    flags = _tiny_flags(
        tmp_path, steps=40, extra=["--train_arg=--backup_every_steps=4"]
    )
    root = tmp_path / "root"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.run", *flags],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Wait until training has written its first backup, then SIGKILL.
        deadline = time.time() + 900
        while time.time() < deadline:
            backups = list(root.glob("train/*/backup*")) if root.is_dir() else []
            if backups and _statistics_done(root):
                break
            assert proc.poll() is None, "pipeline ended before training started"
            time.sleep(0.5)
        else:
            pytest.fail("training never wrote a backup")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = {
        step: sorted(p.name for p in (root / step).iterdir())
        for step in ("synthetic", "ingest", "statistics")
    }
    record_times = {
        step: json.loads(next((root / step).glob(f"*/{base.RECORD_FILE}")).read_text())[
            "start_time"
        ]
        for step in before
    }
    report = _run(flags, tmp_path)
    for step in before:
        assert sorted(p.name for p in (root / step).iterdir()) == before[step]
        assert report["steps"][step]["start"] == record_times[step]
    assert report["pushed"]["pushed"] is True
    train_log = (
        pathlib.Path(report["steps"]["train"]["uri"]) / "train.log"
    ).read_text()
    assert "Finished 40 steps" in train_log


@pytest.mark.slow
def test_corrupted_cache_entries_are_rerun_not_reused(tmp_path):
    # The attack: after a finished run, cut a train shard and the cached model
    # to a third, then rerun the unchanged command.
    flags = _tiny_flags(tmp_path)
    first = _run(flags, tmp_path)
    assert first["status"] == "succeeded" and first["failed_step"] is None
    shard = sorted(
        pathlib.Path(first["steps"]["ingest"]["uri"]).glob("train-*.tfrecord.gz")
    )[0]
    model = pathlib.Path(first["steps"]["train"]["uri"]) / "model.keras"
    sizes = {}
    for path in (shard, model):
        data = path.read_bytes()
        sizes[path] = len(data)
        path.write_bytes(data[: len(data) // 3])

    second = _run(flags, tmp_path)
    runs = second["runs"]
    assert second["status"] == "succeeded"
    assert runs["ingest"]["action"] == "reran" and str(shard) in runs["ingest"]["reason"]
    assert runs["train"]["action"] == "reran" and str(model) in runs["train"]["reason"]
    for step in ("synthetic", "statistics", "evaluate", "push"):
        assert runs[step]["action"] == "reused", (step, runs[step])
    # Written again whole; training resumed from its intact backup.
    from cxr_tf.data import input_pipeline  # pylint: disable=import-outside-toplevel

    assert input_pipeline.find_damaged_files([str(shard)]) == []
    assert model.stat().st_size > sizes[model] // 3
    train_log = (model.parent / "train.log").read_text()
    assert "Finished 2 steps (0 this run)" in train_log
    assert "sha256" in json.dumps(
        json.loads((model.parent / base.RECORD_FILE).read_text())["checksums"]
    )
