"""Tests for step records, caching and atomic folders."""

import json
import os

import pytest

from pipeline import base, evaluate, push


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
    assert push.next_version(tmp_path) == 4


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
