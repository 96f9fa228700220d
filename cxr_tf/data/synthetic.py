"""Synthetic chest films in the exact ChestX-ray14 layout: the offline data set.

Usage:
  python -m cxr_tf.data.synthetic --output_dir=/tmp/cxr_synth \
      [--num_patients=360 --image_size=256 --seed=0 --prevalence=boosted]
  python -m cxr_tf.data.synthetic --contact_sheet=sheet.png [--output_dir=D]

The output has `images/NNNNNNNN_NNN.png` (8-bit grayscale),
`Data_Entry_2017.csv` (v2020 columns), `BBox_List_2017.csv` (one box per
drawn lesion of the 8 boxed findings, label `Infiltrate` as in the real
file), `train_val_list.txt` and `test_list.txt` (patient-wise, no final
newline), plus `synthetic_config.json` recording the arguments.
"""

import csv
import dataclasses
import io
import json
import math
import multiprocessing
import os
import pathlib
import time

import numpy as np
from absl import logging
from PIL import Image

from cxr_tf import config_dict
from cxr_tf.data import _phantom
from cxr_tf.data import schema

Lesion = _phantom.Lesion

# Per-image prevalence of the v2020 table (docs/DATA_AND_METRICS.md, "Prevalence").
REAL_PREVALENCE = {
    "Atelectasis": 0.103,
    "Cardiomegaly": 0.025,
    "Effusion": 0.119,
    "Infiltration": 0.177,
    "Mass": 0.052,
    "Nodule": 0.057,
    "Pneumonia": 0.013,
    "Pneumothorax": 0.047,
    "Consolidation": 0.042,
    "Edema": 0.021,
    "Emphysema": 0.022,
    "Fibrosis": 0.015,
    "Pleural_Thickening": 0.030,
    "Hernia": 0.002,
}
REAL_NO_FINDING = 0.538
PREVALENCE_MODES = ("boosted", "real")

# Median real box (w, h, centre x, centre y) in pixels of the 1024 film.
REAL_BOX_MEDIANS = {
    "Atelectasis": (171, 118, 512, 586),
    "Cardiomegaly": (478, 382, 588, 579),
    "Effusion": (208, 277, 385, 574),
    "Infiltration": (228, 265, 569, 532),
    "Mass": (120, 141, 449, 456),
    "Nodule": (70, 68, 643, 478),
    "Pneumonia": (229, 275, 537, 569),
    "Pneumothorax": (201, 206, 348, 259),
}

DATA_ENTRY_HEADER = (
    "Image Index",
    "Finding Labels",
    "Follow-up #",
    "Patient ID",
    "Patient Age",
    "Patient Gender",
    "View Position",
    "OriginalImage[Width",
    "Height]",
    "OriginalImagePixelSpacing[x",
    "y]",
)
BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
DATA_ENTRY_FILE = "Data_Entry_2017.csv"
BBOX_FILE = "BBox_List_2017.csv"
TRAIN_VAL_FILE = "train_val_list.txt"
TEST_FILE = "test_list.txt"
IMAGES_DIR = "images"
CONFIG_FILE = "synthetic_config.json"
# Width of the simulated detector, so the pixel spacing column is plausible.
FIELD_OF_VIEW_MM = 400.0
# Mean scale of the body in the film; turns real box sizes into body units.
_MEAN_SCALE = 0.93
_MAX_FINDINGS = 6


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Arguments of `generate_dataset`.

    Attributes:
      output_dir: directory to write the data set to.
      num_patients: number of patients (each has one or more films).
      image_size: side of the square films in pixels.
      seed: random seed; the same arguments give the same bytes.
      images_per_patient: mean number of films per patient (follow-ups).
      prevalence: "boosted" (real ordering, rare findings raised to
        `min_prevalence`) or "real" (the v2020 table).
      min_prevalence: floor of the boosted prevalences.
      test_fraction: fraction of patients in `test_list.txt`.
      num_workers: processes rendering films (1: in this process).
    """

    output_dir: str
    num_patients: int = 360
    image_size: int = 256
    seed: int = 0
    images_per_patient: float = 1.7
    prevalence: str = "boosted"
    min_prevalence: float = 0.08
    test_fraction: float = 0.2
    num_workers: int = 1

    def __post_init__(self):
        config_dict.check_int("num_patients", self.num_patients)
        config_dict.check_int("image_size", self.image_size, 32)
        if not 1.0 <= self.images_per_patient <= 20.0:
            raise ValueError(
                "`images_per_patient` must be in [1, 20]. "
                f"Received: images_per_patient={self.images_per_patient!r}"
            )
        _check_prevalence_args(self.prevalence, self.min_prevalence)
        if not 0.0 <= self.test_fraction < 1.0:
            raise ValueError(
                "`test_fraction` must be in [0, 1). "
                f"Received: test_fraction={self.test_fraction!r}"
            )
        config_dict.check_int("num_workers", self.num_workers)


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """Everything needed to render one film, and its table row.

    Attributes:
      image_id: "NNNNNNNN_NNN.png".
      patient_id: int patient number.
      follow_up: 0-based film index of the patient.
      age: age in years.
      sex: "M" or "F".
      view_position: "PA" or "AP".
      findings: findings present, in `schema.FINDINGS` order.
      lesions: the drawn lesions (`Lesion`), one or more per finding.
      anatomy: dict of body-frame anatomy and pose parameters.
      exposure: dict of exposure, noise and window parameters.
      noise_seed: seed of the film's textures and quantum noise.
    """

    image_id: str
    patient_id: int
    follow_up: int
    age: int
    sex: str
    view_position: str
    findings: tuple
    lesions: tuple
    anatomy: dict
    exposure: dict
    noise_seed: int


def _check_prevalence_args(prevalence, min_prevalence):
    if prevalence not in PREVALENCE_MODES:
        raise ValueError(
            f"`prevalence` must be one of {PREVALENCE_MODES}. "
            f"Received: prevalence={prevalence!r}"
        )
    if not 0.0 < min_prevalence <= max(REAL_PREVALENCE.values()):
        raise ValueError(
            "`min_prevalence` must be in (0, "
            f"{max(REAL_PREVALENCE.values())}]. "
            f"Received: min_prevalence={min_prevalence!r}"
        )


def finding_prevalence(prevalence="boosted", min_prevalence=0.08):
    """Target per-image prevalence of each finding.

    "real" is the v2020 table. "boosted" keeps every finding at or above its
    real prevalence and raises those below `min_prevalence` to values spread
    evenly between `min_prevalence` and the next real prevalence above the
    floor, so the real ordering is kept while a few hundred films still hold
    positives of every finding.

    Args:
      prevalence: "boosted" or "real".
      min_prevalence: the floor of "boosted".

    Returns:
      dict finding -> fraction of images, in `schema.FINDINGS` order.

    Raises:
      ValueError: unknown mode or floor out of range.
    """
    _check_prevalence_args(prevalence, min_prevalence)
    if prevalence == "real":
        return dict(REAL_PREVALENCE)
    ranked = sorted(REAL_PREVALENCE, key=REAL_PREVALENCE.get)  # rarest first
    low = [f for f in ranked if REAL_PREVALENCE[f] < min_prevalence]
    above = [REAL_PREVALENCE[f] for f in ranked if REAL_PREVALENCE[f] >= min_prevalence]
    ceiling = min(above) if above else min_prevalence * 1.3
    top = min_prevalence + 0.8 * (ceiling - min_prevalence)
    out = dict(REAL_PREVALENCE)
    for i, f in enumerate(low):
        frac = i / max(1, len(low) - 1)
        out[f] = min_prevalence + frac * (top - min_prevalence)
    return {f: out[f] for f in schema.FINDINGS}


_CALIBRATION_CACHE = {}


def _label_model(prevalence, min_prevalence):
    """(P(any finding), zero-truncated Poisson rate, log weights) of the labels.

    Images get k ~ 0 or a zero-truncated Poisson number of findings, chosen
    without replacement by weight (Gumbel top-k). P(k >= 1) and the rate
    reproduce the real table's 46.2% abnormal and 18.5% multi-finding images;
    the weights are fitted so each finding's marginal hits its target.
    """
    key = (prevalence, float(min_prevalence))
    if key in _CALIBRATION_CACHE:
        return _CALIBRATION_CACHE[key]
    target = np.array(list(finding_prevalence(prevalence, min_prevalence).values()))
    total = target.sum()
    real_mean = sum(REAL_PREVALENCE.values()) / (1.0 - REAL_NO_FINDING)
    p_any = min(total / real_mean, 0.75)
    mean_k = total / p_any
    lam = _solve_truncated_poisson(mean_k)
    rng = np.random.default_rng(12345)
    n = 20000
    ks = _sample_k(rng, lam, n)
    gumbel = rng.gumbel(size=(n, len(target)))
    logw = np.log(target)
    for _ in range(30):
        keys = logw[None, :] + gumbel
        kth = np.take_along_axis(-np.sort(-keys, axis=1), ks[:, None] - 1, axis=1)
        marginal = (keys >= kth).mean(axis=0) * p_any
        logw += np.log(target) - np.log(marginal + 1e-9)
        logw -= logw.max()
    result = (p_any, lam, logw)
    _CALIBRATION_CACHE[key] = result
    return result


def _solve_truncated_poisson(mean_k):
    if mean_k <= 1.0 + 1e-6:
        return 1e-3
    lo, hi = 1e-4, 20.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if mid / (1.0 - math.exp(-mid)) < mean_k:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _sample_k(rng, lam, n):
    ks = np.arange(1, _MAX_FINDINGS + 1)
    p = np.array([lam**k / math.factorial(k) for k in ks])
    return rng.choice(ks, size=n, p=p / p.sum())


def _sample_findings(rng, p_any, lam, logw):
    if rng.random() >= p_any:
        return ()
    k = int(_sample_k(rng, lam, 1)[0])
    keys = logw + rng.gumbel(size=logw.shape)
    chosen = set(np.argsort(-keys)[:k].tolist())
    return tuple(f for i, f in enumerate(schema.FINDINGS) if i in chosen)


# ---------------------------------------------------------------------------
# Anatomy, exposure and lesion sampling.


def _patient_anatomy(rng, sex):
    thorax_hw = rng.uniform(0.78, 0.88)
    lung_cx = 0.5 * thorax_hw + 0.02
    dome_left = rng.uniform(0.36, 0.46)
    ctr = rng.uniform(0.37, 0.5)
    heart_rx = ctr * thorax_hw
    breast = rng.uniform(0.05, 0.12) if (sex == "F" and rng.random() < 0.7) else 0.0
    return {
        "scale": rng.uniform(0.8, 1.0),
        "tx": rng.uniform(-0.08, 0.08),
        "ty": rng.uniform(-0.06, 0.08),
        "rot": rng.normal(0.0, 0.05),
        "thorax_hw": thorax_hw,
        "lung_cx": lung_cx,
        "lung_rx": thorax_hw - lung_cx - 0.02,
        "lung_cy": rng.uniform(-0.06, 0.02),
        "lung_ry": rng.uniform(0.7, 0.8),
        "dome_left": dome_left,
        "dome_right": dome_left + rng.uniform(0.02, 0.07),
        "dome_curv": rng.uniform(0.5, 0.8),
        "heart_cx": rng.uniform(0.12, 0.18),
        "heart_cy": dome_left - rng.uniform(0.12, 0.17),
        "heart_rx": heart_rx,
        "heart_ry": heart_rx * rng.uniform(0.58, 0.7),
        "heart_tilt": rng.uniform(0.2, 0.4),
        "air": rng.uniform(0.9, 1.1),
        "markings": rng.uniform(0.8, 1.2),
        "bubble": rng.uniform(0.1, 0.3) if rng.random() < 0.7 else 0.0,
        "rib_y0": rng.uniform(-0.92, -0.84),
        "rib_dy": rng.uniform(0.105, 0.125),
        "rib_curv": rng.uniform(0.75, 1.0),
        "clav_y": rng.uniform(-0.78, -0.7),
        "breast": breast,
        "ap": False,
        "electrodes": (),
    }


def _image_anatomy(rng, base, view):
    anatomy = dict(base)
    anatomy["scale"] = float(np.clip(base["scale"] + rng.normal(0, 0.02), 0.76, 1.04))
    anatomy["tx"] = base["tx"] + rng.normal(0, 0.015)
    anatomy["ty"] = base["ty"] + rng.normal(0, 0.015)
    anatomy["rot"] = base["rot"] + rng.normal(0, 0.015)
    if view == "AP":
        # Supine films: poorer inspiration, magnified heart, electrodes.
        anatomy["ap"] = True
        lift = rng.uniform(0.02, 0.07)
        anatomy["dome_left"] -= lift
        anatomy["dome_right"] -= lift
        anatomy["heart_cy"] -= lift
        anatomy["heart_rx"] *= 1.06
        anatomy["heart_ry"] *= 1.06
        anatomy["clav_y"] -= 0.05
        anatomy["electrodes"] = tuple(
            (float(rng.uniform(-0.7, 0.7)), float(rng.uniform(-0.75, 0.3)))
            for _ in range(int(rng.integers(2, 5)))
        )
    for k, v in list(anatomy.items()):
        if isinstance(v, (np.floating, float)):
            anatomy[k] = float(v)
    return anatomy


def _exposure(rng, view, image_size):
    # Same dose per film whatever the size: photons per pixel scale with area.
    dose = rng.uniform(2000, 6000) if view == "PA" else rng.uniform(1000, 3000)
    return {
        "photons": float(dose * (256.0 / image_size) ** 2),
        "low": float(rng.uniform(-0.1, 0.2)),
        "high": float(rng.uniform(1.3, 1.9)),
        "gamma": float(rng.uniform(0.7, 1.4)),
        "ramp_x": float(rng.uniform(-0.1, 0.1)),
        "ramp_y": float(rng.uniform(-0.05, 0.1)),
    }


def _box_size(rng, finding):
    w, h = REAL_BOX_MEDIANS[finding][:2]
    jitter = math.exp(rng.normal(0, 0.2))
    aspect = math.exp(rng.normal(0, 0.12))
    scale = 2.0 / 1024.0 / _MEAN_SCALE * jitter
    return w * scale * aspect, h * scale / aspect


def _place(rng, anatomy, side, x_range, y_range, margin):
    """A lesion centre inside the `side` lung (rejection sampling)."""
    cx = side * rng.uniform(*x_range, size=64)
    cy = rng.uniform(*y_range, size=64)
    ok = np.flatnonzero(_phantom.in_lung(anatomy, side, cx, cy, margin))
    if ok.size:
        return float(cx[ok[0]]), float(cy[ok[0]])
    return float(side * anatomy["lung_cx"]), float(anatomy["lung_cy"] - 0.1)


def _sample_lesions(rng, finding, anatomy):
    """The lesion(s) of one finding for a patient's anatomy."""
    side = int(rng.choice((-1, 1)))
    seed = int(rng.integers(2**31))
    u = rng.uniform
    if finding == "Nodule":
        out = []
        for _ in range(1 if rng.random() < 0.8 else 2):
            d = _box_size(rng, finding)[0]
            s = int(rng.choice((-1, 1)))
            c = _place(rng, anatomy, s, (0.2, 0.7), (-0.55, 0.3), d / 2 + 0.02)
            out.append(
                Lesion(
                    finding, c, (d, d), 0.0, u(0.65, 0.85), s, int(rng.integers(2**31))
                )
            )
        return out
    if finding == "Mass":
        w, h = _box_size(rng, finding)
        c = _place(rng, anatomy, side, (0.2, 0.65), (-0.55, 0.25), max(w, h) / 2)
        return [Lesion(finding, c, (w, h), 0.0, u(0.6, 0.8), side, seed)]
    if finding == "Atelectasis":
        w, h = _box_size(rng, finding)
        c = _place(rng, anatomy, side, (0.25, 0.6), (-0.05, 0.3), 0.05)
        return [Lesion(finding, c, (w, h), u(-0.3, 0.3), u(0.6, 0.8), side, seed)]
    if finding == "Effusion":
        side = -1 if rng.random() < 0.6 else 1
        w, h = _box_size(rng, finding)
        dome = anatomy["dome_left"] if side < 0 else anatomy["dome_right"]
        cp_y = dome + anatomy["dome_curv"] * 0.42**2
        c = (side * anatomy["lung_cx"], cp_y - h / 2 + 0.05)
        return [Lesion(finding, c, (w, h), 0.0, u(0.45, 0.65), side, seed)]
    if finding == "Infiltration":
        w, h = _box_size(rng, finding)
        c = _place(rng, anatomy, side, (0.3, 0.55), (-0.35, 0.2), 0.0)
        return [Lesion(finding, c, (w, h), u(-0.5, 0.5), u(0.55, 0.7), side, seed)]
    if finding == "Pneumonia":
        w, h = _box_size(rng, finding)
        c = _place(rng, anatomy, side, (0.3, 0.55), (-0.2, 0.25), 0.0)
        return [Lesion(finding, c, (w, h), u(-0.4, 0.4), u(0.45, 0.6), side, seed)]
    if finding == "Pneumothorax":
        w, h = _box_size(rng, finding)
        c = (side * anatomy["lung_cx"], u(-0.6, -0.35))
        return [Lesion(finding, c, (w, h), 0.0, u(0.72, 0.86), side, seed)]
    if finding == "Cardiomegaly":
        target = u(0.5, 0.62)
        ctr = anatomy["heart_rx"] / anatomy["thorax_hw"]
        c = (anatomy["heart_cx"], anatomy["heart_cy"])
        return [Lesion(finding, c, (0.0, 0.0), 0.0, target / ctr, 0, seed)]
    if finding == "Consolidation":
        w, h = u(0.3, 0.45), u(0.22, 0.32)
        c = _place(rng, anatomy, side, (0.3, 0.55), (0.0, 0.25), 0.0)
        return [Lesion(finding, c, (w, h), u(-0.2, 0.2), u(0.5, 0.65), side, seed)]
    if finding == "Edema":
        return [Lesion(finding, (0.0, 0.0), (1.4, 1.0), 0.0, u(0.12, 0.2), 0, seed)]
    if finding == "Emphysema":
        return [Lesion(finding, (0.0, -0.4), (1.4, 0.6), 0.0, u(0.35, 0.5), 0, seed)]
    if finding == "Fibrosis":
        c = (0.0, u(-0.1, 0.3))
        return [Lesion(finding, c, (1.4, 0.7), 0.0, u(0.45, 0.6), 0, seed)]
    if finding == "Pleural_Thickening":
        c = (side * anatomy["thorax_hw"], u(-0.5, 0.2))
        return [
            Lesion(
                finding, c, (u(0.035, 0.06), u(0.4, 0.7)), 0.0, u(0.7, 0.9), side, seed
            )
        ]
    if finding == "Hernia":
        r = u(0.08, 0.12)
        c = (u(0.0, 0.1), anatomy["heart_cy"] + u(0.05, 0.12))
        return [Lesion(finding, c, (2 * r, 2 * r), u(-0.3, 0.1), u(0.3, 0.45), 0, seed)]
    raise ValueError(f"Unknown finding {finding!r}. Expected one of {schema.FINDINGS}.")


def sample_patient(
    patient_id,
    seed=0,
    images_per_patient=1.7,
    prevalence="boosted",
    min_prevalence=0.08,
    image_size=256,
):
    """Samples the films of one patient.

    The patient's random stream depends only on (seed, patient_id), so a
    patient's films are the same whatever the number of patients. Follow-ups
    keep the previous film's findings and lesions with probability 1/2 and
    otherwise draw new ones, which keeps each film's label distribution at
    the target while chronic findings persist.

    Args:
      patient_id: positive int.
      seed: data set seed.
      images_per_patient: mean number of films (1 + Poisson).
      prevalence: "boosted" or "real", see `finding_prevalence`.
      min_prevalence: floor of "boosted".
      image_size: film side in pixels (sets the dose per pixel).

    Returns:
      list of `ImageSpec`, follow-up order.
    """
    p_any, lam, logw = _label_model(prevalence, min_prevalence)
    rng = np.random.default_rng([int(seed), int(patient_id)])
    n_images = 1 + min(int(rng.poisson(images_per_patient - 1.0)), 40)
    sex = "M" if rng.random() < 0.56 else "F"
    age = int(np.clip(rng.normal(47, 17), 2, 94))
    base = _patient_anatomy(rng, sex)
    ap_rate = 0.15 if rng.random() < 0.6 else 0.8
    specs = []
    findings, lesions = None, None
    for follow_up in range(n_images):
        view = "AP" if rng.random() < ap_rate else "PA"
        anatomy = _image_anatomy(rng, base, view)
        if findings is None or rng.random() >= 0.5:
            findings = _sample_findings(rng, p_any, lam, logw)
            lesions = []
            for f in findings:
                lesions.extend(_sample_lesions(rng, f, anatomy))
            lesions = tuple(lesions)
        specs.append(
            ImageSpec(
                image_id=f"{patient_id:08d}_{follow_up:03d}.png",
                patient_id=int(patient_id),
                follow_up=follow_up,
                age=min(age + follow_up // 3, 99),
                sex=sex,
                view_position=view,
                findings=findings,
                lesions=lesions,
                anatomy=anatomy,
                exposure=_exposure(rng, view, image_size),
                noise_seed=int(rng.integers(2**31)),
            )
        )
    return specs


def sample_specs(
    num_patients,
    seed=0,
    images_per_patient=1.7,
    prevalence="boosted",
    min_prevalence=0.08,
    image_size=256,
):
    """`sample_patient` for patients 1..num_patients, concatenated."""
    specs = []
    for pid in range(1, num_patients + 1):
        specs.extend(
            sample_patient(
                pid, seed, images_per_patient, prevalence, min_prevalence, image_size
            )
        )
    return specs


# ---------------------------------------------------------------------------
# Rendering.


def render_film(spec, image_size, include_lesions=True):
    """Renders one film and the pixel mask of each of its lesions.

    Args:
      spec: an `ImageSpec`.
      image_size: side of the square film in pixels.
      include_lesions: False renders the same film (same pose, exposure and
        noise) without its lesions: the difference shows what was drawn.

    Returns:
      (image, masks): image uint8 (S, S); masks a list aligned with
      `spec.lesions` of bool (S, S) arrays, the pixels where the lesion
      visibly changes the film.
    """
    density, masks = _phantom.render_density(
        spec.anatomy, spec.lesions, image_size, spec.noise_seed, include_lesions
    )
    image = _phantom.expose(density, spec.exposure, spec.noise_seed)
    return image, masks


def mask_to_box(mask):
    """Tight box (x, y, w, h) in pixels of a non-empty bool mask, else None."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    x, y = int(cols[0]), int(rows[0])
    return x, y, int(cols[-1]) - x + 1, int(rows[-1]) - y + 1


def film_boxes(spec, masks):
    """(finding, x, y, w, h) for every drawn lesion of a boxed finding."""
    boxes = []
    for lesion, mask in zip(spec.lesions, masks):
        if lesion.finding not in schema.BOXED_FINDINGS:
            continue
        box = mask_to_box(mask)
        if box is not None:
            boxes.append((lesion.finding,) + box)
    return boxes


def encode_png(image):
    """8-bit grayscale PNG bytes (deterministic: no time or text chunks)."""
    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


# Seconds between progress lines while rendering: below the 15 s a user
# waits before wondering whether anything happens, with room for a slow chunk.
PROGRESS_INTERVAL_S = 10.0


class Progress:
    """Time-based progress lines with rate and ETA ("films 120 / 2040 ...").

    `update(done)` logs when `interval` seconds have passed since the last
    line (and always at the end); `tick()` logs the same line when nothing
    finished in the interval, so a stalled step still shows it is alive.

    Args:
      total: number of items.
      what: their name in the line ("films").
      interval: seconds between lines.
      clock: a monotonic clock (tests pass a fake one).
      log: a printf-style function (default `logging.info`).
    """

    def __init__(
        self, total, what, interval=None, clock=time.monotonic, log=None
    ):
        self.total = int(total)
        self.what = what
        self.interval = PROGRESS_INTERVAL_S if interval is None else interval
        self._clock = clock
        self._log = log or logging.info
        self._start = self._last = clock()
        self.done = 0

    def line(self):
        """The progress text at this moment."""
        elapsed = max(self._clock() - self._start, 1e-9)
        rate = self.done / elapsed
        percent = 100.0 * self.done / self.total if self.total else 100.0
        if self.done >= self.total:
            eta = f"done in {elapsed:.0f} s"
        elif self.done:
            eta = f"ETA {(self.total - self.done) / rate:.0f} s"
        else:
            eta = "ETA unknown"
        return (
            f"{self.what} {self.done} / {self.total} ({percent:.0f}%), "
            f"{rate:.1f} {self.what}/s, {eta}"
        )

    def update(self, done):
        """Records `done` items finished; logs if the interval passed or at the end."""
        self.done = int(done)
        if self.done >= self.total or self._clock() - self._last >= self.interval:
            self._emit()

    def tick(self):
        """Logs the current line if the interval passed (nothing finished)."""
        if self._clock() - self._last >= self.interval:
            self._emit()

    def _emit(self):
        self._last = self._clock()
        self._log("%s", self.line())


def _render_job(args):
    spec, image_size, images_dir = args
    image, masks = render_film(spec, image_size)
    with open(os.path.join(images_dir, spec.image_id), "wb") as f:
        f.write(encode_png(image))
    return film_boxes(spec, masks)


# ---------------------------------------------------------------------------
# Data set files.


def _render_chunk(jobs):
    return [_render_job(job) for job in jobs]


def _split_patients(num_patients, test_fraction, seed):
    rng = np.random.default_rng([int(seed), 0])
    n_test = int(round(test_fraction * num_patients))
    if test_fraction > 0 and num_patients > 1:
        n_test = min(max(n_test, 1), num_patients - 1)
    order = rng.permutation(np.arange(1, num_patients + 1))
    return set(order[:n_test].tolist())


def _format_float(value):
    return repr(float(value))


def generate_dataset(config):
    """Writes a synthetic data set in the ChestX-ray14 layout.

    Args:
      config: a `SyntheticConfig`.

    Returns:
      dict summary: num_patients, num_images, num_boxes, finding counts,
      multi_finding_fraction, test_images, output_dir.
    """
    out = pathlib.Path(config.output_dir)
    images_dir = out / IMAGES_DIR
    images_dir.mkdir(parents=True, exist_ok=True)
    specs = sample_specs(
        config.num_patients,
        config.seed,
        config.images_per_patient,
        config.prevalence,
        config.min_prevalence,
        config.image_size,
    )
    logging.info(
        "Rendering %d films of %d patients at %d px into %s",
        len(specs),
        config.num_patients,
        config.image_size,
        out,
    )
    jobs = [(s, config.image_size, str(images_dir)) for s in specs]
    progress = Progress(len(jobs), "films")
    all_boxes = []
    if config.num_workers > 1:
        with multiprocessing.get_context("spawn").Pool(config.num_workers) as pool:
            # Chunks of 8 films, one task each (imap with chunksize > 1 gives
            # a plain generator, which has no timeout).
            chunks = [jobs[i : i + 8] for i in range(0, len(jobs), 8)]
            results = pool.imap(_render_chunk, chunks)
            while len(all_boxes) < len(jobs):
                try:
                    # A bounded wait: the line comes on time even while a
                    # chunk is slow (a busy machine, workers starting).
                    all_boxes.extend(
                        results.next(timeout=max(progress.interval, 0.05))
                    )
                except multiprocessing.TimeoutError:
                    progress.tick()
                    continue
                progress.update(len(all_boxes))
    else:
        for job in jobs:
            all_boxes.append(_render_job(job))
            progress.update(len(all_boxes))

    spacing = _format_float(round(FIELD_OF_VIEW_MM / config.image_size, 4))
    with open(out / DATA_ENTRY_FILE, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(DATA_ENTRY_HEADER)
        for s in specs:
            labels = "|".join(sorted(s.findings)) or schema.NO_FINDING
            writer.writerow(
                [
                    s.image_id,
                    labels,
                    s.follow_up,
                    s.patient_id,
                    s.age,
                    s.sex,
                    s.view_position,
                    config.image_size,
                    config.image_size,
                    spacing,
                    spacing,
                ]
            )
    num_boxes = 0
    with open(out / BBOX_FILE, "w", newline="") as f:
        f.write(BBOX_HEADER + "\n")
        for s, boxes in zip(specs, all_boxes):
            for finding, x, y, w, h in boxes:
                label = "Infiltrate" if finding == "Infiltration" else finding
                f.write(
                    ",".join(
                        [s.image_id, label] + [_format_float(v) for v in (x, y, w, h)]
                    )
                    + "\n"
                )
                num_boxes += 1
    test_patients = _split_patients(
        config.num_patients, config.test_fraction, config.seed
    )
    test = [s.image_id for s in specs if s.patient_id in test_patients]
    train_val = [s.image_id for s in specs if s.patient_id not in test_patients]
    # The real lists have no final newline.
    (out / TRAIN_VAL_FILE).write_text("\n".join(sorted(train_val)))
    (out / TEST_FILE).write_text("\n".join(sorted(test)))
    (out / CONFIG_FILE).write_text(
        json.dumps(dataclasses.asdict(config), indent=2, sort_keys=True) + "\n"
    )
    counts = {f: sum(f in s.findings for s in specs) for f in schema.FINDINGS}
    summary = {
        "output_dir": str(out),
        "num_patients": config.num_patients,
        "num_images": len(specs),
        "num_boxes": num_boxes,
        "test_images": len(test),
        "finding_counts": counts,
        "no_finding_fraction": sum(not s.findings for s in specs) / len(specs),
        "multi_finding_fraction": sum(len(s.findings) > 1 for s in specs) / len(specs),
    }
    logging.info("Synthetic data set: %s", json.dumps(summary))
    return summary


# ---------------------------------------------------------------------------
# Contact sheet.

_BOX_COLOURS = {
    "Atelectasis": (255, 80, 80),
    "Cardiomegaly": (255, 170, 0),
    "Effusion": (80, 160, 255),
    "Infiltration": (80, 255, 120),
    "Mass": (255, 80, 255),
    "Nodule": (255, 255, 80),
    "Pneumonia": (0, 230, 230),
    "Pneumothorax": (180, 120, 255),
}


def _read_set_for_sheet(data_dir, num_films):
    """(image path, findings text, view, boxes) of films of an existing set."""
    data_dir = pathlib.Path(data_dir)
    entry_path = data_dir / DATA_ENTRY_FILE
    if not entry_path.is_file():
        raise FileNotFoundError(
            f"No {DATA_ENTRY_FILE} in `output_dir`={str(data_dir)!r}: pass the "
            "directory of a generated (or real) ChestX-ray14 set, or leave "
            "`output_dir` out to render films on the fly."
        )
    boxes = {}
    bbox_path = data_dir / BBOX_FILE
    if bbox_path.is_file():
        with open(bbox_path, newline="") as f:
            rows = csv.reader(f)
            next(rows, None)
            for row in rows:
                if len(row) < 6:
                    continue
                finding = schema.canonical_finding(row[1])
                boxes.setdefault(row[0], []).append(
                    (finding,) + tuple(float(v) for v in row[2:6])
                )
    films = []
    with open(entry_path, newline="") as f:
        for row in csv.DictReader(f):
            films.append(
                (row["Image Index"], row["Finding Labels"], row["View Position"])
            )
    # Films with boxes first, so the sheet shows what the boxes look like.
    films.sort(key=lambda r: (r[0] not in boxes, r[1] == schema.NO_FINDING))
    out = []
    for image_id, labels, view in films[:num_films]:
        path = data_dir / IMAGES_DIR / image_id
        out.append(
            (Image.open(path).convert("L"), labels, view, boxes.get(image_id, []))
        )
    return out


def _render_for_sheet(num_films, image_size, seed):
    films = []
    pid = 1
    while len(films) < num_films:
        for spec in sample_patient(pid, seed, image_size=image_size):
            if not spec.findings and len(films) % 4 != 3:
                continue
            image, masks = render_film(spec, image_size)
            labels = "|".join(spec.findings) or schema.NO_FINDING
            boxes = film_boxes(spec, masks)
            films.append((Image.fromarray(image), labels, spec.view_position, boxes))
        pid += 1
    return films[:num_films]


def make_contact_sheet(
    path, data_dir=None, num_films=16, image_size=256, seed=0, columns=4
):
    """Draws a grid of films with their boxes and labels into a PNG.

    Args:
      path: PNG file to write.
      data_dir: directory of an existing data set (ChestX-ray14 layout); None
        renders films on the fly.
      num_films: number of films on the sheet.
      image_size: tile side in pixels (and rendering size on the fly).
      seed: seed of the films rendered on the fly.
      columns: tiles per row.

    Returns:
      The path written.

    Raises:
      FileNotFoundError: `data_dir` holds no Data_Entry_2017.csv.
      ValueError: `num_films` or `columns` not positive.
    """
    from PIL import ImageDraw  # pylint: disable=g-import-not-at-top

    if num_films < 1 or columns < 1:
        raise ValueError(
            "`num_films` and `columns` must be positive. "
            f"Received: num_films={num_films}, columns={columns}"
        )
    if data_dir is not None:
        films = _read_set_for_sheet(data_dir, num_films)
    else:
        films = _render_for_sheet(num_films, image_size, seed)
    tile = image_size
    rows = max(1, math.ceil(len(films) / columns))
    sheet = Image.new("RGB", (columns * tile, rows * tile), (0, 0, 0))
    for i, (image, labels, view, boxes) in enumerate(films):
        scale = tile / max(image.size)
        rgb = image.resize((tile, tile), Image.BILINEAR).convert("RGB")
        draw = ImageDraw.Draw(rgb)
        for finding, x, y, w, h in boxes:
            colour = _BOX_COLOURS.get(finding, (255, 255, 255))
            x0, y0 = x * scale, y * scale
            draw.rectangle(
                [x0, y0, x0 + w * scale - 1, y0 + h * scale - 1], outline=colour
            )
            draw.text((x0 + 2, y0 + 1), finding[:4], fill=colour)
        text = f"{view} {labels}"
        draw.rectangle([0, tile - 12, tile, tile], fill=(0, 0, 0))
        draw.text((2, tile - 12), text[: tile // 6], fill=(255, 255, 255))
        sheet.paste(rgb, ((i % columns) * tile, (i // columns) * tile))
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return str(path)


# ---------------------------------------------------------------------------
# Command line (flags are defined only when run as a program).

if __name__ == "__main__":
    from absl import app  # pylint: disable=g-import-not-at-top
    from absl import flags  # pylint: disable=g-import-not-at-top

    from cxr_tf import cli  # pylint: disable=g-import-not-at-top

    _OUTPUT_DIR = flags.DEFINE_string(
        "output_dir",
        None,
        "Directory to write the data set to (or, with "
        "--contact_sheet, an existing set to draw).",
    )
    _NUM_PATIENTS = flags.DEFINE_integer(
        "num_patients", SyntheticConfig.num_patients, "Number of patients."
    )
    _IMAGE_SIZE = flags.DEFINE_integer(
        "image_size", SyntheticConfig.image_size, "Side of the square films (px)."
    )
    _SEED = flags.DEFINE_integer("seed", SyntheticConfig.seed, "Random seed.")
    _IMAGES_PER_PATIENT = flags.DEFINE_float(
        "images_per_patient",
        SyntheticConfig.images_per_patient,
        "Mean number of films per patient (follow-ups).",
    )
    _PREVALENCE = flags.DEFINE_enum(
        "prevalence",
        SyntheticConfig.prevalence,
        PREVALENCE_MODES,
        "'real': the v2020 table; 'boosted': real ordering, rare findings "
        "raised to --min_prevalence.",
    )
    _MIN_PREVALENCE = flags.DEFINE_float(
        "min_prevalence",
        SyntheticConfig.min_prevalence,
        "Floor of the boosted prevalences (fraction of films).",
    )
    _TEST_FRACTION = flags.DEFINE_float(
        "test_fraction",
        SyntheticConfig.test_fraction,
        "Fraction of patients in test_list.txt.",
    )
    _NUM_WORKERS = flags.DEFINE_integer(
        "num_workers", SyntheticConfig.num_workers, "Rendering processes."
    )
    _CONTACT_SHEET = flags.DEFINE_string(
        "contact_sheet",
        None,
        "Write a PNG grid of films with boxes and labels "
        "here instead of generating a data set.",
    )
    _SHEET_FILMS = flags.DEFINE_integer(
        "contact_sheet_films", 16, "Films on the contact sheet."
    )

    def main(argv):
        cli.reject_arguments(argv)
        # The library module, not __main__: worker processes unpickle its types.
        from cxr_tf.data import synthetic as lib  # pylint: disable=import-self

        if _CONTACT_SHEET.value:
            written = lib.make_contact_sheet(
                _CONTACT_SHEET.value,
                data_dir=_OUTPUT_DIR.value,
                num_films=_SHEET_FILMS.value,
                image_size=_IMAGE_SIZE.value,
                seed=_SEED.value,
            )
            print(written)
            return
        if not _OUTPUT_DIR.value:
            raise app.UsageError("--output_dir is required (or give --contact_sheet).")
        cli.check_writable_dir(_OUTPUT_DIR)
        config = lib.SyntheticConfig(
            output_dir=_OUTPUT_DIR.value,
            num_patients=_NUM_PATIENTS.value,
            image_size=_IMAGE_SIZE.value,
            seed=_SEED.value,
            images_per_patient=_IMAGES_PER_PATIENT.value,
            prevalence=_PREVALENCE.value,
            min_prevalence=_MIN_PREVALENCE.value,
            test_fraction=_TEST_FRACTION.value,
            num_workers=_NUM_WORKERS.value,
        )
        logging.info("Config: %s", config)
        print(json.dumps(lib.generate_dataset(config), indent=2))

    cli.run(main)
