"""Tests for cxr_tf.localization_graph: the TF graph boxes equal the numpy ones."""

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from cxr_tf.localization import extract_boxes
from cxr_tf.localization_graph import extract_boxes_graph

_TRACED = {}


def _graph(maps, image_hw, map_kind, threshold, max_boxes, work_size=None):
    # One trace per setting, with every dimension dynamic: tracing costs
    # seconds, and this also checks that unknown static shapes work.
    key = (map_kind, threshold, max_boxes, work_size)
    if key not in _TRACED:

        def run(batch_maps, batch_hw):
            return extract_boxes_graph(batch_maps, batch_hw, *key)

        _TRACED[key] = tf.function(
            run,
            input_signature=[
                tf.TensorSpec([None] * 4, tf.float32),
                tf.TensorSpec([None, 2], tf.int32),
            ],
        )
    return _TRACED[key](np.asarray(maps, np.float32), np.asarray(image_hw, np.int32))


def _assert_equal_to_numpy(maps, image_hw, map_kind, threshold, max_boxes, **kw):
    boxes, scores, num_boxes = (
        t.numpy() for t in _graph(maps, image_hw, map_kind, threshold, max_boxes, **kw)
    )
    assert boxes.shape == maps.shape[:1] + maps.shape[-1:] + (max_boxes, 4)
    total = 0
    for i in range(maps.shape[0]):
        for k in range(maps.shape[-1]):
            expected = extract_boxes(
                maps[i, ..., k],
                tuple(int(v) for v in image_hw[i]),
                map_kind,
                threshold=threshold,
                max_boxes=max_boxes,
                **kw,
            )
            count = len(expected)
            assert num_boxes[i, k] == count, (i, k)
            np.testing.assert_array_equal(
                boxes[i, k, :count],
                np.array([b[:4] for b in expected], np.float32).reshape(-1, 4),
            )
            np.testing.assert_array_equal(
                scores[i, k, :count], np.array([b.score for b in expected], np.float32)
            )
            assert not boxes[i, k, count:].any() and not scores[i, k, count:].any()
            total += count
    return total


def _smooth_maps(rng, batch, size, classes, sigma):
    raw = rng.normal(size=(batch, size, size, classes))
    raw = ndimage.gaussian_filter(raw, sigma=(0, sigma, sigma, 0))
    return (1.0 / (1.0 + np.exp(-8.0 * raw))).astype(np.float32)


# Few distinct (map_kind, threshold, max_boxes, work_size): each one traces
# the graph again, which costs seconds.
@pytest.mark.parametrize("map_kind, threshold", [("probability", 0.9), ("cam", 180.0)])
def test_random_smooth_maps_equal_numpy(map_kind, threshold):
    rng = np.random.default_rng(0)
    maps = _smooth_maps(rng, 2, 16, 4, sigma=1.0)
    if map_kind == "cam":
        maps = np.log(maps / (1.0 - maps)).astype(np.float32)
    image_hw = np.array([[128, 128], [97, 150]], np.int32)
    assert _assert_equal_to_numpy(maps, image_hw, map_kind, threshold, 4) > 8


def test_full_size_chest_xray_maps_equal_numpy():
    maps = _smooth_maps(np.random.default_rng(5), 1, 16, 3, sigma=1.2)
    image_hw = np.array([[1024, 1024]], np.int32)
    assert _assert_equal_to_numpy(maps, image_hw, "probability", 0.9, 4) > 3


def test_constructed_regions_equal_numpy():
    # Same map and image size: the mask is exactly map >= threshold.
    maps = np.zeros((3, 9, 9, 3), np.float32)
    # Diagonal chain (one region), a separate blob, border pixels.
    for i in range(5):
        maps[0, i, i, 0] = 0.95
    maps[0, 0:2, 6:9, 0] = 0.99
    maps[0, 8, 0, 0] = 0.92
    maps[0, 8, 8, 0] = 0.92
    maps[0, 4, 8, 0] = 0.91  # a fifth region: truncated by max_boxes=4
    # U shape: the two arms join only through the bottom row.
    maps[0, 2:8, 1, 1] = 0.96
    maps[0, 2:8, 6, 1] = 0.98
    maps[0, 7, 1:7, 1] = 0.93
    # Class 2 of image 0 stays empty; image 1 all on; image 2 checkerboard
    # (one region through diagonals).
    maps[1] = 1.0
    maps[2, ..., 1] = (np.indices((9, 9)).sum(0) % 2 == 0) * 0.95
    # Ties in score keep raster order.
    maps[2, 0, 0, 2] = maps[2, 0, 4, 2] = maps[2, 4, 0, 2] = 0.95
    image_hw = np.full((3, 2), 9, np.int32)
    assert _assert_equal_to_numpy(maps, image_hw, "probability", 0.9, 4) == 12


def test_serpentine_and_spiral_regions_equal_numpy():
    # Long thin paths: the worst case for label propagation.
    maps = np.zeros((2, 41, 41, 1), np.float32)
    snake = maps[0, ..., 0]
    snake[::4, :40] = 0.95
    snake[2::4, 1:] = 0.95
    snake[1::4, 39] = snake[3::4, 1] = 0.95
    # Square spiral with one-pixel gaps: R40 D40 L40 U38 R38 D36 L36 ...
    spiral = maps[1, ..., 0]
    y = x = 0
    spiral[0, 0] = 0.97
    steps = [40, 40, 40] + [n for n in range(38, 0, -2) for _ in range(2)]
    for i, length in enumerate(steps):
        dy, dx = [(0, 1), (1, 0), (0, -1), (-1, 0)][i % 4]
        for _ in range(length):
            y, x = y + dy, x + dx
            spiral[y, x] = 0.97
    image_hw = np.full((2, 2), 41, np.int32)
    assert ndimage.label(spiral > 0, structure=np.ones((3, 3)))[1] == 1
    assert _assert_equal_to_numpy(maps, image_hw, "probability", 0.9, 4) == 2


def test_non_square_images_and_work_size_equal_numpy():
    maps = _smooth_maps(np.random.default_rng(7), 2, 12, 2, sigma=0.7)
    image_hw = np.array([[300, 180], [90, 250]], np.int32)
    assert _assert_equal_to_numpy(maps, image_hw, "probability", 0.9, 4) > 4
    maps = np.log(maps / (1.0 - maps)).astype(np.float32)
    assert _assert_equal_to_numpy(maps, image_hw, "cam", 180.0, 4, work_size=64) > 4


def test_empty_and_constant_maps():
    maps = np.zeros((2, 4, 4, 2), np.float32)
    for map_kind, threshold in [("cam", 180.0), ("probability", 0.9)]:
        boxes, scores, num_boxes = _graph(
            maps, [[32, 32], [8, 16]], map_kind, threshold, 4
        )
        assert num_boxes.numpy().sum() == 0 and not boxes.numpy().any()


def test_dynamic_batch_signature():
    fn = tf.function(
        lambda maps, hw: extract_boxes_graph(maps, hw, "probability", 0.9, 4),
        input_signature=[
            tf.TensorSpec([None, 4, 4, 2], tf.float32),
            tf.TensorSpec([None, 2], tf.int32),
        ],
    )
    concrete = fn.get_concrete_function()
    assert concrete.structured_outputs[0].shape.as_list() == [None, 2, 4, 4]
    maps = np.zeros((3, 4, 4, 2), np.float32)
    maps[2, 0, 0, 1] = 1.0
    boxes, _, num_boxes = fn(maps, np.full((3, 2), 4, np.int32))
    np.testing.assert_array_equal(num_boxes.numpy(), [[0, 0], [0, 0], [0, 1]])
    np.testing.assert_array_equal(boxes.numpy()[2, 1, 0], [0, 0, 1, 1])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(map_kind="heat"), "map_kind"),
        (dict(max_boxes=0), "max_boxes"),
        (dict(threshold="x"), "threshold"),
        (dict(work_size=-2), "work_size"),
        (dict(maps=np.zeros((4, 4, 2), np.float32)), "maps"),
    ],
)
def test_invalid_arguments(kwargs, match):
    args = dict(
        maps=np.zeros((1, 4, 4, 2), np.float32),
        image_hw=[[4, 4]],
        map_kind="probability",
        threshold=0.9,
        max_boxes=2,
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        extract_boxes_graph(**args)


@pytest.mark.slow
def test_saved_model_signature_round_trip(tmp_path):
    class Boxes(tf.Module):
        @tf.function(
            input_signature=[
                tf.TensorSpec([None, 8, 8, 2], tf.float32),
                tf.TensorSpec([None, 2], tf.int32),
            ]
        )
        def serve(self, maps, image_hw):
            boxes, scores, num_boxes = extract_boxes_graph(
                maps, image_hw, "probability", 0.9, 4
            )
            return {"boxes": boxes, "box_scores": scores, "num_boxes": num_boxes}

    module = Boxes()
    tf.saved_model.save(
        module, str(tmp_path), signatures={"serving_default": module.serve}
    )
    loaded = tf.saved_model.load(str(tmp_path)).signatures["serving_default"]
    maps = _smooth_maps(np.random.default_rng(11), 2, 8, 2, sigma=0.6)
    image_hw = np.array([[64, 64], [50, 90]], np.int32)
    out = loaded(maps=tf.constant(maps), image_hw=tf.constant(image_hw))
    expected = _graph(maps, image_hw, "probability", 0.9, 4)
    for key, value in zip(("boxes", "box_scores", "num_boxes"), expected):
        np.testing.assert_array_equal(out[key].numpy(), value.numpy())
    assert out["num_boxes"].numpy().sum() > 0
