"""Tests of cxr_tf.predict on real PNG (RGBA too) and DICOM files."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cxr_tf import model_dir as model_dir_lib
from cxr_tf import localization
from cxr_tf import predict_lib
from cxr_tf.data import preprocess
from cxr_tf.data import schema

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _save_model(directory, config):
    from cxr_tf.models import build_model

    model = build_model(config)
    model_dir_lib.write_config(directory, config, schema.FINDINGS)
    model.save(os.path.join(directory, "model.keras"))
    return directory


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """An untrained but real model with probability maps, small and quick: the
    InfoMask network at 64 px."""
    from cxr_tf.models import ModelConfig

    return _save_model(
        str(tmp_path_factory.mktemp("model")),
        ModelConfig(backbone="infomask", image_size=64),
    )


@pytest.fixture(scope="module")
def pcam_model_dir(tmp_path_factory):
    """An untrained ResNet-34 + PCAM model at 64 px."""
    from cxr_tf.models import ModelConfig

    return _save_model(
        str(tmp_path_factory.mktemp("pcam")), ModelConfig(image_size=64, pooling="pcam")
    )


def _sample_files(root, count):
    images = sorted(os.listdir(root / "images"))
    rgba = [
        line.split(",")[1]
        for line in (root / "SOURCES.csv").read_text().splitlines()
        if "RGBA" in line
    ]
    picked = [n for n in images if any(n in r for r in rgba)][:1] + images[:count]
    return [str(root / "images" / n) for n in dict.fromkeys(picked)]


def test_predict_png_rgba_dicom_and_a_broken_file(
    tiny_model_dir, cxr14_sample, tmp_path
):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    inputs = _sample_files(cxr14_sample, 2) + [
        str(cxr14_sample / "dicom" / "CR-MONO1-10-chest.dcm"),
        str(broken),
    ]
    out = tmp_path / "out"
    summary = predict_lib.predict(
        predict_lib.PredictConfig(
            model=tiny_model_dir,
            output_dir=str(out),
            box_threshold=0.0,
            box_findings="all",
            # One overlay panel per image keeps the test quick.
            positive_threshold=1.0,
        ),
        inputs,
    )
    assert summary["predicted"] == len(inputs) - 1
    assert [f["image"] for f in summary["failed"]] == [str(broken)]
    assert "broken.png" in summary["failed"][0]["reason"]
    with open(out / "predictions.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert len(records) == len(inputs) - 1
    for record in records:
        assert set(record["probabilities"]) == set(schema.FINDINGS)
        # One extension: 00000003_000.png, x.dcm -> x.png.
        stem = os.path.splitext(record["image"])[0]
        assert record["overlay"] == f"overlays/{stem}.png"
        assert os.path.isfile(out / record["overlay"])
        # Threshold 0 on a probability map: one box per finding, the film.
        assert len(record["boxes"]) == schema.NUM_FINDINGS
        for b in record["boxes"]:
            assert b["x"] >= 0 and b["y"] >= 0
            assert b["x"] + b["w"] <= record["width"] + 1e-6
            assert b["y"] + b["h"] <= record["height"] + 1e-6
    png = [r for r in records if r["image"].endswith(".png")]
    assert all((r["height"], r["width"]) == (1024, 1024) for r in png)
    assert all(b["w"] == pytest.approx(1024) for r in png for b in r["boxes"])


def test_predict_marks_a_dicom_whose_header_was_wrong(
    tiny_model_dir, cxr14_sample, tmp_path
):
    dicom = cxr14_sample / "dicom"
    siim = "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
    inputs = [str(dicom / siim), str(dicom / "Fake_MONOHR1.dcm")]
    by_mode = {}
    for mode in ("auto", "header"):
        out = tmp_path / mode
        predict_lib.predict(
            predict_lib.PredictConfig(
                model=tiny_model_dir,
                output_dir=str(out),
                overlays=False,
                dicom_orientation=mode,
            ),
            inputs,
        )
        with open(out / "predictions.jsonl") as f:
            by_mode[mode] = {r["image"]: r for r in map(json.loads, f)}
    auto, header = by_mode["auto"], by_mode["header"]
    # Same pixels once the wrong header is caught: the same prediction.
    assert auto["Fake_MONOHR1.dcm"].pop("orientation_corrected") is True
    # Equal up to the 6 printed decimals: two films of one batch may differ in
    # the last float32 bit (oneDNN's blocking depends on the batch position).
    same = lambda a, b: a.keys() == b.keys() and all(  # noqa: E731
        abs(a[k] - b[k]) <= 2e-6 for k in a
    )
    assert same(auto["Fake_MONOHR1.dcm"]["probabilities"], auto[siim]["probabilities"])
    assert "orientation_corrected" not in auto[siim]
    assert not any("orientation_corrected" in r for r in header.values())
    assert header[siim].keys() == auto[siim].keys()
    assert same(header[siim]["probabilities"], auto[siim]["probabilities"])
    assert header["Fake_MONOHR1.dcm"]["probabilities"] != auto[siim]["probabilities"]
    with pytest.raises(ValueError, match="`dicom_orientation` must be one of"):
        predict_lib.PredictConfig(model="m", output_dir="o", dicom_orientation="x")


def test_boxes_match_the_model_map_in_original_pixels(tiny_model_dir, cxr14_sample):
    from cxr_tf.data import images

    path = _sample_files(cxr14_sample, 1)[-1]
    loaded = model_dir_lib.load(tiny_model_dir)
    pixels = images.read_image(path)
    x = preprocess.preprocess_pixels(pixels, 64, loaded.normalization)[None]
    probs, maps = predict_lib.MapComputer(loaded)(x)
    k = 2
    threshold = float(np.median(maps[0, ..., k]))
    record = predict_lib.prediction_record(
        "a.png",
        pixels.shape,
        probs[0],
        maps[0],
        list(schema.FINDINGS),
        64,
        "probability",
        box_threshold=threshold,
        box_findings="all",
    )
    expected = localization.extract_boxes(
        maps[0, ..., k], (1024, 1024), "probability", threshold
    )
    got = [b for b in record["boxes"] if b["finding"] == schema.FINDINGS[k]]
    assert len(got) == len(expected) >= 1
    for g, e in zip(got, expected):
        assert (g["x"], g["y"], g["w"], g["h"]) == pytest.approx(
            (e.x, e.y, e.w, e.h), abs=0.01
        )


@pytest.mark.slow
def test_cli_on_the_whole_sample(pcam_model_dir, cxr14_sample, tmp_path):
    out = tmp_path / "out"
    env = dict(
        os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "cxr_tf.predict",
            f"--model={pcam_model_dir}",
            f"--output_dir={out}",
            # Boxes of every finding; one overlay panel per film (the most
            # probable finding) keeps 138 overlays affordable on 2 cores.
            "--box_findings=all",
            "--positive_threshold=1.0",
            "--box_threshold=0.3",
            str(cxr14_sample / "images"),
            str(cxr14_sample / "dicom"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    expected = sorted(os.listdir(cxr14_sample / "images")) + sorted(
        os.listdir(cxr14_sample / "dicom")
    )
    with open(out / "predictions.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert sorted(r["image"] for r in records) == sorted(expected)
    for r in records:
        assert os.path.isfile(out / r["overlay"]) and ".png.png" not in r["overlay"]
        if r["image"].endswith(".png"):
            assert (r["height"], r["width"]) == (1024, 1024)
        for b in r["boxes"]:
            assert 0 <= b["x"] and b["x"] + b["w"] <= r["width"] + 1e-6
    assert sum(len(r["boxes"]) for r in records) > 0


def test_list_images_keys_films_by_path_below_the_argument(tmp_path):
    for folder in ("a", "b", "b/deep"):
        (tmp_path / "in" / folder).mkdir(parents=True)
    for name in ("a/good.png", "b/good.png", "b/deep/good.png", "a/x.dcm", "a/x.png"):
        (tmp_path / "in" / name).write_bytes(b"")
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    images, missing = predict_lib.list_images(
        [str(tmp_path / "in"), str(tmp_path / "in" / "a" / "good.png"), "nope"]
    )
    assert missing == ["nope"]
    # The file reached twice (folder and file argument) is listed once.
    assert [i.key for i in images] == [
        "a/good.png",
        "a/x.dcm",
        "a/x.png",
        "b/deep/good.png",
        "b/good.png",
    ]
    names = predict_lib.overlay_names([i.key for i in images])
    assert names["a/good.png"] == "a/good.png" and names["a/x.png"] == "a/x.png"
    assert names["a/x.dcm"] == "a/x.dcm.png"  # x.png takes a/x.png
    assert len(set(names.values())) == len(names)
    # Same file name given as two file arguments: keyed below their common folder.
    images, _ = predict_lib.list_images(
        [str(tmp_path / "in" / "a" / "good.png"), str(tmp_path / "in" / "b" / "good.png")]
    )
    assert [i.key for i in images] == ["a/good.png", "b/good.png"]
    # Two folders holding the same name: the clashing films are keyed below
    # the folders' common parent; the others keep their short key.
    images, _ = predict_lib.list_images(
        [str(tmp_path / "in" / "a"), str(tmp_path / "in" / "b")]
    )
    assert sorted(i.key for i in images if i.key.endswith("good.png")) == [
        "a/good.png",
        "b/good.png",
        "deep/good.png",
    ]


def _film_with_a_bright_patch(path, side=96):
    from PIL import Image

    pixels = np.full((side, side), 60, np.uint8)
    pixels[30:60, 20:50] = 200
    Image.fromarray(pixels).save(path)


def test_same_name_films_in_two_folders_give_two_records_and_overlays(
    tiny_model_dir, tmp_path
):
    (tmp_path / "in" / "day1").mkdir(parents=True)
    (tmp_path / "in" / "day2").mkdir()
    _film_with_a_bright_patch(tmp_path / "in" / "day1" / "good.png")
    (tmp_path / "in" / "day2" / "good.png").write_bytes(
        (tmp_path / "in" / "day1" / "good.png").read_bytes()
    )
    # The truth table lists the film by file name, as BBox_List_2017.csv does.
    bbox_list = tmp_path / "boxes.csv"
    bbox_list.write_text(
        "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
        "good.png,Mass,20,30,30,30\n"
        "other.png,Nodule,1,1,5,5\n"
    )
    out = tmp_path / "out"
    summary = predict_lib.predict(
        predict_lib.PredictConfig(
            model=tiny_model_dir,
            output_dir=str(out),
            positive_threshold=1.0,
            bbox_list=str(bbox_list),
        ),
        [str(tmp_path / "in")],
    )
    assert summary["predicted"] == 2 and summary["films_with_truth_boxes"] == 2
    with open(out / "predictions.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["image"] for r in records] == ["day1/good.png", "day2/good.png"]
    assert [r["overlay"] for r in records] == [
        "overlays/day1/good.png",
        "overlays/day2/good.png",
    ]
    assert records[0]["path"] == str(tmp_path / "in" / "day1" / "good.png")
    for r in records:
        assert os.path.getsize(out / r["overlay"]) > 1000
    assert sorted(os.listdir(out / "overlays")) == ["day1", "day2"]


def test_write_overlay_draws_the_listed_truth_in_green(tmp_path):
    from PIL import Image

    from cxr_tf import visualize

    side = 2000  # drawn from a <= 640 px copy; boxes stay in film pixels
    pixels = np.full((side, side), 128, np.uint8)
    findings = list(schema.FINDINGS)
    record = {
        "image": "f.png",
        "probabilities": {f: 0.1 for f in findings},
        "boxes": [],
    }
    maps = np.zeros((4, 4, len(findings)), np.float32)
    truth = {"Mass": [(400.0, 600.0, 800.0, 500.0)]}
    path = tmp_path / "f.png"
    predict_lib.write_overlay(
        str(path), pixels, record, maps, findings, 64, "probability", 0.5, truth
    )
    image = np.asarray(Image.open(path).convert("RGB"), np.float64)
    green = np.array([0, 0xD0, 0], np.float64)
    # Line centres are the exact colour; the label's box (alpha 0.8) is not.
    is_green = np.linalg.norm(image - green, axis=-1) < 20
    # Panels: the film and Mass (the finding with truth, though not positive).
    assert image.shape[1] == 2 * visualize.PANEL_WIDTH
    # The film panel, above the legend.
    left_panel = is_green[: int(image.shape[0] * 0.88), : image.shape[1] // 2]
    rows, cols = np.nonzero(left_panel)
    # The outline's extent in the film panel has the truth box's 8:5 aspect.
    width, height = cols.max() - cols.min(), rows.max() - rows.min()
    assert width / height == pytest.approx(800 / 500, rel=0.12)
    assert visualize.OVERLAY_MAX_SIDE <= 640


def _synthetic_model_dir(directory, synthetic):
    from cxr_tf.models import ModelConfig

    _save_model(str(directory), ModelConfig(backbone="infomask", image_size=64))
    config_path = os.path.join(str(directory), model_dir_lib.CONFIG_FILE)
    with open(config_path) as f:
        payload = json.load(f)
    payload["training_data"] = {
        "source": "synthetic" if synthetic else "ChestX-ray14",
        "synthetic": synthetic,
        "films": {"train": 10, "val": 2, "test": 2},
        "ingest_image_size": 64,
    }
    with open(config_path, "w") as f:
        json.dump(payload, f)
    return str(directory)


def test_synthetic_model_warning_rule(tmp_path):
    synthetic_root = tmp_path / "synth"
    (synthetic_root / "images").mkdir(parents=True)
    (synthetic_root / "synthetic_config.json").write_text("{}")
    fake = str(synthetic_root / "images" / "00000001_000.png")
    real = str(tmp_path / "real" / "00000001_000.png")
    data = {"source": "synthetic", "synthetic": True}
    assert predict_lib.synthetic_model_warning(data, [fake]) is None
    line = predict_lib.synthetic_model_warning(data, [fake, real])
    assert line.startswith(predict_lib.SYNTHETIC_MODEL_WARNING)
    assert "1 of 2 films" in line and "\n" not in line
    # A model trained on real films, or an older one that does not say: silent.
    assert predict_lib.synthetic_model_warning({"synthetic": False}, [real]) is None
    assert predict_lib.synthetic_model_warning(None, [real]) is None


def test_synthetic_model_on_real_films_warns_once(cxr14_sample, tmp_path):
    model = _synthetic_model_dir(tmp_path / "model", synthetic=True)
    assert model_dir_lib.load(model).training_data["synthetic"] is True
    inputs = _sample_files(cxr14_sample, 3)
    summary = predict_lib.predict(
        predict_lib.PredictConfig(
            model=model, output_dir=str(tmp_path / "out"), overlays=False
        ),
        inputs,
    )
    assert summary["predicted"] == len(inputs)
    assert len(summary["warnings"]) == 1
    assert summary["warnings"][0].startswith(predict_lib.SYNTHETIC_MODEL_WARNING)
    real_model = _synthetic_model_dir(tmp_path / "real_model", synthetic=False)
    summary = predict_lib.predict(
        predict_lib.PredictConfig(
            model=real_model, output_dir=str(tmp_path / "out2"), overlays=False
        ),
        inputs[:1],
    )
    assert summary["warnings"] == []


@pytest.mark.slow
def test_cli_warns_once_for_a_synthetic_model_on_the_real_sample(
    cxr14_sample, tmp_path
):
    model = _synthetic_model_dir(tmp_path / "model", synthetic=True)
    env = dict(
        os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "cxr_tf.predict",
            f"--model={model}",
            f"--output_dir={tmp_path / 'out'}",
            "--overlays=false",
            "--batch_size=32",
            str(cxr14_sample / "images"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    output = run.stdout + run.stderr
    lines = [l for l in output.splitlines() if predict_lib.SYNTHETIC_MODEL_WARNING in l]
    assert len(lines) == 1, output[-3000:]
    films = len(os.listdir(cxr14_sample / "images"))
    assert f"{films} of {films} films" in lines[0]


def test_infomask_boxes_use_the_threshold_stored_at_training(tiny_model_dir, tmp_path):
    # The mask ends at 1 - tau = 0.8, under the probability default 0.9:
    # boxes come only from the threshold training chose and stored.
    import shutil

    import tensorflow as tf

    directory = str(tmp_path / "model")
    shutil.copytree(tiny_model_dir, directory)
    film = tmp_path / "films" / "film.png"
    film.parent.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (96, 80, 1), np.uint8)
    film.write_bytes(tf.io.encode_png(pixels).numpy())

    def boxes():
        out = tmp_path / f"out{len(os.listdir(tmp_path))}"
        predict_lib.predict(
            predict_lib.PredictConfig(
                model=directory, output_dir=str(out), box_findings="all",
                overlays=False,
            ),
            [str(film)],
        )
        with open(out / predict_lib.PREDICTIONS_FILE) as f:
            return json.loads(f.readline())["boxes"]

    assert boxes() == []
    model_dir_lib.write_box_thresholds(directory, {"probability": 0.0})
    found = boxes()
    # Every map value is >= 0: one box per finding, over most of the film.
    assert len(found) == schema.NUM_FINDINGS
    assert all(b["w"] > 40 and b["h"] > 48 for b in found), found
    # Per finding: only the finding given a reachable threshold is boxed.
    model_dir_lib.write_box_thresholds(
        directory, {"probability": {"Nodule": 0.0, "Mass": 1.5}}
    )
    assert [b["finding"] for b in boxes()] == ["Nodule"]
