"""MIMIC-CXR-JPG adapter: the official folder layout and report files → an image-caption metadata.jsonl."""

from __future__ import annotations

import csv
import gzip
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from capsearch.errors import UserError
from capsearch.progress import rich_bar
from capsearch.worlds.reports import FINDINGS, findings_from_text

METADATA_CSV = "mimic-cxr-2.0.0-metadata.csv"
SPLIT_CSV = "mimic-cxr-2.0.0-split.csv"
FRONTAL_VIEWS = ("PA", "AP")

# Section headers of a MIMIC-CXR report: an upper-case label at the start of a line, then a colon.
_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z &/()-]{2,40}):", re.MULTILINE)


@dataclass
class MimicImport:
    """What `write_mimic_metadata` wrote: the metadata file, images per split, and why others were left out."""

    metadata: Path
    written: int
    splits: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)


def report_text(report: str) -> str:
    """The IMPRESSION section of a radiology report, else its FINDINGS section, else ''."""
    headers = list(_HEADER.finditer(report))
    sections: dict[str, str] = {}
    ends = [h.start() for h in headers[1:]] + [len(report)]
    for header, end in zip(headers, ends[: len(headers)], strict=True):
        body = " ".join(report[header.end() : end].split())
        if body:
            sections.setdefault(header.group(1).strip(), body)
    for wanted in ("IMPRESSION", "FINDINGS"):
        for name, body in sections.items():
            if wanted in name:
                return body
    return ""


def _table(root: Path, name: str, columns: tuple[str, ...]) -> list[dict[str, str]]:
    """Rows of one of the official CSV tables (plain or .gz) with the columns we need."""
    for path in (root / name, root / f"{name}.gz"):
        if path.is_file():
            break
    else:
        raise UserError(f"{root} has no {name} (or {name}.gz): is it the MIMIC-CXR-JPG root?")
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in columns if c not in (reader.fieldnames or [])]
            if missing:
                raise UserError(f"{path} lacks column(s) {', '.join(missing)}")
            return list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None


def _study_folder(subject: str, study: str) -> Path:
    """Relative folder of a study in the official layout: pNN/pNNNNNNNN/sNNNNNNNN."""
    return Path(f"p{subject[:2]}") / f"p{subject}" / f"s{study}"


def _find_report(roots: list[Path], subject: str, study: str) -> Path | None:
    """The report file of a study: files/pNN/pNNNNNNNN/sNNNNNNNN.txt under one of the report roots."""
    relative = _study_folder(subject, study).with_suffix(".txt")
    for root in roots:
        for candidate in (root / "files" / relative, root / relative):
            if candidate.is_file():
                return candidate
    return None


def write_mimic_metadata(
    root: Path | str,
    out: Path | str,
    reports: Path | str | None = None,
    views: tuple[str, ...] = FRONTAL_VIEWS,
    progress: bool = False,
) -> MimicImport:
    """Write out/metadata.jsonl for the frontal MIMIC-CXR-JPG images under `root`, captions from reports.

    Images stay where they are: each file_name is the image's absolute path.
    """
    root, out = Path(root).resolve(), Path(out)
    if not root.is_dir():
        raise UserError(f"MIMIC-CXR-JPG root {root} does not exist")
    report_roots = [Path(reports).resolve()] if reports is not None else [root]
    if reports is not None and not report_roots[0].is_dir():
        raise UserError(f"report folder {reports} does not exist")
    metadata = _table(root, METADATA_CSV, ("dicom_id", "subject_id", "study_id", "ViewPosition"))
    split_of = {
        row["dicom_id"]: row["split"] for row in _table(root, SPLIT_CSV, ("dicom_id", "split"))
    }
    result = MimicImport(metadata=out / "metadata.jsonl", written=0)
    texts: dict[tuple[str, str], str | None] = {}
    records = []
    bar = rich_bar(progress, len(metadata), "reading MIMIC-CXR")
    for row in metadata:
        if bar is not None:
            bar.advance(bar.task_ids[0])
        subject, study, dicom = (
            row["subject_id"].strip(),
            row["study_id"].strip(),
            row["dicom_id"].strip(),
        )
        if row["ViewPosition"].strip() not in views:
            result.skipped["not a frontal view"] += 1
            continue
        if dicom not in split_of:
            result.skipped["not in the split table"] += 1
            continue
        image = root / "files" / _study_folder(subject, study) / f"{dicom}.jpg"
        if not image.is_file():
            result.skipped["image file missing"] += 1
            continue
        key = (subject, study)
        if key not in texts:
            report = _find_report(report_roots, subject, study)
            try:
                texts[key] = report_text(report.read_text(errors="replace")) if report else None
            except OSError:
                texts[key] = None
        text = texts[key]
        if text is None:
            result.skipped["report missing"] += 1
            continue
        if not text:
            result.skipped["report has no IMPRESSION or FINDINGS"] += 1
            continue
        found = findings_from_text(text)
        records.append(
            {
                "file_name": str(image),
                "text": text,
                "patient_id": subject,
                "study_id": study,
                "findings": [f for f in FINDINGS if f in found],
                "split": split_of[dicom],
                "dup_group": None,
                "view": row["ViewPosition"].strip(),
                "dicom_id": dicom,
            }
        )
        result.splits[split_of[dicom]] += 1
    if bar is not None:
        bar.stop()
    if not records:
        raise UserError(f"no usable frontal image with a report under {root}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with result.metadata.open("w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")
    except OSError as exc:
        raise UserError(f"cannot write {result.metadata}: {exc}") from None
    result.written = len(records)
    return result
