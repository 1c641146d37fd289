"""A procedural, general-purpose captioned world of grey shapes, used to pretrain the tiny base model.

Fine-tuning the base on chest-X-ray phantoms must be a domain shift, as Stable Diffusion → MIMIC-CXR is in
the paper, yet the base must already represent smooth blobs, symmetric pairs, rings, stripes and
gradients so that parameter-efficient methods have something to adapt. No X-ray is ever drawn here.
"""

from __future__ import annotations

import numpy as np

POSITIONS = {
    "at the top left": (0.25, 0.25),
    "at the top": (0.5, 0.22),
    "at the top right": (0.75, 0.25),
    "on the left": (0.25, 0.5),
    "in the centre": (0.5, 0.5),
    "on the right": (0.75, 0.5),
    "at the bottom left": (0.25, 0.75),
    "at the bottom": (0.5, 0.78),
    "at the bottom right": (0.75, 0.75),
}
SIZES = {"tiny": 0.06, "small": 0.1, "medium": 0.17, "large": 0.26}
TONES = {"black": -0.95, "dark": -0.55, "grey": 0.0, "light": 0.5, "bright": 0.9}
SHAPES = (
    "circle",
    "ellipse",
    "ring",
    "square",
    "rectangle",
    "triangle",
    "bar",
    "cross",
    "blob",
    "crescent",
    "spots",
)
EDGES = ("sharp", "soft")
BACKGROUNDS = ("black", "dark", "grey", "light", "gradient", "stripes", "texture", "noise")
_SS = 2  # supersampling factor for anti-aliased edges


def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    ax = (np.arange(n * _SS) + 0.5) / (n * _SS)
    return np.meshgrid(ax, ax, indexing="xy")


def _smooth_noise(rng: np.random.Generator, n: int, cells: int) -> np.ndarray:
    """Bilinearly upsampled random grid: low-frequency texture in [-1, 1]."""
    g = rng.uniform(-1, 1, (cells + 1, cells + 1))
    ax = np.linspace(0, cells, n * _SS)
    i = np.minimum(ax.astype(int), cells - 1)
    f = ax - i
    rows = g[i] * (1 - f)[:, None] + g[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _shape_mask(
    rng, kind: str, cx: float, cy: float, r: float, xx: np.ndarray, yy: np.ndarray
) -> np.ndarray:
    dx, dy = xx - cx, yy - cy
    angle = rng.uniform(0, np.pi)
    ca, sa = np.cos(angle), np.sin(angle)
    u, v = dx * ca + dy * sa, -dx * sa + dy * ca
    if kind == "circle":
        return (dx**2 + dy**2 <= r**2).astype(float)
    if kind == "ellipse":
        a, b = r, r * rng.uniform(0.35, 0.7)
        return ((u / a) ** 2 + (v / b) ** 2 <= 1).astype(float)
    if kind == "ring":
        d = np.sqrt(dx**2 + dy**2)
        return ((d <= r) & (d >= r * rng.uniform(0.5, 0.75))).astype(float)
    if kind == "square":
        return ((np.abs(u) <= r * 0.85) & (np.abs(v) <= r * 0.85)).astype(float)
    if kind == "rectangle":
        return ((np.abs(u) <= r) & (np.abs(v) <= r * rng.uniform(0.3, 0.6))).astype(float)
    if kind == "triangle":
        # three half-planes of an equilateral triangle centred on (cx, cy)
        m = np.ones_like(xx, dtype=bool)
        for k in range(3):
            t = angle + k * 2 * np.pi / 3
            m &= dx * np.cos(t) + dy * np.sin(t) <= r * 0.5
        return m.astype(float)
    if kind == "bar":
        return ((np.abs(u) <= r * 1.6) & (np.abs(v) <= r * 0.18)).astype(float)
    if kind == "cross":
        w = r * 0.25
        return (
            ((np.abs(u) <= r) & (np.abs(v) <= w)) | ((np.abs(v) <= r) & (np.abs(u) <= w))
        ).astype(float)
    if kind == "blob":
        theta = np.arctan2(dy, dx)
        wobble = 1 + sum(
            rng.uniform(-0.2, 0.2) * np.cos(k * theta + rng.uniform(0, 6.3)) for k in (2, 3, 5)
        )
        return (np.sqrt(dx**2 + dy**2) <= r * wobble).astype(float)
    if kind == "crescent":
        outer = dx**2 + dy**2 <= r**2
        inner = (dx - 0.45 * r * ca) ** 2 + (dy - 0.45 * r * sa) ** 2 <= (0.85 * r) ** 2
        return (outer & ~inner).astype(float)
    if kind == "spots":
        m = np.zeros_like(xx)
        for _ in range(rng.integers(4, 9)):
            sx, sy = cx + rng.uniform(-1.5, 1.5) * r, cy + rng.uniform(-1.5, 1.5) * r
            m = np.maximum(m, ((xx - sx) ** 2 + (yy - sy) ** 2 <= (0.25 * r) ** 2).astype(float))
        return m
    raise ValueError(kind)


def _blur(img: np.ndarray, passes: int) -> np.ndarray:
    for _ in range(passes):
        img = (
            np.roll(img, 1, 0)
            + np.roll(img, -1, 0)
            + np.roll(img, 1, 1)
            + np.roll(img, -1, 1)
            + 4 * img
        ) / 8
    return img


def _background(rng: np.random.Generator, kind: str, n: int, xx, yy) -> tuple[np.ndarray, str]:
    if kind in TONES:
        return np.full_like(xx, TONES[kind]), f"a {kind} background"
    if kind == "gradient":
        direction = rng.choice(["top", "bottom", "left", "right"])
        ramp = {"top": 1 - yy, "bottom": yy, "left": 1 - xx, "right": xx}[direction]
        return -0.9 + 1.4 * ramp, f"a background brightening towards the {direction}"
    if kind == "stripes":
        orient = rng.choice(["horizontal", "vertical", "diagonal"])
        coord = {"horizontal": yy, "vertical": xx, "diagonal": (xx + yy) / 2}[orient]
        freq = rng.uniform(4, 9)
        return -0.6 + 0.35 * np.sin(2 * np.pi * freq * coord), f"a background of {orient} stripes"
    if kind == "texture":
        return -0.4 + 0.5 * _smooth_noise(rng, n, int(rng.integers(3, 7))), "a mottled background"
    return rng.normal(-0.3, 0.3, xx.shape), "a noisy background"


def render_shapes(rng: np.random.Generator, size: int = 32) -> tuple[np.ndarray, str]:
    """Draw one random scene; return an image in [-1, 1] (size×size, float32) and its caption."""
    xx, yy = _grid(size)
    bg_kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    img, bg_text = _background(rng, bg_kind, size, xx, yy)
    phrases = []
    n_obj = int(rng.choice([1, 1, 2, 2, 3, 4]))
    pos_names = rng.choice(list(POSITIONS), size=n_obj, replace=False)
    for pos in pos_names:
        kind = SHAPES[rng.integers(len(SHAPES))]
        size_name = list(SIZES)[rng.integers(len(SIZES))]
        tone = list(TONES)[rng.integers(len(TONES))]
        if tone == bg_kind:
            tone = "bright" if tone != "bright" else "black"
        edge = EDGES[rng.integers(2)]
        cx, cy = POSITIONS[pos]
        cx, cy = cx + rng.normal(0, 0.03), cy + rng.normal(0, 0.03)
        r = SIZES[size_name] * rng.uniform(0.85, 1.15)
        pair = (
            kind in ("ellipse", "blob", "circle", "crescent")
            and pos in ("on the left", "on the right")
            and rng.random() < 0.5
        )
        mask = _shape_mask(rng, kind, cx, cy, r, xx, yy)
        if pair:  # a mirror-symmetric pair, as lungs or eyes are
            mask = np.maximum(mask, mask[:, ::-1])
        if edge == "soft":
            mask = _blur(mask, 3 * _SS)
        value = TONES[tone] + rng.normal(0, 0.05)
        if rng.random() < 0.3:  # shaded objects: brightness varies across the shape
            value = value + 0.3 * _smooth_noise(rng, size, 2)
        img = img * (1 - mask) + value * mask
        noun = kind if kind != "spots" else "cluster of spots"
        words = f"{size_name} {tone} {edge + ' ' if edge == 'soft' else ''}{noun}"
        phrases.append(f"a pair of {words}s on both sides" if pair else f"a {words} {pos}")
    img = img + rng.normal(0, 0.03, img.shape)
    img = img.reshape(size, _SS, size, _SS).mean(axis=(1, 3))
    caption = " and ".join(phrases) + f" on {bg_text}"
    return np.clip(img, -1, 1).astype(np.float32), caption


def make_shapes(n: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Render n scenes deterministically for a seed: images [n, size, size] in [-1, 1] and captions."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size), np.float32)
    captions = []
    for i in range(n):
        images[i], cap = render_shapes(rng, size)
        captions.append(cap)
    return images, captions
