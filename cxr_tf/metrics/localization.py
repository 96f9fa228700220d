"""Localization metrics: IoBB / IoU accuracy, false positives, pixelwise IoP.

The definitions, in words: docs/DATA_AND_METRICS.md, sections 12-13.
"""

import numpy as np

from cxr_tf.data import schema

DEFAULT_OVERLAP_THRESHOLDS = (0.1, 0.25, 0.5, 0.75, 0.9)
OVERLAP_METRICS = ("iobb", "iou")

AFP_DEFINITION = (
    "Average false positives of a finding at threshold T: the number of "
    "predicted boxes of that finding, on the images that have at least one "
    "ground-truth box of that finding, whose overlap (IoBB or IoU) with every "
    "ground-truth box of that finding on the same image is <= T, divided by "
    "the number of those images."
)
ACCURACY_DEFINITION = (
    "Localization accuracy of a finding at threshold T: the fraction of its "
    "ground-truth boxes for which at least one predicted box of the same "
    "finding on the same image has overlap (IoBB or IoU) > T."
)
MASK_ERROR_DEFINITION = (
    "Localization error of a thresholded mask: the mean over images of "
    "(FPR + FNR) / 2, i.e. one minus the pixelwise balanced accuracy against "
    "the union of the image's ground-truth boxes."
)


def _xywh(box):
    try:
        x, y, w, h = (float(v) for v in tuple(box)[:4])
    except (TypeError, ValueError):
        raise ValueError(
            f"A box must be (x, y, w, h[, ...]) numbers. Received: {box!r}"
        ) from None
    if w < 0 or h < 0:
        raise ValueError(f"A box must have w >= 0 and h >= 0. Received: {box!r}")
    return x, y, w, h


def _intersection(a, b):
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    iw = min(ax + aw, bx + bw) - max(ax, bx)
    ih = min(ay + ah, by + bh) - max(ay, by)
    return max(iw, 0.0) * max(ih, 0.0)


def iobb(pred, gt):
    """Intersection over the predicted box's area (Wang et al. 2017).

    Args:
      pred: predicted box (x, y, w, h[, score]) (a `Box` works).
      gt: ground-truth box (x, y, w, h).

    Returns:
      area(pred ∩ gt) / area(pred) as a float; 0.0 for an empty pred box.
    """
    pred, gt = _xywh(pred), _xywh(gt)
    area = pred[2] * pred[3]
    return _intersection(pred, gt) / area if area > 0 else 0.0


def iou(pred, gt):
    """Intersection over union of two (x, y, w, h) boxes; 0.0 if both are empty."""
    pred, gt = _xywh(pred), _xywh(gt)
    inter = _intersection(pred, gt)
    union = pred[2] * pred[3] + gt[2] * gt[3] - inter
    return inter / union if union > 0 else 0.0


_OVERLAPS = {"iobb": iobb, "iou": iou}


def _check(thresholds, metric):
    if metric not in OVERLAP_METRICS:
        raise ValueError(
            f"`metric` must be one of {OVERLAP_METRICS}. Received: metric={metric!r}"
        )
    thresholds = tuple(float(t) for t in thresholds)
    if not thresholds or any(not 0.0 <= t < 1.0 for t in thresholds):
        raise ValueError(
            "`thresholds` must be a non-empty sequence of numbers in [0, 1). "
            f"Received: thresholds={thresholds!r}"
        )
    return thresholds, _OVERLAPS[metric]


def _findings(ground_truth, findings):
    if findings is not None:
        return list(findings)
    present = {f for per_image in ground_truth.values() for f, b in per_image.items()}
    known = [f for f in schema.FINDINGS if f in present]
    return known + sorted(present - set(known))


def ground_truth_from_frame(frame):
    """{image_id: {finding: [(x, y, w, h), ...]}} from a `read_bbox_list` frame.

    Args:
      frame: pandas DataFrame with columns image_id, finding, x, y, w, h.

    Returns:
      dict as expected by `localization_accuracy`.
    """
    result = {}
    for row in frame.itertuples(index=False):
        boxes = result.setdefault(row.image_id, {}).setdefault(row.finding, [])
        boxes.append((float(row.x), float(row.y), float(row.w), float(row.h)))
    return result


def _overlap_matrix(preds, gts, overlap):
    # (num_gt, num_pred) overlaps of one finding on one image.
    return np.array(
        [[overlap(p, g) for p in preds] for g in gts], dtype=np.float64
    ).reshape(len(gts), len(preds))


def _boxed_images(predictions, ground_truth, finding):
    """(predicted boxes, truth boxes) of `finding` on each image with truth."""
    for image_id, per_image in ground_truth.items():
        gts = per_image.get(finding, [])
        if gts:
            yield predictions.get(image_id, {}).get(finding, []), gts


def localization_accuracy(
    predictions,
    ground_truth,
    thresholds=DEFAULT_OVERLAP_THRESHOLDS,
    metric="iobb",
    findings=None,
):
    """Fraction of ground-truth boxes hit by a predicted box, per finding.

    A ground-truth box is localized at T when at least one predicted box of
    its finding on its image has overlap > T (`metric`: "iobb" as in Wang et
    al. 2017 and the PCAM paper, or "iou"). Images absent from `predictions`
    have no predicted box.

    Args:
      predictions: {image_id: {finding: [Box or (x, y, w, h), ...]}}.
      ground_truth: {image_id: {finding: [(x, y, w, h), ...]}}, same pixels.
      thresholds: overlap thresholds T.
      metric: "iobb" or "iou".
      findings: findings to report; default: those with ground truth, in
        the canonical order. A finding without ground truth gets None.

    Returns:
      {finding: {"accuracy": {T: float or None}, "localized": {T: int},
      "num_gt_boxes": int, "num_images": int, "metric": metric,
      "definition": ACCURACY_DEFINITION}}.

    Raises:
      ValueError: a bad metric, threshold or box.
    """
    thresholds, overlap = _check(thresholds, metric)
    result = {}
    for finding in _findings(ground_truth, findings):
        best = []
        images = list(_boxed_images(predictions, ground_truth, finding))
        num_images = len(images)
        for preds, gts in images:
            matrix = _overlap_matrix(preds, gts, overlap)
            best.extend(matrix.max(axis=1) if preds else [0.0] * len(gts))
        best = np.asarray(best)
        localized = {t: int(np.sum(best > t)) for t in thresholds}
        result[finding] = {
            "accuracy": {
                t: (localized[t] / len(best) if len(best) else None) for t in thresholds
            },
            "localized": localized,
            "num_gt_boxes": int(len(best)),
            "num_images": num_images,
            "metric": metric,
            "definition": ACCURACY_DEFINITION,
        }
    return result


def average_false_positives(
    predictions,
    ground_truth,
    thresholds=DEFAULT_OVERLAP_THRESHOLDS,
    metric="iobb",
    findings=None,
):
    """Average false positives per image, per finding (see `AFP_DEFINITION`).

    The papers give no formula; this one is: for a finding and threshold T,
    count the predicted boxes of that finding, on the images that have at
    least one ground-truth box of that finding, whose overlap with every
    ground-truth box of that finding on the same image is <= T; divide by
    the number of those images.

    Args:
      predictions, ground_truth, thresholds, metric, findings: as in
        `localization_accuracy`.

    Returns:
      {finding: {"afp": {T: float or None}, "false_positives": {T: int},
      "num_images": int, "metric": metric, "definition": AFP_DEFINITION}}.

    Raises:
      ValueError: a bad metric, threshold or box.
    """
    thresholds, overlap = _check(thresholds, metric)
    result = {}
    for finding in _findings(ground_truth, findings):
        false_positives = {t: 0 for t in thresholds}
        images = list(_boxed_images(predictions, ground_truth, finding))
        num_images = len(images)
        for preds, gts in images:
            if not preds:
                continue
            best = _overlap_matrix(preds, gts, overlap).max(axis=0)
            for t in thresholds:
                false_positives[t] += int(np.sum(best <= t))
        result[finding] = {
            "afp": {
                t: (false_positives[t] / num_images if num_images else None)
                for t in thresholds
            },
            "false_positives": false_positives,
            "num_images": num_images,
            "metric": metric,
            "definition": AFP_DEFINITION,
        }
    return result


def boxes_to_mask(shape, boxes):
    """Boolean (H, W) mask of the union of (x, y, w, h) boxes.

    A pixel (row r, column c) is inside a box when its centre (c + 0.5,
    r + 0.5) lies in [x, x + w) x [y, y + h); integer boxes cover exactly
    columns x .. x + w - 1 and rows y .. y + h - 1.
    """
    height, width = shape
    mask = np.zeros((height, width), dtype=bool)
    for box in boxes:
        x, y, w, h = _xywh(box)
        c0 = int(np.clip(np.ceil(x - 0.5), 0, width))
        c1 = int(np.clip(np.ceil(x + w - 0.5), 0, width))
        r0 = int(np.clip(np.ceil(y - 0.5), 0, height))
        r1 = int(np.clip(np.ceil(y + h - 0.5), 0, height))
        mask[r0:r1, c0:c1] = True
    return mask


def mask_metrics(mask, gt_boxes):
    """Pixelwise InfoMask metrics of one image's binary mask.

    With P the mask and G the union of the ground-truth boxes:
    IoP = |P ∩ G| / |P|, FPR = |P \\ G| / |not G|, FNR = |G \\ P| / |G|.

    Args:
      mask: bool array (H, W), the thresholded mask.
      gt_boxes: (x, y, w, h) boxes in pixels of the mask.

    Returns:
      {"iop", "fpr", "fnr"}: floats, None where the denominator is zero
      (IoP of an empty mask, FPR when G covers the image, FNR without G).

    Raises:
      ValueError: the mask is not 2-D.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"`mask` must be 2-D (H, W). Received: shape={mask.shape}")
    truth = boxes_to_mask(mask.shape, gt_boxes)
    predicted = int(mask.sum())
    inside = int(np.sum(mask & truth))
    positives = int(truth.sum())
    negatives = truth.size - positives
    return {
        "iop": inside / predicted if predicted else None,
        "fpr": (predicted - inside) / negatives if negatives else None,
        "fnr": (positives - inside) / positives if positives else None,
    }


def summarize_mask_metrics(per_image):
    """Mean and standard error over images of `mask_metrics` results.

    Per-image means (as the InfoMask paper's mean and error and per-image
    densities), not pixel totals: every image weighs the same whatever its
    box size. Undefined values (None) are left out of their metric and
    counted.

    Args:
      per_image: list of `mask_metrics` dicts.

    Returns:
      {"iop", "fpr", "fnr": mean or None, "iop_sem", ...: standard error or
      None, "num_images", "num_undefined": {metric: count}}.
    """
    summary = {"num_images": len(per_image), "num_undefined": {}}
    for key in ("iop", "fpr", "fnr"):
        values = np.array([r[key] for r in per_image if r[key] is not None])
        summary["num_undefined"][key] = len(per_image) - len(values)
        summary[key] = float(values.mean()) if len(values) else None
        summary[key + "_sem"] = (
            float(values.std(ddof=1) / np.sqrt(len(values)))
            if len(values) > 1
            else None
        )
    return summary


def _mask_error(metrics):
    # No negative pixel: no false positive is possible.
    fpr = metrics["fpr"] if metrics["fpr"] is not None else 0.0
    return 0.5 * (fpr + metrics["fnr"])


def choose_mask_threshold(masks, gt_boxes, candidates):
    """Threshold of soft masks with the least localization error on validation.

    Error (`MASK_ERROR_DEFINITION`): mean over images of (FPR + FNR) / 2.
    IoP alone is not used: a tiny mask inside the box scores a perfect IoP.
    Ties go to the smallest threshold. Pixels with mask >= t are kept.

    Args:
      masks: list of float arrays (H, W), soft masks (e.g. InfoMask, or a
        probability map upsampled to the image).
      gt_boxes: list (same length) of box lists in pixels of each mask;
        every image needs at least one box.
      candidates: thresholds to try.

    Returns:
      {"threshold": float, "error": float, "table": [{"threshold", "error",
      "iop", "fpr", "fnr"}, ...] (means over images), "definition": str}.

    Raises:
      ValueError: lengths differ, no candidates, or an image without a box.
    """
    candidates = sorted(float(c) for c in candidates)
    if not candidates:
        raise ValueError("`candidates` must hold at least one threshold.")
    if len(masks) != len(gt_boxes) or not masks:
        raise ValueError(
            "`masks` and `gt_boxes` must be non-empty lists of the same length. "
            f"Received: {len(masks)} masks, {len(gt_boxes)} box lists"
        )
    for index, (mask, boxes) in enumerate(zip(masks, gt_boxes)):
        if not boxes_to_mask(np.shape(mask), boxes).any():
            raise ValueError(
                f"Image {index} has no ground-truth pixel; the localization "
                "error needs a box inside every mask."
            )
    table = []
    for threshold in candidates:
        per_image = [
            mask_metrics(np.asarray(mask) >= threshold, boxes)
            for mask, boxes in zip(masks, gt_boxes)
        ]
        summary = summarize_mask_metrics(per_image)
        table.append(
            {
                "threshold": threshold,
                "error": float(np.mean([_mask_error(m) for m in per_image])),
                "iop": summary["iop"],
                "fpr": summary["fpr"],
                "fnr": summary["fnr"],
            }
        )
    best = min(table, key=lambda row: row["error"])
    return {
        "threshold": best["threshold"],
        "error": best["error"],
        "table": table,
        "definition": MASK_ERROR_DEFINITION,
    }
