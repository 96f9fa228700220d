"""TF-graph twin of `cxr_tf.localization.extract_boxes`, for SavedModel export.

Connected components are found on row runs rather than pixels: each row of
the thresholded, upsampled map splits into runs of foreground pixels; a run
touches a run of the next row when their column ranges overlap or meet at a
corner (8-connectivity). Union-find with min-hooking and pointer jumping on
this run graph (a few thousand nodes for a 1024 x 1024 map) converges in a
handful of `tf.while_loop` steps, where pixel-level label propagation would
need as many steps as the longest path inside a region. The result equals
scipy.ndimage.label with the full 3 x 3 structure.

Plain TF ops only (no tensorflow-addons, no XLA); works with a dynamic batch
and a different original size per image inside a `tf.function` signature.
"""

import numbers

import tensorflow as tf

from cxr_tf import localization


def _validate(map_kind, threshold, max_boxes, work_size):
    localization.validate_map_kind(map_kind)
    if threshold is None:
        threshold = localization.DEFAULT_THRESHOLDS[map_kind]
    if not isinstance(threshold, numbers.Real) or isinstance(threshold, bool):
        raise ValueError(
            f"`threshold` must be a Python number. Received: threshold={threshold!r}"
        )
    if (
        not isinstance(max_boxes, numbers.Integral)
        or isinstance(max_boxes, bool)
        or max_boxes < 1
    ):
        raise ValueError(
            f"`max_boxes` must be a positive int. Received: max_boxes={max_boxes!r}"
        )
    # Same checks and rounding as the numpy version.
    localization.working_hw((1, 1), work_size)
    return (
        float(threshold),
        int(max_boxes),
        work_size if work_size is None else int(work_size),
    )


def _working_hw(height, width, work_size):
    # Same integer rounding as localization.working_hw.
    if work_size is None:
        return height, width
    longer = tf.maximum(height, width)
    size = tf.constant(work_size, tf.int32)
    shrink = longer > size
    work_h = tf.maximum(1, (height * size + longer // 2) // longer)
    work_w = tf.maximum(1, (width * size + longer // 2) // longer)
    return tf.where(shrink, work_h, height), tf.where(shrink, work_w, width)


def _union_find(num_nodes, first, second):
    """Component root (smallest node index) of every node of an edge list."""
    parents = tf.range(num_nodes, dtype=tf.int32)

    def body(parents, _):
        root_a = tf.gather(parents, first)
        root_b = tf.gather(parents, second)
        lower = tf.minimum(root_a, root_b)
        # Hook both ends' parents onto the smaller one. Parents only ever
        # decrease and stay inside the true component, so the loop ends, and
        # it ends only when every edge has both ends on one root.
        hooked = tf.minimum(
            tf.math.unsorted_segment_min(lower, root_a, num_nodes),
            tf.math.unsorted_segment_min(lower, root_b, num_nodes),
        )
        new = tf.minimum(parents, hooked)
        new = tf.gather(new, new)
        new = tf.gather(new, new)
        return new, tf.reduce_any(tf.not_equal(new, parents))

    parents, _ = tf.while_loop(
        lambda parents, changed: changed,
        body,
        (parents, tf.constant(True)),
        parallel_iterations=1,
    )
    # Converged: parents[parents] == parents; one more jump is a no-op.
    return parents


def _boxes_one_image(maps, image_hw, map_kind, threshold, max_boxes, work_size):
    """Boxes for one image: maps (h, w, K) -> (K, N, 4), (K, N), (K,)."""
    num_classes = tf.shape(maps)[-1]
    height, width = image_hw[0], image_hw[1]
    work_h, work_w = _working_hw(height, width, work_size)

    # (K, h, w, 1): resize each class as its own image, as the numpy code does.
    maps = tf.transpose(tf.cast(maps, tf.float32), [2, 0, 1])[..., tf.newaxis]
    if map_kind == "cam":
        low = tf.reduce_min(maps, axis=[1, 2, 3], keepdims=True)
        high = tf.reduce_max(maps, axis=[1, 2, 3], keepdims=True)
        valid = high > low
        span = tf.where(valid, high - low, tf.ones_like(high))
        maps = (maps - low) / span * tf.constant(255.0, tf.float32)
    else:
        valid = tf.ones([num_classes, 1, 1, 1], tf.bool)
    upsampled = tf.image.resize(maps, tf.stack([work_h, work_w]), method="bilinear")
    # One row per (class, image row): rows k * H .. k * H + H - 1 are class k.
    upsampled = tf.reshape(upsampled, [-1, work_w])
    valid_rows = tf.repeat(tf.reshape(valid, [-1]), work_h)[:, tf.newaxis]
    mask = tf.logical_and(upsampled >= tf.constant(threshold, tf.float32), valid_rows)

    pad = tf.zeros_like(mask[:, :1])
    before = tf.concat([pad, mask[:, :-1]], axis=1)
    after = tf.concat([mask[:, 1:], pad], axis=1)
    starts = tf.logical_and(mask, tf.logical_not(before))
    run_start = tf.cast(tf.where(starts), tf.int32)  # (R, 2): row, column
    run_end = tf.cast(tf.where(tf.logical_and(mask, tf.logical_not(after))), tf.int32)
    run_row = run_start[:, 0]
    first_col, last_col = run_start[:, 1], run_end[:, 1]
    num_runs = tf.shape(run_row)[0]

    # Largest value of each run: foreground pixels in raster order, each
    # tagged with the run it belongs to.
    fg_index = tf.where(tf.reshape(mask, [-1]))[:, 0]
    fg_values = tf.gather(tf.reshape(upsampled, [-1]), fg_index)
    fg_starts = tf.gather(tf.reshape(starts, [-1]), fg_index)
    fg_run = tf.cumsum(tf.cast(fg_starts, tf.int32)) - 1
    # Sorted ids (raster order): the sorted segment op is several times faster.
    run_max = tf.math.segment_max(fg_values, fg_run)

    # Runs of row r touching runs of row r + 1 (same class). Runs are sorted
    # by (row, column) and disjoint within a row, so the touched runs form an
    # index range [lo, hi], found by binary search on a (row, column) key.
    stride = tf.cast(work_w, tf.int64) + 2
    row64 = tf.cast(run_row, tf.int64)
    start_key = row64 * stride + tf.cast(first_col, tf.int64) + 1
    end_key = row64 * stride + tf.cast(last_col, tf.int64) + 1
    next_row = (row64 + 1) * stride
    lo = tf.searchsorted(end_key, next_row + tf.cast(first_col, tf.int64), "left")
    hi = (
        tf.searchsorted(start_key, next_row + tf.cast(last_col, tf.int64) + 2, "right")
        - 1
    )
    lo = tf.cast(lo, tf.int32)
    hi = tf.cast(hi, tf.int32)
    not_last_row = tf.not_equal(run_row % work_h, work_h - 1)
    touches = tf.logical_and(not_last_row, lo <= hi)
    # Edges: each run to the first run it touches, and consecutive runs of a
    # touched range to each other (they share a neighbour above).
    link_from = tf.boolean_mask(tf.range(num_runs), touches)
    link_to = tf.boolean_mask(lo, touches)
    marks = tf.math.unsorted_segment_sum(
        tf.ones_like(link_to), link_to, num_runs + 1
    ) - tf.math.unsorted_segment_sum(
        tf.ones_like(link_to), tf.boolean_mask(hi, touches), num_runs + 1
    )
    chained = tf.cumsum(marks)[:num_runs] > 0
    chain_from = tf.boolean_mask(tf.range(num_runs), chained)
    first = tf.concat([link_from, chain_from], axis=0)
    second = tf.concat([link_to, chain_from + 1], axis=0)
    roots = _union_find(num_runs, first, second)

    # Per component (indexed by its root run, the region's first run in
    # raster order, as scipy numbers regions).
    col_min = tf.math.unsorted_segment_min(first_col, roots, num_runs)
    col_max = tf.math.unsorted_segment_max(last_col, roots, num_runs)
    row_min = tf.math.unsorted_segment_min(run_row, roots, num_runs)
    row_max = tf.math.unsorted_segment_max(run_row, roots, num_runs)
    score = tf.math.unsorted_segment_max(run_max, roots, num_runs)
    is_root = tf.equal(roots, tf.range(num_runs))
    comp_row_min = tf.boolean_mask(row_min, is_root)
    comp_class = comp_row_min // work_h
    comp_y = comp_row_min % work_h
    comp_h = tf.boolean_mask(row_max, is_root) - comp_row_min + 1
    comp_x = tf.boolean_mask(col_min, is_root)
    comp_w = tf.boolean_mask(col_max, is_root) - comp_x + 1
    comp_score = tf.boolean_mask(score, is_root)
    if map_kind == "cam":
        # A multiply: Grappler rewrites division by a constant into one, so
        # a division would round differently in eager and graph mode.
        comp_score = comp_score * tf.constant(localization.CAM_SCORE_SCALE, tf.float32)

    # Order: class, then score descending, then raster order (stable sorts).
    order = tf.argsort(-comp_score, stable=True)
    order = tf.gather(order, tf.argsort(tf.gather(comp_class, order), stable=True))
    comp_class = tf.gather(comp_class, order)
    counts = tf.math.bincount(
        comp_class, minlength=num_classes, maxlength=num_classes, dtype=tf.int32
    )
    class_offsets = tf.cumsum(counts, exclusive=True)
    rank = tf.range(tf.size(comp_class)) - tf.gather(class_offsets, comp_class)
    keep = rank < max_boxes
    indices = tf.boolean_mask(tf.stack([comp_class, rank], axis=1), keep)

    scale_y = tf.cast(height, tf.float32) / tf.cast(work_h, tf.float32)
    scale_x = tf.cast(width, tf.float32) / tf.cast(work_w, tf.float32)
    boxes = tf.stack(
        [
            tf.cast(tf.gather(comp_x, order), tf.float32) * scale_x,
            tf.cast(tf.gather(comp_y, order), tf.float32) * scale_y,
            tf.cast(tf.gather(comp_w, order), tf.float32) * scale_x,
            tf.cast(tf.gather(comp_h, order), tf.float32) * scale_y,
        ],
        axis=1,
    )
    out_boxes = tf.scatter_nd(
        indices, tf.boolean_mask(boxes, keep), [num_classes, max_boxes, 4]
    )
    out_scores = tf.scatter_nd(
        indices,
        tf.boolean_mask(tf.gather(comp_score, order), keep),
        [num_classes, max_boxes],
    )
    return out_boxes, out_scores, tf.minimum(counts, max_boxes)


def extract_boxes_graph(
    maps, image_hw, map_kind, threshold=None, max_boxes=16, work_size=None
):
    """Boxes of every class of every image, in TF ops.

    Equal to `cxr_tf.localization.extract_boxes` applied to each (image,
    class) map: same upsampling (tf.image.resize bilinear, half-pixel
    centres), same per-image CAM normalisation, same `>=` threshold, one box
    per 8-connected region, same order and scores. Pixels whose upsampled
    value is NaN count as background (the numpy version rejects such maps).
    An empty batch gives empty outputs.

    Args:
      maps: float tensor (B, h, w, K), the model's "localization_maps".
      image_hw: int tensor (B, 2), (height, width) of each original image.
      map_kind: "probability" or "cam" (Python str).
      threshold: Python number; None for `DEFAULT_THRESHOLDS[map_kind]`.
      max_boxes: Python int N > 0, boxes kept per class.
      work_size: None (exact) or an int bounding the longer side at which
        regions are found; see `cxr_tf.localization.working_hw`.

    Returns:
      boxes: float32 (B, K, N, 4), [x, y, w, h] in pixels of the original
        image, zero padded.
      scores: float32 (B, K, N), zero padded.
      num_boxes: int32 (B, K), valid boxes per class.

    Raises:
      ValueError: a bad map_kind, threshold, max_boxes, work_size or rank.
    """
    threshold, max_boxes, work_size = _validate(
        map_kind, threshold, max_boxes, work_size
    )
    maps = tf.convert_to_tensor(maps, tf.float32)
    image_hw = tf.cast(tf.convert_to_tensor(image_hw), tf.int32)
    if maps.shape.rank is not None and maps.shape.rank != 4:
        raise ValueError(
            "`maps` must have shape (B, h, w, K). " f"Received: shape={maps.shape}"
        )
    if image_hw.shape.rank is not None and image_hw.shape.rank != 2:
        raise ValueError(
            "`image_hw` must have shape (B, 2). " f"Received: shape={image_hw.shape}"
        )
    num_classes = maps.shape[-1]

    def one(args):
        return _boxes_one_image(
            args[0], args[1], map_kind, threshold, max_boxes, work_size
        )

    boxes, scores, num_boxes = tf.map_fn(
        one,
        (maps, image_hw),
        fn_output_signature=(
            tf.TensorSpec([num_classes, max_boxes, 4], tf.float32),
            tf.TensorSpec([num_classes, max_boxes], tf.float32),
            tf.TensorSpec([num_classes], tf.int32),
        ),
        parallel_iterations=1,
    )
    return boxes, scores, num_boxes
