"""Phantom chest anatomy: real lung masks, body, mediastinum, heart, diaphragm, ribs and clavicles."""

from __future__ import annotations

import functools
import io
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from capsearch.errors import UserError
from capsearch.worlds.reports import torchxrayvision_data

MASK_ZIP = "semantic_masks_v7labs_lungs.zip"
_CANON = 96  # lung masks are kept bbox-cropped at this resolution, resized per patient

# Densities of the additive projection model: the image is a monotone map of summed density along each
# ray, so overlapping structures (ribs over heart, fluid over lung) combine as on a radiograph.
SOFT_TISSUE = 1.0
LUNG_AIR = -0.62
MEDIASTINUM = 0.28
HEART = 0.18
SPINE = 0.1
RIB = 0.11
CLAVICLE = 0.3
ABDOMEN = 0.3
NORMAL_CTR = 0.4  # heart width / thoracic width of a normal heart


@functools.lru_cache(maxsize=1)
def _mask_archive() -> tuple[str, tuple[str, ...]]:
    """Path of the lung-mask zip and the sorted names of its image members."""
    path = torchxrayvision_data() / MASK_ZIP
    try:
        with zipfile.ZipFile(path) as archive:
            names = sorted(n for n in archive.namelist() if not n.endswith("/"))
    except (OSError, zipfile.BadZipFile) as exc:
        raise UserError(f"cannot read the lung masks {path}: {exc}") from None
    return str(path), tuple(names)


def mask_count() -> int:
    """How many lung masks torchxrayvision ships (517)."""
    return len(_mask_archive()[1])


@functools.cache
def lung_mask(index: int) -> tuple[np.ndarray, float, float] | None:
    """Lung mask `index` cropped to the lungs (float, _CANON²), its aspect and split; None if unusable."""
    path, names = _mask_archive()
    with zipfile.ZipFile(path) as archive:
        data = archive.read(names[index])
    image = Image.open(io.BytesIO(data))
    image.draft("L", (256, 256))  # JPEG masks decode at reduced scale: 5x faster
    image = image.convert("L")
    factor = max(1, min(image.size) // 256)
    if factor > 1:
        image = image.reduce(factor)
    lungs = np.asarray(image) > 191  # 255 marks lungs; 127 marks other annotations in a few masks
    rows, cols = np.flatnonzero(lungs.any(1)), np.flatnonzero(lungs.any(0))
    if len(rows) < 20 or len(cols) < 20:
        return None
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    h, w = lungs.shape
    if y0 == 0 or x0 == 0 or y1 == h or x1 == w:  # lungs cut by the image border
        return None
    crop = lungs[y0:y1, x0:x1]
    fill, aspect = crop.mean(), (y1 - y0) / (x1 - x0)
    column = crop.sum(0).astype(float)
    middle = slice(int(0.3 * len(column)), int(0.7 * len(column)) + 1)
    split = middle.start + int(np.argmin(column[middle]))
    left, right = crop[:, :split].sum(), crop[:, split:].sum()
    two_lungs = column[split] <= 0.05 * column.max() and min(left, right) >= 0.3 * max(left, right)
    if not (two_lungs and 0.3 <= fill <= 0.85 and 0.65 <= aspect <= 1.4):
        return None
    canon = Image.fromarray((crop * 255).astype(np.uint8)).resize((_CANON, _CANON), Image.BILINEAR)
    return np.asarray(canon, dtype=np.float32) / 255.0, float(aspect), split / crop.shape[1]


def pick_lung_mask(rng: np.random.Generator) -> int:
    """Index of a usable lung mask drawn at random (the next usable one after an unusable draw)."""
    count = mask_count()
    start = int(rng.integers(count))
    for step in range(count):
        if lung_mask((start + step) % count) is not None:
            return (start + step) % count
    raise UserError("no usable lung mask in torchxrayvision's semantic_masks_v7labs_lungs.zip")


@dataclass(frozen=True)
class Anatomy:
    """One patient's chest, in fractions of the image side (x to the image right, y down)."""

    mask_index: int
    lung_box: tuple[float, float, float, float]  # x0, y0, x1, y1 of both lungs
    split: float  # fraction of the lung box where the image-left (patient's right) lung ends
    body_margin: float  # soft tissue lateral to the lungs
    heart_width: float  # this patient's normal heart width relative to NORMAL_CTR
    rib_count: int
    rib_tilt: float
    clavicle_drop: float
    lung_markings: float
    texture_seed: int
    gastric_bubble: bool


def sample_anatomy(rng: np.random.Generator, masks: Sequence[int] | None = None) -> Anatomy:
    """A random patient's chest built around a real lung mask (one of `masks`, usable, if given)."""
    index = pick_lung_mask(rng) if masks is None else int(masks[rng.integers(len(masks))])
    _, aspect, split = lung_mask(index)  # type: ignore[misc]
    width = rng.uniform(0.66, 0.78)
    height = float(np.clip(width * aspect * rng.uniform(0.92, 1.08), 0.55, 0.78))
    x0 = 0.5 - width / 2 + rng.uniform(-0.02, 0.02)
    y0 = rng.uniform(0.08, 0.16)
    return Anatomy(
        mask_index=index,
        lung_box=(x0, y0, x0 + width, min(y0 + height, 0.92)),
        split=split,
        body_margin=rng.uniform(0.03, 0.08),
        heart_width=rng.uniform(0.95, 1.12),
        rib_count=int(rng.integers(9, 11)),
        rib_tilt=rng.uniform(0.12, 0.2),
        clavicle_drop=rng.uniform(0.03, 0.07),
        lung_markings=rng.uniform(0.7, 1.3),
        texture_seed=int(rng.integers(2**31)),
        gastric_bubble=bool(rng.random() < 0.6),
    )


@dataclass
class Scene:
    """Density layers of one chest on an R×R canvas, which findings then edit."""

    size: int
    density: np.ndarray  # everything but the lungs' air
    lungs: np.ndarray  # lung field 0..1 (air fraction of each pixel)
    image_left: np.ndarray  # mask of the image-left (patient's right) lung
    image_right: np.ndarray
    heart: np.ndarray
    markings: np.ndarray  # lung vessel texture, removed where a pneumothorax is
    bones: np.ndarray  # ribs, clavicles and humeral heads, added last

    def side(self, patient_side: str) -> np.ndarray:
        """Lung mask of the patient's 'left' or 'right' side (radiological convention: mirrored)."""
        return self.image_right if patient_side == "left" else self.image_left


def _canvas(size: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    """A blank float canvas and its drawing handle."""
    image = Image.new("F", (size, size), 0.0)
    return image, ImageDraw.Draw(image)


def ellipse(
    size: int, cx: float, cy: float, rx: float, ry: float, angle: float = 0.0
) -> np.ndarray:
    """A filled (rotated) ellipse mask in canvas fractions."""
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    c, s = np.cos(angle), np.sin(angle)
    points = [
        ((cx + c * a - s * b) * size, (cy + s * a + c * b) * size)
        for a, b in zip(x, y, strict=True)
    ]
    image, draw = _canvas(size)
    draw.polygon(points, fill=1.0)
    return np.asarray(image)


def polyline(size: int, points: list[tuple[float, float]], width: float) -> np.ndarray:
    """A thick polyline mask in canvas fractions."""
    image, draw = _canvas(size)
    draw.line(
        [(x * size, y * size) for x, y in points], fill=1.0, width=max(1, round(width * size))
    )
    return np.asarray(image)


def smooth_noise(size: int, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Zero-mean, unit-variance smooth noise with correlation length `sigma` (canvas fraction)."""
    field_ = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma * size, mode="wrap")
    return (field_ / (field_.std() + 1e-8)).astype(np.float32)


def build_scene(anatomy: Anatomy, size: int, heart_scale: float = 1.0, view: str = "PA") -> Scene:
    """The patient's density layers on a size×size canvas; `heart_scale` > 1 enlarges the heart."""
    canon, _, split = lung_mask(anatomy.mask_index)  # type: ignore[misc]
    x0, y0, x1, y1 = anatomy.lung_box
    px0, py0 = round(x0 * size), round(y0 * size)
    pw, ph = max(4, round((x1 - x0) * size)), max(4, round((y1 - y0) * size))
    pw, ph = min(pw, size - px0), min(ph, size - py0)
    placed = Image.fromarray(canon, mode="F").resize((pw, ph), Image.BILINEAR)
    lungs = np.zeros((size, size), np.float32)
    lungs[py0 : py0 + ph, px0 : px0 + pw] = np.asarray(placed)
    lungs = ndimage.gaussian_filter(lungs, 0.004 * size).clip(0, 1)
    cut = px0 + round(split * pw)
    image_left = np.zeros_like(lungs)
    image_left[:, :cut] = lungs[:, :cut]
    image_right = lungs - image_left
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    mid = x0 + split * (x1 - x0)

    # Body: a neck widening into shoulders, then the chest wall lateral to the lungs.
    half = (x1 - x0) / 2 + anatomy.body_margin
    neck = 0.11
    shoulder = 1 / (1 + np.exp(-(yy - (y0 + 0.02)) / 0.025))
    body_half = neck + (half + 0.04 - neck) * shoulder
    body = 1 / (1 + np.exp(-(body_half - np.abs(xx - mid)) / 0.012))
    density = SOFT_TISSUE * body * (0.85 + 0.15 * np.clip((yy - y0) / 0.5, 0, 1))

    # Below the diaphragm (the lungs' lower border, bridged under the heart) liver and spleen are dense.
    abdomen = _below_diaphragm(lungs, size) * body
    density += ABDOMEN * abdomen
    # Mediastinum and spine: a dense column between the lungs; trachea: an air column down to the carina.
    density += MEDIASTINUM * body * np.exp(-(((xx - mid) / 0.07) ** 2)) * (1 - abdomen)
    density += SPINE * body * np.exp(-(((xx - mid) / 0.04) ** 4))
    carina = y0 + 0.2 * (y1 - y0)
    trachea = np.exp(-(((xx - mid) / 0.017) ** 4)) * (yy < carina)
    density -= 0.25 * ndimage.gaussian_filter(trachea.astype(np.float32), 0.006 * size)

    # Heart: the cardiac notch the real mask leaves between the lower lungs (their medial borders
    # there are the heart borders), grown towards the patient's left (image right) when enlarged.
    lung_width = x1 - x0
    magnify = 1.1 if view == "AP" else 1.0  # AP films magnify the heart
    width = heart_scale * anatomy.heart_width * magnify * NORMAL_CTR * lung_width * size
    heart = _heart_silhouette(image_left, image_right, py0 + int(0.45 * ph), mid * size, width)
    heart *= 1 - abdomen  # the heart sits on the diaphragm: one silhouette with the abdomen

    # Lung markings: vessels fanning out from the hila, brighter centrally and towards the bases.
    rng = np.random.default_rng(anatomy.texture_seed)
    hila = np.zeros_like(lungs)
    for hx in (mid - 0.1 * lung_width, mid + 0.1 * lung_width):
        hila += np.exp(-((xx - hx) ** 2 + (yy - (y0 + 0.45 * (y1 - y0))) ** 2) / (2 * 0.1**2))
    texture = 0.5 * smooth_noise(size, rng, 0.012) + 0.5 * smooth_noise(size, rng, 0.03)
    basal = np.clip((yy - y0) / (y1 - y0), 0, 1)
    markings = anatomy.lung_markings * (0.16 * hila + 0.05 * texture * (0.5 + hila) + 0.08 * basal)

    if anatomy.gastric_bubble:  # stomach gas below the left hemidiaphragm
        bubble = ellipse(size, mid + 0.22 * lung_width, y1 + 0.05, 0.05, 0.03)
        density -= 0.35 * ndimage.gaussian_filter(bubble, 0.01 * size) * body

    skeleton = bones(anatomy, size, mid, body, view)
    return Scene(
        size=size,
        density=density.astype(np.float32),
        lungs=lungs,
        image_left=image_left,
        image_right=image_right,
        heart=heart,
        markings=markings.astype(np.float32),
        bones=skeleton,
    )


def _below_diaphragm(lungs: np.ndarray, size: int) -> np.ndarray:
    """Soft mask of everything below the diaphragm line, bridged linearly between the two lungs."""
    present = lungs > 0.5
    columns = np.flatnonzero(present.any(0))
    if len(columns) == 0:
        return np.zeros_like(lungs)
    bottom = size - 1 - present[::-1].argmax(0)
    line = np.interp(np.arange(size), columns, bottom[columns]).astype(np.float32)
    # Medial upper-lobe columns end high up; the diaphragm is the lower envelope of the lung bases.
    line = ndimage.maximum_filter1d(line, max(3, int(0.2 * size)), mode="nearest")
    line = ndimage.gaussian_filter1d(line, 0.03 * size, mode="nearest")
    rows = np.arange(size, dtype=np.float32)[:, None]
    return 1 / (1 + np.exp(-(rows - line[None, :] - 0.01 * size) / (0.012 * size)))


def _heart_silhouette(
    image_left: np.ndarray, image_right: np.ndarray, top: int, mid: float, width: float
) -> np.ndarray:
    """Heart mask from row `top` to the diaphragm: the cardiac notch between the lungs, or a heart
    `width` px wide (a third right of the midline, two thirds left), whichever is wider."""
    size = image_left.shape[0]
    heart = np.zeros((size, size), np.float32)
    both = (image_left > 0.5) | (image_right > 0.5)
    rows_present = np.flatnonzero(both.any(1))
    if len(rows_present) == 0 or rows_present[-1] <= top:
        return heart
    rows = np.arange(top, rows_present[-1] + 1)
    left = np.array([_last(image_left[r] > 0.5) for r in rows], dtype=float)
    right = np.array([_first(image_right[r] > 0.5) for r in rows], dtype=float)
    for edge, fallback in ((left, 0.42 * size), (right, 0.6 * size)):
        valid = ~np.isnan(edge)
        edge[:] = np.interp(rows, rows[valid], edge[valid]) if valid.any() else fallback
    left = ndimage.gaussian_filter1d(left, 0.02 * size, mode="nearest")
    right = ndimage.gaussian_filter1d(right, 0.02 * size, mode="nearest")
    # The heart swells from the mediastinum's width at the hilum to its full width near the diaphragm.
    t = (rows - rows[0]) / max(1, rows[-1] - rows[0])
    bulge = np.sin(0.5 * np.pi * np.clip(t / 0.8, 0, 1)) ** 0.7
    stalk = 0.05 * size
    shape_left = mid - stalk - (width / 3 - stalk) * bulge
    shape_right = mid + stalk + (2 * width / 3 - stalk) * bulge
    # The notch may widen the heart a little, not to the costophrenic angles below the domes.
    left = np.clip(left, shape_left - 0.1 * width, shape_left)
    right = np.clip(right, shape_right, shape_right + 0.1 * width)
    columns = np.arange(size)[None, :]
    heart[rows] = ((columns >= left[:, None]) & (columns <= right[:, None])).astype(np.float32)
    return ndimage.gaussian_filter(heart, 0.006 * size)


def _first(row: np.ndarray) -> float:
    """Index of the first True, or NaN."""
    hits = np.flatnonzero(row)
    return float(hits[0]) if len(hits) else float("nan")


def _last(row: np.ndarray) -> float:
    """Index of the last True, or NaN."""
    hits = np.flatnonzero(row)
    return float(hits[-1]) if len(hits) else float("nan")


def bones(anatomy: Anatomy, size: int, mid: float, body: np.ndarray, view: str) -> np.ndarray:
    """Posterior and anterior ribs, clavicles and humeral heads as an additive density layer."""
    x0, y0, x1, y1 = anatomy.lung_box
    half = (x1 - x0) / 2 + 0.02
    layer = np.zeros((size, size), np.float32)
    spacing = (y1 - y0) * 0.95 / anatomy.rib_count
    thickness = 0.36 * spacing
    d = np.linspace(0.05, 1.0, 24)
    front = np.linspace(0.35, 1.0, 12)
    for i in range(anatomy.rib_count):
        top = y0 - 0.02 + i * spacing
        for sign in (-1, 1):
            # Posterior ribs leave the spine, rise a little, then sweep down along the chest wall;
            # fainter anterior ribs run back down towards the sternum, giving the criss-cross.
            xs = mid + sign * d * half
            ys = top - 0.06 * d + (anatomy.rib_tilt + 0.06) * d**2.5
            layer += RIB * polyline(size, list(zip(xs, ys, strict=True)), thickness)
            xs = mid + sign * front * half
            ys = top + 0.5 * spacing + anatomy.rib_tilt * 1.2 * (1 - front)
            layer += 0.5 * RIB * polyline(size, list(zip(xs, ys, strict=True)), 0.7 * thickness)
    layer = np.minimum(layer, 1.6 * RIB)
    clavicle_y = y0 + (0.0 if view == "AP" else 0.02)
    for sign in (-1, 1):
        xs = mid + sign * np.linspace(0.04, 0.36, 12)
        ys = (
            clavicle_y
            - anatomy.clavicle_drop * np.linspace(0, 1, 12) ** 1.5
            + 0.01 * np.sin(np.linspace(0, np.pi, 12))
        )
        layer += CLAVICLE * polyline(size, list(zip(xs, ys, strict=True)), 0.028)
        layer += 0.3 * ellipse(size, mid + sign * 0.47, clavicle_y - 0.02, 0.07, 0.08)
    layer = ndimage.gaussian_filter(layer, 0.004 * size)
    return layer * body
