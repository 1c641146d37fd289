"""Copy a run folder's records (no weights) to where they are committed.

Usage: python experiments/keep_records.py runs/paper_table1_seed0 experiments/results/paper_table1/seed0

Keeps the spec, the report and its plot, the Optuna study (optuna.db: the sampler's history, which
`--resume` needs; copied through SQLite's backup, so a running search's file is read consistently), and
for every trial its plan, result, metrics, training log, pictures and per-caption memorisation table
(memorisation.csv), with the final re-evaluations'; leaves out deltas, checkpoints, the feature cache,
the generated data and Ray's folders. A run resumed from these records trains its finalists again from
their records (capsearch.search.retrain). Files already kept are overwritten, so it can run after every
finished trial.
`capsearch report` works on the copy as on the run folder.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
from pathlib import Path

from capsearch.atomic import atomic_write

TOP = ("spec.yaml", "report.md", "pareto.png", "learning_curve.png")
TRIAL = (
    "params.json",
    "result.json",
    "metrics.json",
    "train_log.jsonl",
    "samples.png",
    "memorised.png",
    "memorisation.csv",
)


STUDY = "optuna.db"


def _backup(src: Path, dst: Path) -> Path:
    """A consistent copy of an SQLite file that another process may be writing, put in place at once."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    with sqlite3.connect(f"file:{src}?mode=ro", uri=True) as source, sqlite3.connect(tmp) as target:
        source.backup(target)
    source.close()
    target.close()
    os.replace(tmp, dst)
    return dst


def keep(run: Path, dest: Path) -> list[Path]:
    """Copy the records of `run` into `dest`; return the files written."""
    if not (run / "spec.yaml").is_file():
        raise SystemExit(f"{run}: not a run folder (no spec.yaml)")
    written = []

    def copy(src: Path, dst: Path) -> None:
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            written.append(atomic_write(dst, src.read_bytes()))

    for name in TOP:
        copy(run / name, dest / name)
    if (run / STUDY).is_file():
        written.append(_backup(run / STUDY, dest / STUDY))
    for trial in sorted((run / "trials").glob("t*")):
        subs = ["", "final", *sorted(p.name for p in trial.glob("final_seed*") if p.is_dir())]
        for sub in subs:
            for name in TRIAL:
                copy(trial / sub / name, dest / "trials" / trial.name / sub / name)
    return written


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("dest", type=Path)
    args = ap.parse_args()
    print(f"{len(keep(args.run, args.dest))} files kept in {args.dest}")


if __name__ == "__main__":
    main()
