"""The run's Optuna study (RUN/optuna.db, SQLite): opening it, planning trials in it, and its failures.

The study is the sampler's memory and the ledger of trial numbers (trial N writes RUN/trials/tNNN). When
its SQLite file cannot be written — a full disk (SQLite's "database or disk is full": Optuna turns the
SQLAlchemy OperationalError into a StorageInternalError), a lock another program holds, a corrupt file —
the search does not go on without it: a sampler that forgets what it proposed, and trial numbers the
file does not hold, would make a resumed search repeat or overwrite trials. It stops starting trials,
lets the running ones finish (each writes its own record), and ends with one line naming the file and
the way back: `--resume` tells the study what the records say (plan_trials).
"""

from __future__ import annotations

import contextlib
import sqlite3
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna
import sqlalchemy.exc
from optuna.trial import TrialState

from capsearch.errors import UserError
from capsearch.search.constraints import margins
from capsearch.search.reward import OBJECTIVES
from capsearch.search.runs import RESULT_FILE, STUDY_FILE, load_trials, write_record

if TYPE_CHECKING:
    from capsearch.config import Spec


class StudyNotSaved(UserError):
    """The study's SQLite file could not be read or written; the search stopped (one line, exit 2).

    `resumable`: the search ran and stopped; its line ends with "finish it with --resume", which the
    command line spells out in full.
    """

    def __init__(self, message: str, resumable: bool = False) -> None:
        super().__init__(message)
        self.resumable = resumable


def objectives(spec: Spec) -> tuple[list[str], list[str]]:
    """Metric names and Ray modes ("min"/"max") the study optimises."""
    if spec.objective.mode == "reward":
        return ["reward"], ["max"]
    return list(spec.objective.pareto), [OBJECTIVES[n] for n in spec.objective.pareto]


def sampler_seed(seed: int, proposed: int) -> int:
    """The seed of a search's sampler once the study holds `proposed` trials (0: the spec's own).

    A sampler rebuilt with the spec's seed when a search is resumed draws its random stream again from
    the start: Optuna's random sampler (and TPE's random start-up trials, NSGA-II's first generation)
    proposes the first sitting's configurations again. Measured on experiments/search_random.yaml
    before this: resumed after 4 searched trials, it proposed t005-t008's parameters again as
    t011-t014, each trained again and counted against the budget. A resumed search's sampler is seeded
    from the spec's seed and the number of trials the study holds: deterministic for the same records,
    and a stream of its own.
    """
    if proposed == 0:
        return seed

    return int(np.random.SeedSequence([seed, proposed]).generate_state(1)[0])


def make_sampler(spec: Spec, proposed: int = 0) -> Any:
    """The Optuna sampler the spec names, seeded (for a study already holding `proposed` trials:
    sampler_seed)."""
    s = spec.search
    seed = sampler_seed(s.seed, proposed)
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=s.population_size)
    if s.sampler == "gp":
        # Gaussian-process Bayesian optimisation (log EI; with constraints log constrained EI, Gardner
        # et al. 2014): it reads each trial's constraint values as TPE does. Its random start-up is
        # startup_trials long; a method's own hyper-parameters (present only where that method was
        # chosen) are drawn by its independent random sampler, without a warning per draw.
        return optuna.samplers.GPSampler(
            seed=seed, n_startup_trials=s.startup_trials, warn_independent_sampling=False
        )
    with warnings.catch_warnings():  # constant_liar is flagged experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=s.startup_trials, constant_liar=s.concurrency > 1
        )


def study_storage(run_dir: Path) -> Any:
    """The run's SQLite Optuna storage."""
    return optuna.storages.RDBStorage(f"sqlite:///{Path(run_dir) / STUDY_FILE}")


def storage_errors() -> tuple[type[BaseException], ...]:
    """What a failing SQLite study raises: Optuna's wrapper, SQLAlchemy's errors, sqlite3's own."""
    return (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError, sqlite3.Error)


def _cause(exc: BaseException) -> str:
    """The innermost cause's message: SQLite's own words ("database or disk is full")."""
    seen = exc
    while True:
        inner = getattr(seen, "orig", None) or seen.__cause__ or seen.__context__
        if inner is None or inner is seen:
            return str(seen).splitlines()[0] if str(seen) else type(seen).__name__
        seen = inner


def _hint(cause: str) -> str:
    if "full" in cause or "space" in cause:
        return "free disk space"
    if "locked" in cause:
        return "close the program that holds the file (an optuna-dashboard?)"
    return "restore the file from a copy (the trial records under trials/ are intact)"


def study_failure(run_dir: Path, exc: BaseException, opening: bool = False) -> StudyNotSaved:
    """The one-line error for a study file that could not be opened (or saved during the search)."""
    path, cause = Path(run_dir) / STUDY_FILE, _cause(exc)
    if opening:
        return StudyNotSaved(f"cannot open the Optuna study {path}: {cause}; {_hint(cause)}")
    return StudyNotSaved(
        f"could not save the Optuna study {path} ({cause}); the search stopped, every trial's own "
        f"record is kept: {_hint(cause)}, then finish it with --resume",
        resumable=True,
    )


@contextlib.contextmanager
def study_guard(run_dir: Path, opening: bool = False) -> Iterator[None]:
    """Turn a failure of the study's SQLite file into its one-line StudyNotSaved."""
    try:
        yield
    except storage_errors() as exc:
        raise study_failure(run_dir, exc, opening) from None


def open_study(spec: Spec, run_dir: Path) -> Any:
    """Create or load the run's Optuna study (one line if its file is corrupt, locked or full)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    path = Path(run_dir) / STUDY_FILE
    if not path.is_file() and load_trials(run_dir, finished_only=False):
        raise UserError(
            f"{path} is missing but the run has trials: restore the run's own optuna.db"
        )
    _, modes = objectives(spec)
    with study_guard(run_dir, opening=True):
        return optuna.create_study(
            storage=study_storage(run_dir),
            study_name=spec.search.study_name,
            directions=["minimize" if m == "min" else "maximize" for m in modes],
            sampler=make_sampler(spec),
            load_if_exists=True,
        )


def check_study(study: Any, run_dir: Path) -> None:
    """Refuse a study that does not hold the run's trials (replaced, or restored from an older copy).

    Optuna numbers the next trial after the study's last; trial folders numbered beyond it would be
    written over by new trials.
    """
    numbers = [r.number for r in load_trials(run_dir, finished_only=False)]
    held = len(study.get_trials(deepcopy=False))
    if numbers and max(numbers) >= held:
        raise UserError(
            f"the Optuna study {Path(run_dir) / STUDY_FILE} holds {held} trial(s) but the run has "
            f"trials/t{max(numbers):03d}: it is not this run's study; restore the run's own optuna.db"
        )


def plan_trials(spec: Spec, study: Any, run_dir: Path, retry_errors: bool = False) -> int:
    """Settle interrupted trials, enqueue the baselines not yet run; return how many trials remain.

    With `retry_errors` (`capsearch run --resume --retry-errors`), a trial whose status is `error` (an
    exception or a failed worker: not `nan`, not `stopped`) is run again: a baseline whose every
    record is an error is enqueued as itself, a searched one with its parameters (as an interrupted
    one is, `retry_of` in its record), and it no longer counts against the search's budget.
    """
    for record in load_trials(run_dir, finished_only=False):
        if record.status == "running":  # started, never finished: the run was interrupted
            write_record(record.folder / RESULT_FILE, {**record.to_dict(), "status": "interrupted"})
    finished = {r.number: r for r in load_trials(run_dir)}
    metrics, _ = objectives(spec)
    with study_guard(run_dir):
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            record = finished.get(t.number)
            ok = record is not None and record.status == "ok"
            values = [record.value(m) for m in metrics] if ok else []
            if values and all(v is not None for v in values):
                _tell_constraints(study, t, record, spec.objective.constraints)
                study.tell(t.number, values if len(values) > 1 else values[0])
            else:
                study.tell(t.number, state=TrialState.FAIL)
        errored = {n for n, r in finished.items() if retry_errors and r.status == "error"}
        done = {r.baseline for n, r in finished.items() if n not in errored}
        waiting = {
            t.user_attrs.get("baseline") for t in study.get_trials(states=(TrialState.WAITING,))
        }
        left = 0
        for point in spec.baseline_points:
            if point.name in done:
                continue
            left += 1
            if point.name not in waiting:
                study.enqueue_trial(dict(point.params), user_attrs={"baseline": point.name})
        searched = sum(1 for n, r in finished.items() if not r.baseline and n not in errored)
        budget = max(0, spec.search.num_samples - searched)
        _enqueue_retries(study, run_dir, budget, retry_errors)
    return left + budget


def _tell_constraints(study: Any, frozen: Any, record: Any, constraints: dict[str, float]) -> None:
    """Give a trial settled from its record the constraint margins a finishing trial is told (loop.py):
    the GP sampler refuses a study whose complete trials do not all carry the same constraints."""
    if not constraints:
        return
    # a FrozenTrial names its storage row only by its private id; Trial is how a value is set on it
    trial = optuna.trial.Trial(study, frozen._trial_id)
    for name, margin in margins(record.value, constraints).items():
        trial.set_constraint(name, margin)


def _enqueue_retries(study: Any, run_dir: Path, budget: int, retry_errors: bool = False) -> None:
    """Enqueue again, with the same parameters, the searched trials that an interruption cut short.

    The sampler proposed them before the interruption; running them again (from their checkpoints:
    capsearch.search.trial.resumable_checkpoint) makes a search's trials independent of where it was stopped,
    and keeps the training they did. Each one is retried once (a retry that is itself interrupted is
    retried in turn), and no more of them than the search's remaining budget, newest first: a
    search resumed by an older capsearch sampled new trials in place of its interrupted ones, so the
    budget left is the newest ones'.
    """
    retried = {t.user_attrs.get("retry_of") for t in study.get_trials(deepcopy=False)}
    queued = len(
        [
            t
            for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
            if t.user_attrs.get("retry_of") is not None
        ]  # fmt: skip
    )
    for record in reversed(load_trials(run_dir, finished_only=False)):
        if queued >= budget:
            return
        again = ("interrupted", "error") if retry_errors else ("interrupted",)
        if record.status not in again or record.baseline or record.number in retried:
            continue
        if not record.params:  # no plan was written: nothing to retry
            continue
        study.enqueue_trial(dict(record.params), user_attrs={"retry_of": record.number})
        queued += 1
