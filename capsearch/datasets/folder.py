"""Image-caption datasets: any image folder with metadata.jsonl or metadata.csv (phantom, MIMIC-CXR, other)."""

from __future__ import annotations

import csv
import json
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from capsearch.errors import UserError
from capsearch.progress import rich_bar

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
REQUIRED_KEYS = ("file_name", "text")
# The splits capsearch reads: train (fine-tuning), validate (the search's evaluation and probes), test
# (the final stage); a record without one, or with an empty one, is train.
SPLITS = ("train", "validate", "test")


def metadata_path(root: Path | str) -> Path:
    """The metadata file of a dataset folder (metadata.jsonl preferred over metadata.csv)."""
    root = Path(root)
    if root.is_file():
        raise UserError(
            f"{root} is a file; give the dataset folder that holds metadata.jsonl or .csv"
        )
    if not root.is_dir():
        raise UserError(f"dataset folder {root} does not exist")
    for name in METADATA_FILES:
        if (root / name).is_file():
            return root / name
    raise UserError(f"dataset folder {root} has no metadata.jsonl or metadata.csv")


def _csv_record(row: dict[str, str]) -> dict:
    """A metadata.csv row with list and integer columns decoded ('a|b' findings, dup_group)."""
    record: dict = dict(row)
    if "findings" in record:
        record["findings"] = [f for f in (record["findings"] or "").split("|") if f]
    if "dup_group" in record:
        value = (record["dup_group"] or "").strip()
        record["dup_group"] = int(value) if value else None
    return record


def _split_error(value: object) -> str | None:
    """Why a record's split value is not one capsearch knows (None: it is; empty means train)."""
    if value is None or value == "" or value in SPLITS:
        return None
    if not isinstance(value, str):
        return f"split {value!r} is not text; use {', '.join(SPLITS)}"
    near = [s for s in SPLITS if len(value) >= 3 and s[:3] == value.strip().lower()[:3]]
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return f"unknown split {value!r}{hint}; use {', '.join(SPLITS)} (an empty split is train)"


def _read_jsonl(path: Path) -> list[dict]:
    records: list[dict] = []
    # utf-8-sig: a byte-order mark at the start (as editors on Windows save it) is not part of line 1
    with path.open(encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path}:{number}: not a JSON object") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{number}: not a JSON object")
            if (why := _split_error(record.get("split"))) is not None:
                raise UserError(f"{path}:{number}: {why}")
            records.append(record)
    if not records:
        raise UserError(
            f"{path} holds no records (it is empty): write one JSON object per image, with "
            "file_name and text"
        )
    return records


def _read_csv(path: Path) -> list[dict]:
    records: list[dict] = []
    # utf-8-sig: spreadsheet programs start a CSV with a byte-order mark, which would hide file_name
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames:
            raise UserError(
                f"{path} holds no records (it is empty): write a header row file_name,text "
                "(and split, ...) and one row per image"
            )
        missing = [k for k in REQUIRED_KEYS if k not in reader.fieldnames]
        if missing:
            semicolons = len(reader.fieldnames) == 1 and ";" in reader.fieldnames[0]
            raise UserError(
                f"{path} lacks column(s) {', '.join(missing)} (its header: "
                f"{', '.join(reader.fieldnames)})"
                + ("; save it with commas, not semicolons, between columns" if semicolons else "")
            )
        for row in reader:
            if (why := _split_error(row.get("split"))) is not None:
                raise UserError(f"{path}:{reader.line_num}: {why}")
            records.append(_csv_record(row))
    if not records:
        raise UserError(f"{path} holds no records (only its header): add one row per image")
    return records


def _read_file(path: Path) -> list[dict]:
    try:
        records = _read_jsonl(path) if path.suffix == ".jsonl" else _read_csv(path)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    for number, record in enumerate(records, 1):
        for key in REQUIRED_KEYS:
            if not isinstance(record.get(key), str):
                raise UserError(f"{path}: record {number} has no '{key}' text")
    return records


def _same_records(path: Path, records: list[dict], other: Path) -> None:
    """Refuse a folder whose metadata.jsonl and metadata.csv list different records (one is read)."""
    both = f"dataset folder {path.parent} has both {path.name} and {other.name}"
    remedy = f"capsearch reads {path.name}: delete {other.name} or make it the same"
    try:
        theirs = _read_file(other)
    except UserError as exc:
        raise UserError(f"{both}, and {exc}; {remedy}") from None
    if len(theirs) != len(records):
        raise UserError(
            f"{both} and they differ ({len(records)} vs {len(theirs)} records); {remedy}"
        )
    for number, (mine, their) in enumerate(zip(records, theirs, strict=True), 1):
        for key in ("file_name", "text", "split"):
            a, b = mine.get(key) or "", their.get(key) or ""
            if key == "split":
                a, b = a or "train", b or "train"
            if a != b:
                raise UserError(
                    f"{both} and they differ (record {number}: {key} {a!r} vs {b!r}); {remedy}"
                )


def read_metadata(root: Path | str) -> list[dict]:
    """All records of a dataset folder's metadata.jsonl or metadata.csv, in file order.

    Every record has a file_name and a text and a split capsearch knows (SPLITS; none or empty: train),
    and a file holds at least one record. A folder with both files is read from metadata.jsonl and
    refused if metadata.csv lists other records. A UTF-8 byte-order mark at the start is skipped.
    """
    path = metadata_path(root)
    records = _read_file(path)
    other = path.with_name(METADATA_FILES[1])
    if path.name == METADATA_FILES[0] and other.is_file():
        _same_records(path, records, other)
    return records


def in_split(record: dict, split: str | None) -> bool:
    """Whether a record belongs to `split` (None: every record; no split column: 'train')."""
    return split is None or (record.get("split") or "train") == split


def load_grayscale(path: Path, size: int) -> np.ndarray:
    """An image file as uint8 size×size grayscale: centre-cropped to a square, resized with antialiasing."""
    with Image.open(path) as image:
        image.draft(
            "L", (size, size)
        )  # JPEG decodes at a reduced scale: big MIMIC files stay cheap
        if image.mode.startswith("I"):  # 16-bit PNGs: rescale instead of clipping at 255
            raw = np.asarray(image, dtype=np.float32)
            image = Image.fromarray((255 * raw / max(float(raw.max()), 1.0)).astype(np.uint8))
        image = image.convert("L")
        width, height = image.size
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
        # Pillow's resampling filters widen with the scale factor, so downscaling is antialiased.
        return np.asarray(image.resize((size, size), Image.BICUBIC))


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Grayscale images and captions of one split: {"pixel_values": [1, size, size] in [-1, 1], "text", "index"}.

    An unreadable image never stops an epoch: `__getitem__` warns once per file, adds one to `skipped`
    and returns the next readable item (its own "index"). Counters live in the process that reads, so
    with DataLoader workers each worker counts its own.
    """

    def __init__(
        self, root: Path | str, split: str | None = "train", size: int = 32, cache: bool = False
    ) -> None:
        """Read the metadata of `root` and keep the records of `split` (None: all records)."""
        if size < 8:
            raise UserError(f"image size must be at least 8 pixels, got {size}")
        self.root = Path(root)
        self.size = size
        self.split = split
        self.records = [r for r in read_metadata(self.root) if in_split(r, split)]
        self.captions = [r["text"] for r in self.records]
        self.skipped = 0
        self.bad_files: dict[str, str] = {}
        self._cache: dict[int, torch.Tensor] | None = {} if cache else None

    def __len__(self) -> int:
        """Number of records in the split."""
        return len(self.records)

    def path(self, index: int) -> Path:
        """Image path of record `index` (absolute names stay absolute, others resolve against root)."""
        return self.root / self.records[index]["file_name"]

    def load(self, index: int, warn: bool = True) -> torch.Tensor | None:
        """Pixel tensor [1, size, size] in [-1, 1] of record `index`, or None if it cannot be read.

        An unreadable file is kept in `bad_files` and warned about once (`warn=False`: the caller
        reports it, see `unreadable`).
        """
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        name = self.records[index]["file_name"]
        if name in self.bad_files:
            return None
        try:
            pixels = load_grayscale(self.path(index), self.size)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            self.bad_files[name] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if warn:
                warnings.warn(self.unreadable(name), stacklevel=2)
            return None
        tensor = torch.from_numpy(pixels.astype(np.float32) / 127.5 - 1.0).unsqueeze(0)
        if self._cache is not None:
            self._cache[index] = tensor
        return tensor

    def unreadable(self, name: str) -> str:
        """The warning about an unreadable image file (a file_name in `bad_files`)."""
        return f"skipping unreadable image {self.root / name}: {self.bad_files[name]}"

    def __getitem__(self, index: int) -> dict:
        """Item `index`, or the next readable one after it if its image is unreadable."""
        if not 0 <= index < len(self.records):
            raise IndexError(index)
        for step in range(len(self.records)):
            current = (index + step) % len(self.records)
            pixels = self.load(current)
            if pixels is not None:
                return {"pixel_values": pixels, "text": self.captions[current], "index": current}
            self.skipped += 1
        raise UserError(f"no readable image in {self.root} (split {self.split})")


def load_images(root: Path | str, split: str | None = "train", size: int = 32) -> torch.Tensor:
    """All readable images of a split as one tensor [N, 1, size, size] in [-1, 1] (unreadable ones left out)."""
    dataset = ImageCaptionDataset(root, split=split, size=size)
    tensors = [t for t in (dataset.load(i) for i in range(len(dataset))) if t is not None]
    if not tensors:
        return torch.zeros(0, 1, size, size)
    return torch.stack(tensors)


@dataclass(frozen=True)
class Problem:
    """One problem `data check` found: its kind, the file or patient concerned, and a detail."""

    kind: str
    item: str
    detail: str


def check_dataset(root: Path | str, progress: bool = False) -> tuple[int, list[Problem]]:
    """Number of records and the problems of a dataset folder: missing, unreadable or corrupt images,
    empty captions, duplicate file names, patients in more than one split."""
    root = Path(root)
    records = read_metadata(root)
    problems: list[Problem] = []
    names = Counter(r["file_name"] for r in records)
    for name, count in sorted(names.items()):
        if count > 1:
            problems.append(Problem("duplicate file name", name, f"listed {count} times"))
    bar = rich_bar(progress, len(names), "checking images")
    for number, record in enumerate(records, 1):
        if not record["text"].strip():
            problems.append(Problem("empty caption", record["file_name"], f"record {number}"))
    for name in names:
        problem = _check_image(root / name, name)
        if problem is not None:
            problems.append(problem)
        if bar is not None:
            bar.advance(bar.task_ids[0])
    if bar is not None:
        bar.stop()
    splits: dict[str, set[str]] = defaultdict(set)
    for record in records:
        if record.get("patient_id") not in (None, ""):
            splits[str(record["patient_id"])].add(record.get("split") or "train")
    for patient, seen in sorted(splits.items()):
        if len(seen) > 1:
            problems.append(
                Problem("patient leakage", patient, "in splits " + ", ".join(sorted(seen)))
            )
    return len(records), problems


def _check_image(path: Path, name: str) -> Problem | None:
    """A problem if the image is missing, unreadable or does not decode."""
    if not path.exists():
        return Problem("missing image", name, "no such file")
    try:
        with Image.open(path) as image:
            image.load()
    except PermissionError:
        return Problem("unreadable image", name, "permission denied")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return Problem(
            "corrupt image", name, str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        )
    return None
