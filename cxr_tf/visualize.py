"""Figures: maps and boxes over the X-ray, ROC curves, accuracy versus IoBB T."""

import dataclasses
import functools
import io
import math
import pathlib
import struct
import zlib

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


# The overlay's layout, in pixels: panels side by side, each a film area
# under its title, one legend band below them all.
PANEL_WIDTH = 288
OVERLAY_HEIGHT = 336
_FILM_SIDE = 240  # the film's square area in each panel
_FILM_LEFT = 12  # its left margin; the colour bar sits right of it
_FILM_TOP = 44  # below the figure title (0-22) and the panel title (24-42)
_LEGEND_TOP = 304  # the legend's band; the panels end above 0.88 of the height
_MAP_ALPHA = 0.4
_LABEL_ALPHA = 0.8
_LINE_WIDTH = 2
_DASH = (6, 4)  # on, off pixels of a dashed outline
# matplotlib's "jet" as its piecewise-linear segments (x, value), so the
# colour map needs no matplotlib: the same colours as the earlier figures.
_JET = {
    "red": ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    "green": (
        (0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)
    ),
    "blue": ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
}


def _jet_table():
    """uint8 (256, 3): the jet colour of each level 0..255."""
    levels = np.linspace(0.0, 1.0, 256)
    channels = [
        np.interp(levels, *zip(*_JET[name])) for name in ("red", "green", "blue")
    ]
    return np.round(np.stack(channels, axis=-1) * 255.0).astype(np.uint8)


_JET_TABLE = _jet_table()
# A map panel's pixel: _BLEND_ROWS[film grey * 256 + map level] =
# round(grey * (1 - alpha) + jet(level) * alpha), one lookup per pixel.
_BLEND_ROWS = np.round(
    np.arange(256, dtype=np.float32)[:, None, None] * np.float32(1.0 - _MAP_ALPHA)
    + _JET_TABLE.astype(np.float32)[None] * np.float32(_MAP_ALPHA)
).astype(np.uint8).reshape(256 * 256, 3)


@functools.lru_cache(maxsize=None)
def _font(size):
    from PIL import ImageFont  # pylint: disable=import-outside-toplevel

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


@functools.lru_cache(maxsize=4096)
def _text_stamp(text, size):
    """(mask, width, height): `text` rendered once as an "L" image, tight.

    Overlays repeat most of their texts (titles, scores, ticks, legend), and
    rendering a text costs more than pasting it.
    """
    from PIL import Image  # pylint: disable=import-outside-toplevel
    from PIL import ImageDraw  # pylint: disable=import-outside-toplevel

    font = _font(size)
    left, top, right, bottom = font.getbbox(text)
    width, height = max(1, right - left), max(1, bottom - top)
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).text((-left, -top), text, fill=255, font=font)
    return mask, width, height


def _stamp(picture, xy, text, size, colour=(0, 0, 0), anchor="la"):
    """Pastes `text` at `xy`: its left-top ("la"), left-middle ("lm") or
    centre ("mm") there."""
    mask, width, height = _text_stamp(str(text), size)
    x, y = xy
    if anchor[0] == "m":
        x -= width / 2
    if anchor[1] == "m":
        y -= height / 2
    x, y = int(round(x)), int(round(y))
    picture.paste(colour, (x, y, x + width, y + height), mask)


@dataclasses.dataclass(frozen=True)
class Panel:
    """Where one panel of an overlay lies, and how film pixels map into it.

    Attributes:
      title: the text above it.
      left, top: the canvas pixel of the film area's top-left corner.
      width, height: the film area's size in canvas pixels.
      scale: canvas pixels per film pixel (the same along x and y).
    """

    title: str
    left: int
    top: int
    width: int
    height: int
    scale: float

    def to_canvas(self, x, y):
        """(row, col) of the canvas pixel showing film point (x, y)."""
        col = self.left + float(x) * self.scale
        row = self.top + float(y) * self.scale
        return int(math.floor(row)), int(math.floor(col))


@dataclasses.dataclass(frozen=True)
class Overlay:
    """A rendered overlay: the RGB canvas and what is drawn where.

    Attributes:
      pixels: uint8 (OVERLAY_HEIGHT, PANEL_WIDTH * panels, 3).
      panels: a `Panel` per panel, the film first.
      legend: the legend's texts, left to right.
      title: the figure title, or None.
    """

    pixels: np.ndarray
    panels: tuple
    legend: tuple
    title: str | None

    def png(self, path=None):
        """The canvas as PNG bytes (also written to `path` when given)."""
        data = png_bytes(self.pixels)
        if path is not None:
            path = pathlib.Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return data


def _png_chunk(kind, data):
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def png_bytes(rgb):
    """A uint8 (H, W, 3) array as an 8-bit RGB PNG, unfiltered, zlib level 1.

    An overlay is mostly flat colour, which compresses well without PNG's
    row filters; skipping them and using zlib's fastest level encodes in
    about two thirds of Pillow's time at its fastest setting, for a file
    about a third larger (~0.3 MB for seven panels).
    """
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    height, width, _ = rgb.shape
    rows = np.zeros((height, 1 + 3 * width), np.uint8)  # filter byte 0: none
    rows[:, 1:] = rgb.reshape(height, 3 * width)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 1)),
            _png_chunk(b"IEND", b""),
        )
    )


def _drawn_film(image, max_side, film_hw):
    """The film as drawn in a panel: uint8 (h, w), stretched to 0..255.

    The film is first reduced by block means to a longer side of at most
    `max_side` (Pillow's `reduce` for uint8 films, `downscale` otherwise),
    then resized bilinearly to the panel's `film_hw`, then stretched from its
    minimum to its maximum, as imshow's autoscale did (a flat film is black).
    """
    from PIL import Image  # pylint: disable=import-outside-toplevel

    image_h, image_w = image.shape
    factor = 1
    if max_side and max(image_h, image_w) > max_side:
        factor = int(math.ceil(max(image_h, image_w) / max_side))
    if image.dtype == np.uint8:
        picture = Image.fromarray(np.ascontiguousarray(image))
        if factor > 1:
            picture = picture.reduce(factor)
        small = np.asarray(
            picture.resize(film_hw[::-1], Image.BILINEAR), np.float32
        )
    else:
        reduced, factor = downscale(np.asarray(image, np.float32), max_side)
        # Without the repeated edge: the rows and columns on the film.
        reduced = reduced[
            : max(1, int(round(image_h / factor))), : max(1, int(round(image_w / factor)))
        ]
        small = np.asarray(
            Image.fromarray(np.ascontiguousarray(reduced), "F").resize(
                film_hw[::-1], Image.BILINEAR
            ),
            np.float32,
        )
    low, high = float(small.min()), float(small.max())
    if not high > low:
        return np.zeros(small.shape, np.uint8)
    scaled = (small - np.float32(low)) * np.float32(255.0 / (high - low))
    return np.clip(scaled + np.float32(0.5), 0, 255).astype(np.uint8)


def _draw_segment(draw, start, end, colour, dashed):
    if not dashed:
        draw.line([start, end], fill=colour, width=_LINE_WIDTH)
        return
    (x0, y0), (x1, y1) = start, end
    length = math.hypot(x1 - x0, y1 - y0)
    on, off = _DASH
    position = 0.0
    while position < length:
        stop = min(position + on, length)
        a, b = position / length, stop / length
        draw.line(
            [(x0 + a * (x1 - x0), y0 + a * (y1 - y0)),
             (x0 + b * (x1 - x0), y0 + b * (y1 - y0))],
            fill=colour,
            width=_LINE_WIDTH,
        )
        position += on + off


def _draw_box(draw, panel, box, colour, dashed=False):
    """The outline of film box (x, y, w, h), clipped to the panel's film area."""
    x, y, w, h = (float(v) for v in tuple(box)[:4])
    left = panel.left + x * panel.scale
    top = panel.top + y * panel.scale
    right = panel.left + (x + w) * panel.scale
    bottom = panel.top + (y + h) * panel.scale
    x_min, y_min = panel.left, panel.top
    x_max, y_max = panel.left + panel.width - 1, panel.top + panel.height - 1
    if right < x_min or left > x_max or bottom < y_min or top > y_max:
        return None
    cl, cr = max(left, x_min), min(right, x_max)
    ct, cb = max(top, y_min), min(bottom, y_max)
    for edge, inside in (
        (((cl, top), (cr, top)), y_min <= top <= y_max),
        (((cl, bottom), (cr, bottom)), y_min <= bottom <= y_max),
        (((left, ct), (left, cb)), x_min <= left <= x_max),
        (((right, ct), (right, cb)), x_min <= right <= x_max),
    ):
        if inside:
            _draw_segment(draw, *edge, colour, dashed)
    return cl, ct


def _draw_label(picture, corner, text, background, colour, size):
    """Text in a box of `background` (alpha 0.8) just above `corner`."""
    from PIL import Image  # pylint: disable=import-outside-toplevel

    x, y = (int(round(v)) for v in corner)
    _, text_w, text_h = _text_stamp(text, size)
    width, height = text_w + 4, text_h + 4
    box = (x, max(0, y - height - 2), x + width, max(height, y - 2))
    region = picture.crop(box)
    solid = Image.new("RGB", region.size, background)
    picture.paste(Image.blend(region, solid, _LABEL_ALPHA), box[:2])
    _stamp(picture, (box[0] + 2, box[1] + 2), text, size, colour)


def render_overlay(
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
    """The PCAM paper's Figure 2 layout for one image (`overlay_figure`: as a PNG).

    Panel 1: the X-ray with the ground-truth boxes (green, the finding's
    name on the first). Then one panel per finding in `maps` (highest
    probability first): its map upsampled to the image and blended over it
    (jet, alpha 0.4), with the predicted boxes (blue, with their scores) and
    the truth boxes of that finding (dashed green). One colour bar beside
    the last panel; a legend under the panels names the two colours. The
    film is drawn from a block-mean copy whose longer side is at most
    `max_side`, so the cost does not grow with the film; boxes are given in
    the film's own pixels. Drawn with NumPy and Pillow: tens of
    milliseconds a film, where a matplotlib figure took seconds.

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
      title: optional figure title (e.g. the image id).
      max_side: longer side of the drawn copy of the film (None: full size).
      frame_hw: (H, W) of the film the boxes are measured in, when `image`
        is a resized copy of it (e.g. an ingested record); None: image.shape.

    Returns:
      An `Overlay` (the canvas and each panel's geometry).

    Raises:
      ValueError: a bad image shape or map_kind.
    """
    from PIL import Image  # pylint: disable=import-outside-toplevel
    from PIL import ImageColor  # pylint: disable=import-outside-toplevel
    from PIL import ImageDraw  # pylint: disable=import-outside-toplevel

    localization.validate_map_kind(map_kind)
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim != 2 or min(image.shape) < 1:
        raise ValueError(f"`image` must be 2-D (H, W). Received: shape={image.shape}")
    height, width = frame_hw if frame_hw is not None else image.shape
    height, width = float(height), float(width)
    order = sorted(maps, key=lambda f: -float(probabilities.get(f, 0.0)))
    count = 1 + len(order)
    scale = _FILM_SIDE / max(height, width)
    film_w = max(1, int(round(width * scale)))
    film_h = max(1, int(round(height * scale)))
    grey = _drawn_film(image, max_side, (film_h, film_w))
    film_rgb = np.repeat(grey[..., np.newaxis], 3, axis=-1)
    grey_index = grey.astype(np.intp) << 8  # row of _BLEND_ROWS, less the level
    canvas = np.full((OVERLAY_HEIGHT, PANEL_WIDTH * count, 3), 255, np.uint8)
    known = gt_boxes is not None
    gt_boxes = gt_boxes or {}
    truth_count = sum(len(b) for b in gt_boxes.values())
    if not known:
        titles = ["Image (truth boxes not given)"]
    else:
        titles = [f"Image, {truth_count} truth box{'es' if truth_count != 1 else ''}"]
    panels = []
    for index in range(count):
        left = index * PANEL_WIDTH + _FILM_LEFT
        top = _FILM_TOP + (_FILM_SIDE - film_h) // 2
        if index == 0:
            canvas[top : top + film_h, left : left + film_w] = film_rgb
        else:
            finding = order[index - 1]
            score_map = np.asarray(maps[finding], dtype=np.float32)
            if map_kind == "cam":
                normalised = localization.normalize_cam(score_map)
                score_map = (
                    np.zeros_like(score_map) if normalised is None
                    else normalised / np.float32(255.0)
                )
            upsampled = localization.resize_bilinear(score_map, (film_h, film_w))
            level = np.clip(upsampled * np.float32(255.0) + np.float32(0.5), 0, 255)
            lookup = grey_index | level.astype(np.intp)
            canvas[top : top + film_h, left : left + film_w] = np.take(
                _BLEND_ROWS, lookup, axis=0
            )
            probability = probabilities.get(finding)
            titles.append(
                finding if probability is None else f"{finding}  p={probability:.2f}"
            )
        panels.append(Panel(titles[-1], left, top, film_w, film_h, film_w / width))

    if order:
        _paint_colour_bar(canvas, panels[-1])
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    labels = []  # drawn last, over the outlines
    title_size, small_size = 11, 9  # text sizes
    truth_rgb = ImageColor.getrgb(_TRUTH_COLOR)
    pred_rgb = ImageColor.getrgb(_PRED_COLOR)
    for finding, truth in gt_boxes.items():
        for number, box in enumerate(truth):
            corner = _draw_box(draw, panels[0], box, truth_rgb)
            if number == 0 and corner is not None:
                labels.append((corner, finding, truth_rgb, (0, 0, 0)))
    for panel, finding in zip(panels[1:], order):
        for box in gt_boxes.get(finding, []):
            _draw_box(draw, panel, box, truth_rgb, dashed=True)
        for box in boxes.get(finding, []):
            corner = _draw_box(draw, panel, box, pred_rgb)
            if corner is not None and isinstance(box, localization.Box):
                labels.append((corner, f"{box.score:.2f}", pred_rgb, (255, 255, 255)))
    for index, panel in enumerate(panels):
        centre = index * PANEL_WIDTH + PANEL_WIDTH / 2
        _stamp(picture, (centre, 33), panel.title, title_size, anchor="mm")
    if order:
        _draw_colour_bar(picture, draw, panels[-1], map_kind, small_size)
    legend = (
        "truth box" if known else "truth box (not given)",
        "predicted box (score)",
    )
    _draw_legend(picture, draw, legend, (truth_rgb, pred_rgb), small_size)
    if title:
        _stamp(picture, (picture.size[0] / 2, 11), title, title_size, anchor="mm")
    for corner, text, background, colour in labels:
        _draw_label(picture, corner, text, background, colour, small_size)
    return Overlay(np.asarray(picture), tuple(panels), legend, title)


def _colour_bar_box(panel):
    left = panel.left + _FILM_SIDE + 6
    return left, _FILM_TOP, left + 7, _FILM_TOP + _FILM_SIDE - 1


def _paint_colour_bar(canvas, panel):
    """The jet gradient of the colour bar, 1 at the top, into the canvas."""
    left, top, right, bottom = _colour_bar_box(panel)
    levels = np.round(np.linspace(255.0, 0.0, bottom - top + 1)).astype(np.uint8)
    canvas[top : bottom + 1, left : right + 1] = _JET_TABLE[levels][:, np.newaxis]


def _draw_colour_bar(picture, draw, panel, map_kind, size):
    """The colour bar's frame, three ticks and its name."""
    left, top, _, bottom = _colour_bar_box(panel)
    draw.rectangle((left, top, left + 7, bottom), outline=(0, 0, 0))
    ticks = ("0", "128", "255") if map_kind == "cam" else ("0", "0.5", "1")
    for text, row in zip(ticks, (bottom, (top + bottom) / 2, top)):
        _stamp(picture, (left + 10, row), text, size, anchor="lm")
    name = "CAM (0-255)" if map_kind == "cam" else "probability"
    _stamp(picture, (left + 4, bottom + 12), name, size, anchor="mm")


def _draw_legend(picture, draw, texts, colours, size):
    """The legend under the panels: a line sample and its text per entry."""
    sample, gap = 24, 18
    widths = [_text_stamp(t, size)[1] for t in texts]
    total = sum(sample + 6 + w for w in widths) + gap * (len(texts) - 1)
    x = (picture.size[0] - total) / 2
    row = _LEGEND_TOP + 16
    for text, width, colour in zip(texts, widths, colours):
        draw.line([(x, row), (x + sample, row)], fill=colour, width=_LINE_WIDTH)
        _stamp(picture, (x + sample + 6, row), text, size, anchor="lm")
        x += sample + 6 + width + gap


def overlay_figure(image, maps, boxes, probabilities, *, path=None, **options):
    """The `render_overlay` figure of one image as a PNG.

    Args:
      image, maps, boxes, probabilities: as in `render_overlay`.
      path: optional file to write the PNG to.
      **options: the keyword arguments of `render_overlay` (gt_boxes,
        map_kind, title, max_side, frame_hw).

    Returns:
      The PNG as bytes.

    Raises:
      ValueError: a bad image shape or map_kind.
    """
    return render_overlay(image, maps, boxes, probabilities, **options).png(path)


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
    # Fixed margins (what tight_layout gives this size): tight_layout draws
    # the figure once more, a third of a plot's cost.
    fig.subplots_adjust(left=0.11, right=0.96, bottom=0.11, top=0.93)
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
        # A fixed corner: "best" tests every line point, and accuracy falls
        # with T, so the upper right is where the lines are lowest.
        axes.legend(fontsize=7, loc="upper right", handlelength=3)
    fig.subplots_adjust(left=0.11, right=0.97, bottom=0.13, top=0.92)
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
