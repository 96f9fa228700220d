"""Prediction on image files: probabilities, maps and boxes in original pixels.

Preprocessing is the input pipeline's evaluation path: the film is letterboxed
(aspect kept, longer side = S, centred zero padding) with the pipeline's own
function, then normalised; boxes found on the S x S map are mapped back
through the inverse letterbox to the original image's pixels.
"""

import collections
import dataclasses
import json
import os

from absl import logging
import numpy as np
from scipy import special

from cxr_tf import choices
from cxr_tf import config_dict
from cxr_tf import localization
from cxr_tf import model_dir
from cxr_tf.data import preprocess
from cxr_tf.data import schema

IMAGE_EXTENSIONS = schema.IMAGE_EXTENSIONS
MAP_SOURCES = choices.MAP_SOURCES
PREDICTIONS_FILE = "predictions.jsonl"
OVERLAY_DIR = "overlays"
# Seconds between progress lines (the project's ~15 s rhythm).
PROGRESS_INTERVAL_S = 15.0


def boxes_in_original(
    score_map,
    original_hw,
    image_size,
    map_kind,
    threshold=None,
    work_size=None,
    ingest_size=None,
):
    """Boxes of one class map, in pixels of the original image.

    The map covers the letterboxed S x S input, i.e. a max(H, W) square of
    the original film with the padding; it is upsampled to that square, boxed
    by `cxr_tf.localization.extract_boxes`, then shifted by the padding and
    clipped to the film (`cxr_tf.data.preprocess.Letterbox`). For square
    films this is extract_boxes at (H, W).

    Args:
      score_map: (h, w) map of one class.
      original_hw: (H, W) of the original image.
      image_size: S, the network input side.
      map_kind: "probability" or "cam".
      threshold: see `extract_boxes` (None: its default for the kind).
      work_size: see `extract_boxes` (bounds memory for large DICOMs).
      ingest_size: the model's stored film size (see `Letterbox`).

    Returns:
      list of `localization.Box` in original pixels (empty boxes dropped).
    """
    box = preprocess.Letterbox.of(
        int(original_hw[0]), int(original_hw[1]), int(image_size), ingest_size
    )
    side = int(round(box.canvas))
    found = localization.extract_boxes(
        score_map, (side, side), map_kind, threshold=threshold, work_size=work_size
    )
    out = []
    for b in found:
        x, y, w, h = box.to_original(b.x, b.y, b.w, b.h)
        if w > 0 and h > 0:
            out.append(localization.Box(x, y, w, h, float(b.score)))
    return out


@dataclasses.dataclass(frozen=True)
class InputImage:
    """One film to predict.

    Attributes:
      path: the file, as found under the input argument.
      key: its name in predictions.jsonl and under overlays/: the path
        relative to the directory argument it was found in (forward
        slashes), the file name for a file argument; where two files would
        share a key, each takes its path relative to their common folder.
    """

    path: str
    key: str


def list_images(inputs):
    """Expands files and directories into the films to predict, each with a key.

    Args:
      inputs: paths of files (taken whatever their extension) and directories
        (searched recursively for `IMAGE_EXTENSIONS`).

    Returns:
      (images, missing): `InputImage`s sorted by key (a file reached twice
      is listed once), and inputs that do not exist.
    """
    found, missing, seen = [], [], set()
    for item in inputs:
        if os.path.isdir(item):
            candidates = []
            for root, dirs, files in os.walk(item):
                dirs.sort()
                for name in sorted(files):
                    if name.lower().endswith(IMAGE_EXTENSIONS):
                        path = os.path.join(root, name)
                        key = os.path.relpath(path, item).replace(os.sep, "/")
                        candidates.append((path, key))
        elif os.path.isfile(item):
            candidates = [(item, os.path.basename(item))]
        else:
            missing.append(item)
            continue
        for path, key in candidates:
            real = os.path.realpath(path)
            if real not in seen:
                seen.add(real)
                found.append((path, key))
    by_key = collections.defaultdict(list)
    for path, key in found:
        by_key[key].append(path)
    images = []
    for key, paths in by_key.items():
        if len(paths) == 1:
            images.append(InputImage(paths[0], key))
            continue
        # Same key from two arguments (a/x.png b/x.png, or two folders with
        # the same layout): distinct real files, so their paths below the
        # common folder differ.
        absolute = [os.path.abspath(p) for p in paths]
        common = os.path.commonpath(absolute)
        for path, full in zip(paths, absolute):
            images.append(
                InputImage(path, os.path.relpath(full, common).replace(os.sep, "/"))
            )
    keys = [i.key for i in images]
    if len(set(keys)) != len(keys):
        clash = sorted(k for k in set(keys) if keys.count(k) > 1)
        raise ValueError(
            f"Two inputs would be written under the same name {clash[0]!r}; "
            "give the films' folders as separate, differently named arguments."
        )
    return sorted(images, key=lambda i: i.key), missing


def overlay_names(keys):
    """{key: overlay file name under overlays/}, one `.png` extension each.

    `a/x.png` -> `a/x.png`, `a/y.dcm` -> `a/y.png`; when two keys would share
    a name (x.png and x.dcm in one folder) the non-PNG ones keep their
    extension (`x.dcm.png`).
    """
    plain = {k: os.path.splitext(k)[0] + ".png" for k in keys}
    counts = collections.Counter(plain.values())
    return {
        k: (name if counts[name] == 1 or k.lower().endswith(".png") else k + ".png")
        for k, name in plain.items()
    }


def read_truth_boxes(bbox_list):
    """{image file name: {finding: [(x, y, w, h), ...]}} of a box list CSV.

    Args:
      bbox_list: a BBox_List_2017.csv-style table (see
        `cxr_tf.data.metadata.read_bbox_list`), boxes in the listed image's
        own pixels.

    Returns:
      The boxes by `Image Index` (a file name).

    Raises:
      FileNotFoundError, ValueError: as `read_bbox_list` (file and row named).
    """
    from cxr_tf.data import metadata

    table = metadata.read_bbox_list(bbox_list)
    truth = collections.defaultdict(lambda: collections.defaultdict(list))
    for row in table.itertuples(index=False):
        truth[row.image_id][row.finding].append(
            (float(row.x), float(row.y), float(row.w), float(row.h))
        )
    return {image: dict(per) for image, per in truth.items()}


SYNTHETIC_MODEL_WARNING = (
    "warning: this model was trained on synthetic films only; its outputs on "
    "real X-rays are not meaningful"
)


def is_synthetic_film(path, _cache=None):
    """Whether a film lies in a data set written by `cxr_tf.data.synthetic`.

    The generator writes `synthetic_config.json` at the data set's root; a
    film counts as synthetic when that file is in its folder or any folder
    above it.
    """
    from cxr_tf.data import synthetic  # pylint: disable=import-outside-toplevel

    cache = {} if _cache is None else _cache
    folder = os.path.dirname(os.path.abspath(path))
    walked = []
    answer = False
    while True:
        if folder in cache:
            answer = cache[folder]
            break
        walked.append(folder)
        if os.path.isfile(os.path.join(folder, synthetic.CONFIG_FILE)):
            answer = True
            break
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    for folder in walked:
        cache[folder] = answer
    return answer


def synthetic_model_warning(data, paths):
    """The one warning line for a synthetic-trained model on other films, or None.

    Args:
      data: the model's `training_data` entry (None: an older model that does
        not say; no warning).
      paths: the films predicted.

    Returns:
      `SYNTHETIC_MODEL_WARNING` with how many films are not synthetic, when
      `data["synthetic"]` is true and some film is not from the generator
      (`is_synthetic_film`); else None.
    """
    if not data or not data.get("synthetic"):
        return None
    cache = {}
    foreign = [p for p in paths if not is_synthetic_film(p, cache)]
    if not foreign:
        return None
    return (
        f"{SYNTHETIC_MODEL_WARNING} ({len(foreign)} of {len(paths)} films are "
        f"not from the synthetic generator, e.g. {foreign[0]})"
    )


class MapComputer:
    """Probabilities and maps of a batch from a loaded model or its Grad-CAM.

    Args:
      loaded: a `cxr_tf.model_dir.LoadedModel`.
      map_source: "model" (the model's own localization maps) or "gradcam".
    """

    def __init__(self, loaded, map_source="model"):
        import tensorflow as tf

        if map_source not in MAP_SOURCES:
            raise ValueError(
                f"`map_source` must be one of {MAP_SOURCES}. "
                f"Received: map_source={map_source!r}"
            )
        self.loaded = loaded
        self.map_source = map_source
        if map_source == "gradcam":
            from cxr_tf.gradcam import GradCAM
            from cxr_tf.gradcam import MAP_KIND

            self._gradcam = GradCAM(loaded.model)
            self.map_kind = MAP_KIND
        else:
            model = loaded.model
            # One trace for every batch size (the last batch of a split is
            # smaller): each trace of the model costs a second or more.
            spec = tf.TensorSpec([None, *model.inputs[0].shape[1:]], tf.float32)

            @tf.function(input_signature=[spec])
            def run(images):
                out = model(images, training=False)
                return out["logits"], out["localization_maps"]

            self._run = run
            self.map_kind = loaded.map_kind

    def __call__(self, images):
        """(probabilities (B, K), maps (B, h, w, K)) as float numpy arrays."""
        images = np.asarray(images, np.float32)
        if self.map_source == "gradcam":
            maps, logits = self._gradcam.maps_and_logits(images)
        else:
            logits, maps = self._run(images)
            logits, maps = logits.numpy(), maps.numpy()
        probs = special.expit(logits.astype(np.float64))
        return probs, maps.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class PredictConfig:
    """Settings of `predict`.

    Attributes:
      model: model directory or `.keras` file.
      output_dir: where predictions.jsonl and overlays/ go.
      checkpoint: "final", "best" or "latest" (model directory only).
      map_source: "model" or "gradcam".
      positive_threshold: probability from which a finding counts as present
        (gets boxes and an overlay panel).
      box_threshold: map threshold for boxes; None: the model's own
        (config.json `box_thresholds`, chosen on validation at training)
        for its own maps, else 0.9 for probability maps, 180 for CAM /
        Grad-CAM maps.
      box_findings: "positive" (boxes only for present findings) or "all".
      batch_size: images per forward pass.
      overlays: write an overlay PNG per image.
      work_size: longer side above which box extraction is done at reduced
        size (large DICOMs).
      dicom_orientation: "auto" or "header"; see
        `cxr_tf.data.images.decode_image`. A DICOM inverted by "auto" gets
        `"orientation_corrected": true` in its record.
      bbox_list: optional BBox_List_2017.csv-style table; its boxes are drawn
        on the overlays of the films whose file name is its `Image Index`.
      resume: keep the films already in output_dir's predictions.jsonl and
        predict only the others (a torn last line is dropped and redone).
      num_workers: threads per stage (loading films; boxes and overlays);
        0: one per CPU core.
    """

    model: str
    output_dir: str
    checkpoint: str = "final"
    map_source: str = "model"
    positive_threshold: float = 0.5
    box_threshold: float | None = None
    box_findings: str = "positive"
    batch_size: int = 8
    overlays: bool = True
    work_size: int | None = localization.DEFAULT_WORK_SIZE
    dicom_orientation: str = "auto"
    bbox_list: str | None = None
    resume: bool = False
    num_workers: int = 0

    def __post_init__(self):
        # pylint: disable-next=import-outside-toplevel
        from cxr_tf.data import images as images_lib

        if self.dicom_orientation not in images_lib.ORIENTATIONS:
            raise ValueError(
                f"`dicom_orientation` must be one of {images_lib.ORIENTATIONS}. "
                f"Received: dicom_orientation={self.dicom_orientation!r}"
            )
        if self.map_source not in MAP_SOURCES:
            raise ValueError(
                f"`map_source` must be one of {MAP_SOURCES}. "
                f"Received: map_source={self.map_source!r}"
            )
        if self.box_findings not in ("positive", "all"):
            raise ValueError(
                "`box_findings` must be 'positive' or 'all'. "
                f"Received: box_findings={self.box_findings!r}"
            )
        if not 0.0 <= self.positive_threshold <= 1.0:
            raise ValueError(
                "`positive_threshold` must be in [0, 1]. "
                f"Received: positive_threshold={self.positive_threshold!r}"
            )
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(
                "`num_workers` must be an int >= 0 (0: one per CPU core). "
                f"Received: num_workers={self.num_workers!r}"
            )
        config_dict.check_int("batch_size", self.batch_size)


def prediction_record(
    name,
    original_hw,
    probs,
    maps,
    findings,
    image_size,
    map_kind,
    box_threshold=None,
    positive_threshold=0.5,
    box_findings="positive",
    work_size=None,
    ingest_size=None,
):
    """One predictions.jsonl record for one image.

    Args:
      name: image name (file basename or image id).
      original_hw: (H, W) of the original image.
      probs: (K,) probabilities.
      maps: (h, w, K) maps.
      findings: K finding names.
      image_size: network input side.
      map_kind: "probability" or "cam".
      box_threshold: map threshold: a float, `model_dir.FindingThresholds`
        or None (the kind's default).
      positive_threshold: probability from which a finding is present.
      box_findings: "positive" or "all".
      work_size: see `extract_boxes`.
      ingest_size: the model's stored film size (see `preprocess.Letterbox`).

    Returns:
      dict {"image", "height", "width", "map_kind", "probabilities", "boxes"}.
    """
    boxes = []
    for k, finding in enumerate(findings):
        if box_findings == "positive" and probs[k] < positive_threshold:
            continue
        for b in boxes_in_original(
            maps[..., k],
            original_hw,
            image_size,
            map_kind,
            model_dir.box_threshold_for(box_threshold, finding),
            work_size,
            ingest_size,
        ):
            boxes.append(localization.box_record(finding, b))
    return {
        "image": name,
        "height": int(original_hw[0]),
        "width": int(original_hw[1]),
        "map_kind": map_kind,
        "probabilities": {f: round(float(p), 6) for f, p in zip(findings, probs)},
        "boxes": boxes,
    }


def crop_map_to_image(score_map, original_hw, image_size, ingest_size=None):
    """The part of an (h, w) map over the film (padding removed), as (h', w')."""
    return preprocess.Letterbox.of(
        int(original_hw[0]), int(original_hw[1]), int(image_size), ingest_size
    ).crop_map(score_map)


def write_overlay(
    path,
    pixels,
    record,
    maps,
    findings,
    image_size,
    map_kind,
    positive_threshold,
    gt_boxes=None,
    ingest_size=None,
):
    """Writes the overlay PNG of one image (maps of present findings, boxes).

    Args:
      path: the PNG to write.
      pixels: (H, W) the film as read.
      record: its `prediction_record`.
      maps: (h, w, K) its maps over the S x S input.
      findings: the K finding names.
      image_size: S.
      map_kind: "probability" or "cam".
      positive_threshold: findings from this probability get a panel.
      gt_boxes: {finding: [(x, y, w, h)]} known truth in the film's pixels
        (those findings get a panel too), {} when known to be none, None when
        not known.
    """
    from cxr_tf import visualize

    probs = record["probabilities"]
    truth_findings = [f for f in findings if (gt_boxes or {}).get(f)]
    shown = [
        f for f in findings if probs[f] >= positive_threshold or f in truth_findings
    ]
    if not shown:
        # Always show something: the most probable finding.
        shown = [max(findings, key=lambda f: probs[f])]
    panel_maps = {
        f: crop_map_to_image(
            maps[..., findings.index(f)], pixels.shape, image_size, ingest_size
        )
        for f in shown
    }
    boxes = {
        f: [
            localization.Box(b["x"], b["y"], b["w"], b["h"], b["score"])
            for b in record["boxes"]
            if b["finding"] == f
        ]
        for f in shown
    }
    visualize.overlay_figure(
        pixels,
        panel_maps,
        boxes,
        {f: probs[f] for f in findings},
        gt_boxes=gt_boxes,
        map_kind=map_kind,
        path=path,
        title=record["image"],
    )


@dataclasses.dataclass(frozen=True)
class _FinishSettings:
    """What `_finish_film` needs besides the film (sent once per film)."""

    findings: tuple
    image_size: int
    map_kind: str
    box_threshold: object  # float, model_dir.FindingThresholds or None
    positive_threshold: float
    box_findings: str
    work_size: int | None
    ingest_size: int | None
    output_dir: str
    overlay: str | None  # overlay path below output_dir, None: no overlay


def _finish_film(key, path, original_hw, orientation_corrected, probs, maps,
                 pixels, gt, settings):
    """One film's predictions.jsonl line (boxes; the overlay written).

    Module level and free of TensorFlow: a thread runs it (processes were
    tried; see docs/design/predict-pipeline.md).
    """
    findings = list(settings.findings)
    record = prediction_record(
        key,
        original_hw,
        probs,
        maps,
        findings,
        settings.image_size,
        settings.map_kind,
        settings.box_threshold,
        settings.positive_threshold,
        settings.box_findings,
        settings.work_size,
        settings.ingest_size,
    )
    record["path"] = path
    if orientation_corrected:
        record["orientation_corrected"] = True
    if settings.overlay is not None:
        record["overlay"] = settings.overlay
        write_overlay(
            os.path.join(settings.output_dir, settings.overlay),
            pixels,
            record,
            maps,
            findings,
            settings.image_size,
            settings.map_kind,
            settings.positive_threshold,
            gt_boxes=gt,
            ingest_size=settings.ingest_size,
        )
    return json.dumps(record) + "\n"


def predict(config, inputs):
    """Predicts every readable image of `inputs`; reports and skips the rest.

    Args:
      config: a `PredictConfig`.
      inputs: image files and/or directories.

    Films are loaded in parallel (`predict_pipeline.FilmLoader`), fed to the
    model in batches, and boxed and drawn in a second pool; records are
    written to predictions.jsonl in key order as they finish, so memory does
    not grow with the number of films. A progress line (films, rate, ETA)
    is logged every `PROGRESS_INTERVAL_S` seconds. Each record's "image" is
    the film's key (`list_images`: its path below the directory argument),
    "path" the file read, "overlay" its overlay below `output_dir` (one
    `.png` extension). When the model's config.json says it was trained on
    synthetic films only and some input film is not from the synthetic
    generator (`synthetic_model_warning`), one warning line is logged for
    the whole run.

    Returns:
      dict summary: {"predicted": records in predictions.jsonl, "resumed":
      films kept from an earlier run (`config.resume`), "failed": [{"image",
      "reason"}], "predictions": path of predictions.jsonl,
      "films_with_truth_boxes": films of this run with boxes in
      `config.bbox_list` (None without one), "warnings": the warning lines
      logged}.

    Raises:
      FileNotFoundError: no image found at all in `inputs`.
      cxr_tf.errors.UserValueError: `config.resume` and predictions.jsonl is
        not one predict wrote.
    """
    from concurrent import futures  # pylint: disable=import-outside-toplevel

    from cxr_tf import predict_pipeline
    from cxr_tf.data import synthetic

    listed, missing = list_images(inputs)
    failed = [{"image": m, "reason": "no such file or directory"} for m in missing]
    if not listed:
        raise FileNotFoundError(f"No image files found in {list(inputs)}")
    truth = read_truth_boxes(config.bbox_list) if config.bbox_list else None
    os.makedirs(config.output_dir, exist_ok=True)
    out_path = os.path.join(config.output_dir, PREDICTIONS_FILE)
    finished = predict_pipeline.read_finished(out_path) if config.resume else set()
    todo = [i for i in listed if i.key not in finished]
    resumed = len(listed) - len(todo)
    if resumed:
        logging.info(
            "Resuming: %d of %d films already in %s", resumed, len(listed), out_path
        )
    loaded = model_dir.load(config.model, config.checkpoint)
    warnings = []
    warning = synthetic_model_warning(
        loaded.training_data or None, [i.path for i in listed]
    )
    if warning:
        # Once per run, before the films: not one line per film.
        logging.warning("%s", warning)
        warnings.append(warning)
    overlay_files = overlay_names([i.key for i in listed])
    computer = MapComputer(loaded, config.map_source)
    findings = list(loaded.findings)
    size = loaded.image_size
    # The model's own threshold, chosen on validation at training, when the
    # maps are its own; else the kind's default (None).
    box_threshold = config.box_threshold
    if box_threshold is None and computer.map_kind == loaded.map_kind:
        box_threshold = loaded.box_threshold
    if config.overlays:
        os.makedirs(os.path.join(config.output_dir, OVERLAY_DIR), exist_ok=True)

    def settings_for(key):
        return _FinishSettings(
            tuple(findings),
            size,
            computer.map_kind,
            box_threshold,
            config.positive_threshold,
            config.box_findings,
            config.work_size,
            loaded.ingest_size,
            config.output_dir,
            f"{OVERLAY_DIR}/{overlay_files[key]}" if config.overlays else None,
        )

    loader = predict_pipeline.FilmLoader(
        size,
        loaded.normalization,
        loaded.ingest_size,
        config.dicom_orientation,
        keep_pixels=config.overlays,
    )
    workers = config.num_workers or max(1, os.cpu_count() or 1)
    # Films in flight per stage: enough to keep every worker busy while the
    # next batch is fed, few enough that memory stays flat.
    lookahead = config.batch_size + 2 * workers
    progress = synthetic.Progress(len(todo), "films", interval=PROGRESS_INTERVAL_S)
    count, with_truth, done = 0, 0, 0
    writes = collections.deque()

    def write_ready(out, block_over):
        nonlocal count, done
        while writes and (writes[0].done() or len(writes) > block_over):
            out.write(writes.popleft().result())
            count += 1
            done += 1
        progress.update(done)

    mode = "a" if config.resume else "w"
    with futures.ThreadPoolExecutor(workers, "predict-load") as load_pool, \
            futures.ThreadPoolExecutor(workers, "predict-boxes") as post_pool, \
            open(out_path, mode) as out:
        films = predict_pipeline.ordered_map(load_pool, loader, todo, lookahead)
        for batch in predict_pipeline.batched(films, config.batch_size):
            readable = []
            for film in batch:
                if film.error is None:
                    readable.append(film)
                    continue
                logging.warning("Skipping %s: %s", film.item.path, film.error)
                failed.append({"image": film.item.path, "reason": film.error})
                done += 1
            if readable:
                probs, maps = computer(np.stack([f.network_input for f in readable]))
                for film, p, m in zip(readable, probs, maps):
                    gt = None
                    if truth is not None:
                        gt = truth.get(os.path.basename(film.item.key), {})
                        with_truth += bool(gt)
                    writes.append(
                        post_pool.submit(
                            _finish_film,
                            film.item.key,
                            film.item.path,
                            film.original_hw,
                            film.info.orientation_corrected,
                            p,
                            m,
                            film.pixels,
                            gt,
                            settings_for(film.item.key),
                        )
                    )
            write_ready(out, lookahead)
            # A killed run loses at most the lines not yet flushed; --resume
            # redoes them (and drops a torn last line).
            out.flush()
        write_ready(out, 0)
    count += resumed
    if truth is not None and not with_truth:
        warnings.append(
            f"no film predicted is listed in --bbox_list={config.bbox_list} "
            "(matched by file name = Image Index): no truth boxes drawn"
        )
        logging.warning("%s", warnings[-1])
    summary = {
        "predicted": count,
        "resumed": resumed,
        "failed": failed,
        "predictions": out_path,
        "films_with_truth_boxes": with_truth if truth is not None else None,
        "warnings": warnings,
    }
    with open(os.path.join(config.output_dir, "predict_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
