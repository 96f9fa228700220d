"""tf.data input pipeline: ingested TFRecords -> normalised, augmented batches."""

import contextlib
import dataclasses
import math
import re

import tensorflow as tf

from cxr_tf import config_dict
from cxr_tf.data import preprocess
from cxr_tf.data import schema
from cxr_tf.data import tfrecord

_AUTOTUNE = tf.data.AUTOTUNE
_IMAGE_LABEL_SPEC = {
    key: tfrecord.FEATURE_SPEC[key] for key in (schema.KEY_IMAGE, schema.KEY_LABELS)
}


@dataclasses.dataclass(frozen=True)
class InputConfig:
    """How records become batches.

    Attributes:
      image_size: side S of the square network input; non-square images are
        letterboxed (aspect kept, zero padding, centred).
      batch_size: global batch size; each input pipeline gets
        `input_context.get_per_replica_batch_size(batch_size)`.
      normalization: `schema.Normalization`, applied as (x - mean) / std to
        pixels on the 0..255 scale.
      augment: random affine and intensity jitter when training.
      flip: random left-right flips when augmenting. Off by default: the side
        of the heart and of a finding matters in a chest film.
      shuffle_buffer: records held for shuffling when training.
      seed: seed of the file order, the record shuffle and the augmentation.
      max_boxes: boxes kept per image in the `with_info` features.
      rotation_degrees: rotation drawn from U(-r, r) degrees.
      scale_range: zoom drawn from U(1 - s, 1 + s).
      translation: shift drawn from U(-t, t) times the image side, per axis.
      brightness: added offset drawn from U(-b, b) times 255.
      contrast: factor around the image mean drawn from U(1 - c, 1 + c).
      cycle_length: files read at once; None picks min(number of files, 8).
      read_buffer_bytes: read buffer of each TFRecord reader.
      private_threadpool_size: threads of a private tf.data pool; 0 uses the
        shared pool.
    """

    image_size: int = 512
    batch_size: int = 16
    normalization: schema.Normalization = schema.FIXED
    augment: bool = False
    flip: bool = False
    shuffle_buffer: int = 1024
    seed: int = 0
    max_boxes: int = 16
    rotation_degrees: float = 7.0
    scale_range: float = 0.1
    translation: float = 0.05
    brightness: float = 0.1
    contrast: float = 0.1
    cycle_length: int | None = None
    read_buffer_bytes: int = 8 << 20
    private_threadpool_size: int = 0

    def __post_init__(self):
        for name in ("image_size", "batch_size", "max_boxes", "read_buffer_bytes"):
            config_dict.check_int(name, getattr(self, name))
        for name in ("shuffle_buffer", "private_threadpool_size"):
            config_dict.check_int(name, getattr(self, name), 0)
        config_dict.check_int("cycle_length", self.cycle_length, optional=True)
        if not isinstance(self.normalization, schema.Normalization) or not (
            self.normalization.std > 0
        ):
            raise ValueError(
                "`normalization` must be a schema.Normalization with std > 0. "
                f"Received: normalization={self.normalization!r}"
            )
        limits = {
            "rotation_degrees": 90.0,
            "scale_range": 0.9,
            "translation": 0.5,
            "brightness": 1.0,
            "contrast": 0.9,
        }
        for name, upper in limits.items():
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value <= upper):
                raise ValueError(
                    f"`{name}` must be a number in [0, {upper}]. "
                    f"Received: {name}={value!r}"
                )


def _pad_boxes(boxes, box_labels, max_boxes):
    count = tf.minimum(tf.shape(boxes)[0], max_boxes)
    boxes = boxes[:count]
    box_labels = box_labels[:count]
    padding = max_boxes - count
    boxes = tf.pad(boxes, [[0, padding], [0, 0]])
    box_labels = tf.pad(box_labels, [[0, padding]], constant_values=-1)
    return (
        tf.ensure_shape(boxes, [max_boxes, 4]),
        tf.ensure_shape(box_labels, [max_boxes]),
        count,
    )


def decode_record(serialized, config, with_info=False):
    """Parses and decodes one record to a letterboxed (S, S, 1) uint8 image.

    Args:
      serialized: scalar string tensor, one serialized `tf.train.Example`.
      config: `InputConfig`.
      with_info: also return boxes, ids and sizes.

    Returns:
      A dict: "image" uint8 (S, S, 1), "labels" float32 (14,); with_info adds
      "image_id", "boxes" (max_boxes, 4) [ymin, xmin, ymax, xmax] normalised to
      the SxS input, "box_labels" (max_boxes,) int32 (-1 pads), "num_boxes",
      "original_height", "original_width" int32.
    """
    if with_info:
        parsed = tfrecord.parse_example(serialized)
    else:
        # Only what training reads: parsing the box lists costs time too.
        parsed = tf.io.parse_single_example(serialized, _IMAGE_LABEL_SPEC)
        parsed = {
            "image": parsed[schema.KEY_IMAGE],
            "labels": tf.cast(parsed[schema.KEY_LABELS], tf.float32),
        }
    image = tf.io.decode_png(parsed["image"], channels=1)
    boxes = parsed["boxes"] if with_info else None
    image, boxes = preprocess.letterbox(image, boxes, config.image_size)
    out = {"image": image, "labels": parsed["labels"]}
    if with_info:
        boxes, box_labels, count = _pad_boxes(
            boxes, parsed["box_labels"], config.max_boxes
        )
        out.update(
            image_id=parsed["image_id"],
            boxes=boxes,
            box_labels=box_labels,
            num_boxes=count,
            original_height=parsed["original_height"],
            original_width=parsed["original_width"],
        )
    return out


@tf.function(jit_compile=True)
def _warp_and_jitter(images, transforms, gain, scale_mean, offset, low, high):
    """Bilinear affine warp (zero fill) + per-image multiply-add + clip, one XLA kernel.

    Same sampling as `ImageProjectiveTransformV3` with BILINEAR/CONSTANT: output
    pixel (x, y) (index coordinates) reads the input at (a0 x + a1 y + a2,
    b0 x + b1 y + b2); each of the four neighbours outside the image counts
    as 0. XLA fuses the coordinates, the four gathers, the blend, the image
    mean and the jitter into a few loops; the raw op evaluates its Eigen
    generator per pixel at ~15 ns.

    Args:
      images: (B, H, W, 1) uint8 or float on 0..255.
      transforms: (B, 6) float32 [a0, a1, a2, b0, b1, b2], output -> input.
      gain, scale_mean, offset: (B,) float32; result = clip(warped * gain +
        mean(images) * scale_mean + offset, low, high).
      low, high: scalar float32 clip bounds.

    Returns:
      (B, H, W, 1) float32.
    """
    shape = tf.shape(images)
    batch, height, width = shape[0], shape[1], shape[2]
    flat = tf.reshape(images, [-1])
    # The contrast pivot is the mean of the unwarped image: a reduction over
    # the warped output would make XLA materialise it (or compute the warp
    # twice), ~20 % of the kernel at 512 px.
    mean = tf.reduce_mean(tf.cast(images, tf.float32), axis=[1, 2], keepdims=True)[
        ..., 0
    ]
    xs = tf.cast(tf.range(width), tf.float32)[None, None, :]
    ys = tf.cast(tf.range(height), tf.float32)[None, :, None]
    t = transforms[:, :, None, None]
    x = t[:, 0] * xs + t[:, 1] * ys + t[:, 2]
    y = t[:, 3] * xs + t[:, 4] * ys + t[:, 5]
    x0 = tf.floor(x)
    y0 = tf.floor(y)
    fx = x - x0
    fy = y - y0
    x0 = tf.cast(x0, tf.int32)
    y0 = tf.cast(y0, tf.int32)
    rows = (tf.range(batch) * height)[:, None, None]

    def tap(yy, xx):
        inside = (xx >= 0) & (xx < width) & (yy >= 0) & (yy < height)
        index = (rows + tf.clip_by_value(yy, 0, height - 1)) * width + tf.clip_by_value(
            xx, 0, width - 1
        )
        return tf.where(inside, tf.cast(tf.gather(flat, index), tf.float32), 0.0)

    v00 = tap(y0, x0)
    v01 = tap(y0, x0 + 1)
    v10 = tap(y0 + 1, x0)
    v11 = tap(y0 + 1, x0 + 1)
    top = v00 + fx * (v01 - v00)
    bottom = v10 + fx * (v11 - v10)
    warped = top + fy * (bottom - top)
    out = warped * gain[:, None, None] + (
        mean * scale_mean[:, None, None] + offset[:, None, None]
    )
    return tf.clip_by_value(out, low, high)[..., None]


def augment_batch(features, seed, config, normalize=False):
    """Random affine + intensity jitter of a batch; boxes follow the geometry.

    The affine map (rotation, zoom, shift, optional flip about the centre) is
    applied by `_warp_and_jitter`, one XLA kernel sampling as
    `tf.raw_ops.ImageProjectiveTransformV3` does (bilinear, zero fill) with the
    intensity jitter fused in; the contrast pivots on the mean of the
    unwarped image. Each valid box's corners go through the same map and the
    box becomes the enclosing box of the moved corners, clipped to [0, 1].

    Args:
      features: dict with "image" (B, S, S, 1) uint8 or float on 0..255, and
        optionally "boxes" (B, N, 4) [ymin, xmin, ymax, xmax] normalised and
        "num_boxes" (B,).
      seed: int tensor of shape (2,), the stateless seed of this batch.
      config: `InputConfig` (ranges of the random parameters).
      normalize: also apply `config.normalization` (folded into the same
        multiply-add as the intensity jitter: fewer passes over the batch).

    Returns:
      The dict with "image" float32 (clipped to [0, 255], or normalised from
      the clipped values when `normalize`) and "boxes" transformed.
    """
    images = features["image"]
    shape = tf.shape(images)
    batch, size = shape[0], tf.cast(shape[1], tf.float32)
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=7)

    def uniform(index, spread):
        return tf.random.stateless_uniform(
            [batch], seed=seeds[index], minval=-spread, maxval=spread
        )

    angle = uniform(0, config.rotation_degrees * math.pi / 180.0)
    scale = 1.0 + uniform(1, config.scale_range)
    shift_x = uniform(2, config.translation) * size
    shift_y = uniform(3, config.translation) * size
    if config.flip:
        flip = tf.where(
            tf.random.stateless_uniform([batch], seed=seeds[4]) < 0.5, -1.0, 1.0
        )
    else:
        flip = tf.ones([batch])
    cos, sin = tf.cos(angle), tf.sin(angle)

    # Forward map, continuous coordinates: p' = A (p - c) + c + t, with
    # A = scale * R(angle) * diag(flip, 1). The warp wants the inverse, from
    # output pixel to input pixel; pixel centres sit at index + 0.5, so in
    # index coordinates the centre is (S - 1) / 2.
    centre = (size - 1.0) / 2.0
    a0, a1 = flip * cos / scale, flip * sin / scale
    b0, b1 = -sin / scale, cos / scale
    a2 = centre - a0 * (centre + shift_x) - a1 * (centre + shift_y)
    b2 = centre - b0 * (centre + shift_x) - b1 * (centre + shift_y)
    transforms = tf.stack([a0, a1, a2, b0, b1, b2], axis=1)
    brightness = uniform(5, config.brightness * 255.0)
    contrast = 1.0 + uniform(6, config.contrast)
    # (x - m) * c + m + b as one multiply-add per pixel, then one clip; with
    # `normalize` the (x - mean) / std is folded in as well.
    gain = contrast
    offset = brightness
    low, high = 0.0, 255.0
    if normalize:
        norm = config.normalization
        gain = gain / norm.std
        offset = (offset - norm.mean) / norm.std
        low, high = -norm.mean / norm.std, (255.0 - norm.mean) / norm.std
        scale_mean = (1.0 - contrast) / norm.std
    else:
        scale_mean = 1.0 - contrast
    images = _warp_and_jitter(
        images,
        transforms,
        gain,
        scale_mean,
        offset,
        tf.constant(low, tf.float32),
        tf.constant(high, tf.float32),
    )
    out = dict(features, image=images)

    if "boxes" in features:
        boxes = features["boxes"]
        half = size / 2.0
        ymin, xmin, ymax, xmax = tf.unstack(boxes * size, axis=-1)
        xs = tf.stack([xmin, xmax, xmin, xmax], axis=-1) - half  # (B, N, 4)
        ys = tf.stack([ymin, ymin, ymax, ymax], axis=-1) - half
        sc = scale[:, None, None]
        fc = (flip * cos)[:, None, None]
        fs = (flip * sin)[:, None, None]
        c, s = cos[:, None, None], sin[:, None, None]
        new_x = sc * (fc * xs - s * ys) + half + shift_x[:, None, None]
        new_y = sc * (fs * xs + c * ys) + half + shift_y[:, None, None]
        moved = tf.stack(
            [
                tf.reduce_min(new_y, -1),
                tf.reduce_min(new_x, -1),
                tf.reduce_max(new_y, -1),
                tf.reduce_max(new_x, -1),
            ],
            axis=-1,
        )
        moved = tf.clip_by_value(moved / size, 0.0, 1.0)
        valid = tf.sequence_mask(features["num_boxes"], tf.shape(boxes)[1])
        out["boxes"] = tf.where(valid[..., None], moved, boxes)
    return out


def _num_pipelines(input_context):
    if input_context is None:
        return 1, 0
    return input_context.num_input_pipelines, input_context.input_pipeline_id


def _has_boxes(serialized):
    """Whether a record holds a box; parses the box labels only."""
    parsed = tf.io.parse_single_example(
        serialized, {schema.KEY_BBOX_LABEL: tfrecord.FEATURE_SPEC[schema.KEY_BBOX_LABEL]}
    )
    return tf.size(parsed[schema.KEY_BBOX_LABEL].values) > 0


def build_dataset(
    data_dir, split, config, training, input_context=None, with_info=False,
    boxed_only=False,
):
    """Builds the `tf.data.Dataset` of one split.

    Files are read interleaved in parallel. Training shuffles files (by
    `config.seed`) and records, repeats, augments when `config.augment`, drops
    the last partial batch and gives up determinism for speed; evaluation
    reads each record once in file order.

    Args:
      data_dir: folder of `{split}-NNNNN-of-MMMMM.tfrecord.gz` files.
      split: one of `schema.SPLITS`.
      config: `InputConfig`.
      training: training (shuffle, repeat, augment) or evaluation order.
      input_context: optional `tf.distribute.InputContext`: each input pipeline
        reads its own files (or, with fewer files than pipelines, its own
        records) and batches `get_per_replica_batch_size(config.batch_size)`.
      with_info: yield `(features, labels)` with the box and id features.
      boxed_only: keep only the records with a ground-truth box; the others
        are dropped before their image is decoded.

    Returns:
      A dataset of `(image (B, S, S, 1) float32 normalised, labels (B, 14)
      float32)`, or with `with_info` `(features, labels)` where features has
      "image", "image_id", "boxes" (B, max_boxes, 4) [ymin, xmin, ymax, xmax]
      normalised to the network input, "box_labels" (B, max_boxes) int32 (-1
      pads), "num_boxes", "original_height", "original_width" (B,) int32.

    Raises:
      ValueError: bad `split` or `config`.
      FileNotFoundError: no record file for the split.
    """
    if not isinstance(config, InputConfig):
        raise ValueError(
            f"`config` must be an InputConfig. Received: config={config!r}"
        )
    files = tfrecord.record_files(data_dir, split)
    num_pipelines, pipeline_id = _num_pipelines(input_context)
    batch_size = config.batch_size
    if input_context is not None:
        batch_size = input_context.get_per_replica_batch_size(config.batch_size)

    dataset = tf.data.Dataset.from_tensor_slices(files)
    shard_records = False
    if num_pipelines > 1:
        if len(files) >= num_pipelines:
            dataset = dataset.shard(num_pipelines, pipeline_id)
            files = files[pipeline_id::num_pipelines]
        else:
            shard_records = True
    if training:
        dataset = dataset.shuffle(
            len(files), seed=config.seed, reshuffle_each_iteration=True
        ).repeat()
    dataset = dataset.interleave(
        lambda path: tf.data.TFRecordDataset(
            path, compression_type="GZIP", buffer_size=config.read_buffer_bytes
        ),
        cycle_length=min(len(files), config.cycle_length or 8),
        block_length=1,
        num_parallel_calls=_AUTOTUNE,
        deterministic=not training,
    )
    if shard_records:
        dataset = dataset.shard(num_pipelines, pipeline_id)
    if boxed_only:
        dataset = dataset.filter(tf.autograph.experimental.do_not_convert(_has_boxes))
    if training and config.shuffle_buffer > 1:
        dataset = dataset.shuffle(config.shuffle_buffer, seed=config.seed)
    # The map functions branch on Python values only (tensor branches are
    # explicit tf.cond), so AutoGraph's source conversion, about 1.5 s of a
    # run's start on 2 cores, is skipped.
    plain = tf.autograph.experimental.do_not_convert
    dataset = dataset.map(
        plain(lambda record: decode_record(record, config, with_info)),
        num_parallel_calls=_AUTOTUNE,
        deterministic=not training,
    )
    dataset = dataset.batch(batch_size, drop_remainder=training)
    if training and config.augment:
        seeds = tf.data.Dataset.random(seed=config.seed).batch(2, drop_remainder=True)
        dataset = tf.data.Dataset.zip((dataset, seeds)).map(
            plain(
                lambda features, seed: augment_batch(
                    features, seed, config, normalize=True
                )
            ),
            num_parallel_calls=_AUTOTUNE,
            deterministic=not training,
        )
    norm = config.normalization

    def finish(features):
        features = dict(features)
        labels = features.pop("labels")
        if not (training and config.augment):  # augment_batch normalised it
            image = tf.cast(features["image"], tf.float32)
            features["image"] = (image - norm.mean) / norm.std
        if with_info:
            return features, labels
        return features["image"], labels

    dataset = dataset.map(plain(finish), num_parallel_calls=_AUTOTUNE)
    dataset = dataset.prefetch(_AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = not training
    options.autotune.enabled = True
    options.threading.max_intra_op_parallelism = 1
    if config.private_threadpool_size:
        options.threading.private_threadpool_size = config.private_threadpool_size
    return dataset.with_options(options)


# ---------------------------------------------------------------------------
# Damaged record files.
#
# tf.data reports a truncated or corrupted `.tfrecord.gz` as a DataLossError
# that names no file. Checking every shard before each run would cost a full
# read of the data set; instead the error is caught where a dataset is
# iterated (fit, a Python loop) and only then are the split's files read one
# by one to find the damaged ones.


def _tf_error_text(error):
    """The useful part of a TF runtime error message (no node, no op name)."""
    text = getattr(error, "message", None) or str(error)
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", text)
    text = re.sub(r"\s*\[Op:[^\]]*\].*$", "", text, flags=re.S)
    text = text.replace("' failed with", " failed with")  # TF's stray quote.
    return " ".join(text.split())


def find_damaged_files(files):
    """Reads each record file to its end; returns the ones TF cannot read.

    Args:
      files: paths of GZIP TFRecord files.

    Returns:
      List of (path, reason) for every file that fails to read, in order.
    """
    damaged = []
    for path in files:
        records = tf.data.TFRecordDataset(path, compression_type="GZIP")
        try:
            records.reduce(tf.constant(0, tf.int64), lambda n, _: n + 1)
        except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
            damaged.append((path, _tf_error_text(e)))
    return damaged


def damaged_records_error(data_dir, splits, error):
    """The `UserFileError` for a DataLossError met while reading `splits`.

    Args:
      data_dir: folder of the record files.
      splits: the splits that were being read.
      error: the `tf.errors.DataLossError` raised by the iterator.

    Returns:
      A `cxr_tf.errors.UserFileError` naming the damaged files, or the
      original error when no file of `splits` fails a read on its own.
    """
    from cxr_tf import errors

    files = []
    for split in splits:
        try:
            files += tfrecord.record_files(data_dir, split)
        except FileNotFoundError:
            continue
    damaged = find_damaged_files(files)
    if not damaged:
        return error
    path, reason = damaged[0]
    more = ""
    if len(damaged) > 1:
        more = f" and {len(damaged) - 1} more: " + ", ".join(p for p, _ in damaged[1:])
    return errors.UserFileError(
        f"damaged TFRecord file: {reason}{more}",
        path,
        "the file is truncated or corrupt; rerun ingest (python -m "
        "pipeline.ingest, or the pipeline, which checks its cached outputs) "
        "to write it again",
    )


@contextlib.contextmanager
def naming_damaged_files(data_dir, splits):
    """Turns a DataLossError raised inside the block into an error naming the file.

    Args:
      data_dir: folder of the record files read inside the block.
      splits: the splits read inside the block.

    Raises:
      cxr_tf.errors.UserFileError: a record file of `splits` is damaged.
    """
    try:
        yield
    except tf.errors.DataLossError as e:
        found = damaged_records_error(data_dir, splits, e)
        if found is e:
            raise
        raise found from e


def iterate_naming_damaged_files(dataset, data_dir, split):
    """Iterates `dataset` (built from `split`), naming a damaged file on failure."""
    with naming_damaged_files(data_dir, (split,)):
        yield from dataset
