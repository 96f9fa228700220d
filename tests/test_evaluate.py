"""Tests of cxr_tf.evaluate: IoBB figures on the real box list, model runs."""

import csv
import json
import os

import numpy as np
import pytest

from cxr_tf import evaluate_lib
from cxr_tf import localization
from cxr_tf import model_dir
from cxr_tf import predict_lib
from cxr_tf.data import schema

THRESHOLDS = (0.1, 0.25, 0.5, 0.75, 0.9)


def _read_real_boxes(path):
    """The box list parsed with the csv module alone (independent of the code)."""
    boxes = {}
    with open(path, newline="") as f:
        reader = csv.reader(f)
        next(reader)
        for row in reader:
            if not row or not row[0]:
                continue
            finding = "Infiltration" if row[1] == "Infiltrate" else row[1]
            x, y, w, h = (float(v) for v in row[2:6])
            boxes.setdefault(row[0], {}).setdefault(finding, []).append((x, y, w, h))
    return boxes


def _numpy_iobb(p, g):
    ix = max(0.0, min(p[0] + p[2], g[0] + g[2]) - max(p[0], g[0]))
    iy = max(0.0, min(p[1] + p[3], g[1] + g[3]) - max(p[1], g[1]))
    return ix * iy / (p[2] * p[3])


def test_predictions_file_iobb_matches_numpy(cxr14_sample, tmp_path):
    bbox_list = str(cxr14_sample / "meta" / "BBox_List_2017.csv")
    truth = _read_real_boxes(bbox_list)
    rng = np.random.RandomState(0)
    images = sorted(truth)[::4]
    predictions = {}
    with open(tmp_path / "p.jsonl", "w") as f:
        for image_id in images:
            boxes = []
            for finding, gts in truth[image_id].items():
                for x, y, w, h in gts:
                    if rng.rand() < 0.2:
                        continue  # a missed box
                    # Jittered, rescaled copies: every IoBB bucket is hit.
                    s = rng.uniform(0.5, 2.0)
                    boxes.append(
                        (finding, x + rng.uniform(-0.5, 0.5) * w, y, w * s, h * s)
                    )
                if rng.rand() < 0.5:
                    boxes.append((finding, 900.0, 900.0, 100.0, 100.0))
            predictions[image_id] = boxes
            record = {
                "image": image_id,
                "height": 1024,
                "width": 1024,
                "probabilities": {},
                "boxes": [
                    {
                        "finding": b[0],
                        "x": b[1],
                        "y": b[2],
                        "w": b[3],
                        "h": b[4],
                        "score": 1.0,
                    }
                    for b in boxes
                ],
            }
            f.write(json.dumps(record) + "\n")
    metrics = evaluate_lib.evaluate(
        evaluate_lib.EvalConfig(
            output_dir=str(tmp_path / "eval"),
            predictions=str(tmp_path / "p.jsonl"),
            bbox_list=bbox_list,
        )
    )
    per_class = metrics["localization"]["predictions"]["per_class"]
    for finding in schema.BOXED_FINDINGS:
        gts = [
            (image_id, g)
            for image_id in images
            for g in truth[image_id].get(finding, [])
        ]
        assert per_class[finding]["num_gt_boxes"] == len(gts)
        for t in THRESHOLDS:
            hits = sum(
                any(
                    _numpy_iobb(p[1:], g) > t
                    for p in predictions[image_id]
                    if p[0] == finding
                )
                for image_id, g in gts
            )
            assert per_class[finding]["iobb"][f"{t:g}"] == pytest.approx(
                hits / len(gts)
            ), (finding, t)
    assert metrics["classification"]["note"].startswith("no labels")
    assert os.path.isfile(tmp_path / "eval" / "metrics.json")
    assert os.path.isfile(tmp_path / "eval" / "localization_accuracy.png")
    accs = [per_class[f]["iobb"]["0.5"] for f in schema.BOXED_FINDINGS]
    assert 0.0 < min(accs) and max(accs) < 1.0


def test_boxes_in_original_for_padded_film():
    # Map over a 64 px input of a 300 x 600 film: only the film rows (16..47)
    # can hold the region; the box comes back in the film's pixels.
    score = np.zeros((8, 8), np.float32)
    score[3:5, 0:2] = 1.0
    boxes = predict_lib.boxes_in_original(score, (300, 600), 64, "probability", 0.5)
    assert len(boxes) == 1
    b = boxes[0]
    assert 0 <= b.x and b.x + b.w <= 600 and 0 <= b.y and b.y + b.h <= 300
    # The region covers map rows 3-4 of 8 (input rows 24-40), i.e. film rows
    # (24-16)*600/64 = 75 .. (40-16)*600/64 = 225, around that after upsampling.
    assert 30 < b.y < 110 and 190 < b.y + b.h < 270
    # Square films: identical to extract_boxes at the film's size.
    from cxr_tf import localization

    square = predict_lib.boxes_in_original(score, (256, 256), 64, "probability", 0.5)
    direct = localization.extract_boxes(score, (256, 256), "probability", 0.5)
    assert [tuple(b) for b in square] == [tuple(b) for b in direct]


def test_config_errors():
    with pytest.raises(ValueError, match="bbox_list"):
        evaluate_lib.EvalConfig(output_dir="x", predictions="p.jsonl")
    with pytest.raises(ValueError, match="model_dir"):
        evaluate_lib.EvalConfig(output_dir="x")
    with pytest.raises(ValueError, match="iobb_thresholds"):
        evaluate_lib.EvalConfig(
            output_dir="x", predictions="p", bbox_list="b", iobb_thresholds=(1.5,)
        )


def test_write_overlays_draws_the_records_truth(tmp_path):
    from PIL import Image

    findings = list(schema.FINDINGS)
    k = findings.index("Mass")
    maps = np.zeros((4, 4, len(findings)), np.float32)
    maps[1:3, 1:3, k] = 1.0
    # A 64 px record of a 1024 x 1024 film; truth in the film's pixels.
    film = np.tile(np.linspace(20, 200, 64, dtype=np.float32), (64, 1))
    result = evaluate_lib.ImageResult(
        image_id="00000001_000.png",
        original_hw=(1024, 1024),
        labels=None,
        probabilities=np.full(len(findings), 0.1),
        gt_boxes={"Mass": np.array([[256.0, 384.0, 512.0, 256.0]])},
        pred_boxes={0.9: {"Mass": [localization.Box(300, 400, 400, 200, 0.95)]}},
        maps=maps,
        image=film.astype(np.uint8),
    )
    unboxed = evaluate_lib.ImageResult(
        "00000002_000.png", (1024, 1024), None, None, {}, {}, None, None
    )
    out = evaluate_lib.write_overlays(
        str(tmp_path), [unboxed, result], findings, 64, "probability", 0.9
    )
    assert out["images"] == ["00000001_000.png"]
    pixels = np.asarray(
        Image.open(tmp_path / "00000001_000.png").convert("RGB"), np.float64
    )
    green = np.linalg.norm(pixels - [0, 0xD0, 0], axis=-1) < 20
    blue = np.linalg.norm(pixels - [0x1F, 0x5C, 0xFF], axis=-1) < 20
    # Two panels (film, Mass): the truth in both, the prediction on the map.
    half, panels = pixels.shape[1] // 2, int(pixels.shape[0] * 0.88)  # no legend
    green, blue = green[:panels], blue[:panels]
    rows, cols = np.nonzero(green[:, :half])
    assert (cols.max() - cols.min()) / (rows.max() - rows.min()) == pytest.approx(
        2.0, rel=0.12
    )
    assert blue[:, half:].sum() > 50 and blue[:, :half].sum() == 0


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from cxr_tf import model_dir as model_dir_lib
    from cxr_tf.models import ModelConfig
    from cxr_tf.models import build_model

    directory = str(tmp_path_factory.mktemp("model"))
    config = ModelConfig(image_size=64, pooling="lse")
    model = build_model(config)
    model_dir_lib.write_config(directory, config, schema.FINDINGS)
    model.save(os.path.join(directory, "model.keras"))
    return directory


@pytest.mark.slow
@pytest.mark.parametrize("map_source", ["model", "gradcam"])
def test_model_on_records_writes_metrics_and_plots(
    tiny_model_dir, tmp_path, map_source
):
    from tests.test_train import write_tiny_records

    data = tmp_path / "data"
    written = write_tiny_records(
        str(data),
        counts={"val": 4, "test": 8},
        shapes=[(64, 64), (48, 64), (64, 40)],
    )
    out = tmp_path / "eval"
    metrics = evaluate_lib.evaluate(
        evaluate_lib.EvalConfig(
            output_dir=str(out),
            model_dir=tiny_model_dir,
            checkpoint="final",
            data_dir=str(data),
            map_source=map_source,
            mask_thresholds=(60.0, 120.0, 180.0),
        )
    )
    assert metrics["num_images"] == 8
    for name in (
        "metrics.json",
        "roc.png",
        "localization_accuracy.png",
        "localization_accuracy_iou.png",
    ):
        assert os.path.isfile(out / name), name
    # Overlays of the boxed test films, named with one extension.
    boxed = [row[0] for row in written["test"] if len(row[2])]
    overlays = metrics["overlays"]["images"]
    assert overlays == boxed[: len(overlays)] and 1 <= len(overlays) <= 8
    for name in overlays:
        assert name.count(".png") == 1 and os.path.isfile(out / "overlays" / name)
    labels = np.array([row[1] for row in written["test"]])
    table = metrics["classification"]["per_class"]
    for k, finding in enumerate(schema.FINDINGS):
        if labels[:, k].sum() == 0:
            assert table[finding]["auc"] is None
            assert table[finding]["note"] == "no positive images"
        elif labels[:, k].all():
            assert table[finding]["note"] == "no negative images"
        else:
            assert 0.0 <= table[finding]["auc"] <= 1.0
    # CAM maps: boxes at both of Wang et al.'s thresholds.
    assert set(metrics["localization"]) == {"180", "60"}
    assert metrics["mask"]["threshold"] in (60.0, 120.0, 180.0)
    # Predicted boxes lie in the original (4x) film's pixels.
    with open(out / "predictions.jsonl") as f:
        records = [json.loads(line) for line in f]
    for record, row in zip(records, written["test"]):
        assert record["image"] == row[0]
        assert (record["height"], record["width"]) == row[4]
        for b in record["boxes"]:
            assert b["x"] >= 0 and b["x"] + b["w"] <= record["width"] + 1e-6
            assert b["y"] >= 0 and b["y"] + b["h"] <= record["height"] + 1e-6


def test_mask_box_thresholds_are_quantiles_of_the_called_films_above_the_floor():
    findings = ["Mass", "Nodule", "Hernia"]
    hist = evaluate_lib.MaskHistograms(findings, positive_threshold=0.5)
    maps = np.zeros((2, 4, 4, 3), np.float32)
    # Film 0 is called positive for Mass only: its Mass mask ramps 0.30 ..
    # 0.75 (16 cells); film 1 (called for nothing) would pull the quantile
    # down if it counted.
    maps[0, ..., 0] = np.linspace(0.30, 0.75, 16).reshape(4, 4)
    maps[1, ..., 0] = 0.0
    maps[..., 1] = 0.31  # Nodule: flat at the prior on every film
    probs = np.array([[0.9, 0.1, 0.1], [0.2, 0.1, 0.1]], np.float32)
    hist.add(probs, maps)
    assert hist.quantile("Mass", 0.9) == pytest.approx(0.72, abs=2e-4)
    # No film called positive for Nodule: all films' masks count.
    assert hist.quantile("Nodule", 0.9) == pytest.approx(0.3101, abs=2e-4)
    thresholds = evaluate_lib.quantile_thresholds(hist, 0.9, floor=0.3)
    values = thresholds.as_dict()
    assert values["Mass"] == pytest.approx(0.72, abs=2e-4)
    # Never at or below the prior's mask value (plus a margin).
    assert values["Nodule"] == pytest.approx(0.3101, abs=2e-4)
    assert values["Hernia"] == pytest.approx(0.301)
    assert thresholds.key() == "per_finding"
    assert model_dir.box_threshold_for(thresholds, "Mass") == values["Mass"]
    assert model_dir.box_threshold_for(thresholds, "Edema") is None
    assert model_dir.box_threshold_for(0.4, "Edema") == 0.4


def test_box_threshold_is_chosen_on_val_and_becomes_the_default(tmp_path):
    from cxr_tf import model_dir as model_dir_lib
    from cxr_tf.models import ModelConfig
    from cxr_tf.models import build_model
    from tests.test_train import write_tiny_records

    data = tmp_path / "data"
    write_tiny_records(str(data), counts={"val": 4})
    directory = str(tmp_path / "model")
    config = ModelConfig(image_size=64, backbone="infomask")
    model_dir_lib.write_config(directory, config, schema.FINDINGS)
    build_model(config).save(os.path.join(directory, "model.keras"))

    choice = evaluate_lib.store_box_threshold(directory, str(data), "val")
    assert choice["quantile"] in evaluate_lib.BOX_QUANTILES
    assert choice["pairs"] > 0 and choice["films"] == 4
    thresholds = choice["threshold"].as_dict()
    assert set(thresholds) == set(schema.FINDINGS)
    # Above the mask of a pixel at the KL prior, sigmoid(0) - tau.
    assert min(thresholds.values()) > 0.5 - config.infomask_tau
    loaded = model_dir_lib.load(directory)
    assert loaded.box_threshold == choice["threshold"]
    assert evaluate_lib.default_box_thresholds(loaded, "probability") == (
        choice["threshold"],
    )
    # Grad-CAM maps of the same model keep the CAM defaults.
    assert evaluate_lib.default_box_thresholds(loaded, "cam") == (180.0, 60.0)
    # The same masks give the same choice.
    again = evaluate_lib.choose_box_threshold(loaded, str(data), "val")
    assert again["threshold"] == choice["threshold"]
    # No such split: nothing chosen, nothing written.
    assert evaluate_lib.store_box_threshold(directory, str(data), "test") is None
    assert model_dir_lib.load(directory).box_threshold == choice["threshold"]
    # Training's call chooses the IoP threshold and the box threshold.
    model_dir_lib.write_box_thresholds(directory, {"probability": 0.99})
    stored = evaluate_lib.store_mask_threshold_choices(
        directory, str(data), "val", box_threshold_of="final"
    )
    assert len(stored) == 1 and "box" not in stored[0]
    assert model_dir_lib.load(directory).box_threshold == choice["threshold"]
    evaluate_lib.store_mask_threshold_choices(
        directory, str(data), "test", box_threshold_of="final"
    )
    assert model_dir_lib.load(directory).box_threshold == choice["threshold"]


@pytest.mark.slow
def test_stored_mask_threshold_is_read_only_where_it_holds(tiny_model_dir, tmp_path):
    """Evaluate reads the IoP threshold chosen when training ended, for that
    very file and those records only; otherwise it chooses on val again."""
    import shutil

    from cxr_tf import model_dir as model_dir_lib
    from tests.test_train import write_tiny_records

    data = tmp_path / "data"
    write_tiny_records(str(data), counts={"val": 6, "test": 4})
    directory = str(tmp_path / "model")
    shutil.copytree(tiny_model_dir, directory)

    def run(name):
        return evaluate_lib.evaluate(
            evaluate_lib.EvalConfig(
                output_dir=str(tmp_path / name),
                model_dir=directory,
                checkpoint="final",
                data_dir=str(data),
                num_overlays=0,
            )
        )

    computed = run("computed")
    assert computed["source"]["mask_threshold_stored_at_training"] is False
    (choice,) = evaluate_lib.store_mask_threshold_choices(
        directory, str(data), "val", checkpoints=("final", "best")
    )  # no best checkpoint here: one choice
    assert choice["pairs"] > 0
    assert choice["threshold"] == computed["mask"]["threshold"]
    stored = run("stored")
    assert stored["source"]["mask_threshold_stored_at_training"] is True
    assert stored["mask"] == computed["mask"]
    assert stored["localization"] == computed["localization"]

    # The stored value is what is used: another candidate shows through.
    other = next(
        t for t in evaluate_lib.DEFAULT_MASK_THRESHOLDS["cam"] if t != choice["threshold"]
    )
    model_dir_lib.write_mask_threshold_choices(
        directory, [{**choice, "threshold": other}]
    )
    assert run("other")["mask"]["threshold"] == other
    # Rewritten records (a new ingest) invalidate it: chosen again.
    val = next((data).glob("val-*"))
    os.utime(val, ns=(val.stat().st_atime_ns, val.stat().st_mtime_ns + 10**9))
    again = run("again")
    assert again["source"]["mask_threshold_stored_at_training"] is False
    assert again["mask"] == computed["mask"]


def test_mask_box_thresholds_without_boxed_val_films_take_the_default_quantile(
    tmp_path,
):
    # ChestX-ray14's own validation films carry no box: the model still gets
    # a threshold per finding (q = DEFAULT_BOX_QUANTILE), so it boxes.
    from cxr_tf import model_dir as model_dir_lib
    from cxr_tf.models import ModelConfig
    from cxr_tf.models import build_model
    from tests.test_train import write_tiny_records

    data = tmp_path / "data"
    write_tiny_records(str(data), counts={"val": 4})
    directory = str(tmp_path / "model")
    # Findings without boxes in ChestX-ray14: no val film has a pair.
    findings = ["Edema", "Hernia"]
    config = ModelConfig(image_size=64, backbone="infomask", num_classes=2)
    model_dir_lib.write_config(directory, config, findings)
    build_model(config).save(os.path.join(directory, "model.keras"))

    choice = evaluate_lib.store_box_threshold(directory, str(data), "val")
    assert choice["pairs"] == 0 and choice["score"] is None
    assert choice["quantile"] == evaluate_lib.DEFAULT_BOX_QUANTILE
    assert set(choice["threshold"].as_dict()) == set(findings)
    assert model_dir_lib.load(directory).box_threshold == choice["threshold"]
