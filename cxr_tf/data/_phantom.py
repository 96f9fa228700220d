"""Procedural chest-film renderer behind `cxr_tf.data.synthetic` (private)."""

import dataclasses
import functools
import math

import numpy as np

# Density units: 1.0 is the soft tissue of the torso; air in the lungs takes
# LUNG_AIR away. Lesion contrasts below are fractions of LUNG_AIR.
LUNG_AIR = 0.62


@dataclasses.dataclass(frozen=True)
class Lesion:
    """One drawn lesion, in the canonical body frame (X, Y in about [-1, 1]).

    Attributes:
      finding: canonical finding name.
      center: (X, Y) centre in the body frame.
      size: (width, height) of the lesion's extent in the body frame.
      angle: rotation in radians (elongated lesions).
      contrast: peak density change as a fraction of the lung-air density
        (Cardiomegaly: the heart's enlargement factor; Pneumothorax: the scale
        of the collapsed lung).
      side: -1 for the image-left lung, +1 for the image-right lung, 0 midline
        or both.
      seed: seed of the lesion's own texture.
    """

    finding: str
    center: tuple
    size: tuple
    angle: float
    contrast: float
    side: int
    seed: int


# ---------------------------------------------------------------------------
# Geometry shared by the sampler (placement) and the renderer.


def canonical_grid(anatomy, size):
    """Body-frame coordinates (X, Y) of each pixel centre of a size x size film."""
    c = (np.arange(size, dtype=np.float32) + 0.5) * (2.0 / size) - 1.0
    u = (c[None, :] - anatomy["tx"]) / anatomy["scale"]
    v = (c[:, None] - anatomy["ty"]) / anatomy["scale"]
    cos, sin = math.cos(anatomy["rot"]), math.sin(anatomy["rot"])
    x = (cos * u + sin * v).astype(np.float32)
    y = (-sin * u + cos * v).astype(np.float32)
    return x, y


def canonical_to_pixels(anatomy, size, x, y):
    """Maps body-frame points to (column, row) pixel coordinates."""
    cos, sin = math.cos(anatomy["rot"]), math.sin(anatomy["rot"])
    u = cos * x - sin * y
    v = sin * x + cos * y
    u = u * anatomy["scale"] + anatomy["tx"]
    v = v * anatomy["scale"] + anatomy["ty"]
    return (u + 1.0) * size / 2.0 - 0.5, (v + 1.0) * size / 2.0 - 0.5


def dome_level(anatomy, x):
    """Y of the diaphragm under body-frame abscissa x (both hemidiaphragms)."""
    x = np.asarray(x, dtype=np.float32)
    left = anatomy["dome_left"] + anatomy["dome_curv"] * (x + 0.36) ** 2
    right = anatomy["dome_right"] + anatomy["dome_curv"] * (x - 0.36) ** 2
    return np.where(x < 0, left, right)


def lung_ellipse(anatomy, side, x, y):
    """Normalised radius of the lung ellipse of `side` (< 1 inside)."""
    cx = side * anatomy["lung_cx"]
    rx = anatomy["lung_rx"] * (1.04 if side < 0 else 1.0)
    xn = (x - cx) / rx
    yn = (y - anatomy["lung_cy"]) / anatomy["lung_ry"]
    # A slightly squarer than elliptic outline gives the lateral chest wall.
    return np.sqrt(np.abs(xn) ** 2.6 + yn**2 + 1e-12)


def heart_radius(anatomy, x, y):
    """Normalised radius of the cardiac ellipse (< 1 inside)."""
    dx = x - anatomy["heart_cx"]
    dy = y - anatomy["heart_cy"]
    a = anatomy["heart_tilt"]
    u = math.cos(a) * dx + math.sin(a) * dy
    v = -math.sin(a) * dx + math.cos(a) * dy
    return np.sqrt((u / anatomy["heart_rx"]) ** 2 + (v / anatomy["heart_ry"]) ** 2)


def mediastinum_half_width(anatomy, y):
    t = np.clip((y + 0.6) / (anatomy["heart_cy"] + 0.6), 0.0, 1.0)
    return 0.085 + 0.06 * t * t


def in_lung(anatomy, side, x, y, margin=0.0):
    """True where a body-frame point lies inside a lung field, `margin` inside."""
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.float32)
    inside = lung_ellipse(anatomy, side, x, y) < 1.0 - margin / anatomy["lung_rx"]
    inside &= y < dome_level(anatomy, x) - margin
    inside &= heart_radius(anatomy, x, y) > 1.0 + margin / anatomy["heart_rx"]
    inside &= np.abs(x - 0.01) > mediastinum_half_width(anatomy, y) + margin
    return inside


# ---------------------------------------------------------------------------
# Small numeric helpers.


def _ramp(f, edge):
    """Anti-aliased indicator of f > 0 with a ramp `edge` wide."""
    return np.clip(f / edge + 0.5, 0.0, 1.0)


@functools.lru_cache(maxsize=32)
def _upsampler(size, cells):
    """(size, cells) Gaussian interpolation matrix: smooth noise by two matmuls."""
    pos = (np.arange(size, dtype=np.float64) + 0.5) * (cells / size) - 0.5
    d = pos[:, None] - np.arange(cells)[None, :]
    a = np.exp(-0.5 * (d / 0.7) ** 2)
    return (a / a.sum(axis=1, keepdims=True)).astype(np.float32)


def _smooth_noise(rng, size, cells):
    """Smooth Gaussian noise with about `cells` blobs across, unit std."""
    cells = max(2, int(cells))
    g = rng.standard_normal((cells, cells)).astype(np.float32)
    a = _upsampler(size, cells)
    # einsum's own loops, not BLAS: thread-pool contention on a shared machine
    # made the BLAS product 100x slower, and this keeps the bytes identical.
    out = np.einsum("ij,jk->ik", a, g, optimize=False)
    out = np.einsum("ik,lk->il", out, a, optimize=False)
    return (out - out.mean()) / (out.std() + 1e-6)


def _rotate(x, y, cx, cy, angle):
    dx, dy = x - cx, y - cy
    c, s = math.cos(angle), math.sin(angle)
    return c * dx + s * dy, -s * dx + c * dy


# ---------------------------------------------------------------------------
# Anatomy.


def _anatomy_density(anatomy, x, y, size, rng):
    """Returns (density, context) of the lesion-free film."""
    px = 2.0 / (size * anatomy["scale"])
    edge = 1.5 * px
    ax = np.abs(x)

    # Torso: shoulders narrowing to the neck; thicker in the middle.
    neck, shoulder = 0.24, anatomy["thorax_hw"] + 0.17
    t = np.clip((y + 1.02) / 0.32, 0.0, 1.0)
    torso_hw = neck + (shoulder - neck) * t * t * (3 - 2 * t)
    torso = _ramp(torso_hw - ax, edge * 2)
    tissue = torso * (0.8 + 0.3 * np.clip(1.0 - (x / (torso_hw + 1e-3)) ** 2, 0, 1))

    dome = dome_level(anatomy, x)
    abdomen = _ramp(y - dome, edge) * torso
    heart_r = heart_radius(anatomy, x, y)
    heart = _ramp((1.0 - heart_r) * anatomy["heart_rx"], edge)
    med_hw = mediastinum_half_width(anatomy, y)
    mediast = _ramp(med_hw - np.abs(x - 0.01), edge) * (y < anatomy["heart_cy"] + 0.1)
    knob_r = np.hypot(x - 0.1, y + 0.42)
    mediast = np.maximum(mediast, _ramp(0.075 - knob_r, edge))

    lungs = []
    for side in (-1, 1):
        ell = lung_ellipse(anatomy, side, x, y)
        lung = _ramp((1.0 - ell) * anatomy["lung_rx"], edge)
        lungs.append(lung)
    not_lung = np.maximum(np.maximum(heart, mediast), abdomen)
    lung_left = lungs[0] * (1.0 - not_lung)
    lung_right = lungs[1] * (1.0 - not_lung)
    lung = lung_left + lung_right

    density = tissue.copy()
    density += 0.15 * abdomen
    density += 0.16 * np.maximum(heart * (1.0 - abdomen), mediast)
    density -= LUNG_AIR * anatomy["air"] * lung

    # Gastric bubble under the image-right hemidiaphragm.
    if anatomy["bubble"] > 0:
        br = np.hypot((x - 0.4) / 0.13, (y - anatomy["dome_right"] - 0.12) / 0.07)
        density -= anatomy["bubble"] * _ramp(1.0 - br, 0.15) * abdomen

    # Trachea: air column above the carina.
    tr = _ramp(0.032 - np.abs(x - 0.01), edge) * _ramp(-0.3 - y, 0.08)
    density -= 0.25 * tr * torso

    # Spine, visible through the mediastinum; vertebral end plates.
    spine = _ramp(0.06 - np.abs(x - 0.005), edge)
    plates = 0.75 + 0.25 * np.cos(2 * math.pi * (y - anatomy["rib_y0"]) / 0.1) ** 8
    density += 0.12 * spine * plates * torso

    # Hila: pulmonary arteries.
    for side in (-1, 1):
        hx = side * 0.17
        r2 = ((x - hx) / 0.07) ** 2 + ((y + 0.02) / 0.12) ** 2
        density += 0.13 * np.exp(-r2) * torso

    # Vascular markings: thin radial lines fanning out of each hilum.
    markings = np.zeros_like(x)
    breaks = np.clip(_smooth_noise(rng, size, 12) * 0.8 + 0.6, 0.0, 1.0)
    wobble = _smooth_noise(rng, size, 6)
    for side, lmask in ((-1, lung_left), (1, lung_right)):
        dx = side * (x - side * 0.17)
        dy = y + 0.02
        theta = np.arctan2(dy, dx)
        r = np.sqrt(dx * dx + dy * dy)
        pattern = np.zeros_like(x)
        for freq in (19.0, 29.0, 41.0, 57.0):
            phase = rng.uniform(0, 2 * math.pi)
            bend = rng.uniform(-4, 4)
            wave = 0.5 + 0.5 * np.cos(
                freq * theta + phase + bend * r + 2.0 * wobble * (freq / 40.0)
            )
            w2 = wave * wave
            w4 = w2 * w2
            pattern += w4 * w4 * w2 * (25.0 / freq)
        taper = np.clip(r / 0.15, 0.0, 1.0) * np.exp(-r / 0.5)
        markings += pattern * taper * lmask
    markings *= anatomy["markings"] * 0.06 * breaks
    density += markings

    # Bones: posterior and anterior ribs, clavicles.
    bones = np.zeros_like(x)
    lateral = np.clip((ax - 0.06) / 0.05, 0, 1) * _ramp(
        anatomy["thorax_hw"] + 0.05 - ax, 0.04
    )
    axs = ax - 0.06
    # All posterior ribs in one pass: the rib index is the rounded phase.
    phase = y - anatomy["rib_y0"] + 0.25 * axs - anatomy["rib_curv"] * axs * axs
    phase = phase / anatomy["rib_dy"]
    k = np.clip(np.round(phase), 0, 10)
    half = (0.021 + 0.0015 * k) / anatomy["rib_dy"]
    d = np.abs(phase - k) / half
    body = np.sqrt(np.clip(1.0 - d * d, 0.0, 1.0))
    cortex = np.exp(-(((d - 0.92) / 0.14) ** 2))
    bones += (0.35 * body + 0.5 * cortex) * lateral * (phase > -0.5) * (phase < 10.5)
    # Anterior ribs: fainter, sloping down towards the sternum.
    dy_a = anatomy["rib_dy"] * 1.15
    phase = (y - anatomy["rib_y0"] - 0.3 - 0.3 * (anatomy["thorax_hw"] - ax)) / dy_a
    k = np.clip(np.round(phase), 0, 5)
    d = np.abs(phase - k) * dy_a / 0.03
    ant = np.clip(1.0 - d * d, 0.0, 1.0) * _ramp(ax - 0.3, 0.1) * lateral
    bones += 0.25 * ant * (phase > -0.5) * (phase < 5.5)
    clav_x = np.clip((ax - 0.07) / 0.6, 0.0, 1.0)
    clav_y = anatomy["clav_y"] - 0.1 * clav_x + 0.12 * (clav_x - 0.45) ** 2
    d = np.abs(y - clav_y) / 0.028
    clav = np.sqrt(np.clip(1.0 - d * d, 0, 1)) * _ramp(ax - 0.07, 0.03)
    clav *= _ramp(0.7 - ax, 0.05)
    bones += 1.1 * clav
    density += 0.12 * bones * torso

    if anatomy["breast"] > 0:
        for side in (-1, 1):
            br = np.hypot((x - side * 0.45) / 0.38, (y - 0.33) / 0.3)
            density += anatomy["breast"] * _ramp(1.0 - br, 0.08) * torso

    if anatomy["ap"]:
        # ECG electrodes and a lead: bright circles and a thin curve.
        for ex, ey in anatomy["electrodes"]:
            er = np.hypot(x - ex, y - ey)
            density += 0.5 * _ramp(0.025 - er, edge) * torso
        lead = np.abs(y - (anatomy["electrodes"][0][1] + 0.3 * np.sin(3 * x)))
        density += 0.25 * _ramp(px * 1.2 - lead, edge) * _ramp(0.8 - ax, 0.05)

    # Fine parenchymal texture.
    fine = _smooth_noise(rng, size, size // 6)
    density += 0.012 * fine * lung

    context = {
        "px": px,
        "edge": edge,
        "lung": lung,
        "lung_left": lung_left,
        "lung_right": lung_right,
        "markings": markings,
        "heart": heart * (1.0 - abdomen),
        "abdomen": abdomen,
        "torso": torso,
    }
    return density.astype(np.float32), context


# ---------------------------------------------------------------------------
# Lesions: each returns (density change, boolean mask of its visible pixels).


def _visible(delta, lesion, frac=0.15):
    """Pixels where the lesion changes the density by `frac` of its contrast.

    The reference is the lesion's intended peak, not the peak reached, so a
    lesion mostly hidden by anatomy keeps only the pixels where it shows.
    """
    return np.abs(delta) > frac * lesion.contrast * LUNG_AIR


def _side_lung(ctx, side):
    if side < 0:
        return ctx["lung_left"]
    if side > 0:
        return ctx["lung_right"]
    return ctx["lung"]


def _sphere(x, y, cx, cy, r):
    d2 = ((x - cx) ** 2 + (y - cy) ** 2) / (r * r)
    return np.sqrt(np.clip(1.0 - d2, 0.0, 1.0))


def _nodule(les, x, y, ctx, rng):
    r = les.size[0] / 2
    delta = les.contrast * LUNG_AIR * _sphere(x, y, les.center[0], les.center[1], r)
    delta = np.maximum(delta, 0.0)
    delta = delta**0.6 * (les.contrast * LUNG_AIR) ** 0.4
    return delta, _visible(delta, les, 0.2)


def _mass(les, x, y, ctx, rng):
    cx, cy = les.center
    rw, rh = les.size[0] / 2, les.size[1] / 2
    r0 = min(rw, rh)
    shape = _sphere(x, y, cx, cy, 0.75 * r0)
    for k in range(5):
        a = 2 * math.pi * k / 5 + rng.uniform(-0.4, 0.4)
        ox = math.cos(a) * (rw - 0.45 * r0)
        oy = math.sin(a) * (rh - 0.45 * r0)
        shape = np.maximum(
            shape, _sphere(x, y, cx + ox, cy + oy, 0.45 * r0 * rng.uniform(0.9, 1.1))
        )
    tex = 1.0 + 0.15 * _smooth_noise(rng, x.shape[0], x.shape[0] // 8)
    delta = les.contrast * LUNG_AIR * np.sqrt(shape) * tex
    delta = np.maximum(delta, 0.0)
    return delta, _visible(delta, les, 0.15)


def _atelectasis(les, x, y, ctx, rng):
    u, v = _rotate(x, y, les.center[0], les.center[1], les.angle)
    w, h = les.size
    # A curved plate: its ends bend down by most of the box height.
    curve = 2.4 * h * (u / w) ** 2
    band = np.exp(-(((v + 0.35 * h - curve) / (0.12 * h)) ** 2))
    ends = np.clip(1.0 - (2 * u / w) ** 6, 0.0, 1.0)
    haze = np.exp(-((2.2 * u / w) ** 2) - ((2.4 * (v - 0.1 * h) / h) ** 2))
    delta = les.contrast * LUNG_AIR * (0.9 * band * ends + 0.1 * haze)
    delta *= _side_lung(ctx, les.side)
    return delta, _visible(delta, les)


def _effusion(les, x, y, ctx, rng):
    side = les.side
    w, h = les.size
    top = les.center[1] - h / 2
    lateral = np.clip(side * (x - side * 0.1) / 0.75, 0.0, 1.2)
    # Meniscus: the fluid climbs the lateral chest wall.
    level = top + 0.55 * h * (1.0 - lateral) ** 2
    depth = np.clip((y - level) / (0.35 * h), 0.0, 1.0)
    hemithorax = ctx["lungs_full"][0 if side < 0 else 1]
    region = hemithorax * ctx["torso"]
    delta = les.contrast * LUNG_AIR * np.sqrt(depth) * region
    return delta, _visible(delta, les, 0.2)


def _patchy(les, x, y, ctx, rng, cells, quantile):
    """Envelope and [0, 1] patches of a patchy opacity, within its lung."""
    u, v = _rotate(x, y, les.center[0], les.center[1], les.angle)
    w, h = les.size
    env = np.exp(-((2 * u / w) ** 4) - (2 * v / h) ** 4) * _side_lung(ctx, les.side)
    noise = _smooth_noise(rng, x.shape[0], cells)
    # Thresholds and scale taken where the lesion is, so every lesion shows
    # patches and reaches its contrast wherever the texture happens to fall.
    inside = env > 0.3 * env.max()
    if not inside.any():
        return env, np.zeros_like(env)
    patches = np.clip(noise - np.percentile(noise[inside], quantile), 0.0, None)
    patches = np.clip(patches / (patches[inside].max() + 1e-6), 0.0, 1.0)
    return env, patches


def _infiltration(les, x, y, ctx, rng):
    env, patches = _patchy(les, x, y, ctx, rng, x.shape[0] / 14, 40)
    delta = les.contrast * LUNG_AIR * env * np.sqrt(patches)
    delta *= _side_lung(ctx, les.side)
    return delta, _visible(delta, les, 0.2)


def _pneumonia(les, x, y, ctx, rng):
    env, patches = _patchy(les, x, y, ctx, rng, x.shape[0] / 24, 0)
    # Air bronchograms: dark branching lines inside the consolidation.
    dx = les.side * (x - les.side * 0.17)
    theta = np.arctan2(y + 0.02, dx)
    bronch = (0.5 + 0.5 * np.cos(31.0 * theta + rng.uniform(0, 6.3))) ** 16
    delta = les.contrast * LUNG_AIR * env * (0.5 + 0.5 * patches) * (1 - 0.4 * bronch)
    delta *= _side_lung(ctx, les.side)
    return delta, _visible(delta, les, 0.2)


def _consolidation(les, x, y, ctx, rng):
    u, v = _rotate(x, y, les.center[0], les.center[1], les.angle)
    w, h = les.size
    # Sharp upper border along a fissure, fading inferiorly.
    top = _ramp(v + h / 2, ctx["edge"])
    env = top * np.exp(-((2 * u / w) ** 6) - (np.clip(v, 0, None) / (0.5 * h)) ** 4)
    noise = _smooth_noise(rng, x.shape[0], x.shape[0] / 30)
    delta = les.contrast * LUNG_AIR * env * (0.85 + 0.15 * noise)
    delta *= _side_lung(ctx, les.side)
    return delta, _visible(delta, les, 0.2)


def _pneumothorax(les, x, y, ctx, rng):
    side = les.side
    hx, hy = side * 0.2, les.center[1] + les.size[1] * 0.6
    lung_full = ctx["lungs_full"][0 if side < 0 else 1]
    # The collapsed lung: the lung outline shrunk towards its hilum.
    k = les.contrast
    xs = hx + (x - hx) / k
    ys = hy + (y - hy) / k
    shrunk = ctx["ellipse"](side, xs, ys)
    inner = _ramp((1.0 - shrunk) * 0.3, ctx["edge"])
    region = (
        lung_full * (1.0 - inner) * _ramp(les.center[1] + les.size[1] / 2 - y, 0.03)
    )
    line = np.exp(-(((shrunk - 1.0) * 0.3 / (0.9 * ctx["px"])) ** 2)) * region.clip(
        0, 1
    )
    line *= _ramp(lung_full - 0.5, 0.2)
    delta = -ctx["markings"] * region - 0.18 * region + 0.35 * line
    mask = (region > 0.5) | (line > 0.5)
    return delta, mask


def _edema(les, x, y, ctx, rng):
    delta = np.zeros_like(x)
    for side in (-1, 1):
        r2 = ((x - side * 0.25) / 0.22) ** 2 + ((y - 0.0) / 0.3) ** 2
        delta += 0.6 * np.exp(-r2)
        # Kerley B lines: short horizontal lines at the lateral bases.
        for _ in range(7):
            ly = rng.uniform(0.05, 0.35)
            lx = side * rng.uniform(0.62, 0.72)
            line = np.exp(-(((y - ly) / 0.008) ** 2)) * _ramp(
                0.05 - np.abs(x - lx), 0.01
            )
            delta += 1.2 * line
    delta += 1.5 * ctx["markings"] / 0.06
    delta = les.contrast * LUNG_AIR * delta * ctx["lung"]
    return delta, _visible(delta, les)


def _emphysema(les, x, y, ctx, rng):
    delta = -0.06 * ctx["lung"] - 0.5 * ctx["markings"]
    for _ in range(3):
        side = rng.choice((-1, 1))
        bx, by = side * rng.uniform(0.3, 0.55), rng.uniform(-0.6, -0.3)
        rad = rng.uniform(0.06, 0.1)
        rr = np.hypot(x - bx, y - by) / rad
        wall = np.exp(-(((rr - 1.0) * rad / (0.8 * ctx["px"])) ** 2))
        delta += les.contrast * LUNG_AIR * (-0.6 * (rr < 1) + 0.8 * wall)
    delta *= ctx["lung"]
    return delta, _visible(delta, les)


def _fibrosis(les, x, y, ctx, rng):
    n = _smooth_noise(rng, x.shape[0], x.shape[0] / 5)
    ridges = np.clip(1.0 - np.abs(n) / 0.35, 0.0, 1.0) ** 2
    # Honeycombing: bright walls around darker cysts, so the texture, not the
    # mean density, carries the finding.
    ridges = ridges - 0.25 * (np.abs(n) > 0.6)
    periphery = np.zeros_like(x)
    for side in (-1, 1):
        r2 = ((x - side * 0.55) / 0.3) ** 2 + ((y - les.center[1]) / 0.35) ** 2
        periphery += np.exp(-r2)
    delta = les.contrast * LUNG_AIR * ridges * periphery * ctx["lung"]
    return delta, _visible(delta, les)


def _pleural_thickening(les, x, y, ctx, rng):
    side = les.side
    ell = ctx["ellipse"](side, x, y)
    depth = (1.0 - ell) * 0.36
    band = _ramp(depth, ctx["edge"]) * _ramp(les.size[0] - depth, ctx["edge"])
    along = np.exp(-(((y - les.center[1]) / (les.size[1] / 2)) ** 4))
    delta = les.contrast * LUNG_AIR * band * along * ctx["lungs_full"][(side + 1) // 2]
    return delta, _visible(delta, les)


def _hernia(les, x, y, ctx, rng):
    cx, cy = les.center
    r = les.size[0] / 2
    sac = _sphere(x, y, cx, cy, r) ** 0.3
    level = cy + les.angle * r
    air = (sac > 0) * _ramp(level - y, ctx["edge"]) * _sphere(x, y, cx, cy, 0.85 * r)
    delta = les.contrast * LUNG_AIR * (sac - 1.4 * air)
    return delta, _visible(delta, les)


def _cardiomegaly(les, x, y, ctx, rng):
    # The heart is drawn with the anatomy; the lesion is its visible silhouette.
    heart = ctx["heart"]
    return np.zeros_like(x), heart > 0.5


LESION_RENDERERS = {
    "Atelectasis": _atelectasis,
    "Cardiomegaly": _cardiomegaly,
    "Effusion": _effusion,
    "Infiltration": _infiltration,
    "Mass": _mass,
    "Nodule": _nodule,
    "Pneumonia": _pneumonia,
    "Pneumothorax": _pneumothorax,
    "Consolidation": _consolidation,
    "Edema": _edema,
    "Emphysema": _emphysema,
    "Fibrosis": _fibrosis,
    "Pleural_Thickening": _pleural_thickening,
    "Hernia": _hernia,
}


# ---------------------------------------------------------------------------
# Film formation.


def render_density(anatomy, lesions, size, noise_seed, include_lesions=True):
    """Returns (density (S, S) float32, [lesion masks]) before exposure."""
    x, y = canonical_grid(anatomy, size)
    rng = np.random.default_rng(noise_seed)
    if include_lesions:
        for lesion in lesions:
            if lesion.finding == "Cardiomegaly":
                anatomy = dict(anatomy)
                anatomy["heart_rx"] *= lesion.contrast
                anatomy["heart_ry"] *= 0.5 + 0.5 * lesion.contrast
                anatomy["heart_cx"] += 0.25 * (lesion.contrast - 1.0)
    density, ctx = _anatomy_density(anatomy, x, y, size, rng)
    ctx["dome"] = dome_level(anatomy, x)
    ctx["ellipse"] = lambda side, xs, ys: lung_ellipse(anatomy, side, xs, ys)
    ctx["lungs_full"] = [
        _ramp((1.0 - lung_ellipse(anatomy, s, x, y)) * anatomy["lung_rx"], ctx["edge"])
        * _ramp(ctx["dome"] - y, ctx["edge"])
        * (1.0 - ctx["heart"])
        for s in (-1, 1)
    ]
    masks = []
    total = np.zeros_like(density)
    for lesion in lesions:
        lrng = np.random.default_rng(lesion.seed)
        delta, mask = LESION_RENDERERS[lesion.finding](lesion, x, y, ctx, lrng)
        total += delta
        masks.append(mask)
    if include_lesions:
        density = density + total
    return density, masks


def expose(density, exposure, noise_seed):
    """Film formation: quantum noise on the transmitted photons, then window."""
    size = density.shape[0]
    rng = np.random.default_rng(noise_seed + 7919)
    c = (np.arange(size, dtype=np.float32) / size) - 0.5
    # Heel effect and scatter: a gentle ramp across the film.
    d = density + exposure["ramp_x"] * c[None, :] + exposure["ramp_y"] * c[:, None]
    k = 2.2
    photons = exposure["photons"] * np.exp(-k * np.clip(d, 0.0, None))
    noisy = photons + np.sqrt(photons) * rng.standard_normal(d.shape).astype(np.float32)
    measured = -np.log(np.clip(noisy, 0.5, None) / exposure["photons"]) / k
    img = (measured - exposure["low"]) / (exposure["high"] - exposure["low"])
    img = np.clip(img, 0.0, 1.0) ** exposure["gamma"]
    return np.round(img * 255.0).astype(np.uint8)
