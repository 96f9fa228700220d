"""End-to-end test of the README demo at toy scale (its figures are not checked)."""

import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_demo_runs_every_step_and_leaves_its_outputs(tmp_path):
    out = tmp_path / "demo"
    env = dict(
        os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # What a user sees (conftest sets it).
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "cxr_tf.demo",
            f"--output_dir={out}",
            "--num_patients=30",
            "--film_size=64",
            "--ingest_size=64",
            "--num_overlays=2",
            "--train_args=image_size=64,epochs=1,steps_per_epoch=2,batch_size=4",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "PCAM beats LSE on localization" in run.stdout
    # Issue 17: no third-party noise in the demo's output (docs/design/cli.md).
    noise = re.compile(r"apitools|bigquery|semi_persistent|cuInit|unsupported characters")
    noisy = [l for l in (run.stdout + run.stderr).splitlines() if noise.search(l)]
    assert not noisy, noisy[:5]
    # Issue 17: each long phase reports progress (at toy scale, its final
    # line; the time-based lines are tested in test_synthetic, test_ingest_hostile
    # and test_callbacks).
    output = run.stdout + run.stderr
    assert re.search(r"films (\d+) / \1 \(100%\)", output), "no rendering progress"
    assert re.search(r"ingest: \d+/\d+ films in ", output), "no ingest progress"
    assert re.search(r"Epoch 1/1 step \d+/2 .*steps/s", output), "no training progress"
    with open(out / "summary.json") as f:
        summary = json.load(f)
    for name in ("pcam", "lse"):
        assert summary[name]["boxed_findings_evaluated"] >= 1
        assert 0.0 <= summary[name]["mean_auc"] <= 1.0
    assert summary["pcam"]["box_threshold"] == "0.9"
    assert summary["lse"]["box_threshold"] == "180"
    outputs = summary["outputs"]
    for key in ("model", "metrics", "roc", "localization_plot"):
        assert os.path.isfile(outputs[key]), key
    assert len(os.listdir(outputs["overlays"])) == 2
    assert os.path.isdir(outputs["export"])
    # The export is the checkpoint evaluate scored, and carries its metrics.
    with open(outputs["metrics"]) as f:
        metrics = json.load(f)
    with open(os.path.join(outputs["export"], "assets", "model_card.json")) as f:
        card = json.load(f)
    assert card["source_model"] == metrics["source"]["model"] == outputs["model"]
    assert card["metrics"]["classification"] == metrics["classification"]
    assert card["training_data"]["synthetic"] is True
