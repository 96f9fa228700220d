"""The streaming parts of `predict`: parallel film loading, ordered results, resume.

`predict_lib.predict` runs films through three stages: loading (decode,
stored size, letterbox and normalisation: `cxr_tf.data.preprocess`) in a
thread pool, the batched forward pass on the calling thread, and boxes and
overlays in a second pool. `ordered_map` keeps each stage in input order
with a bounded number of films in flight, so memory does not grow with the
number of films. `read_finished` is what `--resume` trusts of an earlier
predictions.jsonl.
"""

import collections
import dataclasses
import json
import os

import numpy as np

from cxr_tf import errors
from cxr_tf.data import images as images_lib
from cxr_tf.data import preprocess


def ordered_map(pool, fn, items, lookahead):
    """Yields `fn(item)` for each item, in order, computed ahead in `pool`.

    At most `lookahead` calls are submitted but not yet yielded, which bounds
    the memory held by finished results waiting for an earlier one.

    Args:
      pool: a `concurrent.futures.Executor`.
      fn: one-argument function.
      items: an iterable (consumed lazily).
      lookahead: positive int.

    Yields:
      The results, in the order of `items`; an exception raised by `fn` is
      raised here, at its item.
    """
    pending = collections.deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= lookahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


@dataclasses.dataclass
class LoadedFilm:
    """One film after the loading stage.

    Attributes:
      item: its `predict_lib.InputImage`.
      original_hw: (H, W) as read.
      info: its `images.DecodeInfo`.
      network_input: float32 (S, S, 1), what the model is fed.
      pixels: the film as read (uint8 (H, W)) when an overlay needs it, else
        None (not kept: a 1024 px film is 1 MB).
      error: the reason it could not be read (then the other fields are None).
    """

    item: object
    original_hw: tuple | None = None
    info: object = None
    network_input: np.ndarray | None = None
    pixels: np.ndarray | None = None
    error: str | None = None


class FilmLoader:
    """Reads a film and makes the network input, as `preprocess_pixels` does.

    The stored size is made with Pillow (`preprocess.resize_longer_side`),
    the letterbox and normalisation by `preprocess.preprocess_gray_tf` in one
    traced graph; on a film already at its stored size that function's
    resize is the identity, so the result equals `preprocess_pixels` bit for
    bit (tests/test_predict_pipeline.py). Safe to call from several threads:
    Pillow and the graph release the GIL while they work.

    Args:
      image_size: S, the network input side.
      normalization: `schema.Normalization`.
      ingest_size: the model's stored film size (see `preprocess.Letterbox`).
      orientation: DICOM orientation rule (see `images.decode_image`).
      keep_pixels: keep the film as read (overlays need it).
    """

    def __init__(self, image_size, normalization, ingest_size, orientation, keep_pixels):
        import tensorflow as tf  # pylint: disable=import-outside-toplevel

        self.image_size = int(image_size)
        self.stored_side = ingest_size or self.image_size
        self.orientation = orientation
        self.keep_pixels = keep_pixels

        @tf.function(
            input_signature=[tf.TensorSpec([None, None, 1], tf.uint8)],
            reduce_retracing=True,
        )
        def network_input(stored):
            return preprocess.preprocess_gray_tf(
                stored, self.image_size, normalization, ingest_size
            )

        self._network_input = network_input

    def __call__(self, item):
        """A `LoadedFilm` of `item` (its `error` set when it cannot be read)."""
        try:
            pixels, info = images_lib.read_image_with_info(
                item.path, orientation=self.orientation
            )
        except (ValueError, OSError) as e:
            return LoadedFilm(item, error=str(e))
        stored = preprocess.resize_longer_side(pixels, self.stored_side)
        network = self._network_input(stored[..., np.newaxis]).numpy()
        return LoadedFilm(
            item,
            original_hw=pixels.shape,
            info=info,
            network_input=network,
            pixels=pixels if self.keep_pixels else None,
        )


def batched(iterable, size):
    """Lists of up to `size` consecutive items."""
    batch = []
    for item in iterable:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def read_finished(path):
    """Keys of the films already in a predictions.jsonl; drops a torn tail.

    A run killed while writing leaves its last line without its newline (or
    not valid JSON); that line is cut off the file so the film is predicted
    again and appears exactly once.

    Args:
      path: the predictions.jsonl of an earlier run (may not exist).

    Returns:
      set of the "image" keys of its complete records.

    Raises:
      cxr_tf.errors.UserValueError: a complete line before the last one is not a prediction
        record (the file is not one `predict` wrote; named with its line).
    """
    done = set()
    if not os.path.exists(path):
        return done
    good_bytes = 0
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    # After the last newline: "" for a complete file, else the torn tail.
    *complete, tail = lines
    for number, line in enumerate(complete, 1):
        try:
            done.add(json.loads(line)["image"])
        except (ValueError, KeyError, TypeError) as e:
            if number == len(complete) and not tail:
                # The last line may be torn mid-record but with a newline
                # byte already written: redo it as well.
                break
            raise errors.UserValueError(
                f"not a prediction record ({e}); --resume continues only a "
                "predictions.jsonl written by predict",
                f"{path}, line {number}",
                "give another --output_dir, or remove the file",
            ) from None
        good_bytes += len(line) + 1
    if good_bytes != os.path.getsize(path):
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
    return done
