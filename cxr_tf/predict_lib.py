"""Prediction on image files: probabilities, maps and boxes in original pixels.

Preprocessing is the input pipeline's evaluation path: the film is letterboxed
(aspect kept, longer side = S, centred zero padding) with the pipeline's own
function, then normalised; boxes found on the S x S map are mapped back
through the inverse letterbox to the original image's pixels.
"""

import dataclasses
import json
import os

from absl import logging
import numpy as np
from scipy import special

from cxr_tf import localization
from cxr_tf.data import preprocess
from cxr_tf.data import schema

IMAGE_EXTENSIONS = schema.IMAGE_EXTENSIONS
MAP_SOURCES = ("model", "gradcam")
PREDICTIONS_FILE = "predictions.jsonl"
OVERLAY_DIR = "overlays"


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
    box = preprocess.Letterbox(
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


def list_images(inputs):
    """Expands files and directories into a sorted list of image paths.

    Args:
      inputs: paths of files (taken whatever their extension) and directories
        (searched recursively for `IMAGE_EXTENSIONS`).

    Returns:
      (paths, missing): image paths, and inputs that do not exist.
    """
    paths, missing = [], []
    for item in inputs:
        if os.path.isdir(item):
            for root, _, files in os.walk(item):
                for name in sorted(files):
                    if name.lower().endswith(IMAGE_EXTENSIONS):
                        paths.append(os.path.join(root, name))
        elif os.path.isfile(item):
            paths.append(item)
        else:
            missing.append(item)
    return sorted(dict.fromkeys(paths)), missing


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

            @tf.function(reduce_retracing=True)
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
    work_size: int | None = 2048
    dicom_orientation: str = "auto"

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
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(
                "`batch_size` must be a positive int. "
                f"Received: batch_size={self.batch_size!r}"
            )


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
      box_threshold: map threshold (None: the kind's default).
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
            box_threshold,
            work_size,
            ingest_size,
        ):
            boxes.append(
                {
                    "finding": finding,
                    "x": round(b.x, 2),
                    "y": round(b.y, 2),
                    "w": round(b.w, 2),
                    "h": round(b.h, 2),
                    "score": round(float(b.score), 5),
                }
            )
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
    return preprocess.Letterbox(
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
    ingest_size=None,
):
    """Writes the overlay PNG of one image (maps of present findings, boxes)."""
    from cxr_tf import visualize

    probs = record["probabilities"]
    shown = [f for f in findings if probs[f] >= positive_threshold]
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
        map_kind=map_kind,
        path=path,
        title=record["image"],
    )


def predict(config, inputs):
    """Predicts every readable image of `inputs`; reports and skips the rest.

    Args:
      config: a `PredictConfig`.
      inputs: image files and/or directories.

    Returns:
      dict summary: {"predicted": n, "failed": [{"image", "reason"}],
      "predictions": path of predictions.jsonl}.

    Raises:
      FileNotFoundError: no image found at all in `inputs`.
    """
    from cxr_tf import model_dir
    from cxr_tf.data import images as images_lib

    paths, missing = list_images(inputs)
    failed = [{"image": m, "reason": "no such file or directory"} for m in missing]
    if not paths:
        raise FileNotFoundError(f"No image files found in {list(inputs)}")
    loaded = model_dir.load(config.model, config.checkpoint)
    computer = MapComputer(loaded, config.map_source)
    findings = list(loaded.findings)
    size = loaded.image_size
    # The model's own threshold, chosen on validation at training, when the
    # maps are its own; else the kind's default (None).
    box_threshold = config.box_threshold
    if box_threshold is None and computer.map_kind == loaded.map_kind:
        box_threshold = loaded.box_threshold
    os.makedirs(config.output_dir, exist_ok=True)
    if config.overlays:
        os.makedirs(os.path.join(config.output_dir, OVERLAY_DIR), exist_ok=True)
    out_path = os.path.join(config.output_dir, PREDICTIONS_FILE)
    count = 0
    with open(out_path, "w") as out:
        for start in range(0, len(paths), config.batch_size):
            batch = []
            for path in paths[start : start + config.batch_size]:
                try:
                    pixels, info = images_lib.read_image_with_info(
                        path, orientation=config.dicom_orientation
                    )
                except (ValueError, OSError) as e:
                    logging.warning("Skipping %s: %s", path, e)
                    failed.append({"image": path, "reason": str(e)})
                    continue
                batch.append((path, pixels, info))
            if not batch:
                continue
            inputs_np = np.stack(
                [
                    preprocess.preprocess_pixels(
                        p, size, loaded.normalization, loaded.ingest_size
                    )
                    for _, p, _ in batch
                ]
            )
            probs, maps = computer(inputs_np)
            for (path, pixels, info), p, m in zip(batch, probs, maps):
                name = os.path.basename(path)
                record = prediction_record(
                    name,
                    pixels.shape,
                    p,
                    m,
                    findings,
                    size,
                    computer.map_kind,
                    box_threshold,
                    config.positive_threshold,
                    config.box_findings,
                    config.work_size,
                    loaded.ingest_size,
                )
                if info.orientation_corrected:
                    record["orientation_corrected"] = True
                out.write(json.dumps(record) + "\n")
                if config.overlays:
                    write_overlay(
                        os.path.join(config.output_dir, OVERLAY_DIR, name + ".png"),
                        pixels,
                        record,
                        m,
                        findings,
                        size,
                        computer.map_kind,
                        config.positive_threshold,
                        loaded.ingest_size,
                    )
                count += 1
            logging.info("Predicted %d / %d images", count, len(paths))
    summary = {"predicted": count, "failed": failed, "predictions": out_path}
    with open(os.path.join(config.output_dir, "predict_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
