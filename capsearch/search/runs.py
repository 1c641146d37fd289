"""The run folder: its layout, atomic writes, the spec it was started with, trial records, the best trial.

    RUN/spec.yaml           the resolved spec (extends and --set applied)
    RUN/optuna.db           the Optuna study
    RUN/trials/tNNN/        one trial (NNN: the Optuna trial number): params.json when it starts (its
                            plan), result.json when it ends, delta/, metrics.json, samples.png (and
                            after an extraction attack memorised.png and memorisation.csv), and
                            final/ (result.json and the evaluation's files) for a finalist, and
                            final_seedS/ (delta/ and the same files) per `final.train_seeds` S
    RUN/report.md, RUN/pareto.png

Search, report, export and status read and write the folder through this module only. The records
are typed models (capsearch.search.records) with a format version (`RECORD_VERSION`); records written
before versions existed read as version 1. Writers check a record against its model before writing it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, TypeVar

import yaml

from capsearch.atomic import atomic_write, unwritable
from capsearch.config import Spec, read_yaml, spec_from_dict
from capsearch.errors import UserError
from capsearch.search.choice import (  # noqa: F401  (final_choice, rank_key: read here by callers)
    choice_key,
    final_choice,
    rank_key,
)
from capsearch.search.constraints import Constraints
from capsearch.search.records import (
    CORRUPT,
    FINISHED,
    CorruptRecord,
    FinalResult,
    Scored,
    SeedResult,
    TrialRecord,
    parse,
)

SPEC_FILE = "spec.yaml"
PARAMS_FILE = "params.json"
RESULT_FILE = "result.json"
REPORT_FILE = "report.md"
PARETO_FILE = "pareto.png"
STUDY_FILE = "optuna.db"
FINAL_DIR = "final"  # a finalist's re-evaluation: trials/tNNN/final/result.json
FINAL_SEED_DIR = "final_seed{}"  # the same, trained again on another seed (final.train_seeds)
# A record file that does not parse or fails its model (damaged outside capsearch: its writes are
# atomic and checked) makes the trial "corrupt" (CORRUPT): shown, never rerun, never overwritten;
# --resume refuses the run until it is dealt with.

M = TypeVar("M", TrialRecord, FinalResult, SeedResult)


def trial_dir(run_dir: Path, number: int) -> Path:
    """The folder of the trial with that Optuna number."""
    return Path(run_dir) / "trials" / f"t{number:03d}"


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (a reader never sees half a file)."""
    atomic_write(path, json.dumps(data, indent=2, default=str) + "\n")


def write_record(path: Path, data: dict[str, Any], model: type[M] = TrialRecord) -> M:
    """Write a record's JSON object atomically, checked first against its model (a writer never leaves
    what a reader would call corrupt); the record as a reader will read it."""
    text = json.dumps(data, indent=2, default=str) + "\n"
    record = parse(model, json.loads(text))
    atomic_write(path, text)
    return record


def read_record(path: Path) -> TrialRecord | None:
    """One trial record file (result.json, or params.json) as written; None if missing or corrupt."""
    try:
        return _read(Path(path), TrialRecord)
    except CorruptRecord:
        return None


def unfinished_trials(run_dir: Path) -> list[TrialRecord]:
    """Trials started and never finished (their search was stopped while they ran)."""
    return [r for r in load_trials(run_dir, finished_only=False) if r.status == "running"]


def read_run_spec(run_dir: Path) -> Spec:
    """The resolved spec a run folder was started with (UserError if it is not a run folder)."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise UserError(f"{run_dir} is a file, not a capsearch run folder")
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist")
    if not (run_dir / SPEC_FILE).is_file():
        raise UserError(f"{run_dir} is not a capsearch run folder (no {SPEC_FILE})")
    return spec_from_dict(read_yaml(run_dir / SPEC_FILE), source=str(run_dir / SPEC_FILE))


def load_trials(run_dir: Path, finished_only: bool = True) -> list[TrialRecord]:
    """Trial records in Optuna order; with finished_only=False also running/interrupted ones.

    A trial whose result.json (or, before it has one, params.json) does not parse or fails its model
    reads as a CORRUPT record naming the file, with the plan's fields where params.json is sound.
    """
    folder = Path(run_dir) / "trials"
    records = []
    for sub in sorted(folder.glob("t*")) if folder.is_dir() else []:
        broken: tuple[Path, str] | None = None
        try:
            result = _read(sub / RESULT_FILE, TrialRecord)
        except CorruptRecord as exc:
            result, broken = None, (sub / RESULT_FILE, str(exc))
        try:
            params = _read(sub / PARAMS_FILE, TrialRecord)
        except CorruptRecord as exc:
            params = None
            if broken is None and result is None:
                broken = (sub / PARAMS_FILE, str(exc))
        record = result if result is not None else params
        if broken is not None:  # named in the record's error; the plan's fields where it has one
            number = int(sub.name[1:]) if sub.name[1:].isdigit() else -1
            planned = params.to_dict() if params is not None else {}
            error = corrupt_error(broken[0], why=broken[1])
            record = parse(TrialRecord, {**planned, "trial": sub.name, "number": number,
                                         "status": CORRUPT, "error": error})  # fmt: skip
        if record is None:
            continue
        final = read_final(sub)
        # status and version as read (their defaults where the file has none: a plan, version 1)
        seen = {"status": record.status, "version": record.version, "dir": str(sub),
                **({"final": final} if final is not None else {})}  # fmt: skip
        record = record.model_copy(update=seen)
        if not finished_only or record.status in FINISHED:
            records.append(record)
    return records


def read_train_log(folder: Path) -> list[dict[str, Any]]:
    """A trial's train_log.jsonl as its entries; a line cut short (a trial killed mid-write) is skipped."""
    log = Path(folder) / "train_log.jsonl"
    entries = []
    for line in log.read_text().splitlines() if log.is_file() else []:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def _read(path: Path, model: type[M]) -> M | None:
    """A record file as `model`; None if there is no such file (CorruptRecord if it is damaged)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # ValueError: JSON and UTF-8 decoding errors
        raise CorruptRecord("not a JSON object") from None
    return parse(model, data)


def corrupt_error(
    path: Path,
    remedy: str = "or move its trial folder out of the run to run that trial again",
    why: str = "not a JSON object",
) -> str:
    """The line that names a damaged record or metrics file, what is wrong, and what to do about it."""
    return f"{path} is cut short or corrupt ({why}); restore it, {remedy}"


def check_records(run_dir: Path) -> None:
    """Refuse to resume a run with a damaged trial record (UserError naming the first one)."""
    for record in load_trials(run_dir, finished_only=False):
        if record.status == CORRUPT:
            raise UserError(record.error or f"trial {record.trial} is corrupt")


# What a search writes into its run folder before its first trial record, and after (besides hidden
# files); a folder without spec.yaml may hold only the first two for a search to start in it.
RUN_ENTRIES = ("lock.json", "trials", SPEC_FILE, STUDY_FILE, f"{STUDY_FILE}-journal", "data", "cache",
               "ray", REPORT_FILE, PARETO_FILE)  # fmt: skip
# The sections of a spec its generated phantom data depends on (held-out images: evaluate and final).
DATA_SECTIONS = ("data", "evaluate", "final")


def check_run_dir(spec: Spec, out: Path, resume: bool) -> tuple[Path, bool]:
    """The run folder a search of `spec` may use, checked without writing anything: (folder, afresh).

    `afresh`: the search starts there: a new or empty folder, or one holding no trial record (a run
    refused or stopped before its first trial, with this spec or another; start_run_dir replaces its
    spec and study), with or without `resume`. Otherwise the folder holds a search and `resume` goes
    on with it, if it was started with this very spec. Anything else is one line (UserError).
    """
    run_dir = Path(out).resolve()
    saved = run_dir / SPEC_FILE
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {out} is a file, not a run folder; choose a folder")
    blocked = next((p for p in run_dir.parents if p.exists()), None)
    if blocked is not None and not blocked.is_dir():
        raise UserError(f"--out {out}: {blocked} is a file, not a folder")
    why = unwritable(run_dir)
    if why is not None:
        raise UserError(f"--out {out} {why}; choose a folder you can write to")
    trials = run_dir.is_dir() and bool(load_trials(run_dir, finished_only=False))
    if saved.is_file() and trials:
        if not resume:
            raise UserError(
                f"{run_dir} already holds a search; finish it with --resume or choose another --out"
            )
        old = spec_from_dict(read_yaml(saved), source=str(saved)).to_dict()
        where = first_difference(old, spec.to_dict())
        if where is not None:
            raise UserError(
                f"the spec differs from the one {run_dir} was started with (at {where})"
            )
        return run_dir, False
    if trials:
        raise UserError(
            f"{run_dir} holds trials but no {SPEC_FILE}: restore the spec it was started with to "
            "finish it with --resume, or choose another --out"
        )
    if resume and not saved.is_file():
        raise UserError(f"nothing to resume: {run_dir} holds no search ({SPEC_FILE} is missing)")
    if run_dir.is_dir():  # a search's leftovers only: nothing of the user's is replaced
        known = RUN_ENTRIES if saved.is_file() else RUN_ENTRIES[:2]
        foreign = sorted(
            p.name for p in run_dir.iterdir() if p.name not in known and p.name[0] != "."
        )
        if foreign:
            raise UserError(
                f"--out {out} holds other files ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}) and no search; choose a new or empty folder"
            )
        if saved.is_file() and not _written_by_a_search(saved):
            raise UserError(
                f"--out {out} holds a {SPEC_FILE} that no search wrote (a spec file of your own?) "
                "and no search; choose a new or empty folder"
            )
    return run_dir, True


def _written_by_a_search(saved: Path) -> bool:
    """Whether a run folder's spec.yaml is a resolved spec, as a search writes it: every section."""
    try:
        data = read_yaml(saved)
    except UserError:
        return False
    return set(Spec.model_fields) - {"extends"} <= set(data)


def start_run_dir(spec: Spec, run_dir: Path) -> bool:
    """Write the spec a search starts with into its folder (check_run_dir said `afresh`; call it
    with the folder's lock held); return whether an earlier start's spec was replaced.

    What a run refused or stopped before its first trial left is replaced: its study (which may hold
    the old spec's baselines, enqueued), and the phantom data it generated unless the data's sections of
    the spec are the same. A folder that holds a trial record by now (another search got there first)
    is refused.
    """
    run_dir = Path(run_dir)
    if load_trials(run_dir, finished_only=False):
        raise UserError(
            f"{run_dir} already holds a search; finish it with --resume or choose another --out"
        )
    saved = run_dir / SPEC_FILE
    data = spec.to_dict()
    if not saved.is_file():  # a new (or empty) folder
        atomic_write(saved, yaml.safe_dump(data, sort_keys=False))
        return False
    try:
        old = read_yaml(saved)
    except UserError:  # cut short or edited by hand: replaced like any other
        old = {}
    if old == data:
        return False  # the same spec: its study and data go on as --resume would
    for name in (STUDY_FILE, f"{STUDY_FILE}-journal"):
        (run_dir / name).unlink(missing_ok=True)
    generated, source = run_dir / "data", old.get("data")
    phantom = isinstance(source, dict) and source.get("phantom") is not None
    ours = phantom or (generated / "complete.json").is_file()  # generated by a search
    if ours and any(old.get(k) != data.get(k) for k in DATA_SECTIONS):
        shutil.rmtree(generated, ignore_errors=True)  # prepare_data makes this spec's world
    atomic_write(saved, yaml.safe_dump(data, sort_keys=False))
    return True


def prepare_run_dir(spec: Spec, out: Path, resume: bool) -> Path:
    """Create the run folder with spec.yaml, or check that a resumed run was started with this spec."""
    run_dir, afresh = check_run_dir(spec, out, resume)
    if afresh:
        run_dir.mkdir(parents=True, exist_ok=True)
        start_run_dir(spec, run_dir)
    return run_dir


def first_difference(a: Any, b: Any, path: str = "") -> str | None:
    """The first YAML path where two plain data trees differ, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            where = first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else key)
            if where is not None:
                return where
        return None
    return None if a == b else (path or "<top>")


def _read_sound(path: Path, model: type[M]) -> M | None:
    """A final re-evaluation file as `model`; None if it is missing or damaged (as if never written)."""
    try:
        return _read(path, model)
    except CorruptRecord:
        return None


def read_final(record_dir: Path) -> FinalResult | None:
    """A trial's final re-evaluation result, or None if it has none (or it is unreadable); with its
    re-evaluations trained on other seeds (final_seedS/) under `seeds`, by seed."""
    final = _read_sound(Path(record_dir) / FINAL_DIR / RESULT_FILE, FinalResult)
    if final is None:
        return None
    others = (
        _read_sound(p / RESULT_FILE, SeedResult)
        for p in Path(record_dir).glob(FINAL_SEED_DIR.format("*"))
    )
    seeds = sorted((o for o in others if o is not None), key=lambda o: o.train_seed)
    return final.model_copy(update={"seeds": seeds}) if seeds else final


def record_value(record: Scored, key: str) -> float | None:
    """A record's finite value of a metric (or top-level key such as reward), else None."""
    return record.value(key)


def best_trial(
    records: list[TrialRecord], constraints: Constraints | None = None
) -> TrialRecord | None:
    """The best trial: highest reward in the final re-evaluation if any trial has one, else in the search.

    A winner is chosen on an evaluation it was not searched on whenever the final stage ran (averaged
    over `final.train_seeds` where finalists were trained again on other seeds: final_choice); the
    search's own reward only decides runs without a final stage (None if no trial succeeded). With
    constraints (the spec's `objective.constraints`), a trial within them on that evaluation ranks
    before every trial over them (capsearch.search.constraints); over training seeds, within them on
    every seed's evaluation, the extraction bound pooled over the seeds (capsearch.search.choice).
    """
    final = [r for r in records if r.final is not None and r.final.value("reward") is not None]
    if final:
        return min(final, key=lambda r: choice_key(r.final, constraints))
    ok = [r for r in records if r.status == "ok" and r.value("reward") is not None]
    return min(ok, key=lambda r: rank_key(r, constraints)) if ok else None
