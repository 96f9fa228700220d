"""Tests for cxr_tf.metrics.classification."""

import numpy as np
import pytest

from cxr_tf.metrics import classification


def test_auroc_per_class_known_values_and_undefined_classes():
    y_true = np.array([[0, 0, 1], [0, 0, 1], [1, 0, 1], [1, 0, 1]])
    y_score = np.array(
        [[0.1, 0.2, 0.3], [0.4, 0.1, 0.3], [0.35, 0.9, 0.3], [0.8, 0.5, 0.3]]
    )
    result = classification.auroc_per_class(y_true, y_score, ["a", "none", "all"])
    # Positive pairs ranked right: (0.35 > 0.1), (0.8 > 0.1), (0.8 > 0.4): 3 / 4.
    assert result == {"a": pytest.approx(0.75), "none": None, "all": None}
    assert classification.mean_auroc(result) == pytest.approx(0.75)
    assert classification.mean_auroc({"x": None}) is None


def test_auroc_ties_count_half():
    result = classification.auroc_per_class([[0], [1]], [[0.5], [0.5]], ["t"])
    assert result["t"] == pytest.approx(0.5)


def test_roc_curve_points():
    fpr, tpr, thresholds = classification.roc_curve_points(
        [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    )
    assert fpr[0] == 0.0 and fpr[-1] == 1.0 and tpr[-1] == 1.0
    assert np.trapezoid(tpr, fpr) == pytest.approx(0.75)
    assert len(thresholds) == len(fpr)
    with pytest.raises(ValueError, match="positive and negative"):
        classification.roc_curve_points([1, 1], [0.2, 0.3])


@pytest.mark.parametrize(
    "y_true, y_score, names, match",
    [
        ([[0, 1]], [[0.1, 0.2]], ["a"], "names"),
        ([[0, 2]], [[0.1, 0.2]], ["a", "b"], r"y_true\[0, 1\]=.*2"),
        ([[0, 1]], [[0.1]], ["a", "b"], "same shape"),
        ([[0, 1]], [[0.1, np.nan]], ["a", "b"], "finite"),
    ],
)
def test_auroc_invalid_inputs(y_true, y_score, names, match):
    with pytest.raises(ValueError, match=match):
        classification.auroc_per_class(y_true, y_score, names)
