"""The phantom world: procedurally generated chest X-rays with real-report text, written like a small MIMIC-CXR."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from capsearch.atomic import atomic_write
from capsearch.errors import UserError
from capsearch.progress import rich_bar
from capsearch.worlds import lesions
from capsearch.worlds.anatomy import HEART, LUNG_AIR, Anatomy, build_scene, sample_anatomy
from capsearch.worlds.partition import bank_part, masks_of
from capsearch.worlds.patients import Study, assign_splits, held_out_patients, plan_patient
from capsearch.worlds.reports import (
    FINDINGS,
    ReportBank,
    findings_from_text,
    report_bank,
)
from capsearch.worlds.transfer import (
    AvoidReports,
    avoided_world,
    bank_avoiding,
    bank_without,
    world_texts,
)

__all__ = [
    "FINDINGS",
    "SIZES",
    "findings_from_text",
    "render_phantom",
    "sample_anatomy",
    "write_phantom_dataset",
]

SIZES = (32, 64, 128)
IMAGE_DIR = "images"
METADATA = "metadata.jsonl"
# Written last, after every image and the metadata: the number of records and the metadata's SHA-256
# (and the world whose reports were avoided, if any). A generated folder without it (or whose metadata
# no longer matches it) was cut short: make it again.
COMPLETE = "complete.json"
_DUP_STREAM = 2  # numpy seed sequence [seed, stream, ...]; streams 0 and 1: worlds.patients


def _acquire(density: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Positioning, exposure, blur and noise of one exposure; density on a 2·size canvas → uint8 size²."""
    n = density.shape[0]
    angle = np.deg2rad(rng.uniform(-3.5, 3.5))
    scale = rng.uniform(0.96, 1.05)
    shift = rng.uniform(-0.03, 0.03, 2) * n
    c, s = np.cos(angle), np.sin(angle)
    matrix = np.array([[c, -s], [s, c]]) / scale
    centre = np.array([n / 2, n / 2])
    offset = centre - matrix @ (centre + shift)
    moved = ndimage.affine_transform(density, matrix, offset=offset, order=1, mode="nearest")
    image = np.clip(moved / 1.9, 0, 1) ** rng.uniform(0.85, 1.2)  # film response, exposure latitude
    image = rng.uniform(0.88, 1.12) * (image - 0.45) + 0.45 + rng.uniform(-0.04, 0.04)
    image = ndimage.gaussian_filter(image, rng.uniform(0.3, 0.8))
    image = image + rng.normal(0, rng.uniform(0.006, 0.02), image.shape)
    small = Image.fromarray(np.clip(image, 0, 1).astype(np.float32), mode="F").reduce(n // size)
    return np.clip(np.rint(np.asarray(small) * 255), 0, 255).astype(np.uint8)


def render_phantom(
    findings: Iterable[str] = (),
    size: int = 64,
    seed: int = 0,
    *,
    anatomy: Anatomy | None = None,
    attributes: Mapping[str, Mapping[str, str]] | None = None,
    view: str = "PA",
    lesion_seed: int | None = None,
    acquisition_seed: int | None = None,
) -> np.ndarray:
    """One phantom chest X-ray (uint8, size×size) showing `findings`; same arguments, same pixels."""
    findings = set(findings)
    unknown = findings - set(FINDINGS)
    if unknown:
        raise UserError(f"unknown finding(s) {sorted(unknown)}; known: {', '.join(FINDINGS)}")
    if not 16 <= size <= 512:
        raise UserError(f"phantom size must be 16 to 512 pixels, got {size}")
    # Independent streams: adding a finding leaves the anatomy and the exposure untouched.
    anatomy = anatomy or sample_anatomy(np.random.default_rng([seed, 0]))
    lesion_rng = np.random.default_rng([seed, 1] if lesion_seed is None else [lesion_seed, 1])
    acquisition_rng = np.random.default_rng(
        [seed, 2] if acquisition_seed is None else [acquisition_seed, 2]
    )
    attrs = lesions.resolve_attributes(findings, attributes or {}, lesion_rng)
    canvas = 2 * size  # drawn at twice the size, then box-filtered down (antialiasing)
    heart_scale = (
        lesions.HEART_SCALE[attrs["cardiomegaly"]["size"]] if "cardiomegaly" in attrs else 1.0
    )
    scene = build_scene(anatomy, canvas, heart_scale=heart_scale, view=view)

    opacity = np.zeros_like(scene.lungs)
    dense = np.zeros_like(scene.lungs)  # extra density beyond airless lung (nodules, devices)
    pleural_air = collapsed = np.zeros_like(scene.lungs)
    for finding in FINDINGS:  # fixed order: the lesion stream is consumed the same way every time
        if finding not in attrs or finding == "cardiomegaly":
            continue
        if finding == "effusion":
            opacity = np.maximum(opacity, lesions.effusion(scene, attrs[finding], lesion_rng))
        elif finding == "pneumothorax":
            pleural_air, collapsed = lesions.pneumothorax(scene, attrs[finding], lesion_rng)
        elif finding == "consolidation":
            opacity = np.maximum(opacity, lesions.consolidation(scene, attrs[finding], lesion_rng))
        elif finding == "nodule":
            spot = lesions.nodule(scene, attrs[finding], lesion_rng)
            opacity, dense = np.maximum(opacity, spot), dense + 0.1 * spot
        elif finding == "atelectasis":
            opacity = np.maximum(opacity, lesions.atelectasis(scene, attrs[finding], lesion_rng))
        elif finding == "support_device":
            dense += lesions.support_device(scene, anatomy, attrs[finding], lesion_rng)

    lungs = scene.lungs * (1 - scene.heart)
    air = lungs * (1 - opacity)
    # Pleural air: no vessel markings, a little more air, and a thin visceral pleural line at its edge.
    markings = scene.markings * (1 - pleural_air)
    edge = np.clip(ndimage.gaussian_gradient_magnitude(pleural_air, 0.6) * 2.5, 0, 1) * scene.lungs
    density = scene.density + HEART * scene.heart + LUNG_AIR * air + air * markings
    density += -0.15 * pleural_air * scene.lungs + 0.3 * edge * (1 - pleural_air) + 0.12 * collapsed
    # Ribs show mainly against the dark lungs; over soft tissue they blend in.
    density += scene.bones * (0.45 + 0.55 * scene.lungs) + dense
    return _acquire(density, size, acquisition_rng)


def _distinctive_clause(group: int, rng: np.random.Generator) -> str:
    """A comparison date and accession number unique to one memorisation group."""
    year, month, day = rng.integers(2008, 2020), rng.integers(1, 13), rng.integers(1, 29)
    return f"Comparison: {year}-{month:02d}-{day:02d}, accession {int(rng.integers(10000, 99999))}-{group:04d}."


def _validate(out: Path, patients: int, size: int, dup_fraction: float, dup_copies: int) -> None:
    """Raise UserError for any bad argument or an output folder that is not ours to rewrite."""
    if size not in SIZES:
        raise UserError(f"--size must be one of {', '.join(map(str, SIZES))}, got {size}")
    if patients < 1:
        raise UserError(f"--patients must be at least 1, got {patients}")
    if not 0.0 <= dup_fraction <= 1.0:
        raise UserError(f"--dup-fraction must be between 0 and 1, got {dup_fraction}")
    if dup_copies < 1:
        raise UserError(f"--dup-copies must be at least 1, got {dup_copies}")
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a folder")
    if out.is_dir():
        foreign = sorted(
            p.name for p in out.iterdir() if p.name not in (IMAGE_DIR, METADATA, COMPLETE)
        )
        if foreign:
            raise UserError(
                f"output folder {out} holds other files ({foreign[0]}, ...); choose a new or empty folder"
            )


def write_phantom_dataset(
    out: Path,
    patients: int = 200,
    size: int = 64,
    seed: int = 0,
    dup_fraction: float = 0.0,
    dup_copies: int = 10,
    held_out_images: int = 0,
    avoid_reports_of: AvoidReports | Mapping[str, Any] | None = None,
    disjoint_from_corpus: bool = False,
    progress: bool = False,
) -> Path:
    """Write a phantom image folder (PNG files + metadata.jsonl) and return the metadata path.

    `patients` are split 80/10/10 into train/validate/test by patient; `held_out_images` > 0 adds
    held-out patients until the validate and the test split each hold at least that many images (held-out
    references for FID cost nothing in this world, and never change the training set).
    `avoid_reports_of` makes a transfer world: no report sentence of that world (capsearch.worlds.transfer).
    `disjoint_from_corpus` draws reports and lungs only from the fine-tuning part, none of what the broad
    pretraining corpus draws (capsearch.worlds.partition); off, the world is what it was before that split.
    """
    out = Path(out)
    _validate(out, patients, size, dup_fraction, dup_copies)
    if held_out_images < 0:
        raise UserError(f"--held-out-images must be at least 0, got {held_out_images}")
    avoid = avoided_world(avoid_reports_of, held_out_images, disjoint_from_corpus)
    bank, masks = _sources(avoid, disjoint_from_corpus)
    expanded = _plan_rows(patients, seed, dup_fraction, dup_copies, held_out_images, bank, masks)
    marker: dict[str, Any] = {"avoid_reports_of": avoid} if avoid else {}
    if disjoint_from_corpus:
        marker["disjoint_from_corpus"] = True
    try:
        _write(out, size, expanded, progress, marker)
    except OSError as exc:
        raise UserError(f"cannot write the phantom dataset to {out}: {exc}") from None
    return out / METADATA


def _sources(
    avoid: dict[str, Any] | None, disjoint_from_corpus: bool
) -> tuple[ReportBank | None, tuple[int, ...] | None]:
    """The report bank and lung masks a world draws from (None: the full bank, every mask)."""
    if not disjoint_from_corpus:
        if avoid is None:
            return None, None
        if avoid.get("disjoint_from_corpus"):
            return bank_without(report_bank(), _avoided_texts(avoid)), None
        return bank_avoiding(**avoid), None
    bank = bank_part("finetune")
    if avoid:
        bank = bank_without(bank, _avoided_texts(avoid))
    return bank, masks_of("finetune")


def _avoided_texts(avoid: dict[str, Any]) -> set[str]:
    """Every report text the avoided world draws, drawn as it drew them: from the fine-tuning part of
    the bank and masks where it was made `disjoint_from_corpus`, else as a default world."""
    seed, patients, held = avoid["seed"], avoid["patients"], avoid["held_out_images"]
    if not avoid.get("disjoint_from_corpus"):
        return world_texts(seed, patients, held)
    return world_texts(seed, patients, held, bank_part("finetune"), masks_of("finetune"))


def _plan_rows(
    patients: int,
    seed: int,
    dup_fraction: float,
    dup_copies: int,
    held_out_images: int,
    bank: ReportBank | None = None,
    masks: tuple[int, ...] | None = None,
) -> list[tuple[dict, tuple[Anatomy, Study, int], list[str]]]:
    """Every image's metadata row, what to render it from and the file name(s) it is written to."""
    splits = assign_splits(patients, seed)
    splits += held_out_patients(patients, seed, splits, held_out_images, bank, masks)
    plans = [plan_patient(i, seed, bank, masks) for i in range(len(splits))]
    rows: list[dict] = []
    jobs: list[tuple[Anatomy, Study, int]] = []
    for (anatomy, studies), split in zip(plans, splits, strict=True):
        for study in studies:
            for i in range(len(study.views)):
                rows.append(
                    {
                        "file_name": f"{IMAGE_DIR}/{study.study_id}_{i}.png",
                        "text": study.text,
                        "patient_id": study.patient_id,
                        "study_id": study.study_id,
                        "findings": [f for f in FINDINGS if f in study.findings],
                        "split": split,
                        "dup_group": None,
                        "view": study.views[i],
                        "report_source": study.source,
                    }
                )
                jobs.append((anatomy, study, i))

    # Memorisation subset: a fraction of training images, each written as K identical files with one
    # caption that no other image has, so that memorised prompts can be told apart (Carlini et al. 2023).
    train = [j for j, row in enumerate(rows) if row["split"] == "train"]
    dup_rng = np.random.default_rng([seed, _DUP_STREAM])
    n_groups = int(round(dup_fraction * len(train)))
    chosen = (
        sorted(dup_rng.choice(train, size=n_groups, replace=False).tolist()) if n_groups else []
    )
    groups = {j: g for g, j in enumerate(chosen)}
    expanded: list[tuple[dict, tuple[Anatomy, Study, int], list[str]]] = []
    for j, (row, job) in enumerate(zip(rows, jobs, strict=True)):
        if j not in groups:
            expanded.append((row, job, [row["file_name"]]))
            continue
        g = groups[j]
        caption = f"{_distinctive_clause(g, dup_rng)} {row['text']}"
        names = [f"{IMAGE_DIR}/dup{g:04d}_{k:02d}.png" for k in range(dup_copies)]
        expanded.append(
            ({**row, "text": caption, "dup_group": g, "report_source": "memorised"}, job, names)
        )
    return expanded


def _write(
    out: Path,
    size: int,
    expanded: list[tuple[dict, tuple[Anatomy, Study, int], list[str]]],
    progress: bool,
    marker: dict[str, Any],
) -> None:
    """Render every planned image, write its file(s), metadata.jsonl, then the completeness marker."""
    if (out / IMAGE_DIR).is_dir():
        shutil.rmtree(out / IMAGE_DIR)
    (out / COMPLETE).unlink(missing_ok=True)
    (out / METADATA).unlink(missing_ok=True)
    (out / IMAGE_DIR).mkdir(parents=True)
    bar = rich_bar(progress, sum(len(names) for _, _, names in expanded), "rendering phantoms")
    records = []
    try:
        for row, (anatomy, study, i), names in expanded:
            pixels = render_phantom(
                study.findings,
                size,
                anatomy=anatomy,
                attributes=study.attributes,
                view=study.views[i],
                lesion_seed=study.lesion_seed,
                acquisition_seed=study.acquisition_seeds[i],
            )
            for name in names:
                Image.fromarray(pixels, mode="L").save(out / name, format="PNG")
                records.append({**row, "file_name": name})
                if bar is not None:
                    bar.advance(bar.task_ids[0])
    finally:
        if bar is not None:
            bar.stop()
    metadata = "".join(json.dumps(record) + "\n" for record in records).encode("utf-8")
    atomic_write(out / METADATA, metadata)
    digest = hashlib.sha256(metadata).hexdigest()
    marker = {"records": len(records), "sha256": digest, **marker}
    atomic_write(out / COMPLETE, json.dumps(marker) + "\n")


def phantom_complete(root: Path, settings: Mapping[str, Any] | None = None) -> bool:
    """Whether a generated phantom folder was written to the end (its completeness marker matches).

    `settings`, the write_phantom_dataset arguments it is wanted with: its report avoidance and its
    disjointness from the pretraining corpus must match too (a folder made without avoidance is no
    transfer world, and the reverse).
    """
    try:
        marker = json.loads((Path(root) / COMPLETE).read_text())
        metadata = (Path(root) / METADATA).read_bytes()
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or marker.get("sha256") != hashlib.sha256(metadata).hexdigest():
        return False
    if settings is None:
        return True
    disjoint = bool(settings.get("disjoint_from_corpus", False))
    wanted = avoided_world(
        settings.get("avoid_reports_of"), settings.get("held_out_images") or 0, disjoint
    )
    return (
        marker.get("avoid_reports_of") == wanted
        and marker.get("disjoint_from_corpus", False) == disjoint
    )
