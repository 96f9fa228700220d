"""Localization maps to bounding boxes: upsample, threshold, one box per region."""

import collections
import functools
import numbers

import numpy as np
from scipy import ndimage

from cxr_tf import choices

Box = collections.namedtuple("Box", ["x", "y", "w", "h", "score"])
Box.__doc__ = """A predicted box in pixels of the original image.

(x, y) is the top-left corner and (w, h) the size, the convention of
BBox_List_2017.csv: the box covers columns x .. x + w - 1 and rows
y .. y + h - 1. `score` is the largest map value inside the region
(a probability for "probability" maps, the normalised CAM / 255 for "cam").
"""



def box_record(finding, box):
    """The JSON record of a box in predictions.jsonl (predict and evaluate).

    Args:
      finding: the finding name.
      box: a `Box`.

    Returns:
      {"finding", "x", "y", "w", "h" (pixels, 2 decimals), "score" (5 decimals)}.
    """
    return {
        "finding": finding,
        "x": round(float(box.x), 2),
        "y": round(float(box.y), 2),
        "w": round(float(box.w), 2),
        "h": round(float(box.h), 2),
        "score": round(float(box.score), 5),
    }


MAP_KINDS = ("probability", "cam")

# PCAM paper: probability maps thresholded at 0.9; Wang et al. 2017: CAMs
# normalised to [0, 255] per image and thresholded at 180 (they also report 60).
DEFAULT_THRESHOLDS = {"probability": 0.9, "cam": 180.0}

# "cam" box scores are the normalised value times this float32 1/255. A
# multiply, not a division: TF's graph optimiser turns division by a constant
# into a multiply, and the graph twin must round exactly like this code.
CAM_SCORE_SCALE = np.float32(1.0 / 255.0)

# 8-connectivity: diagonal neighbours belong to the same region.
_STRUCTURE = np.ones((3, 3), dtype=bool)


def validate_map_kind(map_kind):
    """Returns `map_kind` or raises ValueError naming the bad value."""
    if map_kind not in MAP_KINDS:
        raise ValueError(
            f"`map_kind` must be one of {MAP_KINDS}. Received: map_kind={map_kind!r}"
        )
    return map_kind


def _is_count(value, minimum):
    # numbers.Integral: NumPy ints (from array shapes) count; bools do not.
    return (
        isinstance(value, numbers.Integral)
        and not isinstance(value, bool)
        and value >= minimum
    )


def _check_optional_count(name, value, minimum):
    """Raises ValueError unless `value` is None or an int >= `minimum` (0 or 1)."""
    if value is not None and not _is_count(value, minimum):
        kind = "positive" if minimum == 1 else "non-negative"
        raise ValueError(
            f"`{name}` must be None or a {kind} int. Received: {name}={value!r}"
        )


def _validate_image_hw(image_hw):
    try:
        height, width = image_hw
    except (TypeError, ValueError):
        raise ValueError(
            "`image_hw` must be a pair (height, width) of positive ints. "
            f"Received: image_hw={image_hw!r}"
        ) from None
    for value in (height, width):
        if not _is_count(value, 1):
            raise ValueError(
                "`image_hw` must be a pair (height, width) of positive ints. "
                f"Received: image_hw={image_hw!r}"
            )
    return int(height), int(width)


# The longer side above which predict and the served model find regions on a
# shrunk copy (boxes scaled back); in cxr_tf.choices, where the CLIs' flag
# defaults read it without importing SciPy.
DEFAULT_WORK_SIZE = choices.DEFAULT_BOX_WORK_SIZE


def working_hw(image_hw, work_size=None):
    """The (height, width) at which the map is thresholded and labelled.

    Args:
      image_hw: (height, width) of the original image.
      work_size: None to work at the image size (exact boxes). Otherwise an
        int: images whose longer side exceeds it are processed at a size with
        that longer side (aspect kept, sides rounded to the nearest int) and
        the boxes are scaled back, which bounds memory for large DICOMs.

    Returns:
      (height, width) as ints.

    Raises:
      ValueError: `work_size` is not None or a positive int.
    """
    height, width = image_hw
    _check_optional_count("work_size", work_size, 1)
    if work_size is None:
        return height, width
    longer = max(height, width)
    if longer <= work_size:
        return height, width
    # Integer round-half-up, so the TF graph computes the same size.
    return (
        max(1, (height * work_size + longer // 2) // longer),
        max(1, (width * work_size + longer // 2) // longer),
    )


@functools.lru_cache(maxsize=256)
def _interpolation_weights(in_size, out_size):
    """(lower, upper, fraction) per output index; cached and read-only, as a
    split's films share a few sizes and each map asks twice per axis."""
    # The arithmetic of TF's ResizeBilinear kernel with half_pixel_centers
    # (what tf.image.resize "bilinear" runs), in float32 step by step, so the
    # graph version in localization_graph.py thresholds identical values.
    scale = np.float32(in_size) / np.float32(out_size)
    centres = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale
    centres = centres - np.float32(0.5)
    floor = np.floor(centres)
    lower = np.maximum(floor.astype(np.int64), 0)
    upper = np.minimum(np.ceil(centres).astype(np.int64), in_size - 1)
    weights = (lower, upper, (centres - floor).astype(np.float32))
    for array in weights:
        array.flags.writeable = False
    return weights


def resize_bilinear(score_map, out_hw):
    """Bilinear upsampling equal, bit for bit, to `tf.image.resize` on CPU.

    Half-pixel centres (align_corners=False): output pixel i samples the
    input at (i + 0.5) * in_size / out_size - 0.5, clamped to the border.
    Computed in float32 in the order of TF's CPU kernel:
    top = tl + (tr - tl) * dx, bottom = bl + (br - bl) * dx,
    out = top + (bottom - top) * dy.

    Args:
      score_map: array (h, w).
      out_hw: (height, width) of the output.

    Returns:
      float32 array (height, width).
    """
    out_h, out_w = out_hw
    return _resize_bilinear_window(score_map, out_hw, (0, out_h), (0, out_w))


def _resize_bilinear_window(score_map, out_hw, rows, cols):
    """Rows [r0, r1) and columns [c0, c1) of `resize_bilinear(score_map, out_hw)`.

    Each output pixel is computed from its own weights exactly as in the
    whole image, so a window is bit-identical to that part of the whole.
    """
    score_map = np.asarray(score_map, dtype=np.float32)
    in_h, in_w = score_map.shape
    out_h, out_w = out_hw
    y_lo, y_hi, dy = (a[rows[0] : rows[1]] for a in _interpolation_weights(in_h, out_h))
    x_lo, x_hi, dx = (a[cols[0] : cols[1]] for a in _interpolation_weights(in_w, out_w))
    lines = score_map[:, x_lo] + (score_map[:, x_hi] - score_map[:, x_lo]) * dx
    # Output rows come in runs that share their two input rows (y_lo and
    # y_hi never decrease), so each run is one broadcast of its rows'
    # difference: no (rows, cols) gathers. (hi - lo) * dy + lo is the same
    # float32 arithmetic as lo + (hi - lo) * dy, term for term.
    out = np.empty((len(y_lo), lines.shape[1]), np.float32)
    starts = np.flatnonzero(
        np.r_[True, (y_lo[1:] != y_lo[:-1]) | (y_hi[1:] != y_hi[:-1])]
    )
    ends = np.r_[starts[1:], len(y_lo)]
    for start, end in zip(starts, ends):
        top = lines[y_lo[start]]
        run = out[start:end]
        np.multiply(dy[start:end, None], lines[y_hi[start]] - top, out=run)
        run += top
    return out


def _window_above(score_map, threshold, out_hw):
    """The output rows and columns where `resize_bilinear` can reach `threshold`.

    An upsampled pixel is a convex combination of its (up to) four map
    cells, so it stays below the threshold when all four are below it; the
    margin covers float32 rounding of the interpolation. Returns
    ((r0, r1), (c0, c1)), or None when no cell comes near the threshold.
    """
    margin = np.float32(1e-5) * (abs(np.float32(threshold)) + np.abs(score_map).max())
    near = score_map >= np.float32(threshold) - margin
    if not near.any():
        return None
    spans = []
    for axis, out_size in ((0, out_hw[0]), (1, out_hw[1])):
        hit = np.flatnonzero(near.any(axis=1 - axis))
        lower, upper, _ = _interpolation_weights(score_map.shape[axis], out_size)
        # lower and upper never decrease along the output axis: the pixels
        # touching cells hit[0]..hit[-1] form one contiguous range.
        touches = (upper >= hit[0]) & (lower <= hit[-1])
        index = np.flatnonzero(touches)
        spans.append((int(index[0]), int(index[-1]) + 1))
    return tuple(spans)


def normalize_cam(score_map):
    """Per-image CAM normalisation to [0, 255]: (s - min) / (max - min) * 255.

    Args:
      score_map: array (h, w) of raw class activation scores.

    Returns:
      float32 array (h, w), or None when the map is constant (no region).
    """
    score_map = np.asarray(score_map, dtype=np.float32)
    low = score_map.min()
    high = score_map.max()
    if not high > low:
        return None
    return (score_map - low) / (high - low) * np.float32(255.0)


def extract_boxes(
    score_map, image_hw, map_kind, threshold=None, max_boxes=None, work_size=None
):
    """Boxes around the regions of a localization map above a threshold.

    The map (h, w) covers the whole image. Steps: for "cam" maps, normalise
    the (h, w) map per image to [0, 255] (a constant map has no region);
    upsample it bilinearly to the image size (`resize_bilinear`, equal to
    `tf.image.resize`); keep pixels with value >= threshold; one box per
    8-connected region, the tight box around its pixels; score = the largest
    upsampled value in the region (divided by 255 for "cam"). Boxes are
    sorted by score, highest first; ties keep the raster order of the
    regions' first pixels.

    Args:
      score_map: array (h, w) of finite values: probabilities in [0, 1] for
        map_kind "probability", raw CAM scores for "cam".
      image_hw: (height, width) of the original image, in pixels.
      map_kind: "probability" or "cam".
      threshold: keep values >= threshold (probability scale for
        "probability", the 0..255 scale for "cam"). None: DEFAULT_THRESHOLDS.
      max_boxes: None for all boxes, else keep the first max_boxes.
      work_size: see `working_hw`; None (default) gives exact boxes.

    Returns:
      list of `Box` in pixels of the original image.

    Raises:
      ValueError: a bad map shape, non-finite values, a bad map_kind,
        image_hw, threshold or max_boxes.
    """
    validate_map_kind(map_kind)
    image_hw = _validate_image_hw(image_hw)
    score_map = np.asarray(score_map)
    if score_map.ndim != 2 or min(score_map.shape) < 1:
        raise ValueError(
            "`score_map` must be a non-empty 2-D array (h, w). "
            f"Received: shape={score_map.shape}"
        )
    if not np.all(np.isfinite(score_map)):
        raise ValueError(
            "`score_map` must hold finite values. Received a map with "
            f"{int(np.sum(~np.isfinite(score_map)))} NaN or infinite values."
        )
    if threshold is None:
        threshold = DEFAULT_THRESHOLDS[map_kind]
    if not isinstance(threshold, numbers.Real) or not np.isfinite(threshold):
        raise ValueError(
            f"`threshold` must be a finite number. Received: threshold={threshold!r}"
        )
    _check_optional_count("max_boxes", max_boxes, 0)
    work_hw = working_hw(image_hw, work_size)

    if map_kind == "cam":
        score_map = normalize_cam(score_map)
        if score_map is None:
            return []
    score_map = np.asarray(score_map, dtype=np.float32)
    # Only the window where the upsampled map can reach the threshold is
    # computed: regions lie inside it, and raster order within it is raster
    # order in the whole, so boxes equal those of the whole map.
    window = _window_above(score_map, threshold, work_hw)
    if window is None or max_boxes == 0:
        return []
    (row0, _), (col0, _) = window
    upsampled = _resize_bilinear_window(score_map, work_hw, *window)
    mask = upsampled >= np.float32(threshold)
    labels, count = ndimage.label(mask, structure=_STRUCTURE)
    if count == 0:
        return []
    # scipy numbers regions in raster order of their first pixel; the stable
    # sort below keeps that order among equal scores (as the TF graph does).
    slices = ndimage.find_objects(labels)
    # Per-region max over its bounding slice: much faster than
    # ndimage.maximum, which visits every pixel through a generic path.
    scores = np.array(
        [
            upsampled[region][labels[region] == index + 1].max()
            for index, region in enumerate(slices)
        ],
        dtype=np.float32,
    )
    if map_kind == "cam":
        scores = scores * CAM_SCORE_SCALE
    order = np.argsort(-scores, kind="stable")
    if max_boxes is not None:
        order = order[:max_boxes]

    scale_y = np.float32(image_hw[0]) / np.float32(work_hw[0])
    scale_x = np.float32(image_hw[1]) / np.float32(work_hw[1])
    exact = work_hw == image_hw
    boxes = []
    for index in order:
        rows, cols = slices[index]
        x, y = cols.start + col0, rows.start + row0
        w, h = cols.stop - cols.start, rows.stop - rows.start
        if not exact:
            x, w = float(np.float32(x) * scale_x), float(np.float32(w) * scale_x)
            y, h = float(np.float32(y) * scale_y), float(np.float32(h) * scale_y)
        boxes.append(Box(x, y, w, h, float(scores[index])))
    return boxes


def extract_all_boxes(
    maps, image_hw, map_kind, findings, threshold=None, max_boxes=None, work_size=None
):
    """`extract_boxes` for every class of one image.

    Args:
      maps: array (h, w, K), the model's "localization_maps" for one image.
      image_hw: (height, width) of the original image.
      map_kind: "probability" or "cam".
      findings: K class names, in the order of the maps' last axis.
      threshold, max_boxes, work_size: as in `extract_boxes`.

    Returns:
      dict finding -> list of `Box`.

    Raises:
      ValueError: `maps` is not 3-D or its class count differs from
        len(findings); or any error of `extract_boxes`.
    """
    maps = np.asarray(maps)
    if maps.ndim != 3 or maps.shape[-1] != len(findings):
        raise ValueError(
            f"`maps` must have shape (h, w, {len(findings)}) to match `findings`. "
            f"Received: shape={maps.shape}"
        )
    return {
        name: extract_boxes(
            maps[..., k],
            image_hw,
            map_kind,
            threshold=threshold,
            max_boxes=max_boxes,
            work_size=work_size,
        )
        for k, name in enumerate(findings)
    }


def scale_boxes(boxes, from_hw, to_hw):
    """Rescales (x, y, w, h[, ...]) boxes from one pixel frame to another.

    Args:
      boxes: iterable of Box or (x, y, w, h) tuples in pixels of `from_hw`.
      from_hw: (height, width) of the frame the boxes are in.
      to_hw: (height, width) of the target frame.

    Returns:
      list of the same type (Box keeps its score; tuples become tuples).
    """
    from_h, from_w = _validate_image_hw(from_hw)
    to_h, to_w = _validate_image_hw(to_hw)
    sy, sx = to_h / from_h, to_w / from_w
    out = []
    for box in boxes:
        x, y, w, h = (float(v) for v in box[:4])
        scaled = (x * sx, y * sy, w * sx, h * sy)
        out.append(Box(*scaled, box.score) if isinstance(box, Box) else scaled)
    return out
