"""Tests for cxr_tf.visualize: each plot writes a readable PNG."""

import io
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from cxr_tf import visualize
from cxr_tf.localization import Box

_PNG = b"\x89PNG\r\n\x1a\n"


def _png_size(data):
    # Width and height from the IHDR chunk.
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.mark.parametrize("map_kind", ["probability", "cam"])
def test_overlay_figure_writes_png(tmp_path, map_kind):
    image = np.random.default_rng(0).integers(0, 255, size=(64, 48)).astype(np.uint8)
    score_map = np.zeros((4, 3), np.float32)
    score_map[1, 1] = 1.0
    path = tmp_path / "sub" / "overlay.png"
    data = visualize.overlay_figure(
        image,
        {"Mass": score_map, "Nodule": score_map * 0.5},
        {"Mass": [Box(10, 12, 15, 20, 0.97)], "Nodule": []},
        {"Mass": 0.9, "Nodule": 0.6},
        gt_boxes={"Mass": [(8, 10, 20, 20)]},
        map_kind=map_kind,
        path=path,
        title="test image",
    )
    assert data.startswith(_PNG) and path.read_bytes() == data
    width, height = _png_size(data)
    assert width > 2 * height  # three panels side by side
    with pytest.raises(ValueError, match="image"):
        visualize.overlay_figure(np.zeros(5), {}, {}, {})


def test_plot_roc_and_accuracy(tmp_path):
    curves = {"Mass": ([0.0, 0.2, 1.0], [0.0, 0.7, 1.0]), "Nodule": ([0, 1], [0, 1])}
    data = visualize.plot_roc(curves, tmp_path / "roc.png", aucs={"Mass": 0.8})
    assert data.startswith(_PNG) and (tmp_path / "roc.png").exists()
    accuracy = {
        "Mass": {"accuracy": {0.1: 0.8, 0.5: 0.4, 0.9: None}},
        "Nodule": {0.1: 0.2, 0.5: 0.0},
    }
    data = visualize.plot_localization_accuracy(accuracy, tmp_path / "acc.png")
    assert data.startswith(_PNG) and (tmp_path / "acc.png").read_bytes() == data


def test_import_does_not_load_pyplot():
    code = "import sys, cxr_tf.visualize; print('matplotlib.pyplot' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def _rgb(hex_colour):
    return np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)], np.float64)


def _decode(data):
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float64)


def _near(pixels, y, x, colour, radius=2, tolerance=60.0):
    """Whether some pixel within `radius` of (y, x) has `colour`."""
    patch = pixels[y - radius : y + radius + 1, x - radius : x + radius + 1]
    return bool((np.linalg.norm(patch - colour, axis=-1) < tolerance).any())


@pytest.mark.parametrize(
    "side, frame",
    [(96, None), (3000, None), (64, 1024)],
    ids=["small", "large-film-drawn-downscaled", "record-of-a-1024-film"],
)
def test_overlay_draws_the_truth_box_where_it_is(side, frame):
    # A flat grey film: the only green and blue pixels are the boxes' outlines.
    image = np.full((side, side), 128, np.uint8)
    scale = (frame or side) / 96
    truth = (20 * scale, 30 * scale, 40 * scale, 30 * scale)
    predicted = Box(50 * scale, 10 * scale, 30 * scale, 20 * scale, 0.9)
    overlay = visualize.render_overlay(
        image,
        {"Mass": np.zeros((4, 4), np.float32)},
        {"Mass": [predicted]},
        {"Mass": 0.8},
        gt_boxes={"Mass": [truth]},
        frame_hw=None if frame is None else (frame, frame),
    )
    # What is checked is the PNG as written, decoded.
    pixels = _decode(overlay.png())
    assert np.array_equal(pixels, overlay.pixels)
    green, blue = _rgb(visualize._TRUTH_COLOR), _rgb(visualize._PRED_COLOR)
    assert np.linalg.norm(green - blue) > 200  # two colours told apart at a glance
    film_panel, map_panel = overlay.panels
    assert film_panel.title == "Image, 1 truth box"
    to_pixel = film_panel.to_canvas

    x, y, w, h = truth
    # The four edges, sampled away from the corners and from the label above.
    for fx, fy in ((0.5, 0.0), (0.5, 1.0), (0.0, 0.5), (1.0, 0.5), (0.2, 1.0)):
        row, col = to_pixel(x + fx * w, y + fy * h)
        assert _near(pixels, row, col, green), (fx, fy, pixels[row, col])
        assert not _near(pixels, row, col, blue)
    # Inside the box: the grey film, no outline.
    row, col = to_pixel(x + w / 2, y + h / 2)
    assert not _near(pixels, row, col, green, radius=4)
    # The film fills its panel whatever size it is drawn at (not white there).
    frame_side = frame or side
    row, col = to_pixel(0.97 * frame_side, 0.97 * frame_side)
    assert np.linalg.norm(pixels[row, col] - 255.0) > 100
    # The finding's panel shows the predicted box in blue and the truth dashed.
    row, col = map_panel.to_canvas(predicted.x + predicted.w, predicted.y + predicted.h / 2)
    assert _near(pixels, row, col, blue)
    # Dashed: along the truth's top edge in the map panel, green with gaps.
    row, _ = map_panel.to_canvas(0, y)
    first, last = (map_panel.to_canvas(x + f * w, y)[1] for f in (0.1, 0.9))
    edge = [_near(pixels, row, c, green, radius=1) for c in range(first, last)]
    assert 0.3 < np.mean(edge) < 0.9, np.mean(edge)
    assert list(overlay.legend) == ["truth box", "predicted box (score)"]
    # The legend is drawn under the panels, in the two colours.
    legend_band = pixels[visualize._LEGEND_TOP :]  # pylint: disable=protected-access
    for colour in (green, blue):
        assert (np.linalg.norm(legend_band - colour, axis=-1) < 20).any()


def test_overlay_says_when_truth_is_not_given():
    image = np.zeros((32, 32), np.uint8)
    overlay = visualize.render_overlay(image, {}, {}, {})
    assert overlay.panels[0].title == "Image (truth boxes not given)"
    assert overlay.legend[0] == "truth box (not given)"
    overlay = visualize.render_overlay(image, {}, {}, {}, gt_boxes={})
    assert overlay.panels[0].title == "Image, 0 truth boxes"


def test_downscale_bounds_the_drawn_film():
    image = np.arange(7 * 5, dtype=np.uint8).reshape(7, 5)
    small, factor = visualize.downscale(image, max_side=3)
    assert factor == 3 and small.shape == (3, 2)
    assert small[0, 0] == pytest.approx(image[:3, :3].mean())
    # The edge block repeats the last row / column.
    padded = np.pad(image, ((0, 2), (0, 1)), mode="edge")
    assert small[2, 1] == pytest.approx(padded[6:9, 3:6].mean())
    same, one = visualize.downscale(image, max_side=7)
    assert one == 1 and np.array_equal(same, image)


def test_roc_curves_of_14_findings_have_14_distinct_styles():
    from cxr_tf.data import schema

    curves = {
        f: ([0.0, 0.1 * (k % 9), 1.0], [0.0, 0.5, 1.0])
        for k, f in enumerate(schema.FINDINGS)
    }
    fig = visualize.roc_figure(curves, aucs={f: 0.5 for f in curves})
    drawn = [l for l in fig.axes[0].get_lines() if l.get_label() in set(
        f"{f} (0.500)" for f in curves
    )]
    assert len(drawn) == 14
    styles = {(l.get_color(), l.get_linestyle()) for l in drawn}
    assert len(styles) == 14
    # Stronger than the acceptance: 14 distinct colours as well, so the two
    # findings the default cycle painted alike (Infiltration, Hernia) differ.
    assert len({l.get_color() for l in drawn}) == 14
    # The same finding keeps its look on the localization plot.
    acc = {f: {0.1: 0.5, 0.5: 0.2} for f in schema.BOXED_FINDINGS}
    loc = visualize.localization_accuracy_figure(acc, metric="IoU")
    by_label = {l.get_label(): l for l in drawn}
    for line in loc.axes[0].get_lines():
        twin = by_label[f"{line.get_label()} (0.500)"]
        assert (line.get_color(), line.get_linestyle()) == (
            twin.get_color(),
            twin.get_linestyle(),
        )
    assert loc.axes[0].get_xlabel() == "IoU threshold T"


def test_curve_style_is_unique_beyond_20():
    assert len({visualize.curve_style(i) for i in range(80)}) == 80


def test_overlay_memory_does_not_grow_with_the_film(tmp_path):
    # A 4000 x 4000 film drawn at full size cost ~1 GB more; bounded, ~0.1 GB.
    repo = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo))
    out = tmp_path / "cost.json"
    subprocess.run(
        [sys.executable, "-m", "benchmarks.overlay_cost", "--side=4000",
         f"--output={out}"],
        cwd=repo, env=env, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    cost = json.loads(out.read_text())
    assert cost["film_side"] == 4000 and cost["overlay_png_bytes"] > 10_000
    increase = cost["peak_rss_mb_after_overlay"] - cost["peak_rss_mb_before_overlay"]
    assert increase < 300, cost
