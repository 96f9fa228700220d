"""Exports a trained model as a TF Serving SavedModel: preprocessing, maps, boxes."""

import dataclasses
import datetime
import json
import os
import re
import shutil
import tempfile

import numpy as np
import tensorflow as tf
from absl import logging

from cxr_tf import config_dict
from cxr_tf import errors
from cxr_tf import localization
from cxr_tf import localization_graph
from cxr_tf import model_dir
from cxr_tf.data import image_header
from cxr_tf.data import preprocess
from cxr_tf.data import schema
from serving import contract as serving_contract

WARMUP_FILE = "tf_serving_warmup_requests"
SERVING_SIGNATURE = serving_contract.SERVING_SIGNATURE
PIXELS_SIGNATURE = serving_contract.PIXELS_SIGNATURE
MODEL_INFO_SIGNATURE = serving_contract.MODEL_INFO_SIGNATURE
OUTPUT_KEYS = serving_contract.OUTPUT_KEYS
_VERSION_DIR = re.compile(r"^\d+$")

INTENDED_USE = (
    "Research on weakly supervised localization of thoracic findings in "
    "frontal chest radiographs (ChestX-ray14 style). Not a medical device: "
    "not for diagnosis, triage or any clinical decision."
)
LIMITS = (
    "Trained on image-level labels mined from radiology reports (noisy, "
    "about 90% accurate per the NIH data set description); boxes come from "
    "thresholded localization maps and were never supervised with boxes.",
    "Frontal (PA/AP) adult chest films only; other views, paediatric films "
    "and other modalities are out of scope.",
    "Preprocessing shrinks films to the longer side the training records "
    "were stored at (ingest_image_size in preprocessing.json), then "
    "letterboxes them to the network input, as training saw them.",
    "JPEG EXIF orientation is not applied in the graph; send upright images.",
    "16-bit PNGs are min-max scaled to 8 bits per image, as at ingestion; "
    "DICOM must be decoded by the client (serving/client.py does).",
)


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """What `export_saved_model` needs.

    Attributes:
      model_path: a trained `.keras` file, or a model directory holding
        model.keras and config.json (as written by training).
      export_dir: the TF Serving model base path; the export goes to
        export_dir/version.
      version: positive int; None = one more than the newest existing version
        (1 for an empty directory).
      threshold: map threshold for every finding (probability scale for
        "probability" maps, 0..255 for "cam"); None = the model's own
        (config.json `box_thresholds`), else
        `localization.DEFAULT_THRESHOLDS[map_kind]`.
      class_thresholds: (finding, threshold) pairs overriding `threshold`.
      max_boxes: boxes kept per finding (N of the padded outputs).
      box_work_size: the longer side at which regions are found (see
        `localization.working_hw`; default `localization.DEFAULT_WORK_SIZE`,
        as predict), bounding the latency of large images; None for exact
        boxes at any size.
      model_config_path: config.json to use when none sits next to the model.
      checkpoint: which model of a model directory (`model_dir.resolve`).
      metrics_path: metrics.json of the evaluation of this very model, for
        the model card; None: metrics.json in the model directory, if any.
      overwrite: replace an existing export_dir/version.
      warmup_batch_sizes: batch sizes of the warm-up requests written.
    """

    model_path: str
    export_dir: str
    version: int | None = None
    threshold: float | None = None
    class_thresholds: tuple = ()
    max_boxes: int = 10
    box_work_size: int | None = localization.DEFAULT_WORK_SIZE
    model_config_path: str | None = None
    checkpoint: str = "final"
    metrics_path: str | None = None
    overwrite: bool = False
    warmup_batch_sizes: tuple = (1,)

    def __post_init__(self):
        if isinstance(self.class_thresholds, dict):
            object.__setattr__(
                self, "class_thresholds", tuple(sorted(self.class_thresholds.items()))
            )
        config_dict.check_int("version", self.version, optional=True)
        config_dict.check_int("max_boxes", self.max_boxes)
        if self.threshold is not None and not np.isfinite(self.threshold):
            raise ValueError(
                f"`threshold` must be a finite number. Received: {self.threshold!r}"
            )
        for name, value in self.class_thresholds:
            schema.canonical_finding(name)
            if not isinstance(value, (int, float)) or not np.isfinite(value):
                raise ValueError(
                    f"Threshold of {name!r} must be a finite number. "
                    f"Received: {value!r}"
                )
        if not self.warmup_batch_sizes or any(
            not isinstance(b, int) or b < 1 for b in self.warmup_batch_sizes
        ):
            raise ValueError(
                "`warmup_batch_sizes` must be positive ints. "
                f"Received: {self.warmup_batch_sizes!r}"
            )

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["class_thresholds"] = dict(self.class_thresholds)
        d["warmup_batch_sizes"] = list(self.warmup_batch_sizes)
        return d


def resolve_thresholds(findings, map_kind, threshold=None, class_thresholds=()):
    """Per-finding map thresholds.

    Returns:
      Tuple of floats, one per finding.

    Raises:
      ValueError: a class threshold names a finding the model lacks.
    """
    default = (
        localization.DEFAULT_THRESHOLDS[map_kind] if threshold is None else threshold
    )
    values = {f: float(default) for f in findings}
    for name, value in dict(class_thresholds).items():
        name = schema.canonical_finding(name)
        if name not in values:
            raise ValueError(
                f"Threshold given for {name!r}, which is not a finding of the "
                f"model ({list(findings)})"
            )
        values[name] = float(value)
    return tuple(values[f] for f in findings)


# ---------------------------------------------------------------------------
# Preprocessing in the graph.


def decode_grayscale(data):
    """Decodes PNG/JPEG/GIF/BMP bytes to (H, W, 1) uint8 as `data.images` does.

    8-bit gray is kept; R=G=B colour gives that channel, other colour images
    their ITU-R 601 luma with Pillow's integer rounding; alpha is ignored;
    16-bit PNGs are min-max scaled to 0..255 per image (rounded half to
    even, as numpy's rint).

    Args:
      data: scalar string tensor.

    Returns:
      uint8 tensor (H, W, 1).

    Raises:
      tf.errors.InvalidArgumentError: at run time, for an image refused from
        its header (`image_header.guard_image_bytes`: unknown format, more
        than `images.MAX_IMAGE_PIXELS` pixels) or undecodable.
    """
    # The header check runs before any decoder allocates the declared size.
    data = image_header.guard_image_bytes(data)
    # PNG bit depth sits at byte 24 of the IHDR chunk (substr past the end
    # would raise an error quoting the whole input).
    is_png = tf.equal(tf.strings.substr(data, 0, 8), b"\x89PNG\r\n\x1a\n")
    depth_at = tf.minimum(24, tf.strings.length(data))
    depth = tf.io.decode_raw(tf.strings.substr(data, depth_at, 1), tf.uint8)
    is_16bit = tf.logical_and(is_png, tf.reduce_any(tf.equal(depth, 16)))

    def from_16bit():
        image = tf.cast(tf.io.decode_png(data, channels=0, dtype=tf.uint16), tf.int32)
        gray = tf.cond(
            tf.shape(image)[-1] >= 3,
            # Pillow reads 16-bit colour PNGs at 8 bits per channel.
            lambda: _to_gray(image[..., :3] // 256),
            lambda: tf.cast(image[..., :1], tf.float64),
        )
        low = tf.reduce_min(gray)
        high = tf.reduce_max(gray)
        span = tf.where(high > low, high - low, tf.ones_like(high))
        scaled = tf.math.rint((gray - low) * (255.0 / span))
        scaled = tf.where(high > low, scaled, tf.zeros_like(scaled))
        return tf.cast(tf.clip_by_value(scaled, 0.0, 255.0), tf.uint8)

    def from_8bit():
        image = tf.cond(
            tf.equal(tf.strings.substr(data, 0, 3), b"\xff\xd8\xff"),
            # Pillow's JPEG decoding is libjpeg's accurate integer IDCT; TF's
            # default (fast) one differs by a few gray levels.
            lambda: tf.io.decode_jpeg(data, channels=0, dct_method="INTEGER_ACCURATE"),
            lambda: tf.io.decode_image(data, channels=0, expand_animations=False),
        )
        image = tf.cast(image, tf.int32)
        return tf.cond(
            tf.shape(image)[-1] >= 3,
            lambda: tf.cast(_to_gray(image[..., :3]), tf.uint8),
            lambda: tf.cast(image[..., :1], tf.uint8),
        )

    return tf.cond(is_16bit, from_16bit, from_8bit)


def _to_gray(rgb):
    """(H, W, 3) int32 0..255 -> (H, W, 1) float64 gray, Pillow's way."""
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    same = tf.reduce_all(tf.logical_and(tf.equal(red, green), tf.equal(red, blue)))
    # Pillow's RGB -> L: (R*19595 + G*38470 + B*7471 + 0x8000) >> 16.
    luma = (red * 19595 + green * 38470 + blue * 7471 + 0x8000) // 65536
    gray = tf.where(same, red, luma)
    return tf.cast(gray[..., tf.newaxis], tf.float64)


def preprocess_image_bytes(data, image_size, normalization, channels=1, ingest_size=None):
    """Encoded image -> normalised network input, as training saw it.

    decode (`decode_grayscale`) -> `cxr_tf.data.preprocess.preprocess_gray_tf`
    (ingestion's area downscale to the stored size, the input pipeline's
    letterbox to S x S, (x - mean) / std).

    Args:
      data: scalar string tensor (PNG/JPEG bytes).
      image_size: S.
      normalization: `schema.Normalization`.
      channels: network input channels (gray repeated for 3).
      ingest_size: the longer side the training films were stored at (None:
        S).

    Returns:
      (pixels float32 (S, S, channels), original (height, width) int32).
    """
    gray = decode_grayscale(data)
    hw = tf.shape(gray)[:2]
    pixels = preprocess.preprocess_gray_tf(
        gray, image_size, normalization, ingest_size, channels
    )
    return pixels, hw


# ---------------------------------------------------------------------------
# The exported module.


class ServingModule(tf.Module):
    """Signatures of the exported SavedModel around a Keras model.

    serving_default(image_bytes) and predict_pixels(pixels) return
    probabilities (B, K), localization_maps (B, K, h, w) in [0, 1], boxes
    (B, K, N, 4) [x, y, w, h], box_scores (B, K, N), num_boxes (B, K).
    model_info() returns findings, thresholds, the preprocessing JSON and the
    training-data JSON.
    """

    def __init__(
        self,
        model,
        model_config,
        findings,
        map_kind,
        thresholds,
        max_boxes=10,
        box_work_size=None,
        preprocessing_json="{}",
        ingest_size=None,
        training_data_json="{}",
    ):
        super().__init__(name="cxr_serving")
        self.ingest_size = ingest_size
        self.training_data_json = training_data_json
        self.model = model
        self.image_size = model_config.image_size
        self.channels = model_config.channels
        self.normalization = model_config.normalization
        self.findings = tuple(findings)
        self.map_kind = map_kind
        self.thresholds = tuple(float(t) for t in thresholds)
        self.max_boxes = max_boxes
        self.box_work_size = box_work_size
        self.preprocessing_json = preprocessing_json
        size, channels = self.image_size, self.channels
        self.serve_bytes = tf.function(
            self._serve_bytes,
            input_signature=[tf.TensorSpec([None], tf.string, name=serving_contract.BYTES_INPUT)],
            autograph=False,
        )
        self.serve_pixels = tf.function(
            self._serve_pixels,
            input_signature=[
                tf.TensorSpec(
                    [None, size, size, channels],
                    tf.float32,
                    name=serving_contract.PIXELS_INPUT,
                )
            ],
            autograph=False,
        )
        self.model_info = tf.function(
            self._model_info, input_signature=[], autograph=False
        )

    def _boxes(self, maps, image_hw):
        """Per-threshold-group boxes, reassembled in finding order."""
        groups = {}
        for k, t in enumerate(self.thresholds):
            groups.setdefault(t, []).append(k)
        parts, order = [], []
        for threshold, indices in groups.items():
            sub = maps if len(groups) == 1 else tf.gather(maps, indices, axis=-1)
            parts.append(
                localization_graph.extract_boxes_graph(
                    sub,
                    image_hw,
                    self.map_kind,
                    threshold=threshold,
                    max_boxes=self.max_boxes,
                    work_size=self.box_work_size,
                )
            )
            order.extend(indices)
        if len(parts) == 1:
            return parts[0]
        inverse = np.argsort(order)
        return tuple(
            tf.gather(tf.concat([p[i] for p in parts], axis=1), inverse, axis=1)
            for i in range(3)
        )

    def _run(self, pixels):
        outputs = self.model(pixels, training=False)
        maps = tf.cast(outputs["localization_maps"], tf.float32)
        return tf.cast(outputs["probabilities"], tf.float32), maps

    def _normalised_maps(self, maps):
        """(B, h, w, K) raw maps -> (B, K, h, w) in [0, 1]."""
        maps = tf.transpose(maps, [0, 3, 1, 2])
        if self.map_kind == "cam":
            low = tf.reduce_min(maps, axis=[2, 3], keepdims=True)
            high = tf.reduce_max(maps, axis=[2, 3], keepdims=True)
            span = high - low
            maps = tf.where(span > 0, (maps - low) / tf.where(span > 0, span, 1.0), 0.0)
        return tf.clip_by_value(maps, 0.0, 1.0)

    def _serve_bytes(self, image_bytes):
        def one(data):
            return preprocess_image_bytes(
                data,
                self.image_size,
                self.normalization,
                self.channels,
                self.ingest_size,
            )

        size = self.image_size
        pixels, hw = tf.map_fn(
            one,
            image_bytes,
            fn_output_signature=(
                tf.TensorSpec([size, size, self.channels], tf.float32),
                tf.TensorSpec([2], tf.int32),
            ),
        )
        probabilities, maps = self._run(pixels)
        side, off_y, off_x = preprocess.letterbox_geometry(
            hw[:, 0], hw[:, 1], size, self.ingest_size
        )
        # Boxes on the maps upsampled to the square the input covers, in
        # original pixels; for a square image this is extract_boxes(map, (H, W)).
        side_px = tf.cast(tf.round(side), tf.int32)
        boxes, scores, num_boxes = self._boxes(maps, tf.stack([side_px, side_px], 1))
        boxes = self._to_original(boxes, num_boxes, off_y, off_x, hw)
        return self._outputs(probabilities, maps, boxes, scores, num_boxes)

    def _to_original(self, boxes, num_boxes, off_y, off_x, hw):
        x, y, w, h = tf.unstack(boxes, axis=-1)
        x = x - off_x[:, None, None]
        y = y - off_y[:, None, None]
        height = tf.cast(hw[:, 0], tf.float32)[:, None, None]
        width = tf.cast(hw[:, 1], tf.float32)[:, None, None]
        # Clip to the image: a region may run into the letterbox padding.
        x0, y0 = tf.maximum(x, 0.0), tf.maximum(y, 0.0)
        x1, y1 = tf.minimum(x + w, width), tf.minimum(y + h, height)
        clipped = tf.stack(
            [x0, y0, tf.maximum(x1 - x0, 0.0), tf.maximum(y1 - y0, 0.0)], axis=-1
        )
        valid = tf.sequence_mask(num_boxes, self.max_boxes)[..., None]
        return tf.where(valid, clipped, 0.0)

    def _serve_pixels(self, pixels):
        probabilities, maps = self._run(pixels)
        batch = tf.shape(pixels)[0]
        hw = tf.fill([batch, 2], self.image_size)
        boxes, scores, num_boxes = self._boxes(maps, hw)
        return self._outputs(probabilities, maps, boxes, scores, num_boxes)

    def _outputs(self, probabilities, maps, boxes, scores, num_boxes):
        return {
            "probabilities": tf.identity(probabilities, name="probabilities"),
            "localization_maps": self._normalised_maps(maps),
            "boxes": boxes,
            "box_scores": scores,
            "num_boxes": tf.cast(num_boxes, tf.int32),
        }

    def _model_info(self):
        return {
            "findings": tf.constant(self.findings),
            "thresholds": tf.constant(self.thresholds, tf.float32),
            "preprocessing": tf.constant(self.preprocessing_json),
            # Where the training films came from (model_dir.training_data):
            # clients warn when a synthetic-trained model sees real films.
            "training_data": tf.constant(self.training_data_json),
        }


# ---------------------------------------------------------------------------
# Assets, model card, warm-up requests.


def preprocessing_dict(model_config, ingest_size=None):
    """What a client needs to feed `predict_pixels` (assets/preprocessing.json)."""
    norm = model_config.normalization
    stored = ingest_size or model_config.image_size
    return {
        "image_size": model_config.image_size,
        "ingest_image_size": stored,
        "channels": model_config.channels,
        "mean": float(norm.mean),
        "std": float(norm.std),
        "scale": "0..255 grayscale",
        "steps": [
            "decode PNG/JPEG (tf.io.decode_image, first frame); grayscale as "
            "cxr_tf.data.images (R=G=B -> R, else ITU-R 601 luma; 16-bit PNG "
            "min-max scaled to 8 bits)",
            "if the longer side exceeds ingest_image_size: resize to longer "
            "side ingest_image_size, aspect kept, with Pillow's BOX filter in "
            "8 bits (as ingestion; cxr_tf.data.preprocess.resize_longer_side)",
            "letterbox to image_size x image_size: bilinear (antialiased) "
            "resize of the longer side to image_size, zero padding centred "
            "(cxr_tf.data.preprocess.letterbox)",
            "(x - mean) / std",
        ],
    }


def read_metrics(trained, metrics_path=None):
    """The evaluation metrics the model card carries, or None.

    Args:
      trained: the `model_dir.LoadedModel` being exported.
      metrics_path: metrics.json of its evaluation; None looks for one in
        the model directory.

    Returns:
      The metrics dict, or None when there is none.

    Raises:
      UserValueError: `metrics_path` evaluated another model file than the
        one exported (checked by path and sha256 where recorded).
    """
    if metrics_path is None:
        candidate = os.path.join(
            os.path.dirname(os.path.abspath(trained.config_path)),
            model_dir.METRICS_FILE,
        )
        if not os.path.isfile(candidate):
            return None
        metrics_path = candidate
    elif not os.path.isfile(metrics_path):
        raise errors.UserFileError(
            "metrics file not found", f"--metrics={metrics_path}", "check the path"
        )
    with open(metrics_path, encoding="utf-8") as f:
        metrics = json.load(f)
    source = metrics.get("source") or {}
    digest = source.get("model_sha256")
    if digest and digest != model_dir.file_sha256(trained.path):
        raise errors.UserValueError(
            f"these metrics evaluated {source.get('model')}, not the model "
            f"exported ({trained.path})",
            metrics_path,
            "export the evaluated checkpoint (its path is source.model in the "
            "metrics), or evaluate this one",
        )
    return metrics


def build_model_card(trained, thresholds, config, metrics=None):
    """The model card written to assets/model_card.json.

    Args:
      trained: `model_dir.LoadedModel`.
      thresholds: per-finding thresholds.
      config: `ExportConfig`.
      metrics: the evaluation's metrics.json (`read_metrics`), or None.

    Returns:
      A JSON-serialisable dict.
    """
    train = trained.config_payload.get("train") if trained.config_payload else None
    return {
        "name": "cxr_tf chest X-ray classifier and weakly supervised localizer",
        "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "source_model": os.path.abspath(trained.keras_path),
        "model_config": trained.model_config.to_dict(),
        "map_kind": trained.map_kind,
        "findings": list(trained.findings),
        "box_thresholds": dict(zip(trained.findings, thresholds)),
        "max_boxes_per_finding": config.max_boxes,
        "training_data": {
            **(trained.training_data or {"source": "unknown (not recorded)"}),
            "labels": "image-level labels only (weak supervision)",
            "train_config": train,
        },
        "metrics": metrics,
        "intended_use": INTENDED_USE,
        "limits": list(LIMITS),
        "signatures": {
            SERVING_SIGNATURE: "image_bytes: string (B,) PNG/JPEG",
            PIXELS_SIGNATURE: (
                f"pixels: float32 (B, {trained.model_config.image_size}, "
                f"{trained.model_config.image_size}, "
                f"{trained.model_config.channels}) already preprocessed"
            ),
            "outputs": list(OUTPUT_KEYS),
        },
    }


def warmup_image(height=256, width=224, seed=0):
    """A synthetic PNG (gray gradient plus noise) for warm-up requests."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, width, dtype=np.float32)[None, :]
    image = ramp + rng.normal(0, 20, size=(height, width)).astype(np.float32)
    image = np.clip(image, 0, 255).astype(np.uint8)
    return tf.io.encode_png(image[..., None]).numpy()


def write_warmup_requests(
    path, image_size, channels, batch_sizes=(1,), model_name="cxr"
):
    """Writes TF Serving warm-up requests (PredictionLog TFRecords).

    One Predict request per batch size for each of serving_default (PNG
    bytes) and predict_pixels (zeros).

    Args:
      path: the assets.extra/tf_serving_warmup_requests file.
      image_size: S of predict_pixels.
      channels: channels of predict_pixels.
      batch_sizes: batch sizes to warm up.
      model_name: model name in the requests (TF Serving ignores it).

    Returns:
      The number of records written.
    """
    from tensorflow_serving.apis import (  # pylint: disable=g-import-not-at-top
        model_pb2,
        predict_pb2,
        prediction_log_pb2,
    )

    count = 0
    with tf.io.TFRecordWriter(path) as writer:
        for batch in batch_sizes:
            for signature, key, value in (
                (
                    SERVING_SIGNATURE,
                    "image_bytes",
                    np.array([warmup_image(seed=i) for i in range(batch)], object),
                ),
                (
                    PIXELS_SIGNATURE,
                    "pixels",
                    np.zeros((batch, image_size, image_size, channels), np.float32),
                ),
            ):
                request = predict_pb2.PredictRequest(
                    model_spec=model_pb2.ModelSpec(
                        name=model_name, signature_name=signature
                    )
                )
                request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
                log = prediction_log_pb2.PredictionLog(
                    predict_log=prediction_log_pb2.PredictLog(request=request)
                )
                writer.write(log.SerializeToString())
                count += 1
    return count


def next_version(export_dir):
    """One more than the newest numeric version under export_dir (1 if none)."""
    if not tf.io.gfile.isdir(export_dir):
        return 1
    versions = [
        int(n.rstrip("/"))
        for n in tf.io.gfile.listdir(export_dir)
        if _VERSION_DIR.match(n.rstrip("/"))
    ]
    return max(versions, default=0) + 1


def export_saved_model(config):
    """Exports the model of `config` to export_dir/version, atomically.

    The SavedModel is written to a hidden temporary directory inside
    export_dir and renamed to its version number once complete, so a server
    watching export_dir never sees a half-written version.

    Args:
      config: `ExportConfig`.

    Returns:
      The path of the version directory written.

    Raises:
      FileExistsError: the version exists and `overwrite` is False.
      UserFileError, UserValueError: see `model_dir.load` and `read_metrics`.
    """
    if not isinstance(config, ExportConfig):
        raise ValueError(f"`config` must be an ExportConfig. Received: {config!r}")
    trained = model_dir.load(
        config.model_path, config.checkpoint, config.model_config_path
    )
    # No --threshold: the model's own, chosen on validation at training.
    threshold = trained.box_threshold if config.threshold is None else config.threshold
    per_finding = {}
    if isinstance(threshold, model_dir.FindingThresholds):
        per_finding, threshold = threshold.as_dict(), None
    thresholds = resolve_thresholds(
        trained.findings,
        trained.map_kind,
        threshold,
        {**per_finding, **dict(config.class_thresholds)},
    )
    version = config.version or next_version(config.export_dir)
    final = os.path.join(config.export_dir, str(version))
    if os.path.exists(final) and not config.overwrite:
        raise FileExistsError(
            f"{final} exists; choose another --version or pass --overwrite"
        )
    os.makedirs(config.export_dir, exist_ok=True)
    preprocessing = preprocessing_dict(trained.model_config, trained.ingest_size)
    metrics = read_metrics(trained, config.metrics_path)
    card = build_model_card(trained, thresholds, config, metrics)

    module = ServingModule(
        trained.model,
        trained.model_config,
        trained.findings,
        trained.map_kind,
        thresholds,
        max_boxes=config.max_boxes,
        box_work_size=config.box_work_size,
        preprocessing_json=json.dumps(preprocessing, sort_keys=True),
        ingest_size=trained.ingest_size,
        training_data_json=json.dumps(trained.training_data, sort_keys=True),
    )
    tmp = tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=config.export_dir)
    try:
        with tempfile.TemporaryDirectory() as staging:
            assets = _write_asset_files(
                staging, trained, thresholds, preprocessing, card, config
            )
            module.assets = [tf.saved_model.Asset(p) for p in assets]
            tf.saved_model.save(
                module,
                tmp,
                signatures={
                    SERVING_SIGNATURE: module.serve_bytes.get_concrete_function(),
                    PIXELS_SIGNATURE: module.serve_pixels.get_concrete_function(),
                    MODEL_INFO_SIGNATURE: module.model_info.get_concrete_function(),
                },
            )
        extra = os.path.join(tmp, "assets.extra")
        os.makedirs(extra, exist_ok=True)
        write_warmup_requests(
            os.path.join(extra, WARMUP_FILE),
            trained.model_config.image_size,
            trained.model_config.channels,
            config.warmup_batch_sizes,
        )
        _make_world_readable(tmp)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logging.info("Exported %s (version %d) to %s", trained.keras_path, version, final)
    return final


def _make_world_readable(root):
    """Directories 0755, files 0644 under `root`, `root` included.

    mkdtemp creates 0700 and a restrictive umask narrows what TF writes; a
    model server running as another user must still read the version.
    """
    os.chmod(root, 0o755)
    for directory, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(directory, name), 0o755)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o644)


def _write_asset_files(directory, trained, thresholds, preprocessing, card, config):
    paths = []

    def write(name, text):
        path = os.path.join(directory, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        paths.append(path)

    write("findings.txt", "".join(f + "\n" for f in trained.findings))
    write(
        "thresholds.json",
        json.dumps(
            {
                "map_kind": trained.map_kind,
                "scale": (
                    "probability" if trained.map_kind == "probability" else "0..255"
                ),
                "thresholds": dict(zip(trained.findings, thresholds)),
                "max_boxes": config.max_boxes,
                "box_work_size": config.box_work_size,
            },
            indent=2,
        ),
    )
    write("preprocessing.json", json.dumps(preprocessing, indent=2))
    write("model_card.json", json.dumps(card, indent=2, default=str))
    return paths
