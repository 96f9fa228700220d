"""Figures: maps and boxes over the X-ray, ROC curves, accuracy versus IoBB T."""

import io
import pathlib

import numpy as np

from cxr_tf import localization

_TRUTH_COLOR = "#00d000"  # green, as in the PCAM paper's Figure 2
_PRED_COLOR = "#1f5cff"  # blue


def _new_figure(width, height):
    # Figure + Agg canvas directly, not pyplot: no global backend switch, no
    # GUI, safe in threads and when the caller already uses pyplot.
    from matplotlib.backends import backend_agg  # pylint: disable=g-import-not-at-top
    from matplotlib import figure  # pylint: disable=g-import-not-at-top

    fig = figure.Figure(figsize=(width, height))
    backend_agg.FigureCanvasAgg(fig)
    return fig


def _finish(fig, path, dpi=100):
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    data = buffer.getvalue()
    if path is not None:
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return data


def _draw_boxes(axes, boxes, color, linestyle="-", label_scores=False):
    from matplotlib import patches  # pylint: disable=g-import-not-at-top

    for box in boxes:
        x, y, w, h = (float(v) for v in tuple(box)[:4])
        axes.add_patch(
            patches.Rectangle(
                (x, y),
                w,
                h,
                fill=False,
                edgecolor=color,
                linewidth=1.5,
                linestyle=linestyle,
            )
        )
        if label_scores and isinstance(box, localization.Box):
            axes.text(
                x,
                y - 4,
                f"{box.score:.2f}",
                color="white",
                fontsize=7,
                va="bottom",
                bbox=dict(facecolor=color, edgecolor="none", pad=1, alpha=0.8),
            )


def overlay_figure(
    image,
    maps,
    boxes,
    probabilities,
    gt_boxes=None,
    map_kind="probability",
    path=None,
    title=None,
):
    """The PCAM paper's Figure 2 layout for one image.

    Panel 1: the X-ray with the ground-truth boxes (green). Then one panel
    per finding in `maps` (highest probability first): its map upsampled to
    the image and blended over it, with the predicted boxes (blue, with
    their scores) and the truth boxes of that finding (dashed green).

    Args:
      image: array (H, W), the original image (any numeric range).
      maps: {finding: array (h, w)}, the maps to show (e.g. the positive
        findings' maps).
      boxes: {finding: [Box, ...]} predicted boxes in image pixels.
      probabilities: {finding: float}, image-level probabilities.
      gt_boxes: optional {finding: [(x, y, w, h), ...]} in image pixels.
      map_kind: "probability" (shown on 0..1) or "cam" (normalised to
        0..255 per image, as thresholded).
      path: optional file to write the PNG to.
      title: optional figure title (e.g. the image id).

    Returns:
      The PNG as bytes.

    Raises:
      ValueError: a bad image shape or map_kind.
    """
    localization.validate_map_kind(map_kind)
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim != 2:
        raise ValueError(f"`image` must be 2-D (H, W). Received: shape={image.shape}")
    gt_boxes = gt_boxes or {}
    order = sorted(maps, key=lambda f: -float(probabilities.get(f, 0.0)))
    panels = 1 + len(order)
    fig = _new_figure(3.2 * panels, 3.6)
    height, width = image.shape

    axes = fig.add_subplot(1, panels, 1)
    axes.imshow(image, cmap="gray")
    for finding, truth in gt_boxes.items():
        _draw_boxes(axes, truth, _TRUTH_COLOR)
        for box in truth[:1]:
            axes.text(
                box[0],
                box[1] - 6,
                finding,
                color="black",
                fontsize=7,
                va="bottom",
                bbox=dict(facecolor=_TRUTH_COLOR, edgecolor="none", pad=1, alpha=0.8),
            )
    axes.set_title("Image, truth boxes", fontsize=9)

    for index, finding in enumerate(order):
        score_map = np.asarray(maps[finding], dtype=np.float32)
        if map_kind == "cam":
            normalised = localization.normalize_cam(score_map)
            score_map = np.zeros_like(score_map) if normalised is None else normalised
            vmax, label = 255.0, "CAM (0-255)"
        else:
            vmax, label = 1.0, "probability"
        upsampled = localization.resize_bilinear(score_map, (height, width))
        axes = fig.add_subplot(1, panels, index + 2)
        axes.imshow(image, cmap="gray")
        shown = axes.imshow(upsampled, cmap="jet", alpha=0.4, vmin=0.0, vmax=vmax)
        _draw_boxes(axes, gt_boxes.get(finding, []), _TRUTH_COLOR, linestyle="--")
        _draw_boxes(axes, boxes.get(finding, []), _PRED_COLOR, label_scores=True)
        probability = probabilities.get(finding)
        text = finding if probability is None else f"{finding}  p={probability:.2f}"
        axes.set_title(text, fontsize=9)
        colorbar = fig.colorbar(shown, ax=axes, fraction=0.046, pad=0.02)
        colorbar.ax.tick_params(labelsize=6)
        colorbar.set_label(label, fontsize=6)
    for axes in fig.axes:
        if axes.images:  # the image panels, not the colorbars
            axes.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _finish(fig, path)


def plot_roc(curves, path=None, aucs=None, title="ROC"):
    """ROC curves of several classes on one plot.

    Args:
      curves: {name: (fpr, tpr) or (fpr, tpr, thresholds)}, e.g. from
        `cxr_tf.metrics.classification.roc_curve_points`.
      path: optional PNG path.
      aucs: optional {name: AUROC or None} for the legend.
      title: plot title.

    Returns:
      The PNG as bytes.
    """
    fig = _new_figure(6.0, 5.5)
    axes = fig.add_subplot(1, 1, 1)
    for name, curve in curves.items():
        fpr, tpr = curve[0], curve[1]
        auc = (aucs or {}).get(name)
        label = name if auc is None else f"{name} ({auc:.3f})"
        axes.plot(fpr, tpr, linewidth=1.2, label=label)
    axes.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1)
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.01)
    axes.set_xlabel("False positive rate")
    axes.set_ylabel("True positive rate")
    axes.set_title(title)
    if curves:
        axes.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _finish(fig, path)


def plot_localization_accuracy(acc_by_t, path=None, metric="IoBB", title=None):
    """Localization accuracy versus the overlap threshold T, one line per finding.

    Args:
      acc_by_t: {finding: {T: accuracy or None}}, or the output of
        `cxr_tf.metrics.localization.localization_accuracy` (its
        "accuracy" entries are used). None values are left out.
      path: optional PNG path.
      metric: overlap name for the axis label ("IoBB" or "IoU").
      title: plot title.

    Returns:
      The PNG as bytes.
    """
    fig = _new_figure(6.0, 4.5)
    axes = fig.add_subplot(1, 1, 1)
    for finding, values in acc_by_t.items():
        if isinstance(values, dict) and "accuracy" in values:
            values = values["accuracy"]
        points = sorted(
            (float(t), float(a)) for t, a in values.items() if a is not None
        )
        if points:
            ts, accs = zip(*points)
            axes.plot(ts, accs, marker="o", markersize=3, linewidth=1.2, label=finding)
    axes.set_xlabel(f"{metric} threshold T")
    axes.set_ylabel("Localization accuracy")
    axes.set_ylim(0, 1.02)
    axes.grid(alpha=0.3)
    axes.set_title(title or f"Localization accuracy ({metric} > T)")
    if axes.lines:
        axes.legend(fontsize=7)
    fig.tight_layout()
    return _finish(fig, path)
