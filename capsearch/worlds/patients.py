"""The phantom world's patients: each one's anatomy and studies, and the split each patient is in."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from capsearch.worlds.anatomy import Anatomy, sample_anatomy
from capsearch.worlds.cooccurrence import sample_findings
from capsearch.worlds.reports import ReportBank, attributes_from_text, report_bank

_PATIENT_STREAM, _SPLIT_STREAM = 0, 1  # numpy seed sequences [seed, stream, ...] (phantom: 2)


@dataclass
class Study:
    """One report and the images taken with it."""

    patient_id: str
    study_id: str
    findings: frozenset[str]
    text: str
    source: str
    attributes: dict
    lesion_seed: int
    views: list[str]
    acquisition_seeds: list[int]


def plan_patient(
    index: int, seed: int, bank: ReportBank | None = None, masks: Sequence[int] | None = None
) -> tuple[Anatomy, list[Study]]:
    """A patient's anatomy and studies: several studies, several images each, as in MIMIC-CXR.

    Reports come from `bank` (default: the full shared bank; a transfer world passes a filtered one),
    lungs from `masks` (default: every usable lung mask; capsearch.worlds.partition gives a part).
    """
    rng = np.random.default_rng([seed, _PATIENT_STREAM, index])
    anatomy = sample_anatomy(rng, masks)
    bank = report_bank() if bank is None else bank
    patient_id = f"p{index:05d}"
    studies: list[Study] = []
    for k in range(int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))):
        keep = studies and rng.random() < 0.5  # follow-up studies often show the same findings
        findings = studies[-1].findings if keep else sample_findings(rng)
        text, source = bank.describe(findings, rng)
        n_images = int(rng.choice([1, 2, 3], p=[0.45, 0.4, 0.15]))
        ap = 0.7 if "support_device" in findings else 0.35  # portable (AP) films for ICU patients
        studies.append(
            Study(
                patient_id=patient_id,
                study_id=f"{patient_id}_s{k}",
                findings=findings,
                text=text,
                source=source,
                attributes=attributes_from_text(text),
                lesion_seed=int(rng.integers(2**31)),
                views=["AP" if rng.random() < ap else "PA" for _ in range(n_images)],
                acquisition_seeds=[int(rng.integers(2**31)) for _ in range(n_images)],
            )
        )
    return anatomy, studies


def assign_splits(patients: int, seed: int) -> list[str]:
    """Split per patient, about 80/10/10 (no patient in two splits)."""
    order = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(patients)
    n_held = int(round(0.1 * patients)) if patients >= 3 else 0
    splits = ["train"] * patients
    for rank, index in enumerate(order):
        if rank < n_held:
            splits[index] = "test"
        elif rank < 2 * n_held:
            splits[index] = "validate"
    return splits


def held_out_patients(
    patients: int,
    seed: int,
    splits: list[str],
    images: int,
    bank: ReportBank | None = None,
    masks: Sequence[int] | None = None,
) -> list[str]:
    """Splits of extra held-out patients, drawn until validate and test each hold `images` images.

    They are patients `patients`, `patients + 1`, ... of the same world (their own random streams), so
    the training set and the 80/10/10 split of the first `patients` do not change; each extra patient
    goes to whichever held-out split has fewer images so far.
    """
    count = {"validate": 0, "test": 0}
    for index, split in enumerate(splits):
        if split in count:
            count[split] += sum(len(s.views) for s in plan_patient(index, seed, bank, masks)[1])
    extra: list[str] = []
    while min(count.values()) < images:
        split = min(count, key=lambda k: (count[k], k == "validate"))  # ties: test first
        plan = plan_patient(patients + len(extra), seed, bank, masks)
        count[split] += sum(len(s.views) for s in plan[1])
        extra.append(split)
    return extra
