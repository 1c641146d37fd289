"""Finding combinations sampled with the co-occurrence frequencies of a real chest X-ray label table."""

from __future__ import annotations

import csv
import functools
import gzip

import numpy as np

from capsearch.errors import UserError
from capsearch.worlds.reports import FINDINGS, torchxrayvision_data

LABEL_SOURCES = ("chexpert", "nih")

# CheXpert columns (Irvin et al. 2019) mapped onto the phantom's findings; MIMIC-CXR's labels use the
# same labeller, so CheXpert's frequencies are the closest shipped stand-in for MIMIC's.
_CHEXPERT_COLUMNS = {
    "Cardiomegaly": "cardiomegaly",
    "Pleural Effusion": "effusion",
    "Pneumothorax": "pneumothorax",
    "Consolidation": "consolidation",
    "Pneumonia": "consolidation",
    "Lung Lesion": "nodule",
    "Atelectasis": "atelectasis",
    "Support Devices": "support_device",
}
# NIH ChestX-ray14 (Wang et al. 2017) has no support-device label.
_NIH_LABELS = {
    "Cardiomegaly": "cardiomegaly",
    "Effusion": "effusion",
    "Pneumothorax": "pneumothorax",
    "Consolidation": "consolidation",
    "Pneumonia": "consolidation",
    "Infiltration": "consolidation",
    "Nodule": "nodule",
    "Mass": "nodule",
    "Atelectasis": "atelectasis",
}


def _chexpert_rows() -> list[frozenset[str]]:
    """One finding set per frontal CheXpert image; uncertain labels (-1) count as absent (U-Zeros)."""
    path = torchxrayvision_data() / "chexpert_train.csv.gz"
    with gzip.open(path, "rt", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        view = header.index("Frontal/Lateral")
        columns = [(header.index(col), f) for col, f in _CHEXPERT_COLUMNS.items()]
        return [
            frozenset(f for i, f in columns if row[i] == "1.0")
            for row in reader
            if row[view] == "Frontal"
        ]


def _nih_rows() -> list[frozenset[str]]:
    """One finding set per NIH image, from its pipe-separated 'Finding Labels'."""
    path = torchxrayvision_data() / "Data_Entry_2017_v2020.csv.gz"
    with gzip.open(path, "rt", newline="") as handle:
        return [
            frozenset(_NIH_LABELS[x] for x in row["Finding Labels"].split("|") if x in _NIH_LABELS)
            for row in csv.DictReader(handle)
        ]


@functools.lru_cache(maxsize=len(LABEL_SOURCES))
def finding_combinations(source: str = "chexpert") -> tuple[tuple[frozenset[str], ...], np.ndarray]:
    """Distinct finding combinations of a real label table and their empirical probabilities."""
    if source not in LABEL_SOURCES:
        raise UserError(
            f"unknown label source {source!r}; choose one of {', '.join(LABEL_SOURCES)}"
        )
    try:
        rows = _chexpert_rows() if source == "chexpert" else _nih_rows()
    except (OSError, KeyError, ValueError, IndexError, csv.Error) as exc:
        raise UserError(f"cannot read the {source} label table: {exc}") from None
    counts: dict[frozenset[str], int] = {}
    for row in rows:
        counts[row] = counts.get(row, 0) + 1
    # A fixed order (by frequency, then name) keeps sampling deterministic for a seed.
    order = sorted(counts, key=lambda c: (-counts[c], sorted(FINDINGS.index(f) for f in c)))
    freq = np.array([counts[c] for c in order], dtype=np.float64)
    return tuple(order), freq / freq.sum()


def sample_findings(rng: np.random.Generator, source: str = "chexpert") -> frozenset[str]:
    """One finding combination drawn with the real table's co-occurrence frequencies."""
    combos, probs = finding_combinations(source)
    return combos[int(rng.choice(len(combos), p=probs))]
