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
        assert os.path.isfile(out / "overlays" / (record["image"] + ".png"))
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
    assert auto["Fake_MONOHR1.dcm"]["probabilities"] == auto[siim]["probabilities"]
    assert "orientation_corrected" not in auto[siim]
    assert not any("orientation_corrected" in r for r in header.values())
    assert header[siim] == auto[siim]
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
            "--positive_threshold=0.0",
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
        assert os.path.isfile(out / "overlays" / (r["image"] + ".png"))
        if r["image"].endswith(".png"):
            assert (r["height"], r["width"]) == (1024, 1024)
        for b in r["boxes"]:
            assert 0 <= b["x"] and b["x"] + b["w"] <= r["width"] + 1e-6
    assert sum(len(r["boxes"]) for r in records) > 0


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
