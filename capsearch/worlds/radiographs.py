"""Radiographs of the broad pretraining corpus: other body parts from simple procedural anatomy, and a
few chest films from the pretraining part of the report bank and lung masks (capsearch.worlds.partition).

A body-part film is summed density (soft tissue, bone, metal) on a canvas twice the output size, exposed,
blurred, noised and box-filtered down; its caption names the view, side and part, then a short report.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from capsearch.worlds.anatomy import ellipse, polyline, sample_anatomy
from capsearch.worlds.cooccurrence import sample_findings
from capsearch.worlds.partition import bank_part, masks_of
from capsearch.worlds.phantom import render_phantom
from capsearch.worlds.reports import attributes_from_text

PARTS = ("hand", "knee", "pelvis", "skull", "spine")
SOFT, BONE, METAL = 0.45, 0.75, 1.6
# Impressions for films without a finding, per body part (the caption's last sentence).
NORMAL = {
    "hand": ("No acute fracture or dislocation.", "Joint spaces preserved. Bones intact."),
    "knee": ("No knee joint effusion. No fracture.", "Knee alignment maintained. Bones intact."),
    "pelvis": ("Both hips are located. No pelvic fracture.", "Sacroiliac joints symmetric."),
    "skull": ("Calvarium intact. No skull fracture.", "Paranasal sinuses are clear."),
    "spine": ("Vertebral body heights maintained.", "Lumbar alignment preserved."),
}
FINDING_TEXT = {
    "hand": {"fracture": "Fracture of the {bone}."},
    "knee": {
        "fracture": "Fracture of the tibial plateau.",
        "effusion": "Large knee joint effusion.",
        "narrowing": "Medial knee joint space narrowing.",
    },
    "pelvis": {
        "fracture": "Fracture of the {side} femoral neck.",
        "arthroplasty": "{Side} total hip arthroplasty in place.",
    },
    "skull": {
        "fracture": "Linear skull fracture.",
        "sinus": "Opacified maxillary sinus.",
    },
    "spine": {
        "fracture": "Compression fracture of {level}.",
        "narrowing": "Disc space narrowing at {level}.",
    },
}
_HAND_BONES = ("fifth metacarpal", "fourth metacarpal", "distal radius", "index finger")


def _hand(n: int, rng: np.random.Generator, finding: str | None) -> tuple[np.ndarray, dict]:
    """Forearm, palm and five rays of metacarpals and phalanges (thumb image-left, a right hand)."""
    soft = polyline(n, [(0.5, 1.05), (0.5, 0.72)], 0.3) + ellipse(n, 0.5, 0.6, 0.2, 0.17)
    bone = polyline(n, [(0.44, 1.05), (0.44, 0.84)], 0.07) + polyline(
        n, [(0.57, 1.05), (0.57, 0.84)], 0.05
    )
    for k in range(6):  # carpal bones
        bone = bone + ellipse(n, 0.42 + 0.05 * (k % 3), 0.76 + 0.04 * (k // 3), 0.025, 0.02)
    spread = rng.uniform(0.9, 1.1)
    rays = []
    for k, (base_x, tip_x, tip_y) in enumerate(
        [
            (0.40, 0.15, 0.42),
            (0.44, 0.33, 0.12),
            (0.49, 0.48, 0.06),
            (0.54, 0.62, 0.1),
            (0.58, 0.76, 0.2),
        ]
    ):
        tip = (0.5 + (tip_x - 0.5) * spread, tip_y + rng.normal(0, 0.015))
        base = (base_x, 0.72)
        soft = soft + polyline(n, [base, tip], 0.09)
        knots = np.linspace(0, 1, 4 if k else 3)
        pts = [(base[0] + t * (tip[0] - base[0]), base[1] + t * (tip[1] - base[1])) for t in knots]
        for a, b in zip(pts, pts[1:]):  # bones with joint gaps between them
            bone = bone + polyline(n, [_towards(a, b, 0.06), _towards(b, a, 0.06)], 0.035)
        rays.append(pts)
    crack = None
    if finding == "fracture":
        which = _HAND_BONES[rng.integers(len(_HAND_BONES))]
        where = {
            "fifth metacarpal": _mid(rays[4][0], rays[4][1]),
            "fourth metacarpal": _mid(rays[3][0], rays[3][1]),
            "distal radius": (0.44, 0.9),
            "index finger": _mid(rays[1][1], rays[1][2]),
        }[which]
        crack = (where, which)
    return _expose_layers(n, soft, bone, crack, rng), {"bone": crack[1] if crack else ""}


def _towards(a: tuple[float, float], b: tuple[float, float], t: float) -> tuple[float, float]:
    return a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1])


def _mid(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    return _towards(a, b, 0.5)


def _knee(n: int, rng: np.random.Generator, finding: str | None) -> tuple[np.ndarray, dict]:
    """Femur, condyles, tibia, fibula and patella of a frontal knee."""
    gap = 0.02 if finding == "narrowing" else 0.05
    soft = polyline(n, [(0.5, -0.05), (0.5, 1.05)], 0.5)
    if finding == "effusion":
        soft = soft + 0.6 * ellipse(n, 0.5, 0.42, 0.3, 0.12)
    bone = polyline(n, [(0.5, -0.05), (0.5, 0.4)], 0.2)
    bone = bone + ellipse(n, 0.4, 0.45, 0.1, 0.07) + ellipse(n, 0.6, 0.45, 0.1, 0.07)
    top = 0.5 + gap
    bone = bone + polyline(n, [(0.3, top + 0.02), (0.7, top + 0.02)], 0.05)
    bone = bone + polyline(n, [(0.5, top), (0.5, 1.05)], 0.18)
    bone = bone + polyline(n, [(0.68, top + 0.06), (0.68, 1.05)], 0.05)
    bone = bone + 0.5 * ellipse(n, 0.5, 0.38, 0.07, 0.06)  # patella, seen through the femur
    crack = (((0.38, top + 0.03), "")) if finding == "fracture" else None
    return _expose_layers(n, soft, np.minimum(bone, 1.4), crack, rng), {}


def _pelvis(n: int, rng: np.random.Generator, finding: str | None) -> tuple[np.ndarray, dict]:
    """Iliac wings, sacrum, pubic rami with obturator foramina, both hips and proximal femurs."""
    soft = np.clip(ellipse(n, 0.5, 0.55, 0.52, 0.5) * 1.2, 0, 1)
    bone = np.zeros((n, n))
    metal = np.zeros((n, n))
    side = ("left", "right")[rng.integers(2)]
    for sign in (-1, 1):
        bone = bone + ellipse(n, 0.5 + sign * 0.24, 0.3, 0.17, 0.13, sign * 0.5)  # iliac wing
        bone = (
            bone
            + ellipse(n, 0.5 + sign * 0.13, 0.72, 0.1, 0.07)
            - 0.8 * ellipse(n, 0.5 + sign * 0.13, 0.72, 0.06, 0.04)
        )
        head = (0.5 + sign * 0.27, 0.6)
        bone = bone + ellipse(n, head[0], head[1], 0.065, 0.065)
        shaft = [head, (head[0] + sign * 0.07, 0.7), (head[0] + sign * 0.07, 1.05)]
        bone = bone + polyline(n, shaft, 0.09)
        # The patient's side is image-right for "left" (radiological convention).
        if finding == "arthroplasty" and (sign == 1) == (side == "left"):
            metal = (
                metal
                + polyline(n, shaft[:2] + [(shaft[1][0], 0.9)], 0.04)
                + ellipse(n, *head, 0.05, 0.05)
            )
    bone = bone + _triangle_sacrum(n)
    crack = None
    if finding == "fracture":
        sign = 1 if side == "left" else -1
        crack = ((0.5 + sign * 0.31, 0.65), "")
    image = _expose_layers(n, soft, np.minimum(bone, 1.5), crack, rng, metal)
    return image, {"side": side}


def _triangle_sacrum(n: int) -> np.ndarray:
    return polyline(n, [(0.5, 0.28), (0.5, 0.55)], 0.12) + 0.5 * polyline(
        n, [(0.5, 0.55), (0.5, 0.62)], 0.05
    )


def _skull(n: int, rng: np.random.Generator, finding: str | None) -> tuple[np.ndarray, dict]:
    """Calvarium, orbits, nasal cavity, maxillary sinuses and mandible of a frontal skull."""
    h = rng.uniform(0.38, 0.44)
    soft = ellipse(n, 0.5, 0.45, 0.4, h + 0.03)
    bone = ellipse(n, 0.5, 0.45, 0.38, h) - 0.75 * ellipse(n, 0.5, 0.45, 0.34, h - 0.04)
    for sign in (-1, 1):
        bone = bone - 0.35 * ellipse(n, 0.5 + sign * 0.13, 0.52, 0.075, 0.07)  # orbits
        sinus = ellipse(n, 0.5 + sign * 0.12, 0.68, 0.06, 0.05)
        bone = bone - (0.0 if finding == "sinus" and sign == 1 else 0.3) * sinus
    bone = bone - 0.3 * ellipse(n, 0.5, 0.64, 0.035, 0.07)
    bone = bone + polyline(
        n, [(0.22, 0.66), (0.3, 0.9), (0.5, 0.95), (0.7, 0.9), (0.78, 0.66)], 0.05
    )
    crack = ((0.33, 0.2), "") if finding == "fracture" else None
    return _expose_layers(n, soft, np.clip(bone, 0, 1.5), crack, rng), {}


def _spine(n: int, rng: np.random.Generator, finding: str | None) -> tuple[np.ndarray, dict]:
    """Five lumbar vertebral bodies with discs and posterior elements, lateral view."""
    soft = polyline(n, [(0.5, -0.05), (0.5, 1.05)], 0.8)
    bone = np.zeros((n, n))
    level = int(rng.integers(1, 5))
    for k in range(5):
        y = 0.12 + 0.18 * k
        gap = 0.015 if finding == "narrowing" and k == level else 0.04
        top = y + (0.06 if finding == "fracture" and k == level - 1 else 0.0)
        bone = bone + _box(n, 0.35, top + gap / 2, 0.6, y + 0.18 - gap / 2)
        bone = bone + 0.6 * polyline(
            n, [(0.6, y + 0.09), (0.78, y + 0.12)], 0.05
        )  # posterior elements
    texts = {"fracture": f"L{level}", "narrowing": f"L{level}-L{level + 1}"}
    return _expose_layers(n, soft, bone, None, rng), {"level": texts.get(finding or "", "")}


def _box(n: int, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    yy, xx = np.mgrid[0:n, 0:n] / n
    return ((xx >= x0) & (xx <= x1) & (yy >= y0) & (yy <= y1)).astype(np.float64)


def _expose_layers(
    n: int,
    soft: np.ndarray,
    bone: np.ndarray,
    crack: tuple[tuple[float, float], str] | None,
    rng: np.random.Generator,
    metal: np.ndarray | None = None,
) -> np.ndarray:
    """Sum the density layers (a dark crack through the bone where fractured) and expose them."""
    bone = ndimage.gaussian_filter(np.clip(bone, 0, None), 0.006 * n)
    cortex = np.clip(ndimage.gaussian_gradient_magnitude(bone, 0.8) * 2, 0, 0.4)
    if crack is not None:
        (cx, cy), _ = crack
        angle = rng.uniform(-0.6, 0.6)
        d = 0.08
        line = polyline(
            n,
            [
                (cx - d * np.cos(angle), cy - d * np.sin(angle)),
                (cx + d * np.cos(angle), cy + d * np.sin(angle)),
            ],
            0.012,
        )
        bone = bone * (1 - 0.9 * line)
    density = SOFT * np.clip(soft, 0, 1.3) + BONE * bone + cortex
    if metal is not None:
        density = density + METAL * np.clip(metal, 0, 1)
    image = -0.92 + rng.uniform(0.85, 1.15) * density
    image = ndimage.gaussian_filter(image, rng.uniform(0.4, 0.9)) + rng.normal(0, 0.02, image.shape)
    return image


def _position(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Positioning on the detector: a small random rotation, zoom and shift (air fills the edges)."""
    n = image.shape[0]
    angle, scale = np.deg2rad(rng.uniform(-12, 12)), rng.uniform(0.85, 1.15)
    c, s = np.cos(angle), np.sin(angle)
    matrix = np.array([[c, -s], [s, c]]) / scale
    centre = np.array([n / 2, n / 2])
    offset = centre - matrix @ (centre + rng.uniform(-0.08, 0.08, 2) * n)
    return ndimage.affine_transform(image, matrix, offset=offset, order=1, cval=float(image.min()))


_BODY = {"hand": _hand, "knee": _knee, "pelvis": _pelvis, "skull": _skull, "spine": _spine}
_VIEWS = {"hand": "PA", "knee": "AP", "pelvis": "AP", "skull": "PA", "spine": "lateral"}


def render_body_part(rng: np.random.Generator, size: int = 32) -> tuple[np.ndarray, str]:
    """A radiograph of a hand, knee, pelvis, skull or lumbar spine with a short report as caption."""
    part = PARTS[rng.integers(len(PARTS))]
    options = list(FINDING_TEXT[part])
    finding = options[rng.integers(len(options))] if rng.random() < 0.45 else None
    n = 2 * size
    image, words = _BODY[part](n, rng, finding)
    image = _position(image, rng)
    side = ""
    if part in ("hand", "knee"):
        side = ("left", "right")[rng.integers(2)]
        if side == "left":
            image = image[:, ::-1]  # mirrored: a left limb seen from the same side
    image = np.clip(image.reshape(size, 2, size, 2).mean(axis=(1, 3)), -1, 1).astype(np.float32)
    if finding is None:
        report = NORMAL[part][rng.integers(len(NORMAL[part]))]
    else:
        fill = {**words, "Side": words.get("side", "").capitalize()}
        report = FINDING_TEXT[part][finding].format(**fill)
    name = {"spine": "lumbar spine"}.get(part, part)
    subject = f"the {side} {name}" if side else f"the {name}"
    return image, f"{_VIEWS[part]} radiograph of {subject}. {report}"


def render_chest(rng: np.random.Generator, size: int = 32) -> tuple[np.ndarray, str]:
    """A chest film of a corpus patient: lungs and report text from the pretraining part only."""
    bank = bank_part("pretrain")
    anatomy = sample_anatomy(rng, masks_of("pretrain"))
    for _ in range(20):  # a template report could be a fine-tuning sentence: draw other findings
        findings = sample_findings(rng)
        text, source = bank.describe(findings, rng)
        if source != "template":
            break
    else:  # normal impressions are plentiful in either part
        findings = frozenset()
        text, source = bank.describe(findings, rng)
    if source == "template":
        raise RuntimeError("the pretraining part of the report bank has no normal impression")
    view = "AP" if rng.random() < 0.3 else "PA"
    pixels = render_phantom(
        findings,
        size=size,
        anatomy=anatomy,
        attributes=attributes_from_text(text),
        view=view,
        lesion_seed=int(rng.integers(2**31)),
        acquisition_seed=int(rng.integers(2**31)),
    )
    image = pixels.astype(np.float32) / 127.5 - 1.0  # as capsearch.datasets.folder reads a phantom
    caption = text if rng.random() < 0.5 else f"Chest radiograph, {view} view. {text}"
    return image, caption
