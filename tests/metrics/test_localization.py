"""Tests for cxr_tf.metrics.localization on hand-made boxes and masks."""

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cxr_tf.localization import Box
from cxr_tf.metrics import localization as loc


def test_iobb_and_iou_known_values():
    pred, gt = (0, 0, 10, 10), (5, 5, 10, 10)
    assert loc.iobb(pred, gt) == pytest.approx(25 / 100)
    assert loc.iou(pred, gt) == pytest.approx(25 / 175)
    # A small prediction inside a large box: IoBB 1, IoU small.
    assert loc.iobb(Box(2, 2, 2, 2, 0.9), (0, 0, 10, 10)) == 1.0
    assert loc.iou((2, 2, 2, 2), (0, 0, 10, 10)) == pytest.approx(4 / 100)
    # IoBB is not symmetric.
    assert loc.iobb((0, 0, 10, 10), (2, 2, 2, 2)) == pytest.approx(0.04)
    assert loc.iobb((0, 0, 5, 5), (5, 0, 5, 5)) == 0.0  # touching edges
    assert loc.iobb((3, 3, 0, 4), (0, 0, 10, 10)) == 0.0  # empty prediction
    with pytest.raises(ValueError, match="w >= 0"):
        loc.iobb((0, 0, -1, 2), gt)


def _cases():
    ground_truth = {
        "img1": {"Mass": [(0, 0, 10, 10)], "Nodule": [(50, 50, 4, 4)]},
        "img2": {"Mass": [(100, 100, 20, 20), (0, 0, 10, 10)]},
        "img3": {"Effusion": [(0, 0, 8, 8)]},  # no prediction for img3
    }
    predictions = {
        "img1": {
            # IoBB with the gt: 25/100 = 0.25, and a far false positive.
            "Mass": [Box(5, 5, 10, 10, 0.9), Box(200, 200, 5, 5, 0.8)],
            "Nodule": [Box(50, 50, 2, 2, 0.95)],  # IoBB 1.0
        },
        "img2": {"Mass": [Box(100, 100, 10, 10, 0.9)]},  # IoBB 1.0 with gt 1
        "img9": {"Mass": [Box(0, 0, 10, 10, 0.9)]},  # image without gt: ignored
    }
    return predictions, ground_truth


def test_localization_accuracy_known_values():
    predictions, ground_truth = _cases()
    result = loc.localization_accuracy(
        predictions, ground_truth, thresholds=(0.1, 0.25, 0.5), findings=None
    )
    assert list(result) == ["Effusion", "Mass", "Nodule"]  # canonical order
    mass = result["Mass"]
    # gt boxes: img1 (best 0.25), img2 box 1 (1.0), img2 box 2 (0.0).
    assert mass["num_gt_boxes"] == 3 and mass["num_images"] == 2
    assert mass["localized"] == {0.1: 2, 0.25: 1, 0.5: 1}  # strictly > T
    assert mass["accuracy"][0.1] == pytest.approx(2 / 3)
    assert mass["accuracy"][0.5] == pytest.approx(1 / 3)
    assert result["Nodule"]["accuracy"] == {0.1: 1.0, 0.25: 1.0, 0.5: 1.0}
    assert result["Effusion"]["accuracy"][0.1] == 0.0
    iou = loc.localization_accuracy(
        predictions, ground_truth, thresholds=(0.1, 0.3), metric="iou"
    )
    # Mass IoU: img1 25/175 = 0.143, img2 box 1 100/400 = 0.25.
    assert iou["Mass"]["localized"] == {0.1: 2, 0.3: 0}
    extra = loc.localization_accuracy(predictions, ground_truth, findings=["Hernia"])
    assert extra["Hernia"]["accuracy"][0.5] is None
    assert extra["Hernia"]["num_gt_boxes"] == 0


def test_average_false_positives_known_values():
    predictions, ground_truth = _cases()
    result = loc.average_false_positives(
        predictions, ground_truth, thresholds=(0.1, 0.5)
    )
    mass = result["Mass"]
    # img1: box (5,5) has IoBB 0.25 (a FP at 0.5, not at 0.1), far box FP at
    # both; img2: its one box hits gt 1. Two images with Mass boxes.
    assert mass["false_positives"] == {0.1: 1, 0.5: 2}
    assert mass["afp"] == {0.1: 0.5, 0.5: 1.0}
    assert mass["num_images"] == 2 and "divided by the number" in mass["definition"]
    assert result["Effusion"]["afp"] == {0.1: 0.0, 0.5: 0.0}
    assert (
        loc.average_false_positives({}, {}, findings=["Mass"])["Mass"]["afp"][0.5]
        is None
    )


def test_ground_truth_from_frame():
    frame = pd.DataFrame(
        {
            "image_id": ["a.png", "a.png", "b.png"],
            "finding": ["Mass", "Mass", "Nodule"],
            "x": [1.0, 2.0, 3.0],
            "y": [4.0, 5.0, 6.0],
            "w": [7.0, 8.0, 9.0],
            "h": [1.5, 2.5, 3.5],
        }
    )
    assert loc.ground_truth_from_frame(frame) == {
        "a.png": {"Mass": [(1.0, 4.0, 7.0, 1.5), (2.0, 5.0, 8.0, 2.5)]},
        "b.png": {"Nodule": [(3.0, 6.0, 9.0, 3.5)]},
    }


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(metric="giou"), "metric"), (dict(thresholds=(0.5, 1.0)), "thresholds")],
)
def test_invalid_arguments(kwargs, match):
    predictions, ground_truth = _cases()
    with pytest.raises(ValueError, match=match):
        loc.localization_accuracy(predictions, ground_truth, **kwargs)


def test_boxes_to_mask_pixel_centres():
    mask = loc.boxes_to_mask((6, 8), [(1, 2, 3, 2), (6.6, 4.6, 5, 5)])
    expected = np.zeros((6, 8), bool)
    expected[2:4, 1:4] = True
    expected[5:6, 7:8] = True  # centre (7.5, 5.5) only; clipped to the image
    np.testing.assert_array_equal(mask, expected)


def test_mask_metrics_known_values():
    mask = np.zeros((10, 10), bool)
    mask[0:4, 0:4] = True
    result = loc.mask_metrics(mask, [(2, 2, 4, 4)])
    # P 16 px, G 16 px, P ∩ G = rows 2-3 x cols 2-3 = 4 px, not G = 84 px.
    assert result["iop"] == pytest.approx(4 / 16)
    assert result["fpr"] == pytest.approx(12 / 84)
    assert result["fnr"] == pytest.approx(12 / 16)
    empty = loc.mask_metrics(np.zeros((10, 10), bool), [(2, 2, 4, 4)])
    assert empty == {"iop": None, "fpr": 0.0, "fnr": 1.0}
    summary = loc.summarize_mask_metrics([result, empty])
    assert summary["iop"] == pytest.approx(0.25)
    assert summary["num_undefined"]["iop"] == 1
    assert summary["fnr"] == pytest.approx((0.75 + 1.0) / 2)
    assert summary["fnr_sem"] == pytest.approx(0.125)


def test_choose_mask_threshold_minimises_balanced_error():
    soft = np.full((10, 10), 0.2)
    soft[2:6, 2:6] = 0.6  # the gt box
    soft[0, :] = 0.9  # a bright strip outside the box
    masks, boxes = [soft, soft.copy()], [[(2, 2, 4, 4)], [(2, 2, 4, 4)]]
    result = loc.choose_mask_threshold(masks, boxes, [0.95, 0.7, 0.5, 0.1])
    # 0.5 keeps the box and the strip: FNR 0, FPR 10/84. 0.7: FNR 1; 0.1: FPR 1.
    assert result["threshold"] == 0.5
    assert result["error"] == pytest.approx(0.5 * 10 / 84)
    assert [row["threshold"] for row in result["table"]] == [0.1, 0.5, 0.7, 0.95]
    with pytest.raises(ValueError, match="no ground-truth pixel"):
        loc.choose_mask_threshold([soft], [[]], [0.5])


_coord = st.floats(0, 200, allow_nan=False)
_size = st.floats(0.5, 200, allow_nan=False)
_box = st.tuples(_coord, _coord, _size, _size)


@settings(max_examples=200, deadline=None)
@given(_box, _box)
def test_overlap_properties(pred, gt):
    value_iobb, value_iou = loc.iobb(pred, gt), loc.iou(pred, gt)
    assert 0.0 <= value_iou <= value_iobb + 1e-12 <= 1.0 + 2e-12
    assert value_iou == pytest.approx(loc.iou(gt, pred))
    # Rasterised areas agree with the continuous ones on integer boxes.
    ints = [tuple(float(round(v)) for v in b) for b in (pred, gt)]
    masks = [loc.boxes_to_mask((420, 420), [b]) for b in ints]
    if ints[0][2] * ints[0][3] > 0:
        expected = np.sum(masks[0] & masks[1]) / np.sum(masks[0])
        assert loc.iobb(*ints) == pytest.approx(expected)
