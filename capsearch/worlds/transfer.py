"""Transfer worlds: a phantom data set whose reports reuse no sentence of another world's reports.

A transfer world asks whether what a fine-tune learnt carries over to captions it never saw. It draws
its reports from the shared IU report bank with every text the avoided world uses taken out: each whole
impression that shares a sentence with one of the avoided world's reports, and each single-finding
sentence that occurs inside one of them. Templated reports (the bank's last fallback) are built from a
few fixed phrases and cannot be filtered; they may coincide with the avoided world's templated reports.
Sentences are compared after lower-casing, with punctuation and spacing ignored.
"""

from __future__ import annotations

import copy
import functools
import itertools
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import Field

from capsearch.settings import Strict
from capsearch.worlds.patients import assign_splits, held_out_patients, plan_patient
from capsearch.worlds.reports import (
    _DEGREE,
    _NEGATIVE_TEMPLATES,
    _TEMPLATES,
    ReportBank,
    _sentences,
    report_bank,
)


class AvoidReports(Strict):
    """The default phantom world whose report texts this world may not reuse."""

    seed: int
    patients: int = Field(ge=1)
    # Images per held-out split the avoided world was made with (its held-out patients' reports are
    # avoided too); None: this world's own held_out_images, as for a spec that only changes the seed.
    held_out_images: int | None = Field(None, ge=0)
    # Whether the avoided world was made with `disjoint_from_corpus` (its reports drawn from the
    # fine-tuning part of the bank: other texts than a default world of the same seed); None: as this
    # world is made.
    disjoint_from_corpus: bool | None = None


def avoided_world(
    avoid: AvoidReports | Mapping[str, Any] | None,
    held_out_images: int,
    disjoint_from_corpus: bool = False,
) -> dict[str, Any] | None:
    """The avoided world's seed, patients and held-out images (None there: `held_out_images`), and
    `disjoint_from_corpus: True` where it was made so (None there: as this world, `disjoint_from_corpus`)."""
    if avoid is None:
        return None
    if not isinstance(avoid, AvoidReports):
        avoid = AvoidReports.parse(avoid, "avoid_reports_of")
    held = held_out_images if avoid.held_out_images is None else avoid.held_out_images
    out: dict[str, Any] = {"seed": avoid.seed, "patients": avoid.patients, "held_out_images": held}
    disjoint = (
        disjoint_from_corpus if avoid.disjoint_from_corpus is None else avoid.disjoint_from_corpus
    )
    if disjoint:  # recorded only when set: markers of worlds made before it stay equal
        out["disjoint_from_corpus"] = True
    return out


def world_texts(
    seed: int,
    patients: int,
    held_out_images: int,
    bank: ReportBank | None = None,
    masks: tuple[int, ...] | None = None,
) -> set[str]:
    """Every report text a world draws: its patients in all splits and its held-out patients, from
    `bank` and `masks` (None: the full bank and every mask, a default world).

    Its memorisation subset only prefixes a date-and-accession clause to some of these texts, so the
    duplication settings do not change the set.
    """
    splits = assign_splits(patients, seed)
    count = patients + len(held_out_patients(patients, seed, splits, held_out_images, bank, masks))
    return {study.text for i in range(count) for study in plan_patient(i, seed, bank, masks)[1]}


@functools.lru_cache(maxsize=4)
def bank_avoiding(seed: int, patients: int, held_out_images: int) -> ReportBank:
    """The shared report bank less every text of the world (`seed`, `patients`, `held_out_images`)."""
    return bank_without(report_bank(), world_texts(seed, patients, held_out_images))


def normalise(text: str) -> str:
    """Lower case, every run of punctuation or spacing one space: how report texts are compared."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def report_sentences(text: str) -> list[str]:
    """The normalised sentences of a report (numbering removed, as the bank splits them)."""
    return [s for s in map(normalise, _sentences(text)) if s]


class _Haystack:
    """The avoided texts, searchable for a sentence as a run of whole words."""

    def __init__(self, texts: Iterable[str]) -> None:
        self.joined = "\n".join(f" {normalise(t)} " for t in texts)

    def holds(self, sentence: str) -> bool:
        key = normalise(sentence)
        return bool(key) and f" {key} " in self.joined


def bank_without(bank: ReportBank, texts: Iterable[str]) -> ReportBank:
    """A copy of `bank` with no whole impression or single-finding sentence found in `texts`."""
    haystack = _Haystack(texts)
    clean = copy.copy(bank)
    clean.whole = defaultdict(list)
    for findings, impressions in bank.whole.items():
        kept = [t for t in impressions if not any(map(haystack.holds, _sentences(t) or [t]))]
        if kept:
            clean.whole[findings] = kept
    for name in ("positive", "negative"):
        kept_by_finding = defaultdict(list)
        for finding, sentences in getattr(bank, name).items():
            if kept := [s for s in sentences if not haystack.holds(s)]:
                kept_by_finding[finding] = kept
        setattr(clean, name, kept_by_finding)
    return clean


def template_sentences() -> set[str]:
    """Every sentence `ReportBank.template` can write, normalised (for telling template text apart)."""
    out = {normalise("No acute cardiopulmonary process.")}
    out |= {normalise(t) for t in _NEGATIVE_TEMPLATES.values() if t}
    for options, sides, zones in _TEMPLATES.values():
        for option, side, zone, size in itertools.product(
            options, sides or ("",), zones or ("",), ("small", "moderate", "large")
        ):
            words = {"side": side, "size": size, "zone": zone, "degree": _DEGREE[size]}
            words |= {k.capitalize(): v.capitalize() for k, v in list(words.items())}
            out.add(normalise(option.format(**words)))
    return out
