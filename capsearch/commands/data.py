"""`capsearch data`: write phantom datasets, import MIMIC-CXR-JPG, check an image-caption folder."""

from __future__ import annotations

import argparse
import re
import time
from collections import Counter
from pathlib import Path

from capsearch.commands import writable_out


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `data phantom`, `data mimic` and `data check`."""
    parser = subparsers.add_parser(
        "data", help="make, import or check an image-caption dataset", description=__doc__
    )
    actions = parser.add_subparsers(dest="data_action", metavar="ACTION", required=True)

    phantom = actions.add_parser(
        "phantom",
        help="write a phantom chest X-ray dataset (PNG images + metadata.jsonl)",
        description="Write procedurally generated chest X-rays with radiology-report captions, "
        "split by patient, optionally with a duplicated memorisation subset.",
    )
    phantom.add_argument("--out", type=Path, required=True, help="output folder (new or empty)")
    phantom.add_argument(
        "--patients", type=int, default=200, help="number of patients (default 200)"
    )
    phantom.add_argument(
        "--size", type=int, default=64, help="image side: 32, 64 or 128 (default 64)"
    )
    phantom.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    phantom.add_argument(
        "--dup-fraction",
        type=float,
        default=0.0,
        help="fraction of training images to duplicate, 0..1 (default 0)",
    )
    phantom.add_argument(
        "--dup-copies", type=int, default=10, help="copies of each duplicated image (default 10)"
    )
    phantom.add_argument(
        "--held-out-images",
        type=int,
        default=0,
        help="add held-out patients until validate and test each hold this many images (default 0)",
    )
    phantom.add_argument(
        "--avoid-reports-of",
        metavar="SEED:PATIENTS[:HELD_OUT_IMAGES]",
        default=None,
        help="a transfer world: reuse no report sentence of the phantom world with this seed and "
        "patients (its held-out images: --held-out-images unless given)",
    )
    phantom.add_argument(
        "--disjoint-from-corpus",
        action="store_true",
        help="draw reports and lungs only from what the broad pretraining corpus never draws",
    )
    phantom.set_defaults(func=_phantom)

    mimic = actions.add_parser(
        "mimic",
        help="write metadata.jsonl for a MIMIC-CXR-JPG folder (frontal views, report captions)",
        description="Read the official MIMIC-CXR-JPG layout and write a metadata.jsonl whose "
        "file_name entries are the images' absolute paths.",
    )
    mimic.add_argument("--root", type=Path, required=True, help="MIMIC-CXR-JPG root (holds files/)")
    mimic.add_argument("--out", type=Path, required=True, help="folder for metadata.jsonl")
    mimic.add_argument(
        "--reports", type=Path, default=None, help="report root if not under --root (holds files/)"
    )
    mimic.set_defaults(func=_mimic)

    check = actions.add_parser(
        "check",
        help="report missing or corrupt images, empty captions, duplicate names, patient leakage",
        description="Check an image-caption folder; exit 1 if any problem is found, 0 if clean.",
    )
    check.add_argument("dir", type=Path, help="dataset folder with metadata.jsonl or metadata.csv")
    check.set_defaults(func=_check)


def _phantom(args: argparse.Namespace) -> int:
    """Write a phantom dataset and print what was written."""
    # lazy: `capsearch --help` loads no library
    from capsearch.datasets.folder import read_metadata
    from capsearch.worlds.phantom import write_phantom_dataset

    avoid = _avoid_reports_of(args.avoid_reports_of)
    started = time.perf_counter()
    path = write_phantom_dataset(
        args.out,
        patients=args.patients,
        size=args.size,
        seed=args.seed,
        dup_fraction=args.dup_fraction,
        dup_copies=args.dup_copies,
        held_out_images=args.held_out_images,
        avoid_reports_of=avoid,
        disjoint_from_corpus=args.disjoint_from_corpus,
        progress=True,
    )
    records = read_metadata(path.parent)
    splits = Counter(r["split"] for r in records)
    groups = {r["dup_group"] for r in records if r["dup_group"] is not None}
    print(
        f"wrote {len(records)} images of {args.patients} patients to {path} in "
        f"{time.perf_counter() - started:.1f} s"
    )
    print("splits: " + ", ".join(f"{s} {splits[s]}" for s in ("train", "validate", "test")))
    if groups:
        print(
            f"memorisation subset: {len(groups)} images x {args.dup_copies} copies, unique captions"
        )
    if avoid is not None:
        sources = Counter(r["report_source"] for r in records if r["dup_group"] is None)
        print(
            f"reports avoid those of seed {avoid['seed']} ({avoid['patients']} patients): "
            + ", ".join(f"{s} {sources[s]}" for s in ("real", "composed", "template"))
            + " images (templates may coincide with its own)"
        )
    return 0


def _avoid_reports_of(value: str | None) -> dict[str, int] | None:
    """--avoid-reports-of SEED:PATIENTS[:HELD_OUT_IMAGES] as avoid_reports_of settings."""
    # lazy: `capsearch --help` loads no library
    from capsearch.errors import UserError

    if value is None:
        return None
    parts = value.split(":")
    if len(parts) not in (2, 3) or not all(re.fullmatch(r"-?\d+", p.strip()) for p in parts):
        raise UserError(
            f"--avoid-reports-of must be SEED:PATIENTS or SEED:PATIENTS:HELD_OUT_IMAGES "
            f"(integers), got {value!r}"
        )
    numbers = [int(p) for p in parts]
    if numbers[1] < 1 or (len(numbers) == 3 and numbers[2] < 0):
        raise UserError(
            f"--avoid-reports-of: PATIENTS must be at least 1 and HELD_OUT_IMAGES at least 0, "
            f"got {value!r}"
        )
    return dict(zip(("seed", "patients", "held_out_images"), numbers, strict=False))


def _mimic(args: argparse.Namespace) -> int:
    """Import a MIMIC-CXR-JPG folder and print what was kept and left out."""
    # lazy: `capsearch --help` loads no library
    from capsearch.datasets.mimic import write_mimic_metadata

    writable_out(args.out)
    result = write_mimic_metadata(args.root, args.out, reports=args.reports, progress=True)
    print(f"wrote {result.written} frontal images to {result.metadata}")
    print("splits: " + ", ".join(f"{s} {n}" for s, n in sorted(result.splits.items())))
    for reason, count in sorted(result.skipped.items()):
        print(f"left out {count}: {reason}")
    return 0


def _check(args: argparse.Namespace) -> int:
    """Check a dataset folder; print a table of problems; 1 if any, else 0."""
    # lazy: `capsearch --help` loads no library
    from rich.console import Console
    from rich.table import Table

    from capsearch.datasets.folder import check_dataset

    records, problems = check_dataset(args.dir, progress=True)
    console = Console()
    if not problems:
        console.print(f"{args.dir}: {records} records, no problems found")
        return 0
    table = Table(title=f"{args.dir}: {len(problems)} problem(s) in {records} records")
    table.add_column("problem")
    table.add_column("file or patient", overflow="fold")  # never cut a file name short
    table.add_column("detail", overflow="fold")
    for problem in problems:
        table.add_row(problem.kind, problem.item, problem.detail)
    console.print(table)
    kinds = Counter(p.kind for p in problems)
    console.print("; ".join(f"{n} {kind}" for kind, n in sorted(kinds.items())))
    return 1
