"""Figures: maps and boxes over the X-ray, ROC curves, accuracy versus IoBB T."""

import io
import math
import pathlib

import numpy as np

from cxr_tf import localization

_TRUTH_COLOR = "#00d000"  # green, as in the PCAM paper's Figure 2
_PRED_COLOR = "#1f5cff"  # blue
# Overlays are drawn from a copy of the film whose longer side is at most
# this: a panel is ~320 px wide, so twice that loses nothing visible, and a
# 7000 x 7000 film costs what a 640 px one does (a 1024 px film is halved).
OVERLAY_MAX_SIDE = 640
# Curves of several findings: 20 distinct colours (tab20's dark shades, then
# its light ones) crossed with 4 line styles, so no two of the first 80
# curves share (colour, style), and neighbours differ in both.
_TAB20 = (
    "#1f77b4", "#aec7e8", "#ff7f0e", "#ffbb78", "#2ca02c", "#98df8a",
    "#d62728", "#ff9896", "#9467bd", "#c5b0d5", "#8c564b", "#c49c94",
    "#e377c2", "#f7b6d2", "#7f7f7f", "#c7c7c7", "#bcbd22", "#dbdb8d",
    "#17becf", "#9edae5",
)  # fmt: skip
CURVE_COLOURS = _TAB20[0::2] + _TAB20[1::2]
CURVE_STYLES = ("-", "--", "-.", ":")


def curve_style(index):
    """(colour, line style) of the index-th curve; unique for index < 80."""
    index = int(index)
    colour = CURVE_COLOURS[index % len(CURVE_COLOURS)]
    shift = index // len(CURVE_COLOURS)
    return colour, CURVE_STYLES[(index + shift) % len(CURVE_STYLES)]


def _curve_styles(names):
    """{name: (colour, style)}: by position in `schema.FINDINGS` when every
    name is a finding (a finding looks the same on every plot), else by order."""
    from cxr_tf.data import schema  # pylint: disable=import-outside-toplevel

    names = list(names)
    if all(n in schema.FINDINGS for n in names):
        return {n: curve_style(schema.FINDINGS.index(n)) for n in names}
    return {n: curve_style(i) for i, n in enumerate(names)}


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
            _label(axes, x, y, f"{box.score:.2f}", color, "white")


def _label(axes, x, y, text, facecolor, textcolor):
    # Offset in points, not data units: the same look at 128 px and 7000 px.
    axes.annotate(
        text,
        (x, y),
        xytext=(0, 2),
        textcoords="offset points",
        color=textcolor,
        fontsize=7,
        va="bottom",
        bbox=dict(facecolor=facecolor, edgecolor="none", pad=1, alpha=0.8),
    )


def downscale(image, max_side=OVERLAY_MAX_SIDE):
    """Block mean of a 2-D film so that its longer side is at most `max_side`.

    Args:
      image: array (H, W).
      max_side: bound of the longer side (None: no bound).

    Returns:
      (small, factor): float32 (ceil(H / f), ceil(W / f)) and the integer
      factor f; pixel (i, j) of `small` covers original pixels
      [i f, (i + 1) f) x [j f, (j + 1) f) (the last row/column repeats the edge).
    """
    height, width = image.shape
    if not max_side or max(height, width) <= max_side:
        return np.asarray(image, np.float32), 1
    factor = int(math.ceil(max(height, width) / max_side))
    pad_h, pad_w = -height % factor, -width % factor
    if pad_h or pad_w:
        image = np.pad(image, ((0, pad_h), (0, pad_w)), mode="edge")
    blocks = image.reshape(
        image.shape[0] // factor, factor, image.shape[1] // factor, factor
    )
    return blocks.mean(axis=(1, 3), dtype=np.float32), factor


def overlay_axes_figure(
    image,
    maps,
    boxes,
    probabilities,
    gt_boxes=None,
    map_kind="probability",
    title=None,
    max_side=OVERLAY_MAX_SIDE,
    frame_hw=None,
):
    """The figure of `overlay_figure`, not yet rendered (see there).

    Every axes is in the original film's pixels (x right, y down), whatever
    size the film is drawn at, so boxes are drawn as given.
    """
    from matplotlib import lines  # pylint: disable=g-import-not-at-top

    localization.validate_map_kind(map_kind)
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim != 2 or min(image.shape) < 1:
        raise ValueError(f"`image` must be 2-D (H, W). Received: shape={image.shape}")
    image_h, image_w = image.shape
    height, width = frame_hw if frame_hw is not None else image.shape
    height, width = float(height), float(width)
    small, factor = downscale(image, max_side)
    # The drawn copy covers [0, ceil(W / f) f) x [0, ceil(H / f) f) of the
    # image's pixels; the axes limits cut the repeated edge back to the film.
    extent = (
        0,
        small.shape[1] * factor * width / image_w,
        small.shape[0] * factor * height / image_h,
        0,
    )
    map_hw = (
        max(1, int(round(image_h / factor))),
        max(1, int(round(image_w / factor))),
    )
    order = sorted(maps, key=lambda f: -float(probabilities.get(f, 0.0)))
    panels = 1 + len(order)
    fig = _new_figure(3.2 * panels, 3.9)

    def film_axes(position):
        axes = fig.add_subplot(1, panels, position)
        axes.imshow(small, cmap="gray", extent=extent, interpolation="antialiased")
        axes.set_xlim(0, width)
        axes.set_ylim(height, 0)
        return axes

    axes = film_axes(1)
    known = gt_boxes is not None
    gt_boxes = gt_boxes or {}
    count = 0
    for finding, truth in gt_boxes.items():
        truth = [tuple(b) for b in truth]
        count += len(truth)
        _draw_boxes(axes, truth, _TRUTH_COLOR)
        for box in truth[:1]:
            _label(axes, box[0], box[1], finding, _TRUTH_COLOR, "black")
    if not known:
        panel_title = "Image (truth boxes not given)"
    else:
        panel_title = f"Image, {count} truth box{'es' if count != 1 else ''}"
    axes.set_title(panel_title, fontsize=9)

    for index, finding in enumerate(order):
        score_map = np.asarray(maps[finding], dtype=np.float32)
        if map_kind == "cam":
            normalised = localization.normalize_cam(score_map)
            score_map = np.zeros_like(score_map) if normalised is None else normalised
            vmax, label = 255.0, "CAM (0-255)"
        else:
            vmax, label = 1.0, "probability"
        upsampled = localization.resize_bilinear(score_map, map_hw)
        axes = film_axes(index + 2)
        shown = axes.imshow(
            upsampled,
            cmap="jet",
            alpha=0.4,
            vmin=0.0,
            vmax=vmax,
            extent=(0, width, height, 0),
        )
        axes.set_xlim(0, width)
        axes.set_ylim(height, 0)
        _draw_boxes(axes, gt_boxes.get(finding, []), _TRUTH_COLOR, linestyle="--")
        _draw_boxes(axes, boxes.get(finding, []), _PRED_COLOR, label_scores=True)
        probability = probabilities.get(finding)
        text = finding if probability is None else f"{finding}  p={probability:.2f}"
        axes.set_title(text, fontsize=9)
        if index == len(order) - 1:
            # One colour bar for all map panels: they share the scale, and
            # each bar's ticks cost as much layout time as a panel.
            colorbar = fig.colorbar(shown, ax=axes, fraction=0.046, pad=0.02)
            colorbar.ax.tick_params(labelsize=6)
            colorbar.set_label(label, fontsize=6)
    for axes in fig.axes:
        if axes.images:  # the image panels, not the colorbars
            axes.set_axis_off()
    handles = [
        lines.Line2D(
            [],
            [],
            color=_TRUTH_COLOR,
            linewidth=1.5,
            label="truth box" if known else "truth box (not given)",
        ),
        lines.Line2D(
            [], [], color=_PRED_COLOR, linewidth=1.5, label="predicted box (score)"
        ),
    ]
    fig.legend(
        handles=handles, loc="lower center", ncol=2, fontsize=7, frameon=False
    )
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def overlay_figure(
    image,
    maps,
    boxes,
    probabilities,
    gt_boxes=None,
    map_kind="probability",
    path=None,
    title=None,
    max_side=OVERLAY_MAX_SIDE,
    frame_hw=None,
):
    """The PCAM paper's Figure 2 layout for one image.

    Panel 1: the X-ray with the ground-truth boxes (green). Then one panel
    per finding in `maps` (highest probability first): its map upsampled to
    the image and blended over it, with the predicted boxes (blue, with
    their scores) and the truth boxes of that finding (dashed green). A
    legend under the panels names the two colours. The film is drawn from a
    block-mean copy whose longer side is at most `max_side`, so the cost does
    not grow with the film; boxes stay in the film's own pixels.

    Args:
      image: array (H, W), the original image (any numeric range).
      maps: {finding: array (h, w)}, the maps to show (e.g. the positive
        findings' maps), covering the film (no padding).
      boxes: {finding: [Box, ...]} predicted boxes in image pixels.
      probabilities: {finding: float}, image-level probabilities.
      gt_boxes: optional {finding: [(x, y, w, h), ...]} in image pixels;
        None: not known (the panel says so), {}: known to have none.
      map_kind: "probability" (shown on 0..1) or "cam" (normalised to
        0..255 per image, as thresholded).
      path: optional file to write the PNG to.
      title: optional figure title (e.g. the image id).
      max_side: longer side of the drawn copy of the film (None: full size).
      frame_hw: (H, W) of the film the boxes are measured in, when `image`
        is a resized copy of it (e.g. an ingested record); None: image.shape.

    Returns:
      The PNG as bytes.

    Raises:
      ValueError: a bad image shape or map_kind.
    """
    fig = overlay_axes_figure(
        image,
        maps,
        boxes,
        probabilities,
        gt_boxes,
        map_kind,
        title,
        max_side,
        frame_hw,
    )
    return _finish(fig, path)


def roc_figure(curves, aucs=None, title="ROC"):
    """The figure of `plot_roc`, not yet rendered: one Line2D per curve."""
    fig = _new_figure(6.0, 5.5)
    axes = fig.add_subplot(1, 1, 1)
    styles = _curve_styles(curves)
    for name, curve in curves.items():
        fpr, tpr = curve[0], curve[1]
        auc = (aucs or {}).get(name)
        label = name if auc is None else f"{name} ({auc:.3f})"
        colour, style = styles[name]
        axes.plot(
            fpr, tpr, color=colour, linestyle=style, linewidth=1.4, label=label
        )
    axes.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1)
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.01)
    axes.set_xlabel("False positive rate")
    axes.set_ylabel("True positive rate")
    axes.set_title(title)
    if curves:
        axes.legend(fontsize=7, loc="lower right", handlelength=3)
    fig.tight_layout()
    return fig


def plot_roc(curves, path=None, aucs=None, title="ROC"):
    """ROC curves of several classes on one plot.

    Each finding has its own (colour, line style) (`curve_style`), the same
    on every plot, so 14 findings stay apart.

    Args:
      curves: {name: (fpr, tpr) or (fpr, tpr, thresholds)}, e.g. from
        `cxr_tf.metrics.classification.roc_curve_points`.
      path: optional PNG path.
      aucs: optional {name: AUROC or None} for the legend.
      title: plot title.

    Returns:
      The PNG as bytes.
    """
    return _finish(roc_figure(curves, aucs, title), path)


def localization_accuracy_figure(acc_by_t, metric="IoBB", title=None):
    """The figure of `plot_localization_accuracy`, not yet rendered."""
    fig = _new_figure(6.0, 4.5)
    axes = fig.add_subplot(1, 1, 1)
    styles = _curve_styles(acc_by_t)
    for finding, values in acc_by_t.items():
        if isinstance(values, dict) and "accuracy" in values:
            values = values["accuracy"]
        points = sorted(
            (float(t), float(a)) for t, a in values.items() if a is not None
        )
        if points:
            ts, accs = zip(*points)
            colour, style = styles[finding]
            axes.plot(
                ts,
                accs,
                color=colour,
                linestyle=style,
                marker="o",
                markersize=3,
                linewidth=1.4,
                label=finding,
            )
    axes.set_xlabel(f"{metric} threshold T")
    axes.set_ylabel("Localization accuracy")
    axes.set_ylim(0, 1.02)
    axes.grid(alpha=0.3)
    axes.set_title(title or f"Localization accuracy ({metric} > T)")
    if axes.lines:
        axes.legend(fontsize=7, handlelength=3)
    fig.tight_layout()
    return fig


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
    return _finish(localization_accuracy_figure(acc_by_t, metric, title), path)
