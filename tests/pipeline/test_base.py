"""Tests for step records, caching and atomic folders."""

import json
import os

import pytest

from pipeline import base, evaluate


def test_step_runs_once_then_reuses(tmp_path):
    calls = []

    def fn(out):
        calls.append(out)
        (open(os.path.join(out, "x.txt"), "w")).write("hi")
        return {"x": os.path.join(out, "x.txt")}

    a = base.run_step(tmp_path, "s", fn, {"p": 1}, {})
    b = base.run_step(tmp_path, "s", fn, {"p": 1}, {})
    assert len(calls) == 1 and a.uri == b.uri
    assert b.record["status"] == "succeeded" and b.outputs["x"].endswith("x.txt")
    for key in (
        "inputs",
        "outputs",
        "parameters",
        "code_version",
        "start_time",
        "end_time",
        "status",
    ):
        assert key in json.load(open(os.path.join(a.uri, base.RECORD_FILE)))
    c = base.run_step(tmp_path, "s", fn, {"p": 2}, {})
    assert len(calls) == 2 and c.uri != a.uri
    base.run_step(tmp_path, "s", fn, {"p": 1}, {}, force=True)
    assert len(calls) == 3


def test_downstream_key_follows_upstream(tmp_path):
    up1 = base.run_step(tmp_path, "up", lambda out: {}, {"v": 1}, {})
    up2 = base.run_step(tmp_path, "up", lambda out: {}, {"v": 2}, {})
    d1 = base.run_step(tmp_path, "down", lambda out, u: {}, {}, {"u": up1})
    d2 = base.run_step(tmp_path, "down", lambda out, u: {}, {}, {"u": up2})
    assert d1.run_id != d2.run_id


def test_failed_step_is_recorded_and_rerun_resumes_in_place(tmp_path):
    def bad(out):
        open(os.path.join(out, "partial"), "w").write("1")
        raise ValueError("boom at step 3")

    with pytest.raises(base.StepFailedError, match="boom at step 3"):
        base.run_step(tmp_path, "train", bad, {}, {}, keep=True)
    (failed,) = (tmp_path / "train").iterdir()
    record = json.load(open(failed / base.RECORD_FILE))
    assert record["status"] == "failed" and "boom" in record["error"]

    def good(out):
        return {"resumed": os.path.exists(os.path.join(out, "partial"))}

    art = base.run_step(tmp_path, "train", good, {}, {}, keep=True)
    assert art.uri == str(failed) and art.outputs["resumed"] is True


def test_atomic_directory(tmp_path):
    with base.atomic_directory(tmp_path / "3") as tmp:
        (tmp / "saved_model.pb").write_text("x")
        assert not (tmp_path / "3").exists()
    assert (tmp_path / "3" / "saved_model.pb").exists()
    with pytest.raises(RuntimeError):
        with base.atomic_directory(tmp_path / "4"):
            raise RuntimeError("export failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3"]


def test_bless():
    good = {"mean_auc": 0.9, "localization_accuracy": 0.6}
    assert evaluate.bless(good, None, 0.8, 0.5)["blessed"]
    worse = {"mean_auc": 0.85, "localization_accuracy": 0.6}
    b = evaluate.bless(worse, dict(good, version=1), 0.8, 0.5)
    assert not b["blessed"]
    assert "mean_auc 0.8500 is worse than the pushed model's 0.9000" in b["reasons"][0]
    low = evaluate.bless(
        {"mean_auc": 0.7, "localization_accuracy": None}, None, 0.8, 0.5
    )
    assert len(low["reasons"]) == 2 and not low["blessed"]


def _write_shards(out):
    for name in ("train-00000-of-00001.tfrecord.gz", "val-00000-of-00001.tfrecord.gz"):
        with open(os.path.join(out, name), "wb") as f:
            f.write(os.urandom(3000))
    os.makedirs(os.path.join(out, "sub"))
    with open(os.path.join(out, "sub", "report.json"), "w") as f:
        f.write("{}")
    return {}


def test_cut_cached_output_reruns_and_says_which_file(tmp_path, caplog):
    calls = []

    def fn(out):
        calls.append(out)
        return _write_shards(out)

    first = base.run_step(tmp_path, "ingest", fn, {}, {})
    checksums = first.record["checksums"]
    assert checksums["algorithm"] == "sha256"
    assert set(checksums["files"]) == {
        "train-00000-of-00001.tfrecord.gz",
        "val-00000-of-00001.tfrecord.gz",
        "sub/report.json",
    }
    assert base.run_step(tmp_path, "ingest", fn, {}, {}).action == "reused"
    shard = os.path.join(first.uri, "train-00000-of-00001.tfrecord.gz")
    data = open(shard, "rb").read()
    open(shard, "wb").write(data[: len(data) // 3])
    caplog.set_level("WARNING")
    again = base.run_step(tmp_path, "ingest", fn, {}, {})
    assert len(calls) == 2 and again.action == "reran"
    assert f"{shard} has 1000 bytes, 3000 when written" in again.reason
    assert shard in caplog.text
    record = json.load(open(os.path.join(again.uri, base.RECORD_FILE)))
    assert record["rerun_reason"] == again.reason
    assert os.path.getsize(shard) == 3000  # Written again, whole.
    assert base.run_step(tmp_path, "ingest", fn, {}, {}).action == "reused"


@pytest.mark.parametrize(
    "damage, expected",
    [
        ("same_size", "changed (sha256 differs)"),
        ("extra", "was not written by the step"),
        ("missing", "is missing"),
    ],
)
def test_any_change_to_a_cached_output_is_caught(tmp_path, damage, expected):
    first = base.run_step(tmp_path, "ingest", _write_shards, {}, {})
    shard = os.path.join(first.uri, "val-00000-of-00001.tfrecord.gz")
    if damage == "same_size":
        data = bytearray(open(shard, "rb").read())
        data[100] ^= 0xFF
        open(shard, "wb").write(bytes(data))
    elif damage == "extra":
        shard = os.path.join(first.uri, "train-00001-of-00001.tfrecord.gz")
        open(shard, "wb").write(b"planted")
    else:
        os.remove(shard)
    problems = base.verify_outputs(first.uri, first.record["checksums"])
    assert problems == [
        (os.path.relpath(shard, first.uri), f"{shard} {expected}")
    ]
    again = base.run_step(tmp_path, "ingest", _write_shards, {}, {})
    assert again.action == "reran" and shard in again.reason
    assert not os.path.exists(os.path.join(first.uri, "train-00001-of-00001.tfrecord.gz"))


def test_keep_step_resumes_from_its_intact_files(tmp_path):
    def train(out):
        backup = os.path.join(out, "backup.h5")
        resumed = os.path.exists(backup)
        if not resumed:
            open(backup, "w").write("step 40")
        open(os.path.join(out, "model.keras"), "w").write("a whole model")
        return {"resumed": resumed}

    first = base.run_step(tmp_path, "train", train, {}, {}, keep=True)
    assert first.outputs == {"resumed": False}
    model = os.path.join(first.uri, "model.keras")
    open(model, "w").write("a whole")  # Cut.
    again = base.run_step(tmp_path, "train", train, {}, {}, keep=True)
    assert again.action == "reran" and model in again.reason
    assert again.outputs == {"resumed": True}  # The backup was intact: kept.
    assert open(model).read() == "a whole model"


def test_user_error_in_a_step_is_one_line_naming_the_file(tmp_path):
    from cxr_tf import errors

    def bad(out):
        raise errors.UserFileError(
            "damaged TFRecord file: truncated record", "/data/train-00001.gz", "rerun"
        )

    with pytest.raises(base.StepUserError) as info:
        base.run_step(tmp_path, "train", bad, {}, {})
    message = str(info.value)
    assert isinstance(info.value, errors.UserError)
    assert isinstance(info.value, base.StepFailedError)
    assert "\n" not in message and "/data/train-00001.gz" in message
    assert message.startswith("step 'train' failed: damaged TFRecord file")
    record = json.load(open(next((tmp_path / "train").glob("*/record.json"))))
    assert record["status"] == "failed" and "train-00001" in record["error"]


def test_module_sources_follow_imports_and_catch_what_a_hand_list_forgot():
    from pipeline import run

    train = set(run.SOURCES["train"])
    # Deferred (function-level) imports are followed: train_lib imports the
    # model builder inside `train`.
    assert "cxr_tf/models/localizer.py" in train
    assert "cxr_tf/model_dir.py" in train and "cxr_tf/callbacks.py" in train
    # Package __init__ files run first, so they count.
    assert "cxr_tf/layers/__init__.py" in train
    # What a step does not import does not rerun it.
    assert "cxr_tf/export_lib.py" not in train
    assert "cxr_tf/export_lib.py" in run.SOURCES["push"]
    assert "cxr_tf/data/synthetic.py" not in run.SOURCES["ingest"]
    assert "cxr_tf/data/ingest.py" in run.SOURCES["ingest"]


def test_module_sources_of_a_package_follow_its_init():
    # `cxr_tf.models` is a package: its __init__ imports the builder.
    got = base.module_sources("cxr_tf.models")
    assert "cxr_tf/models/localizer.py" in got and "cxr_tf/models/config.py" in got
