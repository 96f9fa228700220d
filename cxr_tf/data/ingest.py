"""Beam ingestion: ChestX-ray14 tables and images -> sharded GZIP TFRecords + report."""

import collections
import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import struct
import tempfile
import threading
import time
import typing
import uuid
import zlib

from absl import logging
import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions
import numpy as np
import tensorflow as tf

from cxr_tf import config_dict
from cxr_tf import errors
from cxr_tf.data import images
from cxr_tf.data import metadata
from cxr_tf.data import preprocess
from cxr_tf.data import schema
from cxr_tf.data import tfrecord

# Candidate names (lower case) of each table the search looks for. A version
# suffix is allowed (Data_Entry_2017_v2020.csv), other suffixes are not, so
# hand-edited variants (BBox_List_2017.excel_resaved.csv) are not picked up.
TABLE_PATTERNS = {
    "data_entry": re.compile(r"^data_entry_2017(_v\d+)?\.csv$"),
    "bbox_list": re.compile(r"^bbox_list_2017(_v\d+)?\.csv$"),
    "train_val_list": re.compile(r"^train_val_list(_v\d+)?\.txt$"),
    "test_list": re.compile(r"^test_list(_v\d+)?\.txt$"),
}
IMAGE_EXTENSIONS = schema.IMAGE_EXTENSIONS
SHARD_TEMPLATE = "{split}-{shard:05d}-of-{num_shards:05d}.tfrecord.gz"

# Reasons a Data_Entry row is skipped (the report's `skipped[*].reason`).
MISSING_FILE = "missing_file"
CORRUPT_IMAGE = "corrupt_image"
UNREADABLE_FILE = "unreadable_file"
NOT_IN_SPLIT_LIST = "not_in_split_list"
DUPLICATE = "duplicate"
UNKNOWN_LABEL = "unknown_label"
MALFORMED_ROW = "malformed_row"

_LOCAL_RUNNER = "apache_beam.runners.portability.fn_api_runner.FnApiRunner"
_RUNNING_MODES = ("multi_processing", "multi_threading", "in_memory")
# Shards of about this many bytes (PNG of a chest film: ~0.5 byte / pixel).
_TARGET_SHARD_BYTES = 128 << 20


class SkipFractionExceededError(errors.UserError, RuntimeError):
    """More rows were skipped than `max_skip_fraction` allows.

    Raised after the records and the report are written; `report` holds it.
    """

    def __init__(self, what, report, where="", fix=""):
        super().__init__(what, where, fix)
        self.report = report


class AmbiguousTableError(errors.UserValueError):
    """The search under `data_dir` found two or more candidates for one table."""


class RecordsExistError(errors.UserError, FileExistsError):
    """`output_dir` already holds records and `overwrite` is False."""


@dataclasses.dataclass(frozen=True)
class IngestConfig:
    """What to ingest and how.

    Attributes:
      data_dir: folder with the tables and images (NIH layout `images/`, the
        Kaggle layout `images_001/images/`..., or any subfolders).
      output_dir: where the records and `ingest_report.json` go.
      data_entry: the label table; None searches `data_dir`.
      bbox_list: the box list; None searches (absent: no boxes).
      train_val_list: official train/val list; None searches (absent: a
        patient-wise random split).
      test_list: official test list; None searches.
      image_size: longer side of the stored images (aspect kept, area
        resampling, never upscaled); 0 keeps the files' resolution.
      val_fraction: fraction of train/val patients drawn for validation.
      test_fraction: fraction of patients drawn for test without a test list.
      seed: seed of the patient draw.
      max_skip_fraction: the job fails (after writing the report) when more
        than this fraction of Data_Entry rows is skipped.
      images_per_shard: images per record file; 0 picks shards of ~128 MB.
      num_workers: DirectRunner worker processes; 0 uses every CPU core.
      running_mode: DirectRunner mode ("multi_processing", "multi_threading"
        or "in_memory"); other runners ignore it.
      overwrite: replace records already in `output_dir` (else an error).
      dicom_orientation: "auto" (PhotometricInterpretation, checked against
        the content: a chest film whose header contradicts it is inverted
        and listed in the report) or "header" (the header only); see
        `cxr_tf.data.images.decode_image`.
    """

    data_dir: str
    output_dir: str
    data_entry: str | None = None
    bbox_list: str | None = None
    train_val_list: str | None = None
    test_list: str | None = None
    image_size: int = 1024
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 0
    max_skip_fraction: float = 0.01
    images_per_shard: int = 0
    num_workers: int = 0
    running_mode: str = "multi_processing"
    overwrite: bool = False
    dicom_orientation: str = "auto"

    def __post_init__(self):
        for name in ("data_dir", "output_dir"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise errors.UserValueError(
                    f"`{name}` must be a non-empty path. Received: {name}={value!r}"
                )
        for name in ("image_size", "images_per_shard", "num_workers", "seed"):
            config_dict.check_int(
                name, getattr(self, name), 0, error=errors.UserValueError
            )
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            raise errors.UserValueError(
                "`max_skip_fraction` must be in [0, 1]. "
                f"Received: max_skip_fraction={self.max_skip_fraction!r}"
            )
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise errors.UserValueError(
                    f"`{name}` must be in [0, 1). Received: {name}={value!r}"
                )
        if self.dicom_orientation not in images.ORIENTATIONS:
            raise errors.UserValueError(
                f"`dicom_orientation` must be one of {images.ORIENTATIONS}. "
                f"Received: dicom_orientation={self.dicom_orientation!r}"
            )
        if self.running_mode not in _RUNNING_MODES:
            raise errors.UserValueError(
                f"`running_mode` must be one of {_RUNNING_MODES}. "
                f"Received: running_mode={self.running_mode!r}"
            )

    def to_dict(self):
        return dataclasses.asdict(self)


def _is_remote(path):
    return "://" in str(path)


# Reasons a folder is not walked (the report's `skipped_folders[*].reason`).
LINK_LOOP = "link_loop"
REPEATED_FOLDER = "repeated_folder"
UNREADABLE_FOLDER = "unreadable_folder"


def _walk(root, skip_dir=None, skipped_folders=None):
    """Yields (folder, file name) of every file under `root`, each real folder once.

    Local folders are walked first without following links, so a folder is
    listed under its own path; then each folder link whose target has not
    been listed yet is walked the same way. A link back to an ancestor (a
    loop) or to a folder already listed is not followed: it is appended to
    `skipped_folders` as {"path", "target", "reason"}, as is a folder that
    cannot be read.
    """
    if skipped_folders is None:
        skipped_folders = []
    if _is_remote(root):
        for folder, _, names in tf.io.gfile.walk(root):
            for name in sorted(names):
                yield folder, name
        return
    skip_dir = os.path.realpath(skip_dir) if skip_dir else None
    visited = {}  # real path -> the path it was listed under
    links = []

    def unreadable(error):
        skipped_folders.append(
            {
                "path": error.filename or "",
                "target": "",
                "reason": UNREADABLE_FOLDER,
                "detail": error.strerror or str(error),
            }
        )

    def skip(path, real, reason):
        skipped_folders.append(
            {
                "path": path,
                "target": real,
                "reason": reason,
                "detail": f"already listed as {visited[real]}",
            }
        )

    def walk_tree(top):
        visited[os.path.realpath(top)] = top
        for folder, dirs, names in os.walk(top, onerror=unreadable):
            kept = []
            for d in sorted(dirs):
                path = os.path.join(folder, d)
                real = os.path.realpath(path)
                if d.startswith(".") or real == skip_dir:
                    continue
                if os.path.islink(path):
                    links.append(path)
                    continue
                if real in visited:
                    # A real folder first reached through an earlier link.
                    skip(path, real, REPEATED_FOLDER)
                    continue
                visited[real] = path
                kept.append(d)
            dirs[:] = kept
            for name in sorted(names):
                yield folder, name

    yield from walk_tree(root)
    while links:
        path = links.pop(0)
        real = os.path.realpath(path)
        if not os.path.isdir(real):
            continue  # a link to nothing: os.walk lists no files under it
        if real in visited:
            parent = os.path.realpath(os.path.dirname(path))
            loop = parent == real or parent.startswith(real.rstrip(os.sep) + os.sep)
            skip(path, real, LINK_LOOP if loop else REPEATED_FOLDER)
            continue
        yield from walk_tree(path)


def scan_data_dir(data_dir, skip_dir=None, skipped_folders=None):
    """Lists the tables and image files under `data_dir`, each real folder once.

    Args:
      data_dir: root folder.
      skip_dir: a folder not to descend into (the output folder).
      skipped_folders: optional list; folder links not followed (a loop back
        to an ancestor, or a second path to a folder already listed) and
        unreadable folders are appended as {"path", "target", "reason",
        "detail"}.

    Returns:
      `(tables, images)`: `tables` maps each key of `TABLE_PATTERNS` to the
      sorted list of candidate paths; `images` maps a file name to the sorted
      list of paths with that name (files with an `IMAGE_EXTENSIONS` suffix;
      file links to a file already listed under that name are left out).
    """
    tables = {key: [] for key in TABLE_PATTERNS}
    images = collections.defaultdict(dict)
    for folder, name in _walk(data_dir, skip_dir, skipped_folders):
        lower = name.lower()
        path = os.path.join(folder, name)
        if lower.endswith(IMAGE_EXTENSIONS):
            real = path if _is_remote(path) else os.path.realpath(path)
            images[name].setdefault(real, []).append(path)
            continue
        for key, pattern in TABLE_PATTERNS.items():
            if pattern.match(lower):
                tables[key].append(path)
    tables = {key: sorted(paths) for key, paths in tables.items()}
    # One path per real file: the first in sorted order, so a link and its
    # target give one film.
    listed = {
        name: sorted(min(paths) for paths in by_real.values())
        for name, by_real in images.items()
    }
    return tables, listed


def resolve_tables(config, found):
    """Picks the table files: the config's paths, else the single candidate.

    Args:
      config: `IngestConfig`.
      found: candidates per table, from `scan_data_dir`.

    Returns:
      dict table key -> path or None (optional table not found).

    Raises:
      FileNotFoundError: a path given in the config does not exist, or no
        Data_Entry table was found.
      AmbiguousTableError: two or more candidates for a table not given
        outright; the message lists them and names the flag to pass.
    """
    chosen = {}
    # Every path given outright is checked before any search result, so a
    # typo is reported even when another table is ambiguous.
    for key in TABLE_PATTERNS:
        given = getattr(config, key)
        if given:
            if not _exists(given):
                raise errors.UserFileError(
                    f"`{key}` file not found", given, f"check --{key}"
                )
            chosen[key] = given
    for key in TABLE_PATTERNS:
        if key in chosen:
            continue
        candidates = sorted(found.get(key, []))
        if len(candidates) > 1:
            raise AmbiguousTableError(
                f"found {len(candidates)} candidates for `{key}`: "
                + ", ".join(candidates),
                config.data_dir,
                f"pass the one to use with --{key}=PATH",
            )
        chosen[key] = candidates[0] if candidates else None
    if chosen["data_entry"] is None:
        raise errors.UserFileError(
            "no Data_Entry table (Data_Entry_2017*.csv) found",
            config.data_dir,
            "pass it with --data_entry=PATH",
        )
    return chosen


def _exists(path):
    if _is_remote(path):
        return tf.io.gfile.exists(path)
    return os.path.exists(path)


def _problem_reason(text):
    lower = text.lower()
    if "duplicate" in lower or "twice" in lower:
        return DUPLICATE
    if "label" in lower:
        return UNKNOWN_LABEL
    return MALFORMED_ROW


def _shard_count(num_images, config):
    if num_images == 0:
        return 0
    per_shard = config.images_per_shard
    if not per_shard:
        side = config.image_size or 1024
        per_shard = int(np.clip(_TARGET_SHARD_BYTES // (0.5 * side * side), 64, 4096))
    return max(1, math.ceil(num_images / per_shard))


def _png_chunk(kind, data):
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def encode_png(pixels, level=6):
    """Encodes a 2-D uint8 array as an 8-bit grayscale PNG (bytes).

    Every row uses the PNG "Up" filter: on chest films it compresses as well
    as the encoders' adaptive choice, and decodes about 20% faster (the
    Paeth rows those pick are the slow ones to unfilter), which is what
    training pays for on every epoch.

    Args:
      pixels: uint8 array (H, W).
      level: zlib compression level.

    Returns:
      The PNG file's bytes.
    """
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    if pixels.ndim != 2 or 0 in pixels.shape:
        raise ValueError(
            f"`pixels` must be a non-empty 2-D array. Received shape {pixels.shape}"
        )
    height, width = pixels.shape
    rows = np.empty((height, width + 1), np.uint8)
    rows[:, 0] = 2  # filter type Up
    rows[0, 1:] = pixels[0]
    # uint8 arithmetic wraps modulo 256, as the filter is defined.
    np.subtract(pixels[1:], pixels[:-1], out=rows[1:, 1:])
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), level)),
            _png_chunk(b"IEND", b""),
        )
    )


def check_box(x, y, w, h, width, height):
    """Checks a box row against its image; returns (box or None, reason).

    Args:
      x, y, w, h: the box in pixels of the file (top-left corner, size).
      width, height: the file's size in pixels.

    Returns:
      `(box, "")` for a box inside the image, `(box, note)` for one that
      reaches more than one pixel outside it (clipped to the image), and
      `(None, reason)` for one refused: a coordinate not finite, a size not
      positive, or less than one pixel of width or height inside the image.
      `box` is [xmin, ymin, xmax, ymax] normalised by the image.
    """
    values = (x, y, w, h)
    text = f"box [x={x}, y={y}, w={w}, h={h}]"
    if not all(math.isfinite(v) for v in values):
        return None, f"{text} has a coordinate that is not finite"
    if w <= 0 or h <= 0:
        return None, f"{text} has a size that is not positive"
    corners = np.array([x, y, x + w, y + h], dtype=np.float64)
    if not np.isfinite(corners).all():
        return None, f"{text} reaches past the largest float"
    clipped = np.clip(corners, 0.0, [width, height, width, height])
    inside_w = clipped[2] - clipped[0]
    inside_h = clipped[3] - clipped[1]
    if inside_w < 1.0 or inside_h < 1.0:
        if (corners == clipped).all():
            return None, f"{text} is less than one pixel wide or high"
        return None, (
            f"{text} lies outside the {width}x{height} image "
            f"({inside_w:g}x{inside_h:g} px inside); not written"
        )
    box = clipped / np.array([width, height, width, height], dtype=np.float64)
    if np.abs(corners - clipped).max() > 1.0:
        return box, (
            f"{text} extends outside the {width}x{height} image; clipped"
        )
    return box, ""


def encode_item(item, image_size, orientation="auto"):
    """Reads, decodes, resizes and serializes one work item.

    Args:
      item: dict from the driver (image_id, path, split, shard, labels, boxes
        in 1024-image pixels [x, y, w, h], box_labels, ...).
      image_size: longer side of the stored image (0 keeps it).
      orientation: DICOM orientation, "auto" or "header" (see
        `cxr_tf.data.images.decode_image`).

    Returns:
      `(serialized_example, None, notes)` on success, or `(None, skip, [])`
      with `skip` a report entry {"row", "image_id", "reason", "detail"}.
      `notes` are report entries {"kind", "row", "image_id", "reason"}:
      kind "box_note" for a box clipped to the image, "box_skipped" for a
      box refused by `check_box` (not written), "orientation_corrected"
      for a DICOM inverted because its content contradicts its header.
    """

    def skip(reason, detail):
        entry = {"row": item["row"], "image_id": item["image_id"], "reason": reason}
        entry["detail"] = detail
        return None, entry, []

    try:
        with FileSystems.open(
            item["path"], compression_type=CompressionTypes.UNCOMPRESSED
        ) as f:
            data = f.read()
    except (OSError, IOError) as e:
        return skip(UNREADABLE_FILE, f"{item['path']}: {e}")
    try:
        pixels, info = images.decode_image_with_info(
            data, name=item["path"], orientation=orientation
        )
    except images.ImageDecodeError as e:
        return skip(CORRUPT_IMAGE, str(e))
    except Exception as e:  # pylint: disable=broad-except
        # A decoder bug on one odd file must not stop a 100k-image job; the
        # row is reported with the error instead.
        return skip(CORRUPT_IMAGE, f"{item['path']}: {type(e).__name__}: {e}")
    original_h, original_w = pixels.shape
    stored = preprocess.resize_longer_side(pixels, image_size)
    height, width = stored.shape

    notes = []
    if info.orientation_corrected:
        notes.append(
            {
                "kind": "orientation_corrected",
                "row": item["row"],
                "image_id": item["image_id"],
                "reason": f"{item['path']}: the content is a chest film's negative "
                f"under PhotometricInterpretation {info.photometric}; stored "
                "inverted (dicom_orientation='header' keeps the header's)",
            }
        )
    boxes, box_labels = [], []
    for (x, y, w, h), label, row in zip(
        item["boxes"], item["box_labels"], item["box_rows"]
    ):
        box, reason = check_box(x, y, w, h, original_w, original_h)
        if box is None:
            notes.append(
                {
                    "kind": "box_skipped",
                    "row": row,
                    "image_id": item["image_id"],
                    "reason": reason,
                }
            )
            continue
        if reason:
            notes.append(
                {
                    "kind": "box_note",
                    "row": row,
                    "image_id": item["image_id"],
                    "reason": reason,
                }
            )
        boxes.append(box)
        box_labels.append(label)
    example = tfrecord.make_example(
        encode_png(stored),
        image_id=item["image_id"],
        labels=item["labels"],
        height=height,
        width=width,
        patient_id=item["patient_id"],
        original_height=original_h,
        original_width=original_w,
        boxes=np.array(boxes, np.float32).reshape(-1, 4),
        box_labels=box_labels,
        view_position=item["view_position"],
        age=item["age"],
        sex=item["sex"],
    )
    return example.SerializeToString(), None, notes


# The driver logs progress at least this often while Beam encodes films.
PROGRESS_INTERVAL_S = 10.0


def _format_seconds(seconds):
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


class FilmTally:
    """Counts films done, one byte per film, in a local folder.

    Each Beam worker process appends to its own file (O_APPEND), so any
    DirectRunner mode counts without a shared lock, and the driver sums the
    file sizes. A worker on another machine (Flink, Dataflow) has no such
    folder: its tally stays silent and only the final count is logged.

    Args:
      folder: the folder the driver watches (made by the driver).
    """

    def __init__(self, folder):
        self.folder = folder
        self._fd = None

    def __getstate__(self):
        return {"folder": self.folder, "_fd": None}

    def add(self):
        """Counts one film (never raises: progress must not fail a job)."""
        if self._fd is None:
            name = os.path.join(self.folder, f"{os.getpid()}-{uuid.uuid4().hex}")
            try:
                self._fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            except OSError:
                self._fd = -1
        if self._fd >= 0:
            try:
                os.write(self._fd, b".")
            except OSError:
                pass

    def close(self):
        if self._fd is not None and self._fd >= 0:
            os.close(self._fd)
        self._fd = None

    def count(self):
        """Films counted so far, by every process."""
        total = 0
        try:
            with os.scandir(self.folder) as found:
                for entry in found:
                    total += entry.stat().st_size
        except OSError:
            pass
        return total


class IngestProgress:
    """Logs films done, films per second and ETA while the Beam job runs.

    A daemon thread in the driver reads `FilmTally.count()` every
    `interval_s` and logs one line; `stop()` logs the final count and rate.
    The rate is taken over the last `RATE_WINDOW_S` seconds, from the first
    film on, so the workers' start-up (tens of seconds for multi_processing)
    does not drag the ETA.

    Args:
      tally: a `FilmTally`.
      total: films the job will encode.
      interval_s: seconds between lines.
      clock: seconds since some origin (tests pass a fake).
      log: where lines go (`logging.info`-like, %-style arguments).
    """

    RATE_WINDOW_S = 30.0

    def __init__(
        self,
        tally,
        total,
        interval_s=PROGRESS_INTERVAL_S,
        clock=time.monotonic,
        log=None,
    ):
        self.tally = tally
        self.total = int(total)
        self.interval_s = float(interval_s)
        self._clock = clock
        self._log = log or logging.info
        self._stop = threading.Event()
        self._thread = None
        self._reset()

    def _reset(self):
        self._start = self._clock()
        self._idle_until = self._start  # last time no film was done yet
        self._all_done_at = None
        self._samples = []  # (time, films done) of each line

    def _rate(self, now, done):
        ref_t, ref_done = self._idle_until, 0
        for t, d in self._samples:
            if t >= now - self.RATE_WINDOW_S and t >= self._idle_until:
                ref_t, ref_done = t, d
                break
        if now <= ref_t or done <= ref_done:
            return done / max(now - self._idle_until, 1e-9)
        return (done - ref_done) / (now - ref_t)

    def line(self, done=None):
        """One progress line: count, rate and ETA (or the phase)."""
        done = self.tally.count() if done is None else done
        now = self._clock()
        elapsed = _format_seconds(now - self._start)
        if done == 0:
            self._idle_until = now
            text = (
                f"ingest: 0/{self.total} films, starting the Beam workers "
                f"({elapsed} elapsed)"
            )
        elif done < self.total:
            rate = self._rate(now, done)
            eta = _format_seconds((self.total - done) / max(rate, 1e-9))
            text = (
                f"ingest: {done}/{self.total} films, {rate:.1f} films/s, ETA {eta}"
            )
        else:
            if self._all_done_at is None:
                self._all_done_at = now
            text = (
                f"ingest: {done}/{self.total} films encoded, writing the shards "
                f"({elapsed} elapsed)"
            )
        self._samples.append((now, done))
        return text

    def final_line(self, done=None):
        """The closing line: films, total time and mean rate of the encoding."""
        done = self.tally.count() if done is None else done
        now = self._clock()
        end = self._all_done_at or now
        rate = done / max(end - self._idle_until, 1e-9)
        return (
            f"ingest: {done}/{self.total} films in {_format_seconds(now - self._start)}"
            f", {rate:.1f} films/s once the workers ran"
        )

    def _run(self):
        while not self._stop.wait(self.interval_s):
            self._log("%s", self.line())

    def start(self):
        self._reset()
        self._thread = threading.Thread(
            target=self._run, name="ingest-progress", daemon=True
        )
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._log("%s", self.final_line())


def write_shard(output_dir, split, shard, num_shards, records):
    """Writes one sorted shard atomically (temp name, then rename).

    Args:
      output_dir: record folder.
      split: split name.
      shard: shard index.
      num_shards: shards of the split.
      records: iterable of (image_id, serialized example).

    Returns:
      The image ids written, in file order.
    """
    records = sorted(records, key=lambda r: r[0])
    name = SHARD_TEMPLATE.format(split=split, shard=shard, num_shards=num_shards)
    path = tf.io.gfile.join(output_dir, name)
    tmp = tf.io.gfile.join(output_dir, f".{name}.{uuid.uuid4().hex}.tmp")
    options = tf.io.TFRecordOptions(compression_type="GZIP")
    with tf.io.TFRecordWriter(tmp, options) as writer:
        for _, serialized in records:
            writer.write(serialized)
    tf.io.gfile.rename(tmp, path, overwrite=True)
    return [image_id for image_id, _ in records]


@beam.typehints.with_output_types(
    typing.Tuple[typing.Tuple[str, int, int], typing.Tuple[str, bytes]]
)
class _EncodeFn(beam.DoFn):
    """Work item -> ((split, shard, num_shards), (image_id, record)) or events."""

    def __init__(self, image_size, orientation, tally=None):
        super().__init__()
        self._image_size = image_size
        self._orientation = orientation
        self._tally = tally

    def process(self, item):
        serialized, skipped, notes = encode_item(
            item, self._image_size, self._orientation
        )
        if self._tally is not None:
            self._tally.add()
        for note in notes:
            yield beam.pvalue.TaggedOutput("events", note)
        if skipped is not None:
            yield beam.pvalue.TaggedOutput("events", dict(skipped, kind="skipped"))
            return
        key = (item["split"], item["shard"], item["num_shards"])
        yield key, (item["image_id"], serialized)

    def teardown(self):
        if self._tally is not None:
            self._tally.close()


class _WriteShardFn(beam.DoFn):
    """Writes one shard's records; emits the ids written."""

    def __init__(self, output_dir):
        super().__init__()
        self._output_dir = output_dir

    def process(self, key_records):
        (split, shard, num_shards), records = key_records
        ids = write_shard(self._output_dir, split, shard, num_shards, records)
        yield {"kind": "written", "split": split, "shard": shard, "image_ids": ids}


def _build_pipeline(pipeline, work, config, tmp_dir, tally=None):
    """Adds the ingest transforms to `pipeline`."""
    encoded = (
        pipeline
        | "Create" >> beam.Create(work)
        # Spreads the decoding over the workers (Create gives one bundle).
        | "Spread" >> beam.Reshuffle()
        | "Encode"
        >> beam.ParDo(
            _EncodeFn(config.image_size, config.dicom_orientation, tally)
        ).with_outputs("events", main="records")
    )
    written = (
        encoded.records
        | "GroupByShard" >> beam.GroupByKey()
        | "WriteShards" >> beam.ParDo(_WriteShardFn(config.output_dir))
    )
    _ = (
        (written, encoded.events)
        | "Events" >> beam.Flatten()
        | "ToJson" >> beam.Map(json.dumps, sort_keys=True)
        | "WriteEvents"
        >> beam.io.WriteToText(
            os.path.join(tmp_dir, "events"), file_name_suffix=".jsonl"
        )
    )


@contextlib.contextmanager
def _importable_in_workers():
    """Puts this package on PYTHONPATH while DirectRunner starts its workers.

    multi_processing workers are fresh interpreters; without this they find
    `cxr_tf` only when the job is launched from the checkout's root.
    """
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = root + (os.pathsep + old if old else "")
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def _pipeline_options(config, pipeline_args):
    args = list(pipeline_args)
    given = {a.split("=", 1)[0].lstrip("-") for a in args if a.startswith("--")}
    defaults = {}
    if "runner" not in given:
        # The DirectRunner's own engine, named outright: `DirectRunner` would
        # first try to download and start Prism, which needs the network.
        defaults["runner"] = _LOCAL_RUNNER
    if "direct_num_workers" not in given:
        defaults["direct_num_workers"] = config.num_workers or os.cpu_count() or 1
    if "direct_running_mode" not in given:
        defaults["direct_running_mode"] = config.running_mode
    return PipelineOptions(args, **defaults)


def _existing_records(output_dir):
    found = []
    for split in schema.SPLITS:
        pattern = tf.io.gfile.join(
            output_dir, schema.TFRECORD_PATTERN.format(split=split)
        )
        found.extend(sorted(tf.io.gfile.glob(pattern)))
    return found


def _plan(config, tables, image_files):
    """Reads the tables; returns (work items, report skeleton, skipped rows)."""
    entries, problems = metadata.read_data_entry(tables["data_entry"])
    skipped = []
    warnings = []
    for p in problems:
        entry = {
            "row": int(p["row"]),
            "image_id": p.get("image_id") or "",
            "detail": p["reason"],
            "file": p["file"],
        }
        if p.get("dropped", True):
            skipped.append(dict(entry, reason=_problem_reason(p["reason"])))
        else:
            warnings.append(entry)
    rows_read = len(entries) + len(skipped)

    box_skipped = []
    boxes_by_image = collections.defaultdict(list)
    box_rows_read = 0
    if tables["bbox_list"]:
        bbox_problems = []
        bbox = metadata.read_bbox_list(tables["bbox_list"], problems=bbox_problems)
        box_rows_read = len(bbox) + len(bbox_problems)
        box_skipped.extend(
            {
                "row": int(p["row"]),
                "image_id": p.get("image_id") or "",
                "reason": p["reason"],
            }
            for p in bbox_problems
        )
        for rec in bbox.itertuples(index=False):
            boxes_by_image[rec.image_id].append(
                (
                    [float(rec.x), float(rec.y), float(rec.w), float(rec.h)],
                    schema.FINDINGS.index(rec.finding),
                    int(rec.row),
                )
            )

    train_val_ids = (
        metadata.read_image_list(tables["train_val_list"])
        if tables["train_val_list"]
        else None
    )
    test_ids = (
        metadata.read_image_list(tables["test_list"]) if tables["test_list"] else None
    )
    try:
        splits = metadata.split_by_patient(
            entries,
            train_val_ids=train_val_ids,
            test_ids=test_ids,
            val_fraction=config.val_fraction,
            test_fraction=config.test_fraction,
            seed=config.seed,
        )
    except metadata.PatientLeakError as e:
        lists = [tables[k] for k in ("train_val_list", "test_list") if tables[k]]
        raise metadata.PatientLeakError(
            e.what, " and ".join(lists) or tables["data_entry"], e.fix
        ) from None
    split_of = {}
    for split in schema.SPLITS:
        for image_id in splits.get(split, []):
            split_of[image_id] = split

    present = collections.defaultdict(list)
    duplicate_files = []
    # Plain object arrays: iterating Arrow-backed pandas columns row by row
    # costs seconds on the 112k-row table.
    ids = entries["image_id"].to_numpy(object)
    rows = entries["row"].to_numpy(np.int64)
    patient_ids = entries["patient_id"].astype(str).to_numpy(object)
    for i, image_id in enumerate(ids):
        split = split_of.get(image_id)
        if split is None:
            skipped.append(
                {"row": int(rows[i]), "image_id": image_id, "reason": NOT_IN_SPLIT_LIST}
            )
            continue
        paths = image_files.get(image_id)
        if not paths:
            skipped.append(
                {"row": int(rows[i]), "image_id": image_id, "reason": MISSING_FILE}
            )
            continue
        if len(paths) > 1:
            duplicate_files.append(
                {"image_id": image_id, "paths": paths, "used": paths[0]}
            )
        rec = entries.iloc[i]
        found_boxes = boxes_by_image.get(image_id, [])
        age = float(rec["age"])
        present[split].append(
            {
                "image_id": image_id,
                "path": paths[0],
                "split": split,
                "row": int(rows[i]),
                "patient_id": patient_ids[i],
                "labels": [int(v) for v in rec["labels"]],
                "view_position": str(rec["view_position"] or ""),
                "age": None if math.isnan(age) else age,
                "sex": str(rec["sex"] or ""),
                "boxes": [b[0] for b in found_boxes],
                "box_labels": [b[1] for b in found_boxes],
                "box_rows": [b[2] for b in found_boxes],
            }
        )

    # A box row whose image is not ingested is reported with the reason.
    with_work = {it["image_id"] for items in present.values() for it in items}
    row_skip = {}
    for entry in skipped:
        row_skip.setdefault(entry["image_id"], entry)
    for image_id, found_boxes in boxes_by_image.items():
        if image_id in with_work:
            continue
        entry = row_skip.get(image_id)
        reason = (
            f"image not ingested: Data_Entry row {entry['row']} skipped "
            f"({entry['reason']})"
            if entry
            else "image not in Data_Entry"
        )
        box_skipped.extend(
            {"row": row, "image_id": image_id, "reason": reason}
            for _, _, row in found_boxes
        )

    work = []
    num_shards = {}
    for split in schema.SPLITS:
        items = sorted(present.get(split, []), key=lambda it: it["image_id"])
        count = _shard_count(len(items), config)
        num_shards[split] = count
        for rank, item in enumerate(items):
            # Contiguous ranges of the sorted ids: the same input always
            # gives the same files with the same content in the same order.
            item.update(shard=rank * count // len(items), num_shards=count)
            work.append(item)

    listed = set(entries["image_id"].to_numpy(object)) | {
        p.get("image_id") for p in problems
    }
    unlisted = sum(1 for name in image_files if name not in listed)
    plan = {
        "rows_read": rows_read,
        "metadata_warnings": warnings,
        "box_rows_read": box_rows_read,
        "box_skipped": box_skipped,
        "num_shards": num_shards,
        "unlisted_image_files": unlisted,
        "duplicate_image_files": duplicate_files,
        "patients": dict(zip(ids, patient_ids)),
    }
    return work, plan, skipped


def run_ingest(config, pipeline_args=(), progress_interval_s=PROGRESS_INTERVAL_S):
    """Runs the ingestion job and writes `ingest_report.json`.

    Tables are located (or taken from the config) and read in the driver,
    which also lists the image folders once: rows without a file never reach
    Beam. The Beam job decodes, resizes and encodes each image and writes
    each split's shards (`{split}-SSSSS-of-NNNNN.tfrecord.gz`, GZIP), sorted
    by image id within contiguous id ranges so reruns give identical files.

    Args:
      config: `IngestConfig`.
      pipeline_args: Beam pipeline options, passed through unparsed
        (`--runner=FlinkRunner`, `--direct_num_workers=4`, ...).
      progress_interval_s: seconds between the progress lines (films done,
        films per second, ETA) logged while Beam encodes.

    Returns:
      The report dict (also written to `output_dir/ingest_report.json`):
      "rows_read" == "rows_written" + "rows_skipped", "written" per split,
      "skipped" (every skipped row: row, image_id, reason, detail; "file"
      too for a row the table reader refused),
      "skipped_by_reason"; for BBox_List rows "box_rows_read" ==
      "boxes_written" + "box_rows_skipped", "box_skipped" (every box row not
      written: row, image_id, reason), "box_notes" (boxes clipped to their
      image); "orientation_corrected" (DICOMs inverted because their
      content contradicts their header: row, image_id, reason),
      "skipped_folders" (folder links not followed: loops, second paths to
      a folder; unreadable folders), "unlisted_image_files", ...

    Raises:
      UserFileError: `data_dir` or a named table is missing, or no
        Data_Entry table is found.
      UserValueError: a table cannot be used (a required column missing, a
        damaged image list); `metadata.PatientLeakError` when the split
        lists put a patient in two splits (names the patients and lists).
      AmbiguousTableError: two candidates for a table (names both).
      RecordsExistError: `output_dir` already holds records and `overwrite`
        is False (a `FileExistsError`).
      SkipFractionExceededError: more than `max_skip_fraction` of the rows
        were skipped (raised after writing the records and the report).
      All of these are `cxr_tf.errors.UserError`: one line, no traceback.
    """
    if not isinstance(config, IngestConfig):
        raise ValueError(f"`config` must be an IngestConfig. Received: {config!r}")
    if not _exists(config.data_dir):
        raise errors.UserFileError(
            "`data_dir` not found", config.data_dir, "pass an existing folder"
        )
    logging.info("Ingest config: %s", json.dumps(config.to_dict(), sort_keys=True))
    try:
        tf.io.gfile.makedirs(config.output_dir)
    except tf.errors.OpError as e:
        raise errors.UserFileError(
            f"cannot create the output folder: {e.message}",
            config.output_dir,
            "pass a folder you can write to with --output_dir",
        ) from None
    existing = _existing_records(config.output_dir)
    if existing and not config.overwrite:
        raise RecordsExistError(
            f"the folder already holds {len(existing)} record file(s), e.g. "
            f"{os.path.basename(existing[0])!r}",
            config.output_dir,
            "pass --overwrite or another --output_dir",
        )
    for path in existing:
        tf.io.gfile.remove(path)

    skipped_folders = []
    found, image_files = scan_data_dir(
        config.data_dir, skip_dir=config.output_dir, skipped_folders=skipped_folders
    )
    if skipped_folders:
        shown = "; ".join(
            f"{f['path']} -> {f['target'] or '?'} ({f['reason']})"
            for f in skipped_folders[:3]
        )
        more = len(skipped_folders) - 3
        logging.warning(
            "ingest: %d folder(s) not walked (each real folder is listed once): "
            "%s%s; see skipped_folders in %s",
            len(skipped_folders),
            shown,
            f" and {more} more" if more > 0 else "",
            schema.INGEST_REPORT,
        )
    tables = resolve_tables(config, found)
    logging.info("Tables: %s; %d image files", tables, len(image_files))
    work, plan, skipped = _plan(config, tables, image_files)
    plan["skipped_folders"] = skipped_folders
    logging.info(
        "%d rows read, %d with an image file go to Beam, %d skipped before",
        plan["rows_read"],
        len(work),
        len(skipped),
    )

    tmp_dir = os.path.join(config.output_dir, f".ingest_tmp_{uuid.uuid4().hex}")
    tf.io.gfile.makedirs(tmp_dir)
    written = {split: [] for split in schema.SPLITS}
    box_notes = []
    box_skipped = []
    corrected = []
    try:
        if work:
            options = _pipeline_options(config, pipeline_args)
            tally = FilmTally(tempfile.mkdtemp(prefix="cxr_tf_ingest_progress_"))
            progress = IngestProgress(tally, len(work), progress_interval_s)
            try:
                with _importable_in_workers(), beam.Pipeline(options=options) as p:
                    progress.start()
                    _build_pipeline(p, work, config, tmp_dir, tally)
            finally:
                progress.stop()
                shutil.rmtree(tally.folder, ignore_errors=True)
        for path in sorted(tf.io.gfile.glob(os.path.join(tmp_dir, "events*"))):
            with tf.io.gfile.GFile(path) as f:
                for line in f:
                    event = json.loads(line)
                    kind = event.pop("kind")
                    if kind == "written":
                        written[event["split"]].extend(event["image_ids"])
                    elif kind == "skipped":
                        skipped.append(event)
                    elif kind == "orientation_corrected":
                        corrected.append(event)
                    elif kind == "box_skipped":
                        box_skipped.append(event)
                    else:
                        box_notes.append(event)
    finally:
        if _is_remote(tmp_dir):
            tf.io.gfile.rmtree(tmp_dir)
        else:
            shutil.rmtree(tmp_dir, ignore_errors=True)

    # A shard whose every image failed to decode still gets its (empty) file,
    # so each split has exactly NNNNN files.
    options = tf.io.TFRecordOptions(compression_type="GZIP")
    for split, count in plan["num_shards"].items():
        for shard in range(count):
            name = SHARD_TEMPLATE.format(split=split, shard=shard, num_shards=count)
            path = tf.io.gfile.join(config.output_dir, name)
            if not tf.io.gfile.exists(path):
                with tf.io.TFRecordWriter(path, options):
                    pass

    report = _report(
        config, tables, plan, written, skipped, box_notes, box_skipped, corrected, work
    )
    path = tf.io.gfile.join(config.output_dir, schema.INGEST_REPORT)
    with tf.io.gfile.GFile(path, "w") as f:
        f.write(report_to_json(report))
    logging.info(
        "Wrote %s: %d read, %d written %s, %d skipped %s",
        path,
        report["rows_read"],
        report["rows_written"],
        report["written"],
        report["rows_skipped"],
        report["skipped_by_reason"],
    )
    if report["skip_fraction"] > config.max_skip_fraction:
        raise SkipFractionExceededError(
            f"{report['rows_skipped']} of {report['rows_read']} rows skipped "
            f"({report['skip_fraction']:.2%}), more than max_skip_fraction="
            f"{config.max_skip_fraction}: {report['skipped_by_reason']}",
            report,
            path,
            "every skipped row is listed there with its reason; fix the data or "
            "raise --max_skip_fraction",
        )
    return report


def report_to_json(report):
    """Serialises a report: readable summary, one line per listed row.

    Pretty-printed, 112k skipped rows take 560k lines; one compact line per
    row keeps the file greppable (`grep corrupt_image`) and ~15 % smaller.
    """
    parts = []
    for key in sorted(report):
        value = report[key]
        if isinstance(value, list) and value and isinstance(value[0], dict):
            rows = ",\n  ".join(json.dumps(v, sort_keys=True) for v in value)
            text = f"[\n  {rows}\n ]"
        else:
            text = json.dumps(value, indent=1, sort_keys=True).replace("\n", "\n ")
        parts.append(f" {json.dumps(key)}: {text}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def _box_accounts(plan, work, written_ids, skipped, box_skipped):
    """Returns (boxes written, every box row skipped with its reason)."""
    refused = {b["row"] for b in box_skipped}
    skip_of = {}
    for entry in skipped:
        skip_of.setdefault(entry["image_id"], entry)
    box_skipped = list(plan["box_skipped"]) + list(box_skipped)
    boxes_written = 0
    for item in work:
        if item["image_id"] in written_ids:
            boxes_written += sum(1 for r in item["box_rows"] if r not in refused)
            continue
        entry = skip_of.get(item["image_id"], {"row": item["row"], "reason": "?"})
        box_skipped.extend(
            {
                "row": row,
                "image_id": item["image_id"],
                "reason": f"image not ingested: Data_Entry row {entry['row']} "
                f"skipped ({entry['reason']})",
            }
            for row in item["box_rows"]
        )
    box_skipped.sort(key=lambda b: (b["row"], b["image_id"]))
    if boxes_written + len(box_skipped) != plan["box_rows_read"]:
        raise RuntimeError(
            f"Ingest box accounting is off: {plan['box_rows_read']} box rows read "
            f"but {boxes_written} written + {len(box_skipped)} skipped. This is a "
            "bug in cxr_tf."
        )
    return boxes_written, box_skipped


def _report(
    config, tables, plan, written, skipped, box_notes, box_skipped, corrected, work
):
    patients = plan["patients"]
    rows_written = sum(len(ids) for ids in written.values())
    skipped = sorted(skipped, key=lambda s: (s["row"], s["image_id"]))
    rows_read = plan["rows_read"]
    if rows_written + len(skipped) != rows_read:
        raise RuntimeError(
            f"Ingest accounting is off: {rows_read} rows read but {rows_written} "
            f"written + {len(skipped)} skipped. This is a bug in cxr_tf."
        )
    written_ids = {i for ids in written.values() for i in ids}
    boxes_written, box_skipped = _box_accounts(
        plan, work, written_ids, skipped, box_skipped
    )
    patients_per_split = {
        split: len({patients[i] for i in ids}) for split, ids in written.items()
    }
    return {
        "config": config.to_dict(),
        "tables": tables,
        "rows_read": rows_read,
        "rows_written": rows_written,
        "rows_skipped": len(skipped),
        "skip_fraction": len(skipped) / rows_read if rows_read else 0.0,
        "written": {split: len(ids) for split, ids in written.items()},
        "num_shards": plan["num_shards"],
        "patients": patients_per_split,
        "skipped_by_reason": dict(
            sorted(collections.Counter(s["reason"] for s in skipped).items())
        ),
        "skipped": skipped,
        "metadata_warnings": plan["metadata_warnings"],
        "box_rows_read": plan["box_rows_read"],
        "boxes_written": boxes_written,
        "box_rows_skipped": len(box_skipped),
        "box_skipped": box_skipped,
        "box_notes": sorted(box_notes, key=lambda b: (b["row"], b["image_id"])),
        "orientation_corrected": sorted(
            corrected, key=lambda c: (c["row"], c["image_id"])
        ),
        "unlisted_image_files": plan["unlisted_image_files"],
        "duplicate_image_files": plan["duplicate_image_files"],
        "skipped_folders": plan["skipped_folders"],
    }
