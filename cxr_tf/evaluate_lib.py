"""Evaluation: per-class AUROC, box localization (IoBB/IoU/AFP), InfoMask IoP.

Two sources: a trained model run on ingested TFRecords (maps -> boxes here),
or a predictions.jsonl file (as `predict` writes it) with the box list and,
for AUROC, the label table. All boxes are compared in the original image's
pixels.

Definitions (docs/DATA_AND_METRICS.md, sections 11-13):
- IoBB = area(pred ∩ gt) / area(pred); IoU = area(pred ∩ gt) / area(pred ∪ gt).
  A ground-truth box is localized at T when some predicted box of its class
  on its image has IoBB (IoU) > T; accuracy = localized / all gt boxes.
- Average false positives (AFP) at T: predicted boxes of the class, on the
  images with a gt box of that class, whose IoBB with every gt box of the
  class there is <= T, divided by the number of those images.
- IoP / FPR / FNR (InfoMask): pixelwise, mask P = map >= t (CAM maps
  normalised per image to [0, 255] first), G = union of the class's gt boxes:
  IoP = |P ∩ G| / |P| (undefined, left out, when P is empty), FPR = |P \\ G| / |not G|,
  FNR = |G \\ P| / |G|; per class the mean over its boxed images, overall
  the mean of the per-class means. t is chosen on the
  validation split to minimise the localization error, mean (FPR + FNR) / 2.
"""

import collections
from concurrent import futures
import dataclasses
import json
import os

from absl import logging
import numpy as np

from cxr_tf import errors
from cxr_tf import localization
from cxr_tf.metrics import localization as loc_metrics
from cxr_tf import model_dir
from cxr_tf import predict_lib
from cxr_tf.data import preprocess
from cxr_tf.data import schema

IOBB_THRESHOLDS = (0.1, 0.25, 0.5, 0.75, 0.9)
METRICS_FILE = model_dir.METRICS_FILE
OVERLAY_DIR = "overlays"
# Mask metrics are computed with the longer side at most this many pixels:
# the ratios barely change and the work stays small for 1024 px films.
MASK_WORK_SIZE = 256
# Batches whose boxes may wait for the box worker while the network runs on.
_BOX_BATCHES_AHEAD = 3
DEFAULT_BOX_THRESHOLDS = {"probability": (0.9,), "cam": (180.0, 60.0)}
DEFAULT_MASK_THRESHOLDS = {
    "probability": tuple(np.round(np.arange(0.05, 1.0, 0.05), 2)),
    "cam": tuple(float(t) for t in range(10, 255, 10)),
}


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Settings of `evaluate`.

    Attributes:
      output_dir: where metrics.json and the plots go.
      model_dir: trained model directory (or .keras file); None with
        `predictions`.
      checkpoint: "best" (default), "final" or "latest".
      data_dir: ingested TFRecords to evaluate on.
      split: split of `data_dir` to evaluate ("test").
      val_split: split used to choose the IoP mask threshold (None: skip).
      predictions: a predictions.jsonl file instead of a model.
      bbox_list: the box list CSV (predictions mode).
      data_entry: the label table (predictions mode, for AUROC).
      map_source: "model" or "gradcam".
      box_thresholds: map thresholds for boxes; empty: 0.9 for probability
        maps, (180, 60) for CAM maps (normalised to [0, 255]).
      iobb_thresholds: the T of the accuracy tables.
      mask_thresholds: candidates of the IoP threshold; empty: a default grid.
      batch_size: images per forward pass.
      max_images: evaluate at most this many images (None: all).
      work_size: see `localization.extract_boxes`.
      num_overlays: overlays (film, maps, predicted and truth boxes) of this
        many images with truth boxes go to `output_dir/overlays/` (model
        runs only: a predictions file carries no pixels).
    """

    output_dir: str
    model_dir: str | None = None
    checkpoint: str = "best"
    data_dir: str | None = None
    split: str = "test"
    val_split: str | None = "val"
    predictions: str | None = None
    bbox_list: str | None = None
    data_entry: str | None = None
    map_source: str = "model"
    box_thresholds: tuple = ()
    iobb_thresholds: tuple = IOBB_THRESHOLDS
    mask_thresholds: tuple = ()
    batch_size: int = 32
    max_images: int | None = None
    work_size: int | None = localization.DEFAULT_WORK_SIZE
    num_overlays: int = 8

    def __post_init__(self):
        for name in ("box_thresholds", "iobb_thresholds", "mask_thresholds"):
            object.__setattr__(self, name, tuple(float(t) for t in getattr(self, name)))
        if self.predictions is None:
            if not self.model_dir or not self.data_dir:
                raise ValueError(
                    "Give `model_dir` and `data_dir`, or `predictions` (with "
                    f"`bbox_list`). Received: model_dir={self.model_dir!r}, "
                    f"data_dir={self.data_dir!r}"
                )
        elif not self.bbox_list:
            raise ValueError(
                "`predictions` needs `bbox_list` (the ground-truth boxes). "
                f"Received: bbox_list={self.bbox_list!r}"
            )
        if self.map_source not in predict_lib.MAP_SOURCES:
            raise ValueError(
                f"`map_source` must be one of {predict_lib.MAP_SOURCES}. "
                f"Received: map_source={self.map_source!r}"
            )
        if self.split not in schema.SPLITS:
            raise ValueError(
                f"`split` must be one of {schema.SPLITS}. Received: split={self.split!r}"
            )
        if not isinstance(self.num_overlays, int) or self.num_overlays < 0:
            raise ValueError(
                "`num_overlays` must be an int >= 0. "
                f"Received: num_overlays={self.num_overlays!r}"
            )
        for t in self.iobb_thresholds:
            if not 0.0 <= t < 1.0:
                raise ValueError(
                    "`iobb_thresholds` must be in [0, 1). "
                    f"Received: iobb_thresholds={self.iobb_thresholds!r}"
                )


@dataclasses.dataclass
class ImageResult:
    """Everything evaluation needs of one image.

    Attributes:
      image_id: image name.
      original_hw: (H, W) of the original film.
      labels: (K,) 0/1 or None (unknown).
      probabilities: (K,) or None.
      gt_boxes: finding -> (N, 4) [x, y, w, h] in original pixels.
      pred_boxes: box threshold -> finding -> list of `localization.Box`.
      maps: (h, w, K) map (kept for images with gt boxes) or None.
      ingest_size: the longer side the film's record was stored at (the
        geometry of `cxr_tf.data.preprocess.Letterbox`); None: the network
        size.
      image: the film as stored in its record (padding removed, 0..255),
        kept for the first images with gt boxes that get an overlay; None
        otherwise.
      mask_cache: finding -> (soft mask, factor) for each boxed finding,
        drawn while the split was read (`soft_masks` reads them); None when
        the image has no gt box.
    """

    image_id: str
    original_hw: tuple
    labels: np.ndarray | None
    probabilities: np.ndarray | None
    gt_boxes: dict
    pred_boxes: dict
    maps: np.ndarray | None = None
    ingest_size: int | None = None
    image: np.ndarray | None = None
    mask_cache: dict | None = None


# ---------------------------------------------------------------------------
# Localization metrics (cxr_tf.metrics.localization on per-image dicts).


def _key(t):
    if isinstance(t, model_dir.FindingThresholds):
        return t.key()
    return f"{t:g}"


def box_dicts(results, box_threshold):
    """(predictions, ground_truth) as {image_id: {finding: [(x, y, w, h)]}}."""
    predictions, ground_truth = {}, {}
    for r in results:
        pred = r.pred_boxes.get(box_threshold, {})
        predictions[r.image_id] = {
            f: [(b.x, b.y, b.w, b.h) for b in boxes] for f, boxes in pred.items()
        }
        if r.gt_boxes:
            ground_truth[r.image_id] = {
                f: [tuple(map(float, b)) for b in boxes]
                for f, boxes in r.gt_boxes.items()
            }
    return predictions, ground_truth


def localization_tables(results, findings, thresholds, box_threshold):
    """Accuracy (IoBB and IoU) and AFP (IoBB) per class and T.

    Args:
      results: list of `ImageResult`.
      findings: finding names to report.
      thresholds: the T values.
      box_threshold: which of each result's `pred_boxes` to use.

    Returns:
      dict finding -> {"num_gt_boxes", "num_images", "iobb": {T: acc},
      "iou": {T: acc}, "afp": {T: afp}}; a finding without gt boxes maps to
      {"num_gt_boxes": 0, "note": "no ground-truth boxes"}.
    """
    predictions, ground_truth = box_dicts(results, box_threshold)
    tables = {
        metric: loc_metrics.localization_accuracy(
            predictions, ground_truth, thresholds, metric, findings
        )
        for metric in ("iobb", "iou")
    }
    afp = loc_metrics.average_false_positives(
        predictions, ground_truth, thresholds, "iobb", findings
    )
    out = {}
    for finding in findings:
        entry = tables["iobb"][finding]
        if not entry["num_gt_boxes"]:
            out[finding] = {"num_gt_boxes": 0, "note": "no ground-truth boxes"}
            continue
        out[finding] = {
            "num_gt_boxes": entry["num_gt_boxes"],
            "num_images": entry["num_images"],
            "iobb": {_key(t): entry["accuracy"][t] for t in thresholds},
            "iou": {_key(t): tables["iou"][finding]["accuracy"][t] for t in thresholds},
            "afp": {_key(t): afp[finding]["afp"][t] for t in thresholds},
        }
    return out


def _soft_mask(map_k, original_hw, image_size, map_kind, ingest_size=None):
    """The map over the film at reduced size (CAMs on 0..255), and the factor."""
    height, width = original_hw
    factor = min(1.0, MASK_WORK_SIZE / max(height, width))
    work_hw = (max(1, int(round(height * factor))), max(1, int(round(width * factor))))
    cropped = predict_lib.crop_map_to_image(map_k, original_hw, image_size, ingest_size)
    if map_kind == "cam":
        cropped = localization.normalize_cam(cropped)
        if cropped is None:
            return np.zeros(work_hw, np.float32), factor
    return localization.resize_bilinear(cropped, work_hw), factor


def soft_masks(results, wanted):
    """(finding, mask, gt boxes in mask pixels) for each boxed (image, class).

    The masks are the ones `_run_on_split` drew for the boxed findings
    (`ImageResult.mask_cache`).
    """
    out = []
    for r in results:
        for finding in wanted:
            cached = (r.mask_cache or {}).get(finding)
            if cached is None:
                continue
            mask, factor = cached
            gt = np.asarray(r.gt_boxes[finding])
            out.append((finding, mask, [tuple(b) for b in gt * factor]))
    return out


def mask_table(masks, wanted, threshold):
    """`summarize_mask_metrics` per finding of thresholded soft masks."""
    per_finding = collections.defaultdict(list)
    for finding, mask, gt in masks:
        per_finding[finding].append(loc_metrics.mask_metrics(mask >= threshold, gt))
    return {
        f: loc_metrics.summarize_mask_metrics(per_finding[f])
        for f in wanted
        if per_finding[f]
    }


# ---------------------------------------------------------------------------
# Sources.


def _run_on_split(
    loaded,
    computer,
    data_dir,
    split,
    box_thresholds,
    config,
    keep_all,
    keep_images=0,
    boxed_only=False,
    on_batch=None,
):
    """Runs the model over a split of records; one `ImageResult` per image.

    The first `keep_images` images with gt boxes keep their film pixels.
    With `boxed_only`, films without a box are dropped before they are
    decoded (unless `config.max_images` counts the split's films).
    `on_batch(probs, maps)`, when given, sees every batch the model ran on.
    """
    from cxr_tf.data import input_pipeline

    cfg = input_pipeline.InputConfig(
        image_size=loaded.image_size,
        batch_size=config.batch_size,
        normalization=loaded.normalization,
        augment=False,
    )
    ds = input_pipeline.build_dataset(
        data_dir, split, cfg, training=False, with_info=True,
        boxed_only=boxed_only and not config.max_images,
    )
    findings = list(loaded.findings)
    columns = [schema.FINDINGS.index(f) for f in findings]
    size = loaded.image_size
    # The records' own stored size: the geometry that maps their boxes and
    # the maps back to original pixels.
    stored = model_dir.stored_image_size(data_dir, split)
    norm = loaded.normalization
    boxed_findings = [f for f in findings if f in schema.BOXED_FINDINGS]
    kept = 0

    def batch_results(batch, probs, maps, labels):
        nonlocal kept
        out = []
        for i in range(len(probs)):
            hw = (int(batch["original_height"][i]), int(batch["original_width"][i]))
            n = int(batch["num_boxes"][i])
            gt_net = batch["boxes"][i, :n]
            gt_labels = batch["box_labels"][i, :n]
            gt_xywh = preprocess.Letterbox.of(
                hw[0], hw[1], size, stored
            ).network_boxes_to_original(gt_net)
            gt = {}
            for label, box in zip(gt_labels, gt_xywh):
                name = schema.FINDINGS[int(label)]
                if name in findings:
                    gt.setdefault(name, []).append(box)
            gt = {f: np.asarray(b) for f, b in gt.items()}
            pred = {}
            wanted = findings if keep_all else list(gt)
            for t in box_thresholds:
                pred[t] = {
                    f: predict_lib.boxes_in_original(
                        maps[i, ..., findings.index(f)],
                        hw,
                        size,
                        computer.map_kind,
                        model_dir.box_threshold_for(t, f),
                        config.work_size,
                        stored,
                    )
                    for f in wanted
                }
            film = None
            if gt and kept < keep_images:
                kept += 1
                network = batch["image"][i, ..., 0] * norm.std + norm.mean
                film = np.clip(
                    predict_lib.crop_map_to_image(network, hw, size, stored), 0, 255
                ).astype(np.uint8)
            # The soft masks of the boxed findings, for the IoP table.
            cache = {
                f: _soft_mask(
                    maps[i, ..., findings.index(f)], hw, size, computer.map_kind,
                    stored,
                )
                for f in boxed_findings
                if len(gt.get(f, ()))
            }
            out.append(
                ImageResult(
                    image_id=batch["image_id"][i].decode(),
                    original_hw=hw,
                    labels=labels[i],
                    probabilities=probs[i],
                    gt_boxes=gt,
                    pred_boxes=pred,
                    maps=maps[i] if gt else None,
                    ingest_size=stored,
                    image=film,
                    mask_cache=cache or None,
                )
            )
        return out

    # The boxes of one batch are drawn by a worker thread while the next
    # batch goes through the network (TensorFlow releases the GIL); one
    # worker keeps the results in the split's order.
    results = []
    read = 0
    with futures.ThreadPoolExecutor(1, "evaluate-boxes") as worker:
        pending = collections.deque()
        for features, labels in input_pipeline.iterate_naming_damaged_files(
            ds, data_dir, split
        ):
            # One conversion per batch: slicing eager tensors per image costs
            # an op dispatch each, more than the boxes of a small film.
            batch = {k: v.numpy() for k, v in features.items()}
            probs, maps = computer(batch["image"])
            if on_batch is not None:
                on_batch(probs, maps)
            labels = labels.numpy()[:, columns]
            pending.append(worker.submit(batch_results, batch, probs, maps, labels))
            while len(pending) > _BOX_BATCHES_AHEAD:
                results += pending.popleft().result()
            read += len(probs)
            if config.max_images and read >= config.max_images:
                break
        while pending:
            results += pending.popleft().result()
    if config.max_images:
        del results[config.max_images:]
    return results


def results_from_predictions(config, findings=schema.FINDINGS):
    """Reads predictions.jsonl + box list (+ label table) into `ImageResult`s.

    Returns:
      (results, boxed image ids of the box list absent from the predictions).
    """
    from cxr_tf.data import metadata

    boxes = metadata.read_bbox_list(config.bbox_list)
    gt_lists = collections.defaultdict(lambda: collections.defaultdict(list))
    for row in boxes.itertuples(index=False):
        gt_lists[row.image_id][row.finding].append((row.x, row.y, row.w, row.h))
    gt_by_image = {
        image_id: {f: np.asarray(b, np.float64) for f, b in per_image.items()}
        for image_id, per_image in gt_lists.items()
    }
    labels_by_image = {}
    if config.data_entry:
        entries, _ = metadata.read_data_entry(config.data_entry)
        for image_id, labels in zip(entries["image_id"], entries["labels"]):
            labels_by_image[image_id] = np.asarray(labels, np.float64)
    results = []
    with open(config.predictions) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                name = record["image"]
                probs = record.get("probabilities", {})
            except (ValueError, KeyError) as e:
                raise ValueError(
                    f"{config.predictions}, line {line_no}: not a prediction "
                    f"record ({e})"
                ) from None
            pred = collections.defaultdict(list)
            for b in record.get("boxes", []):
                pred[b["finding"]].append(
                    localization.Box(
                        b["x"], b["y"], b["w"], b["h"], b.get("score", 1.0)
                    )
                )
            image_id = os.path.basename(name)
            results.append(
                ImageResult(
                    image_id=image_id,
                    original_hw=(record.get("height"), record.get("width")),
                    labels=labels_by_image.get(image_id),
                    probabilities=(
                        np.asarray([probs.get(f, np.nan) for f in findings])
                        if probs
                        else None
                    ),
                    gt_boxes=gt_by_image.get(image_id, {}),
                    pred_boxes={None: dict(pred)},
                )
            )
    if not results:
        raise ValueError(f"No prediction records in {config.predictions}")
    return results, sorted(set(gt_by_image) - {r.image_id for r in results})


# ---------------------------------------------------------------------------
# Classification.


def classification_table(results, findings):
    """Per-class AUROC and ROC points; None entries say why."""
    usable = [
        r for r in results if r.labels is not None and r.probabilities is not None
    ]
    if not usable:
        return None, None
    from cxr_tf.metrics import classification

    y_true = np.stack([r.labels for r in usable])
    y_score = np.stack([r.probabilities for r in usable])
    aucs = classification.auroc_per_class(y_true, y_score, list(findings))
    table, curves = {}, {}
    for k, finding in enumerate(findings):
        positives = int(y_true[:, k].sum())
        entry = {"auc": aucs[finding], "positives": positives, "images": len(usable)}
        if aucs[finding] is None:
            entry["note"] = (
                "no positive images" if positives == 0 else "no negative images"
            )
        else:
            curves[finding] = classification.roc_curve_points(
                y_true[:, k], y_score[:, k]
            )
        table[finding] = entry
    return table, curves


# ---------------------------------------------------------------------------
# The run.


def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def evaluate(config):
    """Evaluates a model (or a predictions file) and writes metrics and plots.

    Args:
      config: an `EvalConfig`.

    Returns:
      The metrics dict written to `output_dir/metrics.json`.
    """
    os.makedirs(config.output_dir, exist_ok=True)
    # Plots are drawn by one background thread (matplotlib's fonts are not
    # for concurrent use) and overlays by another, while the metrics are
    # computed here.
    with futures.ThreadPoolExecutor(1, "evaluate-plots") as drawing, \
            futures.ThreadPoolExecutor(1, "evaluate-overlays") as overlaying:
        return _evaluate(config, drawing, overlaying)


def _evaluate(config, drawing, overlaying):
    from cxr_tf import visualize
    metrics = {"definitions": _DEFINITIONS}
    if config.predictions:
        findings = list(schema.FINDINGS)
        results, unpredicted = results_from_predictions(config, findings)
        box_thresholds = (None,)
        map_kind = None
        metrics["source"] = {
            "predictions": config.predictions,
            "bbox_list": config.bbox_list,
            "note": "ground truth restricted to the images in the predictions file",
            "boxed_images_without_prediction": len(unpredicted),
        }
    else:
        loaded = model_dir.load(config.model_dir, config.checkpoint)
        computer = predict_lib.MapComputer(loaded, config.map_source)
        findings = list(loaded.findings)
        map_kind = computer.map_kind
        box_thresholds = config.box_thresholds or default_box_thresholds(
            loaded, map_kind
        )
        results = _run_on_split(
            loaded,
            computer,
            config.data_dir,
            config.split,
            box_thresholds,
            config,
            keep_all=True,
            keep_images=config.num_overlays,
        )
        model_sha256 = model_dir.file_sha256(loaded.path)
        metrics["source"] = {
            "model": os.path.abspath(loaded.path),
            # What push checks before it exports this very file.
            "model_sha256": model_sha256,
            "checkpoint": config.checkpoint,
            "data_dir": config.data_dir,
            "split": config.split,
            "map_source": config.map_source,
            "map_kind": map_kind,
        }
        _write_predictions(
            os.path.join(config.output_dir, predict_lib.PREDICTIONS_FILE),
            results,
            findings,
            box_thresholds[0],
            map_kind,
        )
    metrics["num_images"] = len(results)
    boxed = [f for f in findings if f in schema.BOXED_FINDINGS]
    drawn = []
    if map_kind is not None and config.num_overlays:
        overlays = overlaying.submit(
            write_overlays,
            os.path.join(config.output_dir, OVERLAY_DIR),
            results,
            findings,
            loaded.image_size,
            map_kind,
            box_thresholds[0],
        )
        drawn.append(overlays)
        metrics["overlays"] = overlays

    table, curves = classification_table(results, findings)
    if table is None:
        metrics["classification"] = {"note": "no labels: AUROC not computed"}
    else:
        metrics["classification"] = {
            "per_class": table,
            "mean_auc": _mean(e["auc"] for e in table.values()),
        }
        if curves:
            drawn.append(
                drawing.submit(
                    visualize.plot_roc,
                    curves,
                    os.path.join(config.output_dir, "roc.png"),
                    aucs={f: table[f]["auc"] for f in curves},
                    title=f"ROC ({metrics['num_images']} images)",
                )
            )

    loc = {}
    for t in box_thresholds:
        per_class = localization_tables(results, boxed, config.iobb_thresholds, t)
        evaluated = [v for v in per_class.values() if v["num_gt_boxes"]]
        summary = {
            kind: {
                _key(T): _mean(v[kind][_key(T)] for v in evaluated)
                for T in config.iobb_thresholds
            }
            for kind in ("iobb", "iou", "afp")
        }
        loc["predictions" if t is None else _key(t)] = {
            "per_class": per_class,
            "mean": summary,
            "num_classes_with_boxes": len(evaluated),
        }
    metrics["localization"] = loc
    first = next(iter(loc.values()))
    if first["num_classes_with_boxes"]:
        # IoBB and IoU side by side: the same finding keeps its (colour,
        # style) on both and on the ROC plot.
        for kind, name in (("iobb", "IoBB"), ("iou", "IoU")):
            drawn.append(
                drawing.submit(
                    visualize.plot_localization_accuracy,
                    {
                        f: v[kind]
                        for f, v in first["per_class"].items()
                        if v["num_gt_boxes"]
                    },
                    os.path.join(config.output_dir, LOCALIZATION_PLOTS[kind]),
                    metric=name,
                )
            )
    if map_kind is not None:
        metrics["mask"], stored = _mask_section(
            config, loaded, computer, results, boxed, model_sha256
        )
        metrics["source"]["mask_threshold_stored_at_training"] = stored
    for future in drawn:
        future.result()  # waits; a drawing error is raised here, not lost
    if isinstance(metrics.get("overlays"), futures.Future):
        metrics["overlays"] = metrics["overlays"].result()
    with open(os.path.join(config.output_dir, METRICS_FILE), "w") as f:
        json.dump(metrics, f, indent=2, sort_keys=True)
    logging.info("Wrote %s", os.path.join(config.output_dir, METRICS_FILE))
    return metrics


LOCALIZATION_PLOTS = {
    "iobb": "localization_accuracy.png",
    "iou": "localization_accuracy_iou.png",
}


def write_overlays(
    directory, results, findings, image_size, map_kind, box_threshold, min_prob=0.5
):
    """Overlays of the results that kept their film (`ImageResult.image`).

    Each shows the film with its truth boxes from the record, then the map
    of every finding with truth boxes or probability >= `min_prob`, with
    the predicted boxes at `box_threshold` and the truth boxes dashed.

    Returns:
      {"dir": directory, "images": [overlay file names]}.
    """
    from cxr_tf import visualize

    kept = [r for r in results if r.image is not None and r.maps is not None]
    names = predict_lib.overlay_names([r.image_id for r in kept])
    written = []
    for r in kept:
        probs = dict(zip(findings, (float(p) for p in r.probabilities)))
        shown = [f for f in findings if f in r.gt_boxes or probs[f] >= min_prob]
        maps = {
            f: predict_lib.crop_map_to_image(
                r.maps[..., findings.index(f)], r.original_hw, image_size, r.ingest_size
            )
            for f in shown
        }
        pred = r.pred_boxes.get(box_threshold, {})
        visualize.overlay_figure(
            r.image,
            maps,
            {f: pred.get(f, []) for f in shown},
            probs,
            gt_boxes={f: [tuple(b) for b in boxes] for f, boxes in r.gt_boxes.items()},
            map_kind=map_kind,
            path=os.path.join(directory, names[r.image_id]),
            title=r.image_id,
            frame_hw=r.original_hw,
        )
        written.append(names[r.image_id])
    return {"dir": directory, "images": written}


def default_box_thresholds(loaded, map_kind):
    """The model's own box threshold (chosen on validation) or the kind's defaults."""
    if map_kind == loaded.map_kind and loaded.box_threshold is not None:
        return (loaded.box_threshold,)
    return DEFAULT_BOX_THRESHOLDS[map_kind]


def box_threshold_floor(loaded):
    """The mask value a box threshold must exceed: sigmoid(0) - tau, for InfoMask.

    Where the network says nothing about a pixel, its z sits at the KL
    prior's mean 0 and the mask at sigmoid(0) - tau (0.3 at tau 0.2); the
    KL pulls every pixel the classifier does not need there. A box drawn at
    or below that value boxes the prior, not the evidence: on the demo
    films the IoP rule chose exactly 0.30 and boxed most of the lungs
    (docs/design/infomask.md, "The mask on the trunk's features", 5).

    Returns:
      float, or None for models without an InfoMask mask.
    """
    config = loaded.model_config
    if config.backbone != "infomask":
        return None
    return 0.5 - float(config.infomask_tau)


BOX_QUANTILES = (0.8, 0.85, 0.9, 0.95, 0.98)
DEFAULT_BOX_QUANTILE = 0.9
_HISTOGRAM_BINS = 10000
_FLOOR_MARGIN = 1e-3


class MaskHistograms:
    """Each finding's mask values over a split, on the films called positive.

    A histogram of 10,000 bins over [0, 1] per finding (a mask lies in
    [0, 1 - tau]): memory does not grow with the split, and quantiles are
    exact to 1e-4. A finding no film is called positive for keeps the
    histogram of all films, so it still gets a threshold.
    """

    def __init__(self, findings, positive_threshold=0.5):
        self.findings = list(findings)
        self.positive_threshold = positive_threshold
        shape = (len(self.findings), _HISTOGRAM_BINS)
        self.positive = np.zeros(shape, np.int64)
        self.every = np.zeros(shape, np.int64)

    def add(self, probs, maps):
        """Adds a batch: probs (B, K), maps (B, h, w, K)."""
        bins = np.clip(
            (np.asarray(maps, np.float64) * _HISTOGRAM_BINS).astype(np.int64),
            0, _HISTOGRAM_BINS - 1,
        )
        for k in range(len(self.findings)):
            cells = bins[..., k]
            self.every[k] += np.bincount(cells.ravel(), minlength=_HISTOGRAM_BINS)
            called = np.asarray(probs)[:, k] >= self.positive_threshold
            if called.any():
                self.positive[k] += np.bincount(
                    cells[called].ravel(), minlength=_HISTOGRAM_BINS
                )

    def quantile(self, finding, q):
        """The q-quantile of `finding`'s mask (upper bin edge), or None."""
        k = self.findings.index(finding)
        counts = self.positive[k] if self.positive[k].any() else self.every[k]
        total = counts.sum()
        if not total:
            return None
        index = int(np.searchsorted(np.cumsum(counts), q * total))
        return min(index + 1, _HISTOGRAM_BINS) / _HISTOGRAM_BINS


def quantile_thresholds(histograms, q, floor):
    """Per finding: the q-quantile of its mask, kept above `floor`.

    Returns:
      `model_dir.FindingThresholds` of the findings with a histogram.
    """
    values = {}
    for finding in histograms.findings:
        value = histograms.quantile(finding, q)
        if value is not None:
            values[finding] = max(value, floor + _FLOOR_MARGIN)
    return model_dir.FindingThresholds.of(values)


def _box_accuracy(results, findings, thresholds, image_size, map_kind,
                  positive_threshold, work_size):
    """Mean over findings of the mean accuracy over IOBB_THRESHOLDS.

    Boxes as predict draws them by default: only for findings called
    positive, at `thresholds` (`model_dir.FindingThresholds`); `findings`
    are the model's output columns. None when no result has a box.
    """
    wanted = thresholds.as_dict()
    predictions, ground_truth = {}, {}
    for r in results:
        if not r.gt_boxes or r.maps is None:
            continue
        pred = {}
        for finding in r.gt_boxes:
            k = findings.index(finding)
            if finding not in wanted or r.probabilities[k] < positive_threshold:
                continue
            pred[finding] = predict_lib.boxes_in_original(
                r.maps[..., k], r.original_hw, image_size, map_kind,
                wanted[finding], work_size, r.ingest_size,
            )
        predictions[r.image_id] = pred
        ground_truth[r.image_id] = {
            f: [tuple(map(float, b)) for b in boxes] for f, boxes in r.gt_boxes.items()
        }
    table = loc_metrics.localization_accuracy(
        predictions, ground_truth, IOBB_THRESHOLDS, "iobb",
        [f for f in findings if f in schema.BOXED_FINDINGS],
    )
    scores = [
        np.mean([v["accuracy"][t] for t in IOBB_THRESHOLDS])
        for v in table.values() if v["num_gt_boxes"]
    ]
    return float(np.mean(scores)) if scores else None


def choose_mask_box_thresholds(loaded, computer, data_dir, split, batch_size=8,
                               max_images=None, positive_threshold=0.5):
    """An InfoMask model's box threshold per finding, chosen on a split.

    The rule (docs/design/infomask.md, "Box thresholds per finding"): a
    finding's threshold is the q-quantile of its mask over the split's films
    the model calls positive for it (probability >= `positive_threshold`),
    kept above `box_threshold_floor`; boxes then enclose the top 1 - q of
    the mask where the finding is called. q is the candidate of
    BOX_QUANTILES whose boxes (drawn as predict draws them) localize the
    split's boxed (image, finding) pairs best, mean accuracy over
    IOBB_THRESHOLDS; without a boxed pair (ChestX-ray14's own validation
    films have none) q is DEFAULT_BOX_QUANTILE.

    Args:
      loaded: a `model_dir.LoadedModel` of an InfoMask model.
      computer: its `predict_lib.MapComputer`.
      data_dir: ingested TFRecords.
      split: the split to choose on.
      batch_size: images per forward pass.
      max_images: read at most this many images (None: all).
      positive_threshold: predict's probability cut for boxes.

    Returns:
      {"threshold": `model_dir.FindingThresholds`, "quantile", "score"
      (None without boxed pairs), "pairs", "films"}, or None when the split
      has no film.

    Raises:
      FileNotFoundError: the split has no record file.
    """
    floor = box_threshold_floor(loaded)
    config = EvalConfig(
        output_dir=".", model_dir=loaded.path, data_dir=data_dir,
        batch_size=batch_size, max_images=max_images,
    )
    histograms = MaskHistograms(loaded.findings, positive_threshold)
    results = _run_on_split(
        loaded, computer, data_dir, split, (), config, keep_all=False,
        on_batch=histograms.add,
    )
    if not results:
        return None
    boxed = [r for r in results if r.gt_boxes]
    pairs = sum(len(r.gt_boxes) for r in boxed)
    scored = []
    for q in BOX_QUANTILES:
        thresholds = quantile_thresholds(histograms, q, floor)
        score = _box_accuracy(
            boxed, list(loaded.findings), thresholds, loaded.image_size,
            computer.map_kind,
            positive_threshold, config.work_size,
        ) if boxed else None
        scored.append((q, thresholds, score))
    if any(score is not None for _, _, score in scored):
        # Ties go to the quantile nearest the default.
        q, thresholds, score = max(
            (x for x in scored if x[2] is not None),
            key=lambda x: (x[2], -abs(x[0] - DEFAULT_BOX_QUANTILE)),
        )
    else:
        q, thresholds, score = next(x for x in scored if x[0] == DEFAULT_BOX_QUANTILE)
    return {
        "threshold": thresholds,
        "quantile": q,
        "score": score,
        "pairs": pairs,
        "films": len(results),
    }


def choose_mask_threshold_on_split(loaded, computer, data_dir, split, candidates,
                                   batch_size=8, max_images=None):
    """The IoP (and mask box) threshold of a model's maps, chosen on a split.

    The InfoMask paper's rule: the candidate with the least localization
    error, mean (FPR + FNR) / 2 over the split's boxed (image, finding) pairs
    (`metrics.localization.choose_mask_threshold`). Only films with boxes
    reach the forward pass: the others add no pair (in ChestX-ray14's
    official split no validation film has a box).

    Args:
      loaded: a `model_dir.LoadedModel`.
      computer: its `predict_lib.MapComputer`.
      data_dir: ingested TFRecords.
      split: the split to choose on.
      candidates: the thresholds tried.
      batch_size: images per forward pass.
      max_images: read at most this many images of the split (None: all).

    Returns:
      {"threshold", "error", "pairs"}; threshold and error are None when
      the split has no boxed pair of the model's findings.

    Raises:
      FileNotFoundError: the split has no record file.
    """
    config = EvalConfig(
        output_dir=".",
        model_dir=loaded.path,
        data_dir=data_dir,
        batch_size=batch_size,
        max_images=max_images,
    )
    results = _run_on_split(
        loaded, computer, data_dir, split, (), config, keep_all=False, boxed_only=True
    )
    findings = list(loaded.findings)
    wanted = [f for f in findings if f in schema.BOXED_FINDINGS]
    masks = soft_masks(results, wanted)
    if not masks:
        return {"threshold": None, "error": None, "pairs": 0}
    choice = loc_metrics.choose_mask_threshold(
        [m for _, m, _ in masks], [g for _, _, g in masks], candidates
    )
    return {
        "threshold": float(choice["threshold"]),
        "error": float(choice["error"]),
        "pairs": len(masks),
    }


def choose_box_threshold(loaded, data_dir, split="val", batch_size=8, max_images=None):
    """Box threshold of a model's own maps, chosen on a split.

    InfoMask models (`box_threshold_floor` is not None): one threshold per
    finding (`choose_mask_box_thresholds`). Other models: the IoP rule of
    `choose_mask_threshold_on_split` over `DEFAULT_MASK_THRESHOLDS` of the
    model's map kind, which needs boxed films.

    Args:
      loaded: a `model_dir.LoadedModel`.
      data_dir: ingested TFRecords.
      split: the split to choose on.
      batch_size: images per forward pass.
      max_images: read at most this many images of the split (None: all).

    Returns:
      {"threshold" (a float or `model_dir.FindingThresholds`), "pairs",
      "split", ...}, or None when nothing can be chosen (no records; for
      other models also no boxed image of the model's findings).
    """
    computer = predict_lib.MapComputer(loaded, "model")
    try:
        if box_threshold_floor(loaded) is not None:
            choice = choose_mask_box_thresholds(
                loaded, computer, data_dir, split, batch_size, max_images
            )
        else:
            choice = choose_mask_threshold_on_split(
                loaded, computer, data_dir, split,
                DEFAULT_MASK_THRESHOLDS[computer.map_kind], batch_size, max_images,
            )
    except FileNotFoundError:
        return None
    if choice is None or choice["threshold"] is None:
        return None
    return {**choice, "split": split}


def store_box_threshold(directory, data_dir, split="val", checkpoint="final",
                        batch_size=8, max_images=None):
    """Chooses a model's box threshold on `split` and writes it to config.json.

    Args:
      directory: the model directory.
      data_dir: ingested TFRecords with `split`.
      split: the split to choose on.
      checkpoint: the model of `directory` to choose for ("final": the one
        predict and export use by default).
      batch_size, max_images: as in `choose_box_threshold`.

    Returns:
      The choice (see `choose_box_threshold`), or None when nothing was
      written.
    """
    loaded = model_dir.load(directory, checkpoint)
    choice = choose_box_threshold(loaded, data_dir, split, batch_size, max_images)
    if choice is None:
        _warn_no_box_threshold(directory, data_dir, split, loaded.map_kind)
        return None
    _write_box_threshold(directory, loaded.map_kind, choice, split)
    return choice


def _write_box_threshold(directory, map_kind, choice, split):
    model_dir.write_box_thresholds(directory, {map_kind: choice["threshold"]})
    threshold = choice["threshold"]
    if isinstance(threshold, model_dir.FindingThresholds):
        shown = ", ".join(f"{f} {t:.4f}" for f, t in threshold.values)
        how = (
            f"quantile {choice['quantile']} of each finding's mask on "
            f"{choice['films']} {split} films"
        )
        how += (
            f", localizing {choice['score']:.3f} of {choice['pairs']} boxed pairs"
            if choice["score"] is not None else " (no boxed pair: the default)"
        )
    else:
        shown = f"{threshold:.2f}"
        how = f"{choice['pairs']} boxed {split} pairs (error {choice['error']:.4f})"
    logging.info("Box threshold %s chosen by %s, in %s", shown, how, directory)


def _warn_no_box_threshold(directory, data_dir, split, kind):
    logging.warning(
        "No %s film in %s to choose a box threshold on: none chosen for %s; "
        "the %s default %s applies.", split, data_dir, directory, kind,
        localization.DEFAULT_THRESHOLDS[kind],
    )


def store_mask_threshold_choices(directory, data_dir, split="val",
                                 checkpoints=("final", "best"), batch_size=8,
                                 box_threshold_of=None):
    """Chooses the IoP threshold of each checkpoint on `split`, once, for evaluate.

    Training calls it when it ends, so that evaluate (of "best" by default)
    reads the choice instead of a second forward pass over the validation
    split. Each choice is tied to its checkpoint file's sha256 and to the
    split's record files (`model_dir.LoadedModel.mask_threshold_choice`).

    Args:
      directory: the model directory.
      data_dir: ingested TFRecords with `split`.
      split: the split to choose on.
      checkpoints: which checkpoints of `directory` (missing ones are skipped;
        files with equal bytes are chosen for once).
      batch_size: images per forward pass.
      box_threshold_of: None, or the name in `checkpoints` whose box
        threshold (`choose_box_threshold`, on the same split) becomes the
        model's (config.json `box_thresholds`).

    Returns:
      The list of choices written (empty when the split has no records).
    """
    records = model_dir.records_fingerprint(data_dir, split)
    if not records["files"]:
        if box_threshold_of:
            # Only mask models (probability maps) ask for a box threshold.
            _warn_no_box_threshold(directory, data_dir, split, "probability")
        return []
    choices = []
    # Checkpoint name (and file digest) -> (its stored choice, its model).
    by_digest, by_name = {}, {}
    for name in checkpoints:
        try:
            loaded = model_dir.load(directory, name)
        except errors.UserFileError:
            continue
        digest = model_dir.file_sha256(loaded.path)
        if digest in by_digest:
            by_name[name] = by_digest[digest]
            continue
        computer = predict_lib.MapComputer(loaded, "model")
        candidates = DEFAULT_MASK_THRESHOLDS[computer.map_kind]
        choice = choose_mask_threshold_on_split(
            loaded, computer, data_dir, split, candidates, batch_size
        )
        logging.info(
            "IoP threshold of %s chosen on %d boxed %s pairs: %s",
            loaded.path, choice["pairs"], split, choice["threshold"],
        )
        choices.append({
            "model_sha256": digest,
            "map_kind": computer.map_kind,
            "records": records,
            "candidates": [float(c) for c in candidates],
            **choice,
        })
        by_digest[digest] = by_name[name] = (choices[-1], loaded)
    model_dir.write_mask_threshold_choices(directory, choices)
    if box_threshold_of:
        chosen, loaded = by_name.get(box_threshold_of, (None, None))
        box = None if loaded is None else choose_box_threshold(
            loaded, data_dir, split, batch_size
        )
        if box is None:
            kind = chosen["map_kind"] if chosen else "probability"
            _warn_no_box_threshold(directory, data_dir, split, kind)
        else:
            _write_box_threshold(directory, chosen["map_kind"], box, split)
    return choices


def _validation_mask_threshold(config, loaded, computer, candidates, model_sha256):
    """(choice, stored): the IoP threshold chosen on `config.val_split`.

    A choice stored when training ended is used when it was made for this
    very file, map kind, candidates and records; otherwise the split is run.
    """
    records = model_dir.records_fingerprint(config.data_dir, config.val_split)
    if not records["files"]:
        return None, False
    if computer.map_source == "model" and not config.max_images:
        stored = loaded.mask_threshold_choice(
            model_sha256, computer.map_kind, records, candidates
        )
        if stored is not None:
            return stored, True
    choice = choose_mask_threshold_on_split(
        loaded, computer, config.data_dir, config.val_split, candidates,
        config.batch_size, config.max_images,
    )
    return choice, False


def _mask_section(config, loaded, computer, results, boxed, model_sha256):
    map_kind = computer.map_kind
    findings = list(loaded.findings)
    wanted = [f for f in findings if f in boxed]
    candidates = config.mask_thresholds or DEFAULT_MASK_THRESHOLDS[map_kind]
    chosen, error, source, stored = None, None, None, False
    if config.val_split:
        choice, stored = _validation_mask_threshold(
            config, loaded, computer, candidates, model_sha256
        )
        if choice is not None and choice["threshold"] is not None:
            chosen, error = choice["threshold"], choice["error"]
            source = (
                f"chosen on the {config.val_split} split "
                f"({choice['pairs']} boxed image-finding pairs)"
            )
    if chosen is None:
        chosen = localization.DEFAULT_THRESHOLDS[map_kind]
        source = "default of the map kind (no validation images with boxes)"
    masks = soft_masks(results, wanted)
    per_class = mask_table(masks, wanted, chosen)
    section = {
        "threshold": chosen,
        "threshold_source": source,
        "validation_error": error,
        "per_class": per_class,
        "mean": {
            k: _mean(v[k] for v in per_class.values()) for k in ("iop", "fpr", "fnr")
        },
        "definition": loc_metrics.MASK_ERROR_DEFINITION,
    }
    return section, stored


def _write_predictions(path, results, findings, box_threshold, map_kind):
    with open(path, "w") as f:
        for r in results:
            boxes = [
                localization.box_record(finding, b)
                for finding, items in r.pred_boxes.get(box_threshold, {}).items()
                for b in items
            ]
            record = {
                "image": r.image_id,
                "height": r.original_hw[0],
                "width": r.original_hw[1],
                "map_kind": map_kind,
                "probabilities": {
                    f: round(float(p), 6) for f, p in zip(findings, r.probabilities)
                },
                "boxes": boxes,
            }
            f.write(json.dumps(record) + "\n")


_DEFINITIONS = {
    "iobb": "area(pred ∩ gt) / area(pred); a gt box is localized at T when a "
    "predicted box of its class on its image has IoBB > T; accuracy = localized "
    "gt boxes / all gt boxes of the class",
    "iou": "as iobb with area(pred ∩ gt) / area(pred ∪ gt)",
    "afp": loc_metrics.AFP_DEFINITION + " (overlap: IoBB)",
    "accuracy": loc_metrics.ACCURACY_DEFINITION,
    "mask": "IoP = |P∩G|/|P|, FPR = |P\\G|/|not G|, FNR = |G\\P|/|G| with "
    "P = map >= threshold (CAMs normalised to [0,255] per image) over the film, "
    "G = union of the finding's gt boxes; per finding the mean over its boxed "
    "images, overall the mean of the per-finding means; "
    "threshold chosen on the validation split: " + loc_metrics.MASK_ERROR_DEFINITION,
    "boxes": "in pixels of the original image (letterbox undone)",
}


def headline(metrics):
    """The summary figures of a metrics dict (mean AUC, accuracy at IoBB > T)."""
    out = {"num_images": metrics.get("num_images")}
    cls = metrics.get("classification", {})
    out["mean_auc"] = cls.get("mean_auc")
    for name, section in metrics.get("localization", {}).items():
        out[f"boxes@{name}"] = {
            "mean_iobb_accuracy": section["mean"]["iobb"],
            "mean_afp": section["mean"]["afp"],
        }
    if "mask" in metrics:
        out["mask"] = {
            "threshold": metrics["mask"]["threshold"],
            **metrics["mask"]["mean"],
        }
    return out
