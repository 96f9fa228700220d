"""The image contract: stored size, letterbox and their inverse, in NumPy and TF.

A film reaches the network in two steps, and every path (training on
records, evaluation, `predict` on raw files, the exported SavedModel and the
serving client) must take the same two:

1. Ingestion stores it with its longer side shrunk to the *ingest* size S_i
   (Pillow's BOX area filter on 8 bits, never an upscale): `stored_size`,
   `resize_longer_side` (NumPy) and `resize_like_ingestion` (TF, bit-exact).
2. The input pipeline letterboxes the stored image into the S x S network
   input (bilinear with antialiasing, aspect kept, centred zero padding):
   `letterbox` (TF).

`Letterbox` (NumPy) and `letterbox_geometry` (TF) give where the original
film lands in the network input, so that boxes and maps found there map back
to the original pixels. The NumPy and TF twins sit side by side; their
parity is tested in tests/data/test_preprocess.py.

The model directory records S_i (`cxr_tf.model_dir`), so a model trained on
films ingested at 1024 and fed at 512 is served and predicted on raw films
exactly as it was evaluated on its records. This module imports TensorFlow
only inside the TF functions: the serving client uses the NumPy half without
it.
"""

import dataclasses
import functools
import math

import numpy as np
from PIL import Image


# ---------------------------------------------------------------------------
# Step 1: the stored size (ingestion).


def stored_size(height, width, ingest_size):
    """The (h, w) ingestion stores an (height, width) film at.

    Args:
      height: original height.
      width: original width.
      ingest_size: longer side of the stored image; 0 or None keeps the size.

    Returns:
      (h, w) ints: max(h, w) == ingest_size, aspect kept; unchanged when the
      film is no larger than `ingest_size` (ingestion never upscales).
    """
    height, width = int(height), int(width)
    if not ingest_size or max(height, width) <= ingest_size:
        return height, width
    scale = ingest_size / max(height, width)
    # Python's round() is half-to-even, like tf.math.rint in the TF twin.
    new_h = max(1, min(ingest_size, round(height * scale)))
    new_w = max(1, min(ingest_size, round(width * scale)))
    return new_h, new_w


def resize_longer_side(pixels, image_size):
    """Resizes a 2-D uint8 image so its longer side is `image_size` (area mean).

    Args:
      pixels: uint8 array (H, W).
      image_size: target longer side; 0, or a side the image does not exceed,
        leaves it unchanged (never upscales).

    Returns:
      uint8 array (h, w) of `stored_size(H, W, image_size)`.
    """
    height, width = pixels.shape
    new_h, new_w = stored_size(height, width, image_size)
    if (new_h, new_w) == (height, width):
        return pixels
    # BOX is the area average: every source pixel counts once (antialiased).
    resized = Image.fromarray(pixels).resize((new_w, new_h), Image.Resampling.BOX)
    return np.asarray(resized, dtype=np.uint8)


def stored_size_tf(height, width, ingest_size):
    """TF twin of `stored_size` for int32 scalar or vector tensors."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    longer = tf.maximum(height, width)
    scale = tf.cast(ingest_size, tf.float64) / tf.cast(longer, tf.float64)
    new_h = tf.cast(tf.math.rint(tf.cast(height, tf.float64) * scale), tf.int32)
    new_w = tf.cast(tf.math.rint(tf.cast(width, tf.float64) * scale), tf.int32)
    new_h = tf.clip_by_value(new_h, 1, ingest_size)
    new_w = tf.clip_by_value(new_w, 1, ingest_size)
    shrink = longer > ingest_size
    return tf.where(shrink, new_h, height), tf.where(shrink, new_w, width)


# Pillow's fixed-point resampling (libImaging/Resample.c): 32 - 8 - 2 bits.
_PILLOW_PRECISION_BITS = 22


def _pillow_box_coefficients(in_size, out_size):
    """Pillow's BOX resampling weights as an (out, in) float64 matrix.

    Pillow averages the input pixels whose centres fall in the output
    pixel's support (whole pixels, no partial coverage), with weights
    converted to fixed point; float64 holds these integers exactly.
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    in_f = tf.cast(in_size, tf.float64)
    scale = in_f / tf.cast(out_size, tf.float64)
    filterscale = tf.maximum(scale, 1.0)
    support = 0.5 * filterscale
    center = (tf.range(out_size, dtype=tf.float64) + 0.5) * scale
    # Pillow truncates (int)(v + 0.5); v >= 0 here, so floor is the same.
    first = tf.maximum(tf.floor(center - support + 0.5), 0.0)[:, tf.newaxis]
    last = tf.minimum(tf.floor(center + support + 0.5), in_f)[:, tf.newaxis]
    index = tf.range(in_size, dtype=tf.float64)[tf.newaxis, :]
    t = (index - center[:, tf.newaxis] + 0.5) * (1.0 / filterscale)
    inside = (index >= first) & (index < last) & (t > -0.5) & (t <= 0.5)
    weights = tf.cast(inside, tf.float64)
    total = tf.reduce_sum(weights, axis=1, keepdims=True)
    weights = weights / tf.where(total > 0, total, 1.0)
    return tf.floor(0.5 + weights * float(1 << _PILLOW_PRECISION_BITS))


def _pillow_pass(values):
    """Fixed-point accumulator -> uint8 value, as Pillow's clip8."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    shifted = tf.floor(
        (values + float(1 << (_PILLOW_PRECISION_BITS - 1)))
        / float(1 << _PILLOW_PRECISION_BITS)
    )
    return tf.clip_by_value(shifted, 0.0, 255.0)


def resize_like_ingestion(gray, ingest_size):
    """TF twin of `resize_longer_side`, bit-exact, for a (H, W, 1) uint8 tensor.

    Pillow's BOX filter: horizontal pass, rounding to 8 bits, then vertical
    pass, each as a matrix product.

    Args:
      gray: uint8 (H, W, 1).
      ingest_size: longer side of the stored image.

    Returns:
      uint8 (h, w, 1).
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    shape = tf.shape(gray)
    new_h, new_w = stored_size_tf(shape[0], shape[1], ingest_size)

    def shrink():
        image = tf.cast(gray[..., 0], tf.float64)
        across = _pillow_box_coefficients(shape[1], new_w)
        image = _pillow_pass(tf.matmul(image, across, transpose_b=True))
        down = _pillow_box_coefficients(shape[0], new_h)
        image = _pillow_pass(tf.matmul(down, image))
        return tf.cast(image, tf.uint8)[..., tf.newaxis]

    return tf.cond(
        tf.logical_and(tf.equal(new_h, shape[0]), tf.equal(new_w, shape[1])),
        lambda: gray,
        shrink,
    )


# ---------------------------------------------------------------------------
# Step 2: the letterbox (input pipeline).


def letterbox(image, boxes, size):
    """Resizes (aspect kept) and pads a (h, w, 1) uint8 image to (S, S, 1) uint8.

    Args:
      image: uint8 tensor (h, w, 1), the stored film.
      boxes: None or (N, 4) float [ymin, xmin, ymax, xmax] normalised to the
        stored image.
      size: S.

    Returns:
      (pixels uint8 (S, S, 1), boxes normalised to the S x S input or None).
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    shape = tf.shape(image)
    height = tf.cast(shape[0], tf.float32)
    width = tf.cast(shape[1], tf.float32)
    scale = size / tf.maximum(height, width)
    new_h = tf.clip_by_value(tf.round(height * scale), 1.0, float(size))
    new_w = tf.clip_by_value(tf.round(width * scale), 1.0, float(size))
    off_y = tf.floor((size - new_h) / 2.0)
    off_x = tf.floor((size - new_w) / 2.0)

    def resize_and_pad():
        resized = tf.image.resize(
            image,
            tf.cast(tf.stack([new_h, new_w]), tf.int32),
            method="bilinear",
            antialias=True,
        )
        resized = tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)
        return tf.image.pad_to_bounding_box(
            resized,
            tf.cast(off_y, tf.int32),
            tf.cast(off_x, tf.int32),
            size,
            size,
        )

    # A square film stored at the network size needs nothing; the resize is
    # for records written at another size or non-square films. Pixels stay
    # uint8 until after batching and the geometric transform: a quarter of
    # the bytes to copy.
    pixels = tf.cond(
        tf.logical_and(tf.equal(shape[0], size), tf.equal(shape[1], size)),
        lambda: image,
        resize_and_pad,
    )
    pixels = tf.ensure_shape(pixels, [size, size, 1])
    if boxes is None:
        return pixels, None
    factor = tf.stack([new_h, new_w, new_h, new_w]) / size
    offset = tf.stack([off_y, off_x, off_y, off_x]) / size
    return pixels, boxes * factor + offset


def _letterboxed_size(stored_h, stored_w, size):
    """(new_h, new_w, off_y, off_x) of a stored image in the S x S input."""
    scale = size / max(stored_h, stored_w)
    # np.round is half-to-even like tf.round in `letterbox`.
    new_h = float(min(max(np.round(stored_h * scale), 1.0), size))
    new_w = float(min(max(np.round(stored_w * scale), 1.0), size))
    return new_h, new_w, math.floor((size - new_h) / 2), math.floor((size - new_w) / 2)


@dataclasses.dataclass(frozen=True)
class Letterbox:
    """Where an (H, W) film sits in the S x S network input (NumPy side).

    The film is first stored at `stored_size(H, W, ingest_size)`, then
    letterboxed into S x S as `letterbox` does.

    Attributes:
      height: original height H.
      width: original width W.
      size: S, the network input side.
      ingest_size: the longer side ingestion stores films at (the model
        directory records it); None means S (ingested at the network size).

    The geometry is computed once per instance (cached properties), and
    `Letterbox.of` hands out one instance per distinct film geometry: box
    mapping asks for it per box.
    """

    height: int
    width: int
    size: int
    ingest_size: int | None = None

    @classmethod
    @functools.lru_cache(maxsize=4096)
    def of(cls, height, width, size, ingest_size=None):
        """The (shared, cached) `Letterbox` of this geometry."""
        return cls(int(height), int(width), int(size), ingest_size)

    @functools.cached_property
    def stored_hw(self):
        return stored_size(self.height, self.width, self.ingest_size or self.size)

    @functools.cached_property
    def resized_hw(self):
        """(h, w) of the film inside the S x S input, in network pixels."""
        new_h, new_w, _, _ = _letterboxed_size(*self.stored_hw, self.size)
        return int(new_h), int(new_w)

    @functools.cached_property
    def offset_yx(self):
        """Top-left corner of the film in the S x S input, network pixels."""
        _, _, off_y, off_x = _letterboxed_size(*self.stored_hw, self.size)
        return off_y, off_x

    @functools.cached_property
    def per_pixel(self):
        """Original pixels per network pixel."""
        return max(self.height, self.width) / max(self.resized_hw)

    @functools.cached_property
    def canvas(self):
        """Side of the S x S input in original pixels (max(H, W))."""
        return self.size * self.per_pixel

    def to_original(self, x, y, w, h, unit="canvas"):
        """Maps a box from padded-canvas (or network) pixels to the original.

        Args:
          x, y, w, h: the box, top-left corner and size.
          unit: "canvas" (pixels of the S x S input scaled to `canvas`) or
            "network" (pixels of the S x S input).

        Returns:
          (x, y, w, h) clipped to the image, in original pixels.
        """
        if unit not in ("canvas", "network"):
            raise ValueError(
                f'`unit` must be "canvas" or "network". Received: unit={unit!r}'
            )
        factor = 1.0 if unit == "canvas" else self.per_pixel
        off_y, off_x = self.offset_yx
        x0 = x * factor - off_x * self.per_pixel
        y0 = y * factor - off_y * self.per_pixel
        x1 = x0 + w * factor
        y1 = y0 + h * factor
        x0, x1 = np.clip([x0, x1], 0.0, float(self.width))
        y0, y1 = np.clip([y0, y1], 0.0, float(self.height))
        return float(x0), float(y0), float(x1 - x0), float(y1 - y0)

    def network_boxes_to_original(self, boxes):
        """[ymin, xmin, ymax, xmax] normalised to the S x S input -> [x, y, w, h].

        Args:
          boxes: (N, 4) boxes as the input pipeline yields them.

        Returns:
          (N, 4) float64 array of [x, y, w, h] in original pixels.
        """
        s = self.size
        out = [
            self.to_original(
                xmin * s, ymin * s, (xmax - xmin) * s, (ymax - ymin) * s, "network"
            )
            for ymin, xmin, ymax, xmax in np.asarray(boxes, np.float64).reshape(-1, 4)
        ]
        return np.asarray(out, np.float64).reshape(-1, 4)

    def crop_map(self, score_map):
        """The part of an (h, w) map over the film (padding removed)."""
        h, w = score_map.shape[:2]
        off_y, off_x = self.offset_yx
        new_h, new_w = self.resized_hw
        s = self.size
        y0 = int(math.floor(off_y * h / s))
        x0 = int(math.floor(off_x * w / s))
        y1 = max(int(math.ceil((off_y + new_h) * h / s)), y0 + 1)
        x1 = max(int(math.ceil((off_x + new_w) * w / s)), x0 + 1)
        return score_map[y0:y1, x0:x1]


def letterbox_geometry(height, width, size, ingest_size=None):
    """TF twin of `Letterbox`: where (height, width) films land in S x S.

    Args:
      height: original heights (int32 tensor, scalar or vector).
      width: original widths.
      size: S.
      ingest_size: see `Letterbox`.

    Returns:
      (side, offset_y, offset_x) float32: the S x S input covers a square of
      `side` original pixels whose top-left corner is at (-offset_y,
      -offset_x) in original pixel coordinates.
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    stored_h, stored_w = stored_size_tf(height, width, ingest_size or size)
    stored_h = tf.cast(stored_h, tf.float32)
    stored_w = tf.cast(stored_w, tf.float32)
    s = float(size)
    scale = s / tf.maximum(stored_h, stored_w)
    new_h = tf.clip_by_value(tf.round(stored_h * scale), 1.0, s)
    new_w = tf.clip_by_value(tf.round(stored_w * scale), 1.0, s)
    off_y = tf.floor((s - new_h) / 2.0)
    off_x = tf.floor((s - new_w) / 2.0)
    per_pixel = tf.cast(tf.maximum(height, width), tf.float32) / tf.maximum(
        new_h, new_w
    )
    return s * per_pixel, off_y * per_pixel, off_x * per_pixel


# ---------------------------------------------------------------------------
# Both steps plus normalisation: what the network is fed.


def preprocess_pixels(pixels, size, normalization, ingest_size=None):
    """A decoded film -> the normalised (S, S, 1) float32 network input.

    The evaluation path of the input pipeline on a film that ingestion would
    store at `ingest_size`.

    Args:
      pixels: (H, W) uint8 grayscale, as `cxr_tf.data.images.read_image` gives.
      size: S.
      normalization: `schema.Normalization`.
      ingest_size: see `Letterbox`.

    Returns:
      float32 NumPy array (S, S, 1).
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    stored = resize_longer_side(np.asarray(pixels, np.uint8), ingest_size or size)
    letterboxed, _ = letterbox(tf.constant(stored[..., None]), None, int(size))
    letterboxed = tf.cast(letterboxed, tf.float32)
    return ((letterboxed - normalization.mean) / normalization.std).numpy()


def preprocess_gray_tf(gray, size, normalization, ingest_size=None, channels=1):
    """TF twin of `preprocess_pixels` for a decoded (H, W, 1) uint8 tensor.

    Returns:
      float32 tensor (S, S, channels).
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    stored = resize_like_ingestion(gray, ingest_size or size)
    pixels, _ = letterbox(stored, None, size)
    pixels = (tf.cast(pixels, tf.float32) - normalization.mean) / normalization.std
    if channels == 3:
        pixels = tf.repeat(pixels, 3, axis=-1)
    return pixels
