"""Tests for cxr_tf.localization: maps to boxes, against hand-made cases."""

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from cxr_tf import localization
from cxr_tf.localization import Box, extract_boxes


def _boxes(boxes):
    return [(b.x, b.y, b.w, b.h) for b in boxes]


def test_resize_bilinear_known_values():
    # 2 -> 4 with half-pixel centres samples at -0.25, 0.25, 0.75, 1.25.
    out = localization.resize_bilinear(np.array([[0.0, 4.0]]), (1, 4))
    np.testing.assert_array_equal(out, [[0.0, 1.0, 3.0, 4.0]])


@pytest.mark.parametrize(
    "in_hw, out_hw",
    [
        ((16, 16), (1024, 1024)),
        ((16, 16), (700, 1100)),
        ((7, 9), (61, 37)),
        ((5, 3), (5, 3)),
        ((16, 16), (8, 5)),
    ],
)
def test_resize_bilinear_equals_tf_bit_for_bit(in_hw, out_hw):
    score_map = np.random.default_rng(0).normal(size=in_hw).astype(np.float32)
    expected = tf.image.resize(score_map[None, :, :, None], out_hw, "bilinear")
    np.testing.assert_array_equal(
        localization.resize_bilinear(score_map, out_hw), expected.numpy()[0, :, :, 0]
    )


def test_extract_boxes_known_regions():
    # Same map and image size: upsampling is the identity, so the mask is
    # exactly `score_map >= threshold`.
    score_map = np.zeros((8, 10), np.float32)
    score_map[1:3, 1:4] = 0.95  # region A, max 0.95
    score_map[2, 2] = 0.97
    score_map[5:8, 8:10] = 0.99  # region B at the bottom-right border
    score_map[4, 7] = 0.91  # touches B diagonally only: same region
    score_map[6, 0] = 0.9  # exactly the threshold: kept (>=)
    boxes = extract_boxes(score_map, (8, 10), "probability")
    assert _boxes(boxes) == [(7, 4, 3, 4), (1, 1, 3, 2), (0, 6, 1, 1)]
    assert [b.score for b in boxes] == pytest.approx([0.99, 0.97, 0.9])
    assert extract_boxes(score_map, (8, 10), "probability", max_boxes=2) == boxes[:2]
    high = extract_boxes(score_map, (8, 10), "probability", threshold=0.98)
    assert _boxes(high) == [(8, 5, 2, 3)]


def test_extract_boxes_upsampled_region_in_image_pixels():
    score_map = np.zeros((4, 4), np.float32)
    score_map[1, 2] = 1.0
    boxes = extract_boxes(score_map, (64, 64), "probability", threshold=0.5)
    upsampled = localization.resize_bilinear(score_map, (64, 64))
    rows, cols = np.nonzero(upsampled >= 0.5)
    assert _boxes(boxes) == [
        (
            cols.min(),
            rows.min(),
            cols.max() - cols.min() + 1,
            rows.max() - rows.min() + 1,
        )
    ]
    # The peak cell (rows 16..31, columns 32..47) lies inside the box.
    box = boxes[0]
    assert box.x <= 32 and box.x + box.w >= 48 and box.y <= 16 and box.y + box.h >= 32
    assert boxes[0].score == pytest.approx(upsampled.max())


def test_extract_boxes_cam_normalisation():
    score_map = np.full((4, 4), -3.0, np.float32)
    score_map[0, 0] = 7.0  # normalises to 255
    score_map[3, 3] = 3.5  # normalises to 165.75 < 180
    boxes = extract_boxes(score_map, (4, 4), "cam")
    assert boxes == [Box(0, 0, 1, 1, pytest.approx(1.0))]
    assert len(extract_boxes(score_map, (4, 4), "cam", threshold=160.0)) == 2
    # A shift and a positive scale of the CAM give the same boxes.
    assert extract_boxes(score_map * 3.0 + 11.0, (4, 4), "cam") == boxes
    assert extract_boxes(np.full((4, 4), 2.0), (4, 4), "cam") == []


def test_extract_boxes_random_maps_match_scipy_regions():
    rng = np.random.default_rng(3)
    score_map = ndimage.gaussian_filter(rng.normal(size=(16, 16)), 1.0)
    boxes = extract_boxes(score_map, (96, 80), "probability", threshold=0.2)
    upsampled = localization.resize_bilinear(score_map, (96, 80))
    labels, count = ndimage.label(upsampled >= 0.2, structure=np.ones((3, 3)))
    assert count > 1 and len(boxes) == count
    assert [b.score for b in boxes] == sorted((b.score for b in boxes), reverse=True)
    for box in boxes:
        region = labels[box.y : box.y + box.h, box.x : box.x + box.w]
        ids = set(np.unique(region)) - {0}
        # The box holds its region wholly: some id is entirely inside it.
        assert any(
            (region == i).sum() == (labels == i).sum()
            and upsampled[labels == i].max() == np.float32(box.score)
            for i in ids
        )


def test_extract_boxes_work_size_scales_back():
    score_map = np.zeros((4, 4), np.float32)
    score_map[:2, :2] = 1.0
    exact = extract_boxes(score_map, (400, 200), "probability", threshold=0.5)
    coarse = extract_boxes(
        score_map, (400, 200), "probability", threshold=0.5, work_size=100
    )
    assert localization.working_hw((400, 200), 100) == (100, 50)
    assert coarse[0].x == exact[0].x and coarse[0].y == exact[0].y == 0
    assert coarse[0].w == pytest.approx(exact[0].w, abs=4)
    assert coarse[0].h == pytest.approx(exact[0].h, abs=4)


def test_extract_all_boxes_and_scale_boxes():
    maps = np.zeros((4, 4, 2), np.float32)
    maps[0, 0, 1] = 1.0
    result = localization.extract_all_boxes(maps, (4, 4), "probability", ["a", "b"])
    assert result["a"] == [] and _boxes(result["b"]) == [(0, 0, 1, 1)]
    scaled = localization.scale_boxes(result["b"] + [(1, 2, 3, 4)], (4, 4), (8, 2))
    assert scaled[0] == Box(0.0, 0.0, 0.5, 2.0, 1.0)
    assert scaled[1] == (0.5, 4.0, 1.5, 8.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(map_kind="heat"), "map_kind"),
        (dict(image_hw=(0, 4)), "image_hw"),
        (dict(image_hw=(4,)), "image_hw"),
        (dict(score_map=np.zeros(4)), "score_map"),
        (dict(score_map=np.full((2, 2), np.nan)), "finite"),
        (dict(threshold="high"), "threshold"),
        (dict(max_boxes=-1), "max_boxes"),
        (dict(work_size=0), "work_size"),
    ],
)
def test_extract_boxes_invalid_arguments(kwargs, match):
    args = dict(score_map=np.zeros((2, 2)), image_hw=(4, 4), map_kind="probability")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        extract_boxes(**args)
