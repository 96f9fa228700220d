"""Classification metrics: per-class AUROC and ROC curves (scikit-learn).

The definition, in words: docs/DATA_AND_METRICS.md, section 11.
"""

import numpy as np
from sklearn import metrics as sk_metrics


def _as_label_matrix(y_true, y_score, names):
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score, dtype=np.float64)
    if y_true.ndim != 2 or y_true.shape != y_score.shape:
        raise ValueError(
            "`y_true` and `y_score` must be 2-D arrays (N, K) of the same shape. "
            f"Received: y_true.shape={y_true.shape}, y_score.shape={y_score.shape}"
        )
    if len(names) != y_true.shape[1]:
        raise ValueError(
            f"`names` must hold one name per column ({y_true.shape[1]}). "
            f"Received: {len(names)} names"
        )
    bad = ~np.isin(y_true, (0, 1))
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(
            "`y_true` must hold only 0 and 1. "
            f"Received: y_true[{row}, {col}]={y_true[row, col]!r}"
        )
    if not np.all(np.isfinite(y_score)):
        raise ValueError("`y_score` must hold finite values; it has NaN or inf.")
    return y_true.astype(np.int64), y_score


def auroc_per_class(y_true, y_score, names):
    """Area under the ROC curve of each class.

    Args:
      y_true: array (N, K) of 0/1 labels.
      y_score: array (N, K) of scores (probabilities or logits).
      names: K class names.

    Returns:
      dict name -> float AUROC, or None where the class has no positive or
      no negative example (the AUROC is undefined there, not 0.5).

    Raises:
      ValueError: shapes disagree, labels are not 0/1, scores not finite.
    """
    y_true, y_score = _as_label_matrix(y_true, y_score, names)
    result = {}
    for k, name in enumerate(names):
        positives = int(y_true[:, k].sum())
        if positives == 0 or positives == y_true.shape[0]:
            result[name] = None
        else:
            result[name] = float(sk_metrics.roc_auc_score(y_true[:, k], y_score[:, k]))
    return result


def mean_auroc(per_class):
    """Mean of the defined AUROCs of `auroc_per_class`; None if none is defined."""
    values = [v for v in per_class.values() if v is not None]
    return float(np.mean(values)) if values else None


def roc_curve_points(y_true, y_score):
    """ROC curve of one class.

    Args:
      y_true: array (N,) of 0/1 labels with both values present.
      y_score: array (N,) of scores.

    Returns:
      (fpr, tpr, thresholds) arrays, as sklearn.metrics.roc_curve.

    Raises:
      ValueError: bad shapes or labels, or only one label value present (the
        curve is undefined).
    """
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score)
    if y_true.ndim != 1 or y_true.shape != y_score.shape:
        raise ValueError(
            "`y_true` and `y_score` must be 1-D arrays of the same length. "
            f"Received: y_true.shape={y_true.shape}, y_score.shape={y_score.shape}"
        )
    y_true, y_score = _as_label_matrix(y_true[:, None], y_score[:, None], ["class"])
    positives = int(y_true.sum())
    if positives == 0 or positives == len(y_true):
        raise ValueError(
            "A ROC curve needs positive and negative examples. Received "
            f"{positives} positives among {len(y_true)} examples."
        )
    fpr, tpr, thresholds = sk_metrics.roc_curve(y_true[:, 0], y_score[:, 0])
    return fpr, tpr, thresholds
