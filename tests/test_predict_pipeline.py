"""Tests of predict's pipeline: same results as the per-film loop, order, resume."""

import concurrent.futures
import json
import os
import threading

import numpy as np
import pytest
from PIL import Image

from cxr_tf import errors
from cxr_tf import model_dir as model_dir_lib
from cxr_tf import predict_lib
from cxr_tf import predict_pipeline
from cxr_tf.data import images as images_lib
from cxr_tf.data import preprocess
from cxr_tf.data import schema


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An untrained compact PCAM model at 64 px (probability maps)."""
    from cxr_tf.models import ModelConfig
    from cxr_tf.models import build_model

    directory = str(tmp_path_factory.mktemp("model"))
    config = ModelConfig(backbone="compact", pooling="pcam", image_size=64)
    model_dir_lib.write_config(directory, config, schema.FINDINGS)
    build_model(config).save(os.path.join(directory, "model.keras"))
    return directory


def _films(folder, count, side=80, seed=0):
    """`count` films with a bright patch each, some not square."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        h, w = (side, side) if i % 3 else (side, side * 3 // 4)
        film = rng.integers(20, 90, (h, w), dtype=np.uint8)
        y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
        film[y : y + h // 3, x : x + w // 3] = 230
        path = os.path.join(folder, f"film_{i:03d}.png")
        Image.fromarray(film).save(path)
        paths.append(path)
    return paths


# Probabilities are written with 6 decimals; a film's last float32 bit may
# depend on its position in the batch (oneDNN blocking), which can move the
# printed value by one unit of the 6th decimal.
PROBABILITY_TOLERANCE = 1e-6 + 1e-12
# Box scores (5 decimals) are map values: the same last-bit effect.
SCORE_TOLERANCE = 1e-5 + 1e-12


def _assert_same_boxes(got, want, where):
    """Same boxes in the same order; scores equal up to the last printed digit."""
    geometry = lambda boxes: [  # noqa: E731
        {k: v for k, v in b.items() if k != "score"} for b in boxes
    ]
    assert geometry(got) == geometry(want), where
    for a, b in zip(got, want):
        assert abs(a["score"] - b["score"]) <= SCORE_TOLERANCE, where


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _per_film_reference(model, paths, config):
    """The records of the sequential per-film loop predict ran before."""
    loaded = model_dir_lib.load(model)
    computer = predict_lib.MapComputer(loaded)
    out = []
    for path in paths:
        try:
            pixels, _ = images_lib.read_image_with_info(path)
        except (ValueError, OSError):
            continue
        x = preprocess.preprocess_pixels(
            pixels, loaded.image_size, loaded.normalization, loaded.ingest_size
        )
        probs, maps = computer(x[None])
        out.append(
            predict_lib.prediction_record(
                os.path.basename(path), pixels.shape, probs[0], maps[0],
                list(loaded.findings), loaded.image_size, computer.map_kind,
                config.box_threshold, config.positive_threshold,
                config.box_findings, config.work_size, loaded.ingest_size,
            )
        )
    return out


def test_pipeline_equals_the_per_film_loop_and_reports_unreadable_files(
    model_dir, cxr14_sample, tmp_path
):
    folder = tmp_path / "films"
    paths = _films(str(folder), 5)
    real = sorted(os.listdir(cxr14_sample / "images"))[:2]
    for name in real:
        os.symlink(cxr14_sample / "images" / name, folder / name)
    (folder / "zz_broken.png").write_bytes(b"\x89PNG not really")
    config = predict_lib.PredictConfig(
        model=model_dir,
        output_dir=str(tmp_path / "out"),
        # Boxes for every finding at the map's typical level: many boxes.
        box_findings="all",
        box_threshold=0.5,
        overlays=False,
        batch_size=3,
        num_workers=2,
    )
    summary = predict_lib.predict(config, [str(folder)])
    assert [f["image"] for f in summary["failed"]] == [str(folder / "zz_broken.png")]
    assert "zz_broken.png" in summary["failed"][0]["reason"]
    got = _records(summary["predictions"])
    # Key order, whatever order the workers finished in.
    assert [r["image"] for r in got] == sorted(
        [os.path.basename(p) for p in paths] + real
    )
    expected = {
        r["image"]: r
        for r in _per_film_reference(
            model_dir, [str(folder / r["image"]) for r in got], config
        )
    }
    assert sum(len(r["boxes"]) for r in got) > len(got)
    for record in got:
        reference = expected[record["image"]]
        assert (record["height"], record["width"]) == (
            reference["height"], reference["width"]
        )
        for finding, p in record["probabilities"].items():
            assert abs(p - reference["probabilities"][finding]) <= PROBABILITY_TOLERANCE
        _assert_same_boxes(record["boxes"], reference["boxes"], record["image"])


def test_film_loader_equals_preprocess_pixels_bit_for_bit(model_dir, tmp_path):
    loaded = model_dir_lib.load(model_dir)
    for ingest_size in (None, 48, 200):
        loader = predict_pipeline.FilmLoader(
            64, loaded.normalization, ingest_size, "auto", keep_pixels=True
        )
        for path in _films(str(tmp_path / "f"), 3, side=150):
            item = predict_lib.InputImage(path, os.path.basename(path))
            film = loader(item)
            expected = preprocess.preprocess_pixels(
                film.pixels, 64, loaded.normalization, ingest_size
            )
            np.testing.assert_array_equal(film.network_input, expected)


def test_resume_after_a_torn_line_predicts_each_film_exactly_once(model_dir, tmp_path):
    folder = str(tmp_path / "films")
    paths = _films(folder, 7, side=48)
    out = str(tmp_path / "out")
    config = predict_lib.PredictConfig(
        model=model_dir, output_dir=out, overlays=False, batch_size=2, num_workers=1
    )
    full = _records(predict_lib.predict(config, [folder])["predictions"])
    # A run killed while writing its fourth line: three records and a half.
    path = os.path.join(out, predict_lib.PREDICTIONS_FILE)
    with open(path) as f:
        lines = f.readlines()
    with open(path, "w") as f:
        f.writelines(lines[:3])
        f.write(lines[3][: len(lines[3]) // 2])
    resumed = predict_lib.predict(
        predict_lib.PredictConfig(
            model=model_dir, output_dir=out, overlays=False, batch_size=2, resume=True
        ),
        [folder],
    )
    assert resumed["resumed"] == 3
    assert resumed["predicted"] == len(paths)
    again = _records(path)
    assert [r["image"] for r in again] == [os.path.basename(p) for p in paths]
    for a, b in zip(again, full):
        _assert_same_boxes(a["boxes"], b["boxes"], a["image"])
        for k, p in a["probabilities"].items():
            assert abs(p - b["probabilities"][k]) <= PROBABILITY_TOLERANCE
    # Resuming a finished run predicts nothing and keeps every line.
    done = predict_lib.predict(
        predict_lib.PredictConfig(model=model_dir, output_dir=out, resume=True),
        [folder],
    )
    assert (done["resumed"], done["predicted"]) == (len(paths), len(paths))
    assert len(_records(path)) == len(paths)


def test_read_finished_drops_a_torn_tail_and_rejects_a_foreign_file(tmp_path):
    path = tmp_path / "predictions.jsonl"
    assert predict_pipeline.read_finished(str(path)) == set()
    # A newline already written after a torn record: that line is redone too.
    path.write_text('{"image": "a.png"}\n{"image": "b.png"}\n{"image": "c\n')
    assert predict_pipeline.read_finished(str(path)) == {"a.png", "b.png"}
    assert path.read_text() == '{"image": "a.png"}\n{"image": "b.png"}\n'
    path.write_text('{"image": "a.png"}\nnot json\n{"image": "b.png"}\n')
    with pytest.raises(errors.UserValueError, match=r"line 2\): give another"):
        predict_pipeline.read_finished(str(path))


def test_ordered_map_keeps_input_order_with_bounded_lookahead():
    first_may_finish = threading.Event()
    in_flight, most = [0], [0]
    lock = threading.Lock()

    def work(i):
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        if i == 0:
            # Item 0 finishes only after item 2 has: results arrive out of order.
            assert first_may_finish.wait(timeout=30)
        if i == 2:
            first_may_finish.set()
        return i * 10

    out = []
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for value in predict_pipeline.ordered_map(pool, work, range(12), lookahead=3):
            out.append(value)
            with lock:
                in_flight[0] -= 1
    assert out == [i * 10 for i in range(12)]
    assert most[0] <= 3
