"""Tests of benchmarks/reproduce.py: report pieces, and one tiny end-to-end run."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from cxr_tf.data import schema
from tests import script_loader

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "reproduce.py"


@pytest.fixture(scope="module")
def reproduce():
    return script_loader.load(SCRIPT, "reproduce")


def _evaluation(auc, acc05, afp05, iop, map_kind="probability"):
    """A compact evaluation dict as the script stores it."""
    key = "0.9" if map_kind == "probability" else "180"
    per_class = {
        f: {
            "iobb": {f"{t:g}": acc05 for t in (0.1, 0.25, 0.5, 0.75, 0.9)},
            "iou": {f"{t:g}": acc05 / 2 for t in (0.1, 0.25, 0.5, 0.75, 0.9)},
            "afp": {f"{t:g}": afp05 for t in (0.1, 0.25, 0.5, 0.75, 0.9)},
            "num_gt_boxes": 3,
        }
        for f in schema.BOXED_FINDINGS
    }
    mean = {
        kind: {f"{t:g}": v for t in (0.1, 0.25, 0.5, 0.75, 0.9)}
        for kind, v in (("iobb", acc05), ("iou", acc05 / 2), ("afp", afp05))
    }
    return {
        "auc": {f: auc for f in schema.FINDINGS},
        "mean_auc": auc,
        "source": {"map_kind": map_kind},
        "localization": {key: {"per_class": per_class, "mean": mean}},
        "mask": {
            "threshold": 0.5,
            "mean": {"iop": iop, "fpr": 0.1, "fnr": 0.5},
            "per_class": {
                f: {"iop": iop, "fpr": 0.1, "fnr": 0.5} for f in schema.BOXED_FINDINGS
            },
        },
        "accuracy": {f: 0.75 for f in schema.FINDINGS},
        "eval_wall_s": 10.0,
        "run": "pcam",
        "map_source": "model",
    }


def _results(reproduce):
    settings = {
        "seed": 0,
        "num_patients": 10,
        "data_image_size": 64,
        "image_size": 64,
        "batch_size": 2,
        "steps": 3,
        "learning_rate": 1e-3,
        "jit_compile": "auto",
        "poolings": ["pcam", "lse"],
        "infomask_variants": ["infomask"],
        "gradcam_run": "lse",
        "noise_seeds": [1],
        "num_figure_images": 1,
        "smoke": False,
    }
    evaluations = {
        "pcam": _evaluation(0.81, 0.60, 1.2, 0.3),
        "pcam_seed1": _evaluation(0.79, 0.55, 1.0, 0.25),
        "lse": _evaluation(0.70, 0.40, 0.8, 0.2, "cam"),
        "infomask_infomask": _evaluation(0.66, 0.0, 0.0, 0.45),
        "gradcam": {**_evaluation(0.70, 0.1, 0.5, 0.15, "cam"), "run": "lse"},
    }
    runs = {
        name: {
            "backbone": "resnet34",
            "pooling": name,
            "variant": None,
            "seed": 0,
            "train_wall_s": 5.0,
            "reused": False,
        }
        for name in ("pcam", "pcam_seed1", "lse", "infomask_infomask")
    }
    return {
        "command": "python benchmarks/reproduce.py --output_dir=docs/results",
        "settings": settings,
        "started_utc": "2026-01-01 00:00",
        "finished_utc": "2026-01-01 00:40",
        "wall_time_s": 2400.0,
        "machine": {
            "cpu_count": 2,
            "tensorflow": "2.21.0",
            "keras": "3.15.1",
            "load_start": [1.0, 1.0, 1.0],
            "load_end": [1.5, 1.0, 1.0],
        },
        "data": {
            "written": {"train": 20, "val": 4, "test": 6},
            "test_boxes": {f: 2 for f in schema.BOXED_FINDINGS},
            "test_positives": {f: 1 for f in schema.FINDINGS},
        },
        "runs": runs,
        "evaluations": evaluations,
        "figures": {"files": ["figure2.png"], "images": [["00000001_000.png", "Mass"]]},
        "noise": reproduce.noise_summary(evaluations, [1], 0),
    }


def test_noise_summary_spread(reproduce):
    results = _results(reproduce)
    noise = results["noise"]
    assert noise["runs"] == ["pcam", "pcam_seed1"]
    assert noise["spread"]["mean_auc"]["range"] == pytest.approx(0.02)
    assert noise["spread"]["mean_iobb_acc_0.5"]["range"] == pytest.approx(0.05)
    assert noise["per_class_auc_range"]["max"] == pytest.approx(0.02)
    assert (
        reproduce.noise_summary({"pcam": results["evaluations"]["pcam"]}, [], 0) is None
    )


def test_report_tables_and_statements(reproduce, tmp_path):
    results = _results(reproduce)
    md = tmp_path / "RESULTS.md"
    reproduce.write_report(results, md, tmp_path / "results")
    text = md.read_text()
    assert "python benchmarks/reproduce.py --output_dir=docs/results" in text
    # Table 2: the PCAM column's values and the paper's.
    assert "| Atelectasis | **0.810** | 0.700 | 0.772 |" in text
    # Table 3 at IoBB > 0.5: per-finding accuracies and the mean.
    assert "| PCAM (map >= 0.9) | 0.600 |" in text
    assert "| LSE (map >= 180) | 0.400 |" in text
    # InfoMask table, pneumonia row and the paper's rows.
    assert "| InfoMask | 0.450 | 0.100 | 0.500 | 0.750 | 0.660 | 0.50 |" in text
    assert "| paper: InfoMask | 0.440 | 0.025 | 0.800 |" in text
    assert "![Figure 2 layout](results/figure2.png)" in text
    # Orderings stated against the seed spread (0.02 AUC, 0.05 accuracy).
    assert "PCAM above LSE on 8 of 8 findings" in text
    assert "PCAM higher (+0.200)" in text
    assert "Spread (max - min) between seeds: mean AUC 0.020" in text


def test_report_keeps_hand_collected_section(reproduce, tmp_path):
    results = _results(reproduce)
    md = tmp_path / "RESULTS.md"
    reproduce.write_report(results, md, tmp_path / "results")
    generated = md.read_text()
    hand = (
        reproduce.HAND_COLLECTED_MARKER
        + " kept -->\n# Other measurements\n\n- demo: 7 min 25 s\n"
    )
    md.write_text(generated.replace("Reproducing", "Stale title") + "\n" + hand)
    reproduce.write_report(results, md, tmp_path / "results")
    text = md.read_text()
    # The generated part is rewritten, the hand-collected tail is kept once.
    assert "Stale title" not in text
    assert text == generated + "\n" + hand
    reproduce.write_report(results, md, tmp_path / "results")
    assert md.read_text() == text


def test_report_of_the_repository_has_a_hand_collected_section(reproduce):
    text = (ROOT / "docs" / "RESULTS.md").read_text()
    assert text.count(reproduce.HAND_COLLECTED_MARKER) == 1
    assert "# Other measurements (hand-collected)" in text


def test_compare_within_noise(reproduce):
    assert reproduce._compare(0.5, 0.49, 0.02).startswith("within the seed spread")
    assert reproduce._compare(0.5, 0.4, 0.02) == "higher (+0.100)"
    assert reproduce._compare(0.4, 0.5, None) == "lower (-0.100)"
    assert reproduce._compare(None, 0.5, 0.1) == "n/a"


def test_rerun_summary(reproduce, tmp_path):
    results = _results(reproduce)
    other = json.loads(json.dumps(results))
    other["evaluations"]["pcam"]["mean_auc"] = 0.80
    path = tmp_path / "results.json"
    path.write_text(json.dumps(other))
    summary = reproduce.rerun_summary(results, path)
    assert summary["differences"]["pcam"]["mean_auc"] == pytest.approx(0.01)
    assert "near, not on" in summary["text"]
    other["settings"]["steps"] = 99
    path.write_text(json.dumps(other))
    with pytest.raises(ValueError, match="steps"):
        reproduce.rerun_summary(results, path)


def test_accuracy_per_class(reproduce, tmp_path):
    path = tmp_path / "predictions.jsonl"
    records = [
        {"image": "a.png", "probabilities": {"Mass": 0.9, "Nodule": 0.2}},
        {"image": "b.png", "probabilities": {"Mass": 0.4, "Nodule": 0.6}},
        {"image": "unknown.png", "probabilities": {"Mass": 0.9, "Nodule": 0.9}},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    labels = {"a.png": np.zeros(14), "b.png": np.zeros(14)}
    labels["a.png"][schema.FINDINGS.index("Mass")] = 1
    acc = reproduce.accuracy_per_class(path, labels)
    assert acc == {"Mass": 1.0, "Nodule": 0.5}


def test_choose_figure_images(reproduce, tmp_path):
    (tmp_path / "test_list.txt").write_text("00000001_000.png\n00000002_000.png")
    (tmp_path / "BBox_List_2017.csv").write_text(
        "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
        "00000002_000.png,Mass,1,2,3,4\n"
        "00000001_000.png,Atelectasis,1,2,3,4\n"
        "00000001_000.png,Mass,1,2,3,4\n"
        "00000003_000.png,Nodule,1,2,3,4\n"
    )
    chosen = reproduce.choose_figure_images(tmp_path, 3)
    # One film per finding in canonical order; the train film is never used.
    assert chosen == [("00000001_000.png", "Atelectasis"), ("00000002_000.png", "Mass")]


@pytest.mark.slow
def test_smoke_run_end_to_end(tmp_path):
    out = tmp_path / "docs" / "results"
    command = [
        sys.executable,
        str(SCRIPT),
        "--smoke",
        f"--output_dir={out}",
        f"--work_dir={tmp_path / 'work'}",
    ]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["evaluations"]) == {
        "pcam",
        "lse",
        "infomask_infomask",
        "gradcam",
    }
    assert results["evaluations"]["gradcam"]["source"]["map_source"] == "gradcam"
    for name in ("figure2.png", "infomask_maps.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = tmp_path / "docs" / "RESULTS.md"
    text = md.read_text()
    assert "--smoke" in text and "results/figure2.png" in text
    # The report is a pure function of results.json.
    subprocess.run(
        [sys.executable, str(SCRIPT), f"--output_dir={out}", "--report_only"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    assert md.read_text() == text


def test_partial_report_names_missing_runs(reproduce, tmp_path):
    results = _results(reproduce)
    results["complete"] = False
    results["planned_runs"] = ["pcam", "pcam_seed1", "lse", "infomask_infomask", "max"]
    md = tmp_path / "RESULTS.md"
    reproduce.write_report(results, md, tmp_path / "results")
    assert "Partial results: 4 of 5 trainings finished" in md.read_text()
    assert "missing: max." in md.read_text()


def test_run_order_puts_headline_runs_first(reproduce):
    settings = {
        "poolings": ["pcam", "avg", "max", "lse"],
        "noise_seeds": [1],
        "infomask_variants": ["infomask", "regl1"],
        "gradcam_run": "avg",
        "seed": 0,
        "backbone": "compact",
        "infomask_steps": 5,
        "infomask_batch_size": 2,
    }
    runs = reproduce.plan_runs(settings)
    assert runs["max"]["backbone"] == "compact"
    assert runs["infomask_regl1"]["steps"] == 5
    assert runs["infomask_regl1"]["batch_size"] == 2
    assert reproduce.run_order(runs, settings) == [
        "pcam",
        "lse",
        "avg",
        "pcam_seed1",
        "infomask_infomask",
        "infomask_regl1",
        "max",
    ]


def test_report_says_when_classifiers_are_near_chance(reproduce, tmp_path):
    results = _results(reproduce)
    md = tmp_path / "RESULTS.md"
    reproduce.write_report(results, md, tmp_path / "results")
    assert "near chance" not in md.read_text()
    for name in ("pcam", "lse"):
        results["evaluations"][name]["mean_auc"] = 0.52
    reproduce.write_report(results, md, tmp_path / "results")
    assert "every pooling classifies near chance** (mean AUC 0.520" in md.read_text()
