"""The model directory: one schema for config.json, one loader, one checkpoint rule.

Training writes a model directory; evaluate, predict and export read it, and
nothing else knows its layout:

    model_dir/
      config.json              `write_config` / `read_config` (schema below)
      model.keras              the final epoch ("final")
      checkpoints/best.keras   best validation mean AUC ("best")
      checkpoints/latest.keras end of the last finished epoch ("latest")

config.json holds:
  model: the `ModelConfig` dict the model was built from.
  findings: the finding names of the output columns.
  map_kind: "probability" or "cam", asked of the model's pooling layer.
  normalization: {"mean", "std"} applied to 0..255 pixels.
  ingest_image_size: the longer side the training films were stored at by
    ingestion (None when unknown: then the network size is assumed). Predict,
    export and the client shrink raw films to it before the letterbox, as
    training saw them (`cxr_tf.data.preprocess`).
  training_data: where the training films came from: {"source", "synthetic",
    "films": {split: count}, "ingest_image_size", "data_dir"}.
  train: the `TrainConfig` dict of the run, or None. Its "model" is the
    same dict as the top-level "model"; directories written before
    TrainConfig nested its ModelConfig hold the model fields flat here.
    Model settings are read from the top-level "model" only, in either
    layout.
  box_thresholds (optional): {map kind: map threshold} chosen for this
    model on its validation split (`write_box_thresholds`); evaluate,
    predict and export use it instead of the kind's default. A threshold is
    one number, or {finding: number} (`FindingThresholds`: an InfoMask
    model's masks end at a different height for each finding).
  mask_threshold_choices (optional): the IoP mask threshold of each
    checkpoint file, chosen on a validation split when training ended
    (`write_mask_threshold_choices`). A choice holds only for the file it was
    made for (its sha256) and the records it was made on (their names, sizes
    and modification times); evaluate reads it instead of a second pass over
    the split, and makes the choice again whenever anything differs.

Which checkpoint: `resolve` is the one rule. "final" falls back to "best",
then "latest", when training did not finish; "best" and "latest" are strict.
A consumer that must use the model another step evaluated (push) names its
`.keras` file outright; the evaluation records it (metrics.json
`source.model`, `source.model_sha256`).
"""

import dataclasses
import hashlib
import json
import os

from absl import logging

from cxr_tf import errors
from cxr_tf.data import schema

CONFIG_FILE = "config.json"
FINAL_MODEL = "model.keras"
BEST_CHECKPOINT = os.path.join("checkpoints", "best.keras")
LATEST_CHECKPOINT = os.path.join("checkpoints", "latest.keras")
CHECKPOINT_FILES = {
    "final": FINAL_MODEL,
    "best": BEST_CHECKPOINT,
    "latest": LATEST_CHECKPOINT,
}
CHECKPOINTS = tuple(CHECKPOINT_FILES)
METRICS_FILE = "metrics.json"
# Written by `cxr_tf.data.synthetic` next to the films it renders.
SYNTHETIC_MARKER = "synthetic_config.json"
MAP_KINDS = ("probability", "cam")


def atomic_write_text(path, text):
    """Writes `path` whole or not at all (a temporary file, then a rename).

    A reader (or a resumed run after a kill) sees the old file or the new
    one, never half of one.
    """
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def file_sha256(path, chunk=1 << 20):
    """sha256 hex digest of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------
# What the training data was (read from the ingest report).


def read_ingest_report(data_dir):
    """The ingest report of a TFRecord folder, or None when there is none."""
    path = os.path.join(data_dir, schema.INGEST_REPORT)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except ValueError as e:
            raise errors.UserValueError(
                f"ingest report is not JSON ({e})",
                path,
                "re-run ingest into an empty --output_dir",
            ) from None


def stored_image_size(data_dir, split="train"):
    """The longer side the films of `data_dir` are stored at.

    Taken from the ingest report's `config.image_size`; without a report, the
    larger stored side over the first records of `split`.

    Args:
      data_dir: a folder of ingested TFRecords.
      split: the split read when there is no report.

    Returns:
      An int, or None when neither the report nor a record tells.
    """
    report = read_ingest_report(data_dir)
    if report is not None:
        size = (report.get("config") or {}).get("image_size")
        if isinstance(size, int) and size > 0:
            return size
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    from cxr_tf.data import tfrecord  # pylint: disable=g-import-not-at-top

    files = sorted(
        tf.io.gfile.glob(
            os.path.join(data_dir, schema.TFRECORD_PATTERN.format(split=split))
        )
    )
    longest = 0
    for path in files[:2]:
        for serialized in tf.data.TFRecordDataset(path, compression_type="GZIP").take(8):
            parsed = tfrecord.parse_example(serialized)
            longest = max(
                longest,
                int(parsed["height"].numpy()) if "height" in parsed else 0,
                int(parsed["width"].numpy()) if "width" in parsed else 0,
            )
    return longest or None


def training_data(data_dir):
    """What config.json records of the training films of `data_dir`.

    Args:
      data_dir: the folder of ingested TFRecords training read.

    Returns:
      dict {"data_dir", "source", "synthetic", "films", "ingest_image_size"}.
    """
    report = read_ingest_report(data_dir) or {}
    source_dir = (report.get("config") or {}).get("data_dir")
    synthetic = bool(
        source_dir and os.path.isfile(os.path.join(source_dir, SYNTHETIC_MARKER))
    )
    if synthetic:
        source = "synthetic (cxr_tf.data.synthetic)"
    elif source_dir:
        source = f"ChestX-ray14 layout at {source_dir}"
    else:
        source = "unknown (no ingest report)"
    films = report.get("written") if isinstance(report.get("written"), dict) else {}
    return {
        "data_dir": os.path.abspath(data_dir),
        "source": source,
        "synthetic": synthetic,
        "films": {k: int(v) for k, v in films.items()},
        "ingest_image_size": stored_image_size(data_dir),
    }


# ---------------------------------------------------------------------------
# config.json.


def write_config(
    directory, model_config, findings, train_config=None, data=None, map_kind=None
):
    """Writes `config.json`, which tells evaluate/predict/export how to use a model.

    Args:
      directory: the model directory.
      model_config: the `ModelConfig` the model was built from.
      findings: the finding names of the model's output columns.
      train_config: the `TrainConfig` of the run, if any.
      data: `training_data(...)` of the run, if known.
      map_kind: the model's map kind; None asks the pooling layer the
        config builds (`cxr_tf.models.map_kind_for`).

    Returns:
      The path written.
    """
    if map_kind is None:
        from cxr_tf import models  # pylint: disable=g-import-not-at-top

        map_kind = models.map_kind_for(model_config)
    os.makedirs(directory, exist_ok=True)
    norm = model_config.normalization
    payload = {
        "model": model_config.to_dict(),
        "findings": list(findings),
        "map_kind": map_kind,
        "normalization": {"mean": norm.mean, "std": norm.std},
        "ingest_image_size": (data or {}).get("ingest_image_size"),
        "training_data": data,
        "train": train_config.to_dict() if train_config is not None else None,
    }
    path = os.path.join(directory, CONFIG_FILE)
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True))
    return path


@dataclasses.dataclass(frozen=True)
class FindingThresholds:
    """A box threshold per finding (hashable, so it can key result tables).

    Attributes:
      values: ((finding, threshold), ...) in the model's finding order.
    """

    values: tuple

    @classmethod
    def of(cls, mapping):
        return cls(tuple((str(f), float(t)) for f, t in dict(mapping).items()))

    def as_dict(self):
        return dict(self.values)

    def key(self):
        """The name of these thresholds in metrics.json ("per_finding")."""
        return "per_finding"


def box_threshold_for(threshold, finding):
    """The map threshold of `finding` under a box threshold setting.

    Args:
      threshold: None (the kind's default), a number, or `FindingThresholds`.
      finding: the finding's name.

    Returns:
      A float, or None (the kind's default; also for a finding that
      `FindingThresholds` does not name).
    """
    if isinstance(threshold, FindingThresholds):
        return threshold.as_dict().get(finding)
    return threshold


def _clean_threshold(kind, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        float("-inf") < float(value) < float("inf")
    ):
        raise ValueError(
            f"box threshold must be a finite number. Received: {kind}={value!r}"
        )
    return float(value)


def write_box_thresholds(directory, thresholds):
    """Adds (or replaces) the `box_thresholds` of a model directory's config.json.

    Args:
      directory: the model directory (its config.json must exist).
      thresholds: {map kind: finite float, {finding: finite float} or
        `FindingThresholds`}, e.g. {"probability": 0.45}.

    Returns:
      The path written.

    Raises:
      UserFileError: no config.json; ValueError: an unknown map kind or
        finding, or a non-finite threshold.
    """
    clean = {}
    for kind, value in dict(thresholds).items():
        if kind not in MAP_KINDS:
            raise ValueError(
                f"box threshold map kind must be one of {MAP_KINDS}. Received: {kind!r}"
            )
        if isinstance(value, FindingThresholds):
            value = value.as_dict()
        if isinstance(value, dict):
            for finding, t in value.items():
                if finding not in schema.FINDINGS:
                    raise ValueError(
                        f"box threshold names an unknown finding {finding!r}; "
                        f"the findings are {schema.FINDINGS}"
                    )
            clean[kind] = {f: _clean_threshold(f"{kind}.{f}", t) for f, t in value.items()}
        else:
            clean[kind] = _clean_threshold(kind, value)
    return _set_config_entry(directory, "box_thresholds", clean, "box thresholds")


def _set_config_entry(directory, key, value, what):
    """Sets `key` of a model directory's config.json (atomically); its path."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise errors.UserFileError(
            f"no {CONFIG_FILE} to add {what} to", path, "train the model first"
        )
    payload = read_config(path)
    payload[key] = value
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True))
    return path


def records_fingerprint(data_dir, split):
    """What identifies a split's record files: folder, names, sizes, mtimes.

    Any rewrite of a record file (a new ingest) changes it; a copy of the
    folder elsewhere does too, which only costs one recomputation.

    Returns:
      {"data_dir", "split", "files": [[name, bytes, mtime_ns], ...]}; "files"
      is empty when the split has no record file.
    """
    from cxr_tf.data import tfrecord  # pylint: disable=import-outside-toplevel

    try:
        files = tfrecord.record_files(data_dir, split)
    except FileNotFoundError:
        files = []
    listed = []
    for path in files:
        info = os.stat(path)
        listed.append([os.path.basename(path), info.st_size, info.st_mtime_ns])
    return {"data_dir": os.path.realpath(data_dir), "split": split, "files": listed}


MASK_THRESHOLD_CHOICES = "mask_threshold_choices"


def write_mask_threshold_choices(directory, choices):
    """Sets the `mask_threshold_choices` of a model directory's config.json.

    Args:
      directory: the model directory (its config.json must exist).
      choices: list of dicts with "model_sha256", "map_kind", "records" (a
        `records_fingerprint`), "candidates", "threshold" (None: the split
        has no boxed pair), "error" and "pairs"; they replace the old ones.

    Returns:
      The path written.
    """
    keys = ("model_sha256", "map_kind", "records", "candidates", "threshold",
            "error", "pairs")
    clean = []
    for choice in choices:
        missing = [k for k in keys if k not in choice]
        if missing:
            raise ValueError(f"mask threshold choice lacks {missing}: {choice!r}")
        clean.append({k: choice[k] for k in keys})
    return _set_config_entry(directory, MASK_THRESHOLD_CHOICES, clean, "mask thresholds")


def read_config(path):
    """Reads and checks a config.json (the training bundle or a bare ModelConfig).

    Args:
      path: the config.json file.

    Returns:
      The payload dict, normalised to the bundle form ({"model": ..., ...}).

    Raises:
      UserValueError: not JSON, or not a model config.
    """
    with open(path, encoding="utf-8") as f:
        try:
            payload = json.load(f)
        except ValueError as e:
            raise errors.UserValueError(
                f"not JSON ({e})", path, "restore it from the training run"
            ) from None
    if not isinstance(payload, dict):
        raise errors.UserValueError(
            "does not hold a model config", path, "point at a trained model directory"
        )
    if "model" not in payload:
        payload = {"model": payload}
    if not isinstance(payload["model"], dict):
        raise errors.UserValueError(
            "does not hold a model config", path, "point at a trained model directory"
        )
    return payload


def resolve(path, checkpoint="final"):
    """Finds the `.keras` file and `config.json` of a model directory or file.

    Args:
      path: a model directory (as written by `train`) or a `.keras` file in it
        (or in its `checkpoints/`).
      checkpoint: for a directory: "final" (model.keras; falls back to best,
        then latest, when training did not finish), "best" (best validation
        mean AUC) or "latest" (end of the last finished epoch).

    Returns:
      (keras_path, config_path).

    Raises:
      UserFileError: no model or no config.json found.
      UserValueError: unknown `checkpoint`, or a file that is not `.keras`.
    """
    if checkpoint not in CHECKPOINT_FILES:
        raise errors.UserValueError(
            f"`checkpoint` must be one of {list(CHECKPOINTS)}. "
            f"Received: checkpoint={checkpoint!r}",
            "--checkpoint",
        )
    if os.path.isdir(path):
        order = [checkpoint] + (["best", "latest"] if checkpoint == "final" else [])
        keras_path = None
        for name in order:
            candidate = os.path.join(path, CHECKPOINT_FILES[name])
            if os.path.isfile(candidate):
                keras_path = candidate
                break
        if keras_path is None:
            present = [
                n for n, f in CHECKPOINT_FILES.items()
                if os.path.isfile(os.path.join(path, f))
            ]
            raise errors.UserFileError(
                f"no {checkpoint!r} model in {path}: expected "
                f"{os.path.join(path, CHECKPOINT_FILES[checkpoint])}",
                path,
                (
                    f"use --checkpoint={present[0]} (present: {present})"
                    if present
                    else "train a model into this directory first"
                ),
            )
        config_dirs = [path]
    elif os.path.isfile(path):
        if not path.endswith(".keras"):
            raise errors.UserValueError(
                "expected a .keras file or a model directory", path,
                "point at the directory training wrote",
            )
        keras_path = path
        here = os.path.dirname(os.path.abspath(path))
        config_dirs = [here, os.path.dirname(here)]
    else:
        raise errors.UserFileError(
            "model path does not exist", path, "check the path"
        )
    for directory in config_dirs:
        config_path = os.path.join(directory, CONFIG_FILE)
        if os.path.isfile(config_path):
            return keras_path, config_path
    raise errors.UserFileError(
        f"no {CONFIG_FILE} next to {keras_path} (looked in {config_dirs})",
        keras_path,
        "it is written by training (`cxr_tf.model_dir.write_config`)",
    )


def layer_map_kind(model):
    """The map kind declared by the model's pooling (or mask) layer, or None."""
    kinds = {
        layer.map_kind
        for layer in getattr(model, "layers", ())
        if isinstance(getattr(layer, "map_kind", None), str)
    }
    if len(kinds) > 1:
        raise ValueError(f"Layers of {model.name} declare several map kinds: {kinds}")
    return kinds.pop() if kinds else None


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A trained model and what is needed to feed it and read its maps.

    Attributes:
      model: the Keras model.
      model_config: its `ModelConfig`.
      findings: finding names of the output columns.
      map_kind: "probability" or "cam".
      path: the `.keras` file loaded.
      config_path: the config.json read.
      payload: the whole config.json.
    """

    model: object
    model_config: object
    findings: tuple
    map_kind: str
    path: str
    config_path: str = ""
    payload: dict = dataclasses.field(default_factory=dict)

    @property
    def normalization(self):
        return self.model_config.normalization

    @property
    def image_size(self):
        return self.model_config.image_size

    @property
    def ingest_size(self):
        """Longer side the training films were stored at (None: the network size)."""
        size = self.payload.get("ingest_image_size")
        return int(size) if size else None

    @property
    def box_threshold(self):
        """Box threshold of the model's own map kind chosen on validation, or None.

        A float, or `FindingThresholds` where one was chosen per finding.
        """
        value = (self.payload.get("box_thresholds") or {}).get(self.map_kind)
        if isinstance(value, dict):
            return FindingThresholds.of(
                {f: value[f] for f in self.findings if f in value}
            )
        return None if value is None else float(value)

    @property
    def training_data(self):
        return self.payload.get("training_data") or {}

    def mask_threshold_choice(self, model_sha256, map_kind, records, candidates):
        """The stored IoP threshold choice that holds for exactly these, or None.

        Args:
          model_sha256: sha256 of the `.keras` file evaluated.
          map_kind: the map kind thresholded.
          records: `records_fingerprint` of the split the choice is made on.
          candidates: the thresholds tried.
        """
        for choice in self.payload.get(MASK_THRESHOLD_CHOICES) or ():
            if (
                choice.get("model_sha256") == model_sha256
                and choice.get("map_kind") == map_kind
                and choice.get("records") == records
                and choice.get("candidates") == [float(c) for c in candidates]
            ):
                return choice
        return None

    # The export module's older name for `path`.
    @property
    def keras_path(self):
        return self.path

    @property
    def config_payload(self):
        return self.payload


def load(path, checkpoint="final", config_path=None):
    """Loads a trained model with its config.

    Args:
      path: model directory or `.keras` file (see `resolve`).
      checkpoint: "final", "best" or "latest" for a directory.
      config_path: config.json to use instead of the one found next to the
        model.

    Returns:
      A `LoadedModel`.

    Raises:
      UserFileError: no model or config; UserValueError: a corrupt file.
    """
    import keras  # pylint: disable=g-import-not-at-top

    import cxr_tf.layers  # noqa: F401  pylint: disable=unused-import,g-import-not-at-top
    from cxr_tf import models  # pylint: disable=g-import-not-at-top
    import cxr_tf.models.localizer  # noqa: F401  (registers the model's layers)

    if config_path is not None:
        if not os.path.isfile(config_path):
            raise errors.UserFileError(
                "model config not found", config_path, "check the path"
            )
        keras_path, _ = (
            (path, None) if os.path.isfile(path) else resolve(path, checkpoint)
        )
    else:
        keras_path, config_path = resolve(path, checkpoint)
    payload = read_config(config_path)
    model_config = models.ModelConfig.from_dict(payload["model"])
    findings = tuple(payload.get("findings") or schema.FINDINGS)
    if len(findings) != model_config.num_classes:
        raise errors.UserValueError(
            f"{len(findings)} findings for num_classes={model_config.num_classes}",
            config_path,
            "restore config.json from the training run",
        )
    try:
        model = keras.saving.load_model(keras_path, compile=False)
    except (OSError, ValueError, EOFError) as e:
        if not os.path.isfile(keras_path) or os.path.getsize(keras_path) == 0:
            raise
        raise errors.UserValueError(
            f"cannot load the model file, it is corrupt or truncated "
            f"({type(e).__name__})",
            keras_path,
            "restore it, or retrain",
        ) from e
    map_kind = (
        layer_map_kind(model)
        or payload.get("map_kind")
        or models.map_kind_for(model_config)
    )
    if map_kind not in MAP_KINDS:
        raise errors.UserValueError(
            f"map kind must be one of {MAP_KINDS}. Received: {map_kind!r}", config_path
        )
    logging.info("Loaded %s (config %s)", keras_path, config_path)
    return LoadedModel(
        model=model,
        model_config=model_config,
        findings=findings,
        map_kind=map_kind,
        path=keras_path,
        config_path=config_path,
        payload=payload,
    )
