"""Tests for cxr_tf.visualize: each plot writes a readable PNG."""

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
