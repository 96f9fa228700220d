"""Tests of benchmarks/reproduce.py and _reproduce_report.py; one end-to-end run."""

import hashlib
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


@pytest.fixture(scope="module")
def report(reproduce):
    return reproduce._reproduce_report


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


def _results(report):
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
        "noise": report.noise_summary(evaluations, [1], 0),
    }


def _real_results(report):
    """Results of a partial --smoke run on ChestX-ray14, for the real-data branches."""
    results = _results(report)
    results["settings"].update(
        data_dir="/data/cxr14", image_size=None, backbone="resnet34", smoke=True
    )
    results["complete"] = False
    results["planned_runs"] = ["pcam", "lse", "pcam_seed1", "infomask_infomask", "max"]
    results["machine"]["load_start"] = [3.0, 1.0, 1.0]
    results["data"].update(
        kind="chestxray14",
        tables={
            "data_entry": "/data/cxr14/Data_Entry_2017_v2020.csv",
            "bbox_list": "/data/cxr14/BBox_List_2017.csv",
            "train_val_list": None,
            "test_list": "/data/cxr14/test_list.txt",
        },
        notes=["Two Data_Entry tables; the newest, Data_Entry_2017_v2020.csv, was used."],
        test_positives={f: (0 if f == "Hernia" else 1) for f in schema.FINDINGS},
        test_boxes={f: (0 if f == "Mass" else 2) for f in schema.BOXED_FINDINGS},
    )
    results["data_stages"] = {"ingest": {"wall_s": 14.1, "reused": True}}
    pooling = {"backbone": "resnet34", "image_size": 1024, "batch_size": 36,
               "epochs": 10, "learning_rate": 1e-4, "findings": list(schema.FINDINGS)}
    for name in ("pcam", "pcam_seed1", "lse"):
        results["runs"][name]["config"] = dict(pooling)
    results["runs"]["infomask_infomask"].update(
        backbone="infomask",
        pooling="avg",
        variant="infomask",
        config={"backbone": "infomask", "image_size": 64, "batch_size": 4,
                "epochs": 1, "steps_per_epoch": 2, "learning_rate": 1e-3,
                "findings": ["Pneumonia"]},
    )
    results["figures"]["files"] = ["figure2.png", "infomask_maps.png"]
    results["rerun"] = {"text": "Same-seed rerun: the command reproduces its numbers."}
    return results


# sha256 of the RESULTS.md that write_report writes from `_results` and
# `_real_results`, taken from the code before the report left reproduce.py
# (commit a8ed23c), so that move changed no byte. A deliberate change of the
# report's text updates these.
REPORT_SHA256 = {
    "real": "0c0bc7ca59fc138159f4361d81deafbef343e16e984794e5a312a4ec2bb00253",
    "synthetic": "2ce74427b4b3ac8103c07cfa86ad7f7a017aec8f8798b7c550675c9edcc518b8",
}


@pytest.mark.parametrize("kind", sorted(REPORT_SHA256))
def test_report_text_is_unchanged(report, tmp_path, kind):
    results = (_real_results if kind == "real" else _results)(report)
    md = tmp_path / "docs" / "RESULTS.md"
    report.write_report(results, md, tmp_path / "docs" / "results")
    text = md.read_text()
    assert hashlib.sha256(text.encode()).hexdigest() == REPORT_SHA256[kind], text


def test_noise_summary_spread(report):
    results = _results(report)
    noise = results["noise"]
    assert noise["runs"] == ["pcam", "pcam_seed1"]
    assert noise["spread"]["mean_auc"]["range"] == pytest.approx(0.02)
    assert noise["spread"]["mean_iobb_acc_0.5"]["range"] == pytest.approx(0.05)
    assert noise["per_class_auc_range"]["max"] == pytest.approx(0.02)
    assert (
        report.noise_summary({"pcam": results["evaluations"]["pcam"]}, [], 0) is None
    )


def test_report_tables_and_statements(report, tmp_path):
    results = _results(report)
    md = tmp_path / "RESULTS.md"
    report.write_report(results, md, tmp_path / "results")
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


def test_report_keeps_hand_collected_section(report, tmp_path):
    results = _results(report)
    md = tmp_path / "RESULTS.md"
    report.write_report(results, md, tmp_path / "results")
    generated = md.read_text()
    hand = (
        report.HAND_COLLECTED_MARKER
        + " kept -->\n# Other measurements\n\n- demo: 7 min 25 s\n"
    )
    md.write_text(generated.replace("Reproducing", "Stale title") + "\n" + hand)
    report.write_report(results, md, tmp_path / "results")
    text = md.read_text()
    # The generated part is rewritten, the hand-collected tail is kept once.
    assert "Stale title" not in text
    assert text == generated + "\n" + hand
    report.write_report(results, md, tmp_path / "results")
    assert md.read_text() == text


def test_report_of_the_repository_has_a_hand_collected_section(report):
    text = (ROOT / "docs" / "RESULTS.md").read_text()
    assert text.count(report.HAND_COLLECTED_MARKER) == 1
    assert "# Other measurements (hand-collected)" in text


def test_compare_within_noise(report):
    assert report._compare(0.5, 0.49, 0.02).startswith("within the seed spread")
    assert report._compare(0.5, 0.4, 0.02) == "higher (+0.100)"
    assert report._compare(0.4, 0.5, None) == "lower (-0.100)"
    assert report._compare(None, 0.5, 0.1) == "n/a"


def test_rerun_summary(report, tmp_path):
    results = _results(report)
    other = json.loads(json.dumps(results))
    other["evaluations"]["pcam"]["mean_auc"] = 0.80
    path = tmp_path / "results.json"
    path.write_text(json.dumps(other))
    summary = report.rerun_summary(results, path)
    assert summary["differences"]["pcam"]["mean_auc"] == pytest.approx(0.01)
    assert "near, not on" in summary["text"]
    other["settings"]["steps"] = 99
    path.write_text(json.dumps(other))
    with pytest.raises(ValueError, match="steps"):
        report.rerun_summary(results, path)


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


def test_run_config_reads_old_and_new_config_json_alike(reproduce, tmp_path):
    from cxr_tf import model_dir as model_dir_lib
    from cxr_tf import train_lib
    from cxr_tf.models import ModelConfig
    from tests.test_model_dir import FLAT_TRAIN_SECTION

    model = ModelConfig(
        backbone="compact", pooling="lse", num_classes=1, image_size=64,
        pooling_options={"gamma": 10.0},
    )
    # The same run as FLAT_TRAIN_SECTION, written as training writes it now.
    train = train_lib.TrainConfig.from_dict(
        {**{k: v for k, v in FLAT_TRAIN_SECTION.items() if k not in model.to_dict()},
         "model": model.to_dict()}
    )
    model_dir_lib.write_config(
        str(tmp_path / "new"), model, train.findings, train, map_kind="cam"
    )
    path = model_dir_lib.write_config(
        str(tmp_path / "old"), model, train.findings, map_kind="cam"
    )
    payload = model_dir_lib.read_config(path)
    payload["train"] = FLAT_TRAIN_SECTION
    model_dir_lib.atomic_write_text(path, json.dumps(payload))
    expected = {
        "backbone": "compact", "pooling": "lse", "image_size": 64, "batch_size": 16,
        "epochs": 1, "steps_per_epoch": None, "learning_rate": 0.0001,
        "lr_schedule": "constant", "optimizer": "adam", "loss": "balanced_bce",
        "weights": None, "findings": ["Pneumonia"], "mixed_precision": "none",
        "strategy": "mirrored",
    }
    assert reproduce.run_config(tmp_path / "new") == expected
    assert reproduce.run_config(tmp_path / "old") == expected
    assert reproduce.run_config(tmp_path / "none") == {}


def test_choose_figure_images(reproduce, tmp_path):
    (tmp_path / "BBox_List_2017.csv").write_text(
        "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
        "00000002_000.png,Mass,1,2,3,4\n"
        "00000001_000.png,Atelectasis,1,2,3,4\n"
        "00000001_000.png,Mass,1,2,3,4\n"
        "00000003_000.png,Nodule,1,2,3,4\n"
    )
    test_ids = {"00000001_000.png", "00000002_000.png"}
    chosen = reproduce.choose_figure_images(tmp_path / "BBox_List_2017.csv", test_ids, 3)
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


def test_partial_report_names_missing_runs(report, tmp_path):
    results = _results(report)
    results["complete"] = False
    results["planned_runs"] = ["pcam", "pcam_seed1", "lse", "infomask_infomask", "max"]
    md = tmp_path / "RESULTS.md"
    report.write_report(results, md, tmp_path / "results")
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


def test_report_says_when_classifiers_are_near_chance(report, tmp_path):
    results = _results(report)
    md = tmp_path / "RESULTS.md"
    report.write_report(results, md, tmp_path / "results")
    assert "near chance" not in md.read_text()
    for name in ("pcam", "lse"):
        results["evaluations"][name]["mean_auc"] = 0.52
    report.write_report(results, md, tmp_path / "results")
    assert "every pooling classifies near chance** (mean AUC 0.520" in md.read_text()


def test_real_tables_take_the_newest_data_entry_and_name_the_choice(
    reproduce, cxr14_sample
):
    real = reproduce._reproduce_real
    given = dict.fromkeys(("data_entry", "bbox_list", "train_val_list", "test_list"))
    tables, images, notes = real.resolve_tables(str(cxr14_sample), given)
    assert tables["data_entry"].endswith("Data_Entry_2017_v2020.csv")
    assert tables["test_list"].endswith("test_list.txt")
    assert "Data_Entry_2017_v2020.csv, was used" in notes[0]
    assert len([n for n in images if n.endswith(".png")]) == 135
    older = str(cxr14_sample / "meta" / "Data_Entry_2017.csv")
    tables, _, notes = real.resolve_tables(str(cxr14_sample), {**given, "data_entry": older})
    assert tables["data_entry"] == older and notes == []


def test_real_train_argv_starts_from_the_papers_flagfiles(reproduce):
    real = reproduce._reproduce_real
    settings = {"smoke": False, "seed": 3, "backbone": "resnet34", "image_size": None,
                "batch_size": None, "steps": None, "learning_rate": None,
                "jit_compile": None}
    pcam = {"backbone": "resnet34", "pooling": "pcam", "variant": None, "seed": 3}
    argv = real.train_argv(settings, pcam, "R", "M")
    assert argv[0].endswith("configs/pcam_resnet34.flags")
    # Nothing but data, folder, seed and the method overrides the paper.
    assert not any(a.startswith(("--image_size", "--batch_size", "--epochs")) for a in argv)
    lse = real.train_argv(settings, {**pcam, "pooling": "lse"}, "R", "M")
    assert lse[0].endswith("configs/lse_resnet34.flags")
    mask = {"backbone": "infomask", "pooling": "avg", "variant": "regl1", "seed": 3,
            "steps": 2, "batch_size": 4}
    argv = real.train_argv({**settings, "smoke": True, "image_size": 64}, mask, "R", "M")
    assert argv[0].endswith("configs/infomask.flags")
    assert "--infomask_variant=regl1" in argv and "--steps_per_epoch=2" in argv
    assert "--image_size=64" in argv and "--batch_size=4" in argv
    assert not any(a.startswith("--pooling") for a in argv)


def test_report_names_findings_without_positives(report):
    data = {
        "test_positives": {f: (0 if f == "Hernia" else 2) for f in schema.FINDINGS},
        "test_boxes": {f: (0 if f == "Mass" else 1) for f in schema.BOXED_FINDINGS},
    }
    text = report.missing_findings(data)
    assert "no positive test film for Hernia (AUC undefined)" in text
    assert "no test box for Mass" in text


@pytest.mark.slow
def test_smoke_run_on_the_real_sample(cxr14_sample, tmp_path):
    # Exactly the acceptance command: every method, scored on the NIH boxes.
    out = tmp_path / "O"
    command = [
        sys.executable,
        str(SCRIPT),
        f"--data_dir={cxr14_sample}",
        f"--output_dir={out}",
        "--smoke",
        f"--work_dir={tmp_path / 'work'}",
    ]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["complete"]
    assert set(results["evaluations"]) == {
        *reproduce_methods(),
        "gradcam",
    }
    data = results["data"]
    assert data["kind"] == "chestxray14"
    assert data["written"]["test"] > 0 and data["written"]["train"] > 0
    # The sample's 91 test films with boxes carry the NIH boxes of each finding.
    assert all(data["test_boxes"][f] > 0 for f in schema.BOXED_FINDINGS)
    for name, evaluation in results["evaluations"].items():
        section = next(iter(evaluation["localization"].values()))
        gt = sum(v.get("num_gt_boxes", 0) for v in section["per_class"].values())
        assert gt > 0, name
    runs = results["runs"]
    assert runs["lse"]["config"]["loss"] == "balanced_bce"
    assert runs["infomask_infomask"]["config"]["findings"] == ["Pneumonia"]
    text = (out / "RESULTS.md").read_text()
    assert text.startswith("# Reproducing the papers' comparisons on ChestX-ray14")
    assert "a subset of ChestX-ray14" in text
    assert "Data_Entry_2017_v2020.csv, was used" in text
    assert not (tmp_path / "RESULTS.md").exists()


def reproduce_methods():
    return [
        "pcam", "avg", "max", "linear", "exp", "lse", "lse_lba", "attention",
        "infomask_infomask", "infomask_featuremask", "infomask_regl1",
    ]
