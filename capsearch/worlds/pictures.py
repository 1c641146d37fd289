"""Three captioned picture families of the broad pretraining corpus: textures, outdoor scenes, line art.

Each `render_*` draws one grey picture from a random generator: an image in [-1, 1] (size×size,
float32, as capsearch.worlds.shapes draws) and its caption. None of them is a radiograph.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from capsearch.worlds.shapes import _SS, _blur, _grid, _smooth_noise

TEXTURES = ("stripes", "checkerboard", "dots", "rings", "waves", "clouds", "bricks", "hatching")
_SCALES = {"fine": 14.0, "medium": 8.0, "coarse": 4.0}
_CONTRASTS = {"faint": 0.25, "clear": 0.55, "strong": 0.9}
GLYPHS = tuple("ABCDEFGHKLMNPRSTUVWXYZ23456789")
_COUNT = {1: "a", 2: "two", 3: "three"}
DRAWINGS = ("spiral", "zigzag", "star", "arrow", "wave", "grid", "polygon", "house")


def _finish(img: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Add faint noise, box-filter the supersampled canvas down and clip to [-1, 1]."""
    img = img + rng.normal(0, 0.02, img.shape)
    img = img.reshape(size, _SS, size, _SS).mean(axis=(1, 3))
    return np.clip(img, -1, 1).astype(np.float32)


def render_texture(rng: np.random.Generator, size: int = 32) -> tuple[np.ndarray, str]:
    """A periodic or random texture filling the frame."""
    xx, yy = _grid(size)
    kind = TEXTURES[rng.integers(len(TEXTURES))]
    scale = list(_SCALES)[rng.integers(len(_SCALES))]
    contrast = list(_CONTRASTS)[rng.integers(len(_CONTRASTS))]
    freq = _SCALES[scale] * rng.uniform(0.85, 1.15)
    angle = rng.uniform(0, np.pi)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    v = -xx * np.sin(angle) + yy * np.cos(angle)
    if kind == "stripes":
        pattern = np.sign(np.sin(2 * np.pi * freq * u))
    elif kind == "checkerboard":
        pattern = np.sign(np.sin(np.pi * freq * u) * np.sin(np.pi * freq * v))
    elif kind == "dots":
        pattern = 2.0 * (np.hypot((freq * u) % 1 - 0.5, (freq * v) % 1 - 0.5) < 0.25) - 1
    elif kind == "rings":
        cx, cy = rng.uniform(0.2, 0.8, 2)
        pattern = np.sin(2 * np.pi * freq * np.hypot(xx - cx, yy - cy))
    elif kind == "waves":
        pattern = np.sin(2 * np.pi * freq * u + 2 * np.sin(2 * np.pi * 0.5 * freq * v))
    elif kind == "clouds":
        pattern = _smooth_noise(rng, size, int(freq)) + 0.5 * _smooth_noise(
            rng, size, 2 * int(freq)
        )
        pattern = pattern / (np.abs(pattern).max() + 1e-8)
    elif kind == "bricks":
        row = np.floor(freq * yy)
        shift = (row % 2) * 0.5
        mortar = ((freq * yy) % 1 < 0.15) | (((freq * xx / 2 + shift) % 1) < 0.08)
        pattern = np.where(mortar, -1.0, 1.0)
    else:  # hatching: two crossing families of thin lines
        lines = (np.abs(np.sin(np.pi * freq * u)) < 0.25) | (
            np.abs(np.sin(np.pi * freq * v)) < 0.25
        )
        pattern = np.where(lines, 1.0, -1.0)
    mean = rng.uniform(-0.5, 0.5)
    img = mean + _CONTRASTS[contrast] * 0.5 * pattern
    noun = {"hatching": "cross-hatching", "clouds": "cloudy texture", "bricks": "brick wall"}
    caption = f"a {contrast} {scale} {noun.get(kind, kind + ' pattern')}"
    if kind in ("stripes", "checkerboard", "waves", "hatching"):
        caption += f" tilted {15 * round(np.degrees(angle) / 15) % 180} degrees"
    return _finish(img, size, rng), caption


def _polygon(points: list[tuple[float, float]], n: int, width: int = 0) -> np.ndarray:
    """A polygon (filled, or outlined `width` px wide) on an n×n canvas, points in fractions."""
    image = Image.new("F", (n, n), 0.0)
    draw = ImageDraw.Draw(image)
    xy = [(x * n, y * n) for x, y in points]
    if width:
        draw.line(xy + xy[:1], fill=1.0, width=width)
    else:
        draw.polygon(xy, fill=1.0)
    return np.asarray(image, dtype=np.float64)


def render_scene(rng: np.random.Generator, size: int = 32) -> tuple[np.ndarray, str]:
    """A simple outdoor view: sky over ground at a horizon, with a sun or moon, hills, trees, houses."""
    xx, yy = _grid(size)
    n = size * _SS
    night = rng.random() < 0.3
    horizon = rng.choice(["low", "middle", "high"])
    h = {"low": 0.72, "middle": 0.55, "high": 0.38}[horizon] + rng.normal(0, 0.02)
    sky = (-0.8 if night else 0.2) + (0.0 if night else 0.5) * (1 - yy)
    ground_tone = rng.choice(["dark", "grey"]) if not night else "dark"
    ground = {"dark": -0.55, "grey": -0.1}[ground_tone] + 0.1 * _smooth_noise(rng, size, 6)
    water = rng.random() < 0.25
    if water:  # water mirrors the sky, rippled
        ground = sky[::-1] * 0.7 + 0.08 * np.sin(60 * yy)
    img = np.where(yy < h, sky, ground)
    parts = [f"a {'night' if night else 'day'} landscape with a {horizon} horizon"]
    if water:
        parts.append("over water")
    if rng.random() < 0.7:
        cx, cy = rng.uniform(0.15, 0.85), rng.uniform(0.1, h - 0.12)
        r = rng.uniform(0.05, 0.1)
        disc = np.hypot(xx - cx, yy - cy) <= r
        img = np.where(disc, 0.95 if not night else 0.7, img)
        side = "left" if cx < 0.4 else "right" if cx > 0.6 else "middle"
        parts.append(f"a {'moon' if night else 'sun'} on the {side}")
    if rng.random() < 0.6:
        count = int(rng.integers(1, 4))
        hill = np.full_like(xx, 1.0)
        for _ in range(count):
            px, height = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.3)
            hill = np.minimum(hill, h - height + 1.2 * height * np.abs(xx - px) / 0.4)
        mountain = (yy >= hill) & (yy < h)
        img = np.where(mountain, -0.3 if not night else -0.6, img)
        parts.append(f"{_COUNT[count]} mountain{'s' if count > 1 else ''}")
    if not water and rng.random() < 0.6:
        count = int(rng.integers(1, 4))
        for _ in range(count):
            tx, th = rng.uniform(0.1, 0.9), rng.uniform(0.12, 0.22)
            crown = _polygon([(tx - th / 3, h), (tx + th / 3, h), (tx, h - th)], n)
            trunk = (np.abs(xx - tx) < 0.015) & (yy >= h) & (yy < h + 0.05)
            img = np.where((crown > 0) | trunk, -0.85, img)
        parts.append(f"{_COUNT[count]} tree{'s' if count > 1 else ''}")
    if not water and rng.random() < 0.4:
        hx, w = rng.uniform(0.2, 0.8), rng.uniform(0.08, 0.14)
        body = (np.abs(xx - hx) <= w / 2) & (yy >= h - w) & (yy < h + 0.02)
        roof = _polygon([(hx - w * 0.65, h - w), (hx + w * 0.65, h - w), (hx, h - 1.7 * w)], n)
        img = np.where(body, 0.6, np.where(roof > 0, -0.7, img))
        parts.append("a house")
    return _finish(_blur(img, 1), size, rng), parts[0] + (
        " and " + ", ".join(parts[1:]) if len(parts) > 1 else ""
    )


def _drawing(kind: str, rng: np.random.Generator, n: int, width: int) -> np.ndarray:
    """One line drawing's strokes on an n×n canvas."""
    image = Image.new("F", (n, n), 0.0)
    draw = ImageDraw.Draw(image)
    c = n / 2 + rng.normal(0, 0.04 * n, 2)
    if kind == "spiral":
        t = np.linspace(0, rng.uniform(4, 7) * np.pi, 200)
        r = 0.42 * n * t / t[-1]
        draw.line(list(zip(c[0] + r * np.cos(t), c[1] + r * np.sin(t))), fill=1.0, width=width)
    elif kind == "zigzag":
        xs = np.linspace(0.1, 0.9, int(rng.integers(4, 9))) * n
        ys = np.where(np.arange(len(xs)) % 2, 0.35, 0.65) * n
        draw.line(list(zip(xs, ys)), fill=1.0, width=width)
    elif kind == "star":
        k = int(rng.integers(5, 8))
        t = np.pi * np.arange(2 * k) / k
        r = np.where(np.arange(2 * k) % 2, 0.18, 0.42) * n
        pts = list(zip(c[0] + r * np.cos(t), c[1] + r * np.sin(t)))
        draw.line(pts + pts[:1], fill=1.0, width=width)
    elif kind == "arrow":
        draw.line([(0.15 * n, 0.5 * n), (0.85 * n, 0.5 * n)], fill=1.0, width=width)
        draw.line(
            [(0.6 * n, 0.3 * n), (0.85 * n, 0.5 * n), (0.6 * n, 0.7 * n)], fill=1.0, width=width
        )
    elif kind == "wave":
        xs = np.linspace(0.05, 0.95, 100) * n
        ys = n / 2 + 0.25 * n * np.sin(xs / n * 2 * np.pi * rng.uniform(1, 3))
        draw.line(list(zip(xs, ys)), fill=1.0, width=width)
    elif kind == "grid":
        k = int(rng.integers(3, 6))
        for p in np.linspace(0.15, 0.85, k) * n:
            draw.line([(p, 0.15 * n), (p, 0.85 * n)], fill=1.0, width=width)
            draw.line([(0.15 * n, p), (0.85 * n, p)], fill=1.0, width=width)
    elif kind == "polygon":
        k = int(rng.integers(3, 9))
        t = 2 * np.pi * np.arange(k) / k + rng.uniform(0, np.pi)
        pts = list(zip(c[0] + 0.38 * n * np.cos(t), c[1] + 0.38 * n * np.sin(t)))
        draw.line(pts + pts[:1], fill=1.0, width=width)
    else:  # house: square body and triangular roof
        pts = [(0.25, 0.85), (0.25, 0.45), (0.5, 0.18), (0.75, 0.45), (0.75, 0.85)]
        draw.line([(x * n, y * n) for x, y in pts + pts[:1]], fill=1.0, width=width)
    return np.asarray(image, dtype=np.float64)


def render_glyph(rng: np.random.Generator, size: int = 32) -> tuple[np.ndarray, str]:
    """A letter, a digit or a simple line drawing, light on dark or dark on light."""
    n = size * _SS
    dark_on_light = rng.random() < 0.5
    if rng.random() < 0.5:
        char = GLYPHS[rng.integers(len(GLYPHS))]
        image = Image.new("F", (n, n), 0.0)
        font = ImageFont.load_default(size=int(n * rng.uniform(0.55, 0.8)))
        ImageDraw.Draw(image).text((n / 2, n / 2), char, fill=1.0, font=font, anchor="mm")
        strokes = np.asarray(image, dtype=np.float64)
        what = f"the {'digit' if char.isdigit() else 'letter'} {char.lower()}"
    else:
        kind = DRAWINGS[rng.integers(len(DRAWINGS))]
        thick = rng.random() < 0.5
        strokes = _drawing(kind, rng, n, width=max(1, round(n * (0.06 if thick else 0.03))))
        what = f"a {'thick' if thick else 'thin'} line drawing of a {kind}"
    paper, ink = (0.8, -0.8) if dark_on_light else (-0.85, 0.85)
    img = paper + (ink - paper) * np.clip(strokes, 0, 1)
    colours = "in black on white" if dark_on_light else "in white on black"
    return _finish(img, size, rng), f"{what} {colours}"
