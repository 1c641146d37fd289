"""Findings drawn on a phantom chest: effusion, pneumothorax, consolidation, nodule, atelectasis, devices."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from scipy import ndimage

from capsearch.worlds.anatomy import Anatomy, Scene, ellipse, polyline, smooth_noise

# Heart enlargement per cardiomegaly grade: measured cardiothoracic ratio ~0.45 (normal, 90% within
# 0.41-0.50) becomes ~0.58 / 0.64 / 0.71 (experiments/benchmarks/bench_phantom.py --ctr).
HEART_SCALE = {"small": 1.3, "moderate": 1.42, "large": 1.58}
# Effusion height as a fraction of lung height (blunted angle / mid-lung / most of the hemithorax).
EFFUSION_LEVEL = {"small": 0.16, "moderate": 0.3, "large": 0.5}
PNEUMOTHORAX_RIM = {"small": 0.035, "moderate": 0.07, "large": 0.12}
CONSOLIDATION_RADIUS = {"small": 0.045, "moderate": 0.07, "large": 0.1}
NODULE_RADIUS = {"small": (0.016, 0.026), "moderate": (0.026, 0.04), "large": (0.045, 0.07)}

_DEFAULTS: dict[str, dict[str, tuple[tuple[str, ...], tuple[float, ...]]]] = {
    "cardiomegaly": {"size": (("small", "moderate", "large"), (0.5, 0.35, 0.15))},
    "effusion": {
        "side": (("left", "right", "bilateral"), (0.3, 0.3, 0.4)),
        "size": (("small", "moderate", "large"), (0.45, 0.38, 0.17)),
    },
    "pneumothorax": {
        "side": (("left", "right"), (0.5, 0.5)),
        "size": (("small", "moderate", "large"), (0.45, 0.33, 0.22)),
    },
    "consolidation": {
        "side": (("left", "right", "bilateral"), (0.35, 0.4, 0.25)),
        "size": (("small", "moderate", "large"), (0.3, 0.4, 0.3)),
        "zone": (("upper", "middle", "lower"), (0.15, 0.25, 0.6)),
    },
    "nodule": {
        "side": (("left", "right"), (0.5, 0.5)),
        "size": (("small", "moderate", "large"), (0.5, 0.25, 0.25)),
        "zone": (("upper", "middle", "lower"), (0.4, 0.35, 0.25)),
    },
    "atelectasis": {
        "side": (("left", "right", "bilateral"), (0.4, 0.3, 0.3)),
        "size": (("small", "moderate", "large"), (0.55, 0.3, 0.15)),
        "zone": (("upper", "middle", "lower"), (0.05, 0.2, 0.75)),
    },
    "support_device": {"kind": (("line", "tube", "pacemaker"), (0.5, 0.35, 0.15))},
}


def resolve_attributes(
    findings: Iterable[str], given: Mapping[str, Mapping[str, str]], rng: np.random.Generator
) -> dict[str, dict[str, str]]:
    """Side, size, zone and kind for every finding: the report's where it says, random otherwise."""
    resolved = {}
    for finding in sorted(findings):
        told = dict(given.get(finding, {}))
        for key, (values, probs) in _DEFAULTS.get(finding, {}).items():
            draw = values[int(rng.choice(len(values), p=probs))]
            if told.get(key) not in values:
                told[key] = draw
        resolved[finding] = told
    return resolved


def _sides(side: str) -> tuple[str, ...]:
    """Patient sides named by an attribute."""
    return ("left", "right") if side == "bilateral" else (side,)


def _column_profile(mask: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Per column: the lowest lung row (-1 outside); and the side's top and bottom rows."""
    present = mask > 0.5
    rows = np.flatnonzero(present.any(1))
    if len(rows) == 0:
        return np.full(mask.shape[1], -1), 0, 0
    flipped = present[::-1]
    bottom = np.where(present.any(0), mask.shape[0] - 1 - flipped.argmax(0), -1)
    return bottom, int(rows[0]), int(rows[-1])


def _zone_point(
    mask: np.ndarray, zone: str, rng: np.random.Generator, inset: int
) -> tuple[int, int]:
    """A random pixel (row, col) well inside the lung, in its upper, middle or lower third."""
    inner = ndimage.binary_erosion(mask > 0.5, iterations=max(1, inset))
    if not inner.any():
        inner = mask > 0.5
    rows = np.flatnonzero(inner.any(1))
    third = {"upper": 0, "middle": 1, "lower": 2}.get(zone, 2)
    lo = rows[0] + third * (rows[-1] - rows[0]) // 3
    hi = rows[0] + (third + 1) * (rows[-1] - rows[0]) // 3 + 1
    band = np.zeros_like(inner)
    band[lo:hi] = inner[lo:hi]
    band = band if band.any() else inner
    # Row, then column, by fractions: the same draw lands in the same place at every image size.
    u, v = rng.random(2)
    band_rows = np.flatnonzero(band.any(1))
    row = band_rows[int(u * len(band_rows))]
    cols = np.flatnonzero(band[row])
    return int(row), int(cols[int(v * len(cols))])


def effusion(scene: Scene, attrs: Mapping[str, str], rng: np.random.Generator) -> np.ndarray:
    """Fluid filling the lung base with a meniscus rising laterally (opacity map 0..1)."""
    n = scene.size
    yy, xx = np.mgrid[0:n, 0:n]
    opacity = np.zeros((n, n), np.float32)
    for side in _sides(attrs.get("side", "left")):
        mask = scene.side(side)
        bottom, top, lowest = _column_profile(mask)
        cols = np.flatnonzero(bottom >= 0)
        if len(cols) == 0:
            continue
        height = (lowest - top) * EFFUSION_LEVEL[attrs.get("size", "small")] * rng.uniform(0.9, 1.1)
        # Lateral is away from the midline; the patient's right lung lies on the image left.
        lateral = (cols.max() - xx) if side == "right" else (xx - cols.min())
        lateral = np.clip(lateral / max(1, cols.max() - cols.min()), 0, 1)
        level = lowest - height * (1 + 0.7 * lateral**2)  # meniscus: higher at the chest wall
        soft = 0.02 * n
        layer = 1 / (1 + np.exp(-(yy - level) / soft))
        opacity = np.maximum(opacity, 0.96 * layer * mask)
    return opacity


def pneumothorax(
    scene: Scene, attrs: Mapping[str, str], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Rim of lung-free pleural air along the apex and lateral chest wall, and the collapsed lung inside it."""
    n = scene.size
    region = np.zeros((n, n), np.float32)
    collapsed = np.zeros((n, n), np.float32)
    rim = PNEUMOTHORAX_RIM[attrs.get("size", "small")] * n * rng.uniform(0.9, 1.15)
    for side in _sides(attrs.get("side", "left")):
        mask = scene.side(side) > 0.5
        if not mask.any():
            continue
        bottom, top, lowest = _column_profile(mask.astype(np.float32))
        # Distance to the apical/lateral pleura only: pad the medial side and everything below the lung.
        extended = mask.copy()
        for r in np.flatnonzero(mask.any(1)):
            inside = np.flatnonzero(mask[r])
            if (
                side == "right"
            ):  # the patient's right lung is on the image left; medial is to its right
                extended[r, inside[-1] :] = True
            else:
                extended[r, : inside[0] + 1] = True
        for c in np.flatnonzero(bottom >= 0):
            extended[bottom[c] :, c] = True
        extended[top + int(0.6 * (lowest - top)) :, :] = True  # upright: air rises to apex and side
        distance = ndimage.distance_transform_edt(extended)
        region = np.maximum(region, (mask & (distance < rim)).astype(np.float32))
        collapsed = np.maximum(collapsed, (mask & (distance >= rim)).astype(np.float32))
    return ndimage.gaussian_filter(region, 0.004 * n), ndimage.gaussian_filter(collapsed, 0.004 * n)


def consolidation(scene: Scene, attrs: Mapping[str, str], rng: np.random.Generator) -> np.ndarray:
    """Patchy airspace opacity in one lung zone (opacity map 0..1)."""
    n = scene.size
    yy, xx = np.mgrid[0:n, 0:n]
    opacity = np.zeros((n, n), np.float32)
    radius = CONSOLIDATION_RADIUS[attrs.get("size", "moderate")] * n
    for side in _sides(attrs.get("side", "right")):
        mask = scene.side(side)
        if not (mask > 0.5).any():
            continue
        cy, cx = _zone_point(mask, attrs.get("zone", "lower"), rng, inset=int(radius / 3))
        blob = np.zeros((n, n), np.float32)
        for _ in range(int(rng.integers(3, 6))):
            oy, ox = rng.normal(0, radius * 0.6, 2)
            r = radius * rng.uniform(0.6, 1.0)
            blob += np.exp(-((yy - cy - oy) ** 2 + (xx - cx - ox) ** 2) / (2 * r**2))
        noise_rng = np.random.default_rng(int(rng.integers(2**31)))  # size-independent draw count
        patchy = 0.75 + 0.25 * smooth_noise(n, noise_rng, 0.02)
        opacity = np.maximum(opacity, np.clip(1.6 * blob * patchy, 0, 0.9) * mask)
    return opacity


def nodule(scene: Scene, attrs: Mapping[str, str], rng: np.random.Generator) -> np.ndarray:
    """A round nodule or mass (dense opacity map 0..1)."""
    n = scene.size
    low, high = NODULE_RADIUS[attrs.get("size", "small")]
    radius = rng.uniform(low, high)
    mask = scene.side(_sides(attrs.get("side", "right"))[0])
    cy, cx = _zone_point(mask, attrs.get("zone", "middle"), rng, inset=int(radius * n) + 1)
    spot = ellipse(n, cx / n, cy / n, radius, radius * rng.uniform(0.85, 1.0), rng.uniform(0, 3))
    return ndimage.gaussian_filter(spot, 0.004 * n)


def atelectasis(scene: Scene, attrs: Mapping[str, str], rng: np.random.Generator) -> np.ndarray:
    """Plate-like linear bands of collapsed lung, mostly at the bases (opacity map 0..1)."""
    n = scene.size
    opacity = np.zeros((n, n), np.float32)
    size = attrs.get("size", "small")
    for side in _sides(attrs.get("side", "left")):
        mask = scene.side(side)
        if not (mask > 0.5).any():
            continue
        for _ in range({"small": 1, "moderate": 2, "large": 3}[size]):
            cy, cx = _zone_point(mask, attrs.get("zone", "lower"), rng, inset=2)
            length = rng.uniform(0.07, 0.12) * (1.3 if size == "large" else 1.0)
            thickness = rng.uniform(0.012, 0.02) * (1.6 if size != "small" else 1.0)
            band = ellipse(n, cx / n, cy / n, length, thickness, rng.uniform(-0.3, 0.3))
            opacity = np.maximum(opacity, 0.9 * ndimage.gaussian_filter(band, 0.005 * n) * mask)
    return opacity


def support_device(
    scene: Scene, anatomy: Anatomy, attrs: Mapping[str, str], rng: np.random.Generator
) -> np.ndarray:
    """A tube, central line or pacemaker as a density layer (radio-opaque)."""
    n = scene.size
    x0, y0, x1, y1 = anatomy.lung_box
    mid = x0 + anatomy.split * (x1 - x0)
    carina = y0 + 0.2 * (y1 - y0)
    kind = attrs.get("kind", "line")
    wobble = rng.normal(0, 0.004, 8)
    if kind == "tube":  # endotracheal tube above the carina, often with a nasogastric tube
        layer = 0.9 * polyline(n, [(mid + wobble[0], 0.0), (mid + wobble[1], carina - 0.04)], 0.014)
        if rng.random() < 0.6:
            path = [(mid + 0.015, 0.0), (mid + 0.02 + wobble[2], y1 - 0.1), (mid + 0.12, y1 + 0.06)]
            layer += 0.6 * polyline(n, path, 0.008)
    elif kind == "pacemaker":  # generator below the (patient's) left clavicle, leads into the heart
        sign = -1 if attrs.get("side") == "right" else 1
        gx, gy = mid + sign * 0.27, y0 + 0.07
        layer = 1.6 * ellipse(n, gx, gy, 0.045, 0.032, rng.uniform(-0.3, 0.3))
        leads = [(gx, gy), (mid + sign * 0.12, y0 + 0.05), (mid - 0.03, y0 + 0.3 * (y1 - y0))]
        leads += [(mid + 0.04 + wobble[3], y1 - 0.12), (mid + 0.1, y1 - 0.08)]
        layer += 0.8 * polyline(n, leads, 0.01)
    else:  # central venous catheter from a jugular or subclavian vein down to the cavoatrial junction
        sign = 1 if attrs.get("side") == "left" else -1
        start = (mid + sign * rng.uniform(0.18, 0.3), y0 - 0.02)
        path = [start, (mid + sign * 0.08, y0 + 0.04 + wobble[4]), (mid - 0.035, y0 + 0.12)]
        path += [(mid - 0.03 + wobble[5], y0 + rng.uniform(0.28, 0.36) * (y1 - y0))]
        layer = 0.7 * polyline(n, path, 0.009)
    return ndimage.gaussian_filter(layer, 0.003 * n)
