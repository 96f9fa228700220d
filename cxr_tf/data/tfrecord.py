"""tf.train.Example records of one chest film: write (make_example), parse, read."""

import math

import numpy as np
import tensorflow as tf

from cxr_tf.data import schema

# Scalars are FixedLen with defaults so records written by older or foreign
# writers (without age, sex, view) still parse; boxes are VarLen because an
# image carries 0..n of them.
FEATURE_SPEC = {
    schema.KEY_IMAGE: tf.io.FixedLenFeature([], tf.string),
    schema.KEY_HEIGHT: tf.io.FixedLenFeature([], tf.int64),
    schema.KEY_WIDTH: tf.io.FixedLenFeature([], tf.int64),
    schema.KEY_FORMAT: tf.io.FixedLenFeature([], tf.string, default_value="png"),
    schema.KEY_IMAGE_ID: tf.io.FixedLenFeature([], tf.string),
    schema.KEY_ORIGINAL_HEIGHT: tf.io.FixedLenFeature([], tf.int64, default_value=0),
    schema.KEY_ORIGINAL_WIDTH: tf.io.FixedLenFeature([], tf.int64, default_value=0),
    schema.KEY_PATIENT_ID: tf.io.FixedLenFeature([], tf.string, default_value=""),
    schema.KEY_LABELS: tf.io.FixedLenFeature([schema.NUM_FINDINGS], tf.int64),
    schema.KEY_BBOX_XMIN: tf.io.VarLenFeature(tf.float32),
    schema.KEY_BBOX_YMIN: tf.io.VarLenFeature(tf.float32),
    schema.KEY_BBOX_XMAX: tf.io.VarLenFeature(tf.float32),
    schema.KEY_BBOX_YMAX: tf.io.VarLenFeature(tf.float32),
    schema.KEY_BBOX_LABEL: tf.io.VarLenFeature(tf.int64),
    schema.KEY_VIEW_POSITION: tf.io.FixedLenFeature([], tf.string, default_value=""),
    schema.KEY_PATIENT_AGE: tf.io.FixedLenFeature(
        [], tf.float32, default_value=float("nan")
    ),
    schema.KEY_PATIENT_SEX: tf.io.FixedLenFeature([], tf.string, default_value=""),
}


def _bytes(values):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))


def _ints(values):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=values))


def _floats(values):
    return tf.train.Feature(float_list=tf.train.FloatList(value=values))


def _text(value):
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def make_example(
    image,
    image_id,
    labels,
    height,
    width,
    patient_id="",
    original_height=None,
    original_width=None,
    boxes=None,
    box_labels=None,
    view_position="",
    age=None,
    sex="",
    image_format="png",
):
    """Builds the `tf.train.Example` of one film.

    Args:
      image: the encoded image (bytes), normally an 8-bit grayscale PNG.
      image_id: file name in Data_Entry, e.g. "00000001_000.png".
      labels: 14 ints in {0, 1} in the order of `schema.FINDINGS`.
      height: height in pixels of the encoded image.
      width: width in pixels of the encoded image.
      patient_id: the patient identifier (str).
      original_height: height of the source file; defaults to `height`.
      original_width: width of the source file; defaults to `width`.
      boxes: (N, 4) array-like of [xmin, ymin, xmax, ymax], normalised to [0, 1]
        of the image; None or empty for none.
      box_labels: N ints, index of each box's finding in `schema.FINDINGS`.
      view_position: "PA", "AP", ... or "".
      age: age in years; None or NaN when unknown.
      sex: "M", "F" or "".
      image_format: format of `image` ("png").

    Returns:
      A `tf.train.Example`.

    Raises:
      ValueError: wrong number of labels, a label outside {0, 1}, a box that is
        not [xmin, ymin, xmax, ymax] inside [0, 1], box labels not matching the
        boxes or outside `schema.FINDINGS`, or a non-positive size.
    """
    labels = np.asarray(labels).reshape(-1)
    if labels.shape[0] != schema.NUM_FINDINGS or not np.isin(labels, (0, 1)).all():
        raise ValueError(
            f"`labels` must be {schema.NUM_FINDINGS} values in {{0, 1}} for "
            f"{image_id!r}. Received: labels={labels.tolist()}"
        )
    for name, value in (("height", height), ("width", width)):
        if int(value) <= 0:
            raise ValueError(
                f"`{name}` must be positive for {image_id!r}. "
                f"Received: {name}={value}"
            )
    boxes = np.zeros((0, 4), np.float32) if boxes is None else np.asarray(boxes)
    boxes = boxes.astype(np.float32).reshape(-1, 4)
    box_labels = np.asarray([] if box_labels is None else box_labels, np.int64)
    box_labels = box_labels.reshape(-1)
    if box_labels.shape[0] != boxes.shape[0]:
        raise ValueError(
            f"`box_labels` must have one entry per box for {image_id!r}. "
            f"Received: {boxes.shape[0]} boxes, box_labels={box_labels.tolist()}"
        )
    if len(box_labels) and (
        box_labels.min() < 0 or box_labels.max() >= schema.NUM_FINDINGS
    ):
        raise ValueError(
            f"`box_labels` must index `schema.FINDINGS` for {image_id!r}. "
            f"Received: box_labels={box_labels.tolist()}"
        )
    bad = (
        ~np.isfinite(boxes).all(axis=1)
        | (boxes.min(axis=1, initial=0.0) < 0.0)
        | (boxes.max(axis=1, initial=0.0) > 1.0)
        | (boxes[:, 2] < boxes[:, 0])
        | (boxes[:, 3] < boxes[:, 1])
    )
    if bad.any():
        raise ValueError(
            f"`boxes` must be [xmin, ymin, xmax, ymax] normalised to [0, 1] for "
            f"{image_id!r}. Received: {boxes[bad].tolist()}"
        )
    age = float("nan") if age is None else float(age)
    feature = {
        schema.KEY_IMAGE: _bytes([bytes(image)]),
        schema.KEY_HEIGHT: _ints([int(height)]),
        schema.KEY_WIDTH: _ints([int(width)]),
        schema.KEY_FORMAT: _bytes([_text(image_format)]),
        schema.KEY_IMAGE_ID: _bytes([_text(image_id)]),
        schema.KEY_ORIGINAL_HEIGHT: _ints(
            [int(height if original_height is None else original_height)]
        ),
        schema.KEY_ORIGINAL_WIDTH: _ints(
            [int(width if original_width is None else original_width)]
        ),
        schema.KEY_PATIENT_ID: _bytes([_text(patient_id)]),
        schema.KEY_LABELS: _ints(labels.astype(np.int64).tolist()),
        schema.KEY_BBOX_XMIN: _floats(boxes[:, 0].tolist()),
        schema.KEY_BBOX_YMIN: _floats(boxes[:, 1].tolist()),
        schema.KEY_BBOX_XMAX: _floats(boxes[:, 2].tolist()),
        schema.KEY_BBOX_YMAX: _floats(boxes[:, 3].tolist()),
        schema.KEY_BBOX_LABEL: _ints(box_labels.tolist()),
        schema.KEY_VIEW_POSITION: _bytes([_text(view_position or "")]),
        schema.KEY_PATIENT_AGE: _floats([age]),
        schema.KEY_PATIENT_SEX: _bytes([_text(sex or "")]),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature))


def parse_example(serialized):
    """Parses one serialized record (a graph op, usable in `tf.data` maps).

    Args:
      serialized: scalar `tf.string` tensor, one serialized `tf.train.Example`.

    Returns:
      A dict of tensors: "image" (encoded bytes, scalar string), "format",
      "image_id", "patient_id", "view_position", "sex" (scalar strings),
      "height", "width", "original_height", "original_width" (scalar int32),
      "labels" (14,) float32, "boxes" (N, 4) float32 as [ymin, xmin, ymax, xmax]
      normalised to the stored image (the `tf.image` order), "box_labels" (N,)
      int32, "age" float32 (NaN when unknown).
    """
    parsed = tf.io.parse_single_example(serialized, FEATURE_SPEC)
    coords = [
        tf.sparse.to_dense(parsed[key])
        for key in (
            schema.KEY_BBOX_YMIN,
            schema.KEY_BBOX_XMIN,
            schema.KEY_BBOX_YMAX,
            schema.KEY_BBOX_XMAX,
        )
    ]
    return {
        "image": parsed[schema.KEY_IMAGE],
        "format": parsed[schema.KEY_FORMAT],
        "image_id": parsed[schema.KEY_IMAGE_ID],
        "patient_id": parsed[schema.KEY_PATIENT_ID],
        "view_position": parsed[schema.KEY_VIEW_POSITION],
        "sex": parsed[schema.KEY_PATIENT_SEX],
        "age": parsed[schema.KEY_PATIENT_AGE],
        "height": tf.cast(parsed[schema.KEY_HEIGHT], tf.int32),
        "width": tf.cast(parsed[schema.KEY_WIDTH], tf.int32),
        "original_height": tf.cast(parsed[schema.KEY_ORIGINAL_HEIGHT], tf.int32),
        "original_width": tf.cast(parsed[schema.KEY_ORIGINAL_WIDTH], tf.int32),
        "labels": tf.cast(parsed[schema.KEY_LABELS], tf.float32),
        "boxes": tf.stack(coords, axis=-1),
        "box_labels": tf.cast(
            tf.sparse.to_dense(parsed[schema.KEY_BBOX_LABEL]), tf.int32
        ),
    }


def record_files(data_dir, split):
    """Lists the record files of one split, sorted.

    Args:
      data_dir: folder holding `{split}-NNNNN-of-MMMMM.tfrecord.gz` files.
      split: one of `schema.SPLITS`.

    Returns:
      Sorted list of paths.

    Raises:
      ValueError: `split` is not one of `schema.SPLITS`.
      FileNotFoundError: no file matches.
    """
    if split not in schema.SPLITS:
        raise ValueError(
            f"`split` must be one of {schema.SPLITS}. Received: split={split!r}"
        )
    pattern = tf.io.gfile.join(
        str(data_dir), schema.TFRECORD_PATTERN.format(split=split)
    )
    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        raise FileNotFoundError(
            f"No TFRecord files match {pattern!r}. Run `python -m pipeline.ingest "
            f"--output_dir={data_dir}` first, or check `data_dir`."
        )
    return files


def read_examples(data_dir, split):
    """Yields the parsed records of one split as NumPy dicts (eager; for tools).

    Args:
      data_dir: folder of ingested records.
      split: one of `schema.SPLITS`.

    Yields:
      The dict of `parse_example` with NumPy values; strings decoded to str and
      "pixels" added: the decoded image, uint8 (H, W).
    """
    dataset = tf.data.TFRecordDataset(
        record_files(data_dir, split), compression_type="GZIP"
    ).map(parse_example)
    for features in dataset.as_numpy_iterator():
        out = {
            key: value.decode("utf-8") if isinstance(value, bytes) else value
            for key, value in features.items()
            if key != "image"
        }
        out["pixels"] = tf.io.decode_image(features["image"], channels=1).numpy()[
            ..., 0
        ]
        out["image_bytes"] = features["image"]
        if math.isnan(out["age"]):
            out["age"] = None
        yield out
