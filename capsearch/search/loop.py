"""The outer loop: Ray Tune runs the trials that Optuna proposes; the paper's baselines go first.

Optuna's study lives in `RUN/optuna.db` (SQLite, so optuna-dashboard opens it); each trial writes its
record, delta, metrics and samples under `RUN/trials/tNNN/`. A run is resumed from those records: a
finished trial (ok, error, nan, stopped) is never rerun, an interrupted one is tried again (from its
checkpoint, with the same parameters: capsearch.search.study.plan_trials).
"""

from __future__ import annotations

import functools
import math
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from capsearch.config import Spec
from capsearch.errors import UserError
from capsearch.search.cluster import (
    check_ray_start,
    check_resources,
    local_resources,
    prepare_ray_start,
    start_local_ray,
    stop_local_ray,
)
from capsearch.search.constraints import margins
from capsearch.search.final import final_todo, run_final_stage
from capsearch.search.inputs import check_inputs, ensure_scorer, prepare_data
from capsearch.search.runlock import RunLock, describe
from capsearch.search.runs import (
    PARAMS_FILE,
    RESULT_FILE,
    check_records,
    check_run_dir,
    read_record,
    start_run_dir,
    trial_dir,
    unfinished_trials,
    write_record,
)
from capsearch.search.schedule import trial_scheduler
from capsearch.search.space import CONFIG_EXTRAS, define_space
from capsearch.search.study import (
    StudyNotSaved,
    check_study,
    make_sampler,
    objectives,
    open_study,
    plan_trials,
    storage_errors,
    study_failure,
    study_storage,
)
from capsearch.search.trial import (
    REPORTED,
    TrialPlan,
    build_plan,
    failed_record,
    final_result,
    resumable_checkpoint,
    reusable_trial,
    run_trial,
)


def _finite(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


class TrialSearch(OptunaSearch):
    """OptunaSearch that plans each trial it proposes, stores probe scores and failed trials as failed.

    A study write that fails (a full disk, a lock: capsearch.search.study) is remembered in `study_error`, not
    raised into Ray Tune (which would log it and fail an innocent trial): no trial starts after it, the
    running ones finish, and `_tune` then stops the search with its one line.
    """

    def __init__(self, *args: Any, spec: Spec, run_dir: Path, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.spec, self.run_dir = spec, Path(run_dir)
        self.study_error: StudyNotSaved | None = None

    def _saving(self, write: Any, *args: Any) -> Any:
        if self.study_error is not None:  # the file failed once: the trials' records carry on alone
            return None
        try:
            return write(*args)
        except storage_errors() as exc:
            self.study_error = study_failure(self.run_dir, exc)
            return None

    def suggest(self, trial_id: str) -> dict | str | None:
        """Optuna's parameters with the trial's plan, built and validated here, once, in the driver."""
        # lazy: Ray loads only where a search runs
        from ray.tune.search import Searcher

        config = self._saving(self._suggest, trial_id)
        return Searcher.FINISHED if self.study_error is not None else config

    def _suggest(self, trial_id: str) -> dict | str | None:
        config = super().suggest(trial_id)
        if not isinstance(config, dict) or "_number" not in config:
            return config
        params = {k: v for k, v in config.items() if k not in CONFIG_EXTRAS}
        try:
            plan = build_plan(self.spec, params, config.get("baseline"), int(config["_number"]),
                              self.run_dir)  # fmt: skip
        except UserError as exc:
            return {**config, "plan_error": str(exc)}
        plan.retry_of = config.get("retry_of")
        if (
            plan.baseline or plan.retry_of is not None
        ):  # an interrupted run goes on from its checkpoint
            plan.resume_from = resumable_checkpoint(self.run_dir, plan)
        if plan.resume_from is None and self.spec.search.reuse:  # a finished twin in another run
            plan.reuse_from = reusable_trial(self.spec, plan)
        return {**config, "plan": plan.model_dump(mode="json")}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """Record a probe's score (capsearch.training.probe; single-objective studies only: Optuna's limit)."""
        self._saving(self._on_trial_result, trial_id, result)

    def _on_trial_result(self, trial_id: str, result: dict) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or isinstance(self.metric, list) or "probe_score" not in result:
            return
        ot_trial.report(float(result["probe_score"]), step=int(result.get("training_step", 0)))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        """Tell Optuna: complete with finite objectives, pruned if stopped early, failed otherwise."""
        self._saving(self._on_trial_complete, trial_id, result, error)

    def _on_trial_complete(self, trial_id: str, result: dict | None, error: bool) -> None:
        result = dict(result or {})
        ot_trial = self._ot_trials.get(trial_id)
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        complete = result.get("status") == "ok" and all(
            _finite(result.get(m)) is not None for m in metrics
        )
        if ot_trial is not None and trial_id not in self._completed_trials:
            ot_trial.set_user_attr("ray_trial_id", trial_id)
            for key in ("trial", "status", "error", *REPORTED):
                if key in result:
                    ot_trial.set_user_attr(key, result[key])
            limits = self.spec.objective.constraints if complete else {}
            for name, margin in margins(lambda k: _finite(result.get(k)), limits).items():
                ot_trial.set_constraint(name, margin)  # the sampler prefers trials within them
        if complete:
            super().on_trial_complete(trial_id, result, error=False)
        else:
            stopped = "status" not in result and not error  # ASHA stopped it at this probe
            if stopped and ot_trial is not None:
                self._on_trial_result(trial_id, result)  # Ray passes the stopping probe only here
                ot_trial.set_user_attr("status", "stopped")
            super().on_trial_complete(trial_id, None, error=not stopped)


def _trainable(config: dict, run_dir: str, data_root: str) -> None:
    """The Ray Tune function trainable: one planned trial, reporting probes and then its result."""
    if "plan_error" in config:  # the driver could not build the plan: record why, train nothing
        number = int(config["_number"])
        folder = trial_dir(Path(run_dir), number)
        folder.mkdir(parents=True, exist_ok=True)
        params = {k: v for k, v in config.items() if k not in CONFIG_EXTRAS}
        record = write_record(folder / RESULT_FILE, failed_record(
            folder.name, number, config.get("baseline"), params, config["plan_error"]))  # fmt: skip
    else:
        plan = TrialPlan.model_validate(config["plan"])
        record = run_trial(plan, Path(run_dir), Path(data_root), report=tune.report)
    tune.report(final_result(record))


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


class TrialRecords(tune.Callback):
    """Writes the record of a trial that Ray ended from outside (ASHA stop, crashed worker)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)

    def _settle(self, trial: Any, status: str, error: str | None = None) -> None:
        number = trial.config.get("_number")
        if number is None:
            return
        folder = trial_dir(self.run_dir, int(number))
        if (folder / RESULT_FILE).is_file():
            return
        folder.mkdir(parents=True, exist_ok=True)
        planned = read_record(folder / PARAMS_FILE)  # the plan it started with, if it got that far
        record: dict[str, Any] = {
            "trial": folder.name,
            "number": int(number),
            "baseline": trial.config.get("baseline"),
            "params": {},
            **(planned.to_dict() if planned is not None else {}),
        }
        last = trial.last_result or {}
        record.update(status=status, steps=last.get("training_step", 0))
        # the compute a stopped trial used (docs/results.md counts it)
        if planned is not None and planned.started is not None:
            record["seconds"] = round(time.time() - planned.started, 1)
        if error:
            record["error"] = error
        write_record(folder / RESULT_FILE, record)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """A trial that ended without writing its record was stopped by the scheduler."""
        self._settle(trial, "stopped", "stopped early by ASHA (probe score behind its rung)")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """A trial whose worker failed outside capsearch's own error handling."""
        text = ""
        if trial.error_file and Path(trial.error_file).is_file():
            text = Path(trial.error_file).read_text(errors="replace")
        if "worker process has died" in text or "actor died unexpectedly" in text:
            pid = re.search(r"\bpid: (\d+)", text)
            message = (
                f"the Ray worker died{f' (pid {pid[1]})' if pid else ''}: killed (a signal, the OOM "
                "killer) or crashed before the trial could record anything"
            )
        else:
            lines = [ln for ln in text.splitlines() if ln.strip()]
            message = "the Ray worker failed" + (f": {lines[-1][:300]}" if lines else "")
        self._settle(trial, "error", message)


def run_search(
    spec: Spec,
    out: Path,
    resume: bool = False,
    console: Any = None,
    callbacks: tuple = (),
    retry_errors: bool = False,
    join: Callable[[], bool] | None = None,
) -> Path:
    """Run (or finish) a search into the folder `out`; return the run folder (report: capsearch.reporting).

    `retry_errors` (with `resume`): run the trials that ended in `error` again (plan_trials).
    `join`: called once the inputs and the folder are checked, to join a Ray cluster or start one with a
    dashboard (capsearch.search.cluster.connect); True if it did, and the search then leaves it.

    Uses the Ray cluster the caller connected to, or starts a local one sized to this machine. Every
    check that can be made before the run folder is written is made first: a refusal leaves the folder
    as it was (and a folder a refused run wrote holds no trial record: check_run_dir starts it afresh).
    """
    check_inputs(spec)
    run_dir, afresh = check_run_dir(spec, out, resume)
    connected = join() if join is not None else False
    try:
        if afresh:  # what a new search needs of Ray, before anything is written
            if ray.is_initialized():
                check_resources(spec)
            elif spec.baseline_points or spec.search.num_samples:  # trials: a local Ray starts
                check_resources(spec, local_resources())
                check_ray_start()
        run_dir.mkdir(parents=True, exist_ok=True)
        # One search per run folder (capsearch.search.runlock). A killed search's lock is taken over:
        # check_run_dir let a plain run through only to a folder with no trial record.
        with RunLock(run_dir, resume=True) as lock:
            if lock.took_over is not None and console is not None:
                console.print(f"took over the lock of a killed search ({describe(lock.took_over)})")
            if afresh and start_run_dir(spec, run_dir) and console is not None:
                console.print(f"{run_dir} held no trial yet: started again with this spec")
            return _search_held(spec, run_dir, console, callbacks, retry_errors)
    finally:
        if connected:
            stop_local_ray()  # also for a joined cluster: leaves it running, removes no entry


def _search_held(spec: Spec, run_dir: Path, console: Any, callbacks: tuple,
                 retry_errors: bool = False) -> Path:  # fmt: skip
    """run_search with the run folder's lock held."""
    check_records(run_dir)  # a record cut short: one line naming it, nothing rewritten
    study = open_study(spec, run_dir)  # a corrupt, locked or full optuna.db: one line naming it
    check_study(study, run_dir)
    proposed = len(study.get_trials(deepcopy=False))  # a resumed search's sampler draws anew
    data_root = prepare_data(spec, run_dir, console)
    ensure_scorer(spec, data_root, console)
    pending = plan_trials(spec, study, run_dir, retry_errors)
    # a finished run resumed: nothing to train or re-evaluate, no Ray to start
    started_here = not ray.is_initialized() and bool(pending or final_todo(spec, run_dir))
    if started_here:
        check_resources(spec, local_resources())  # a resumed search: before Ray starts
        prepare_ray_start()
        start_local_ray(console, num_cpus=os.cpu_count(), include_dashboard=False,
                        log_to_driver=False, logging_level="WARNING")  # fmt: skip
    try:
        if ray.is_initialized():
            check_resources(spec)
        if pending:
            _tune(spec, run_dir, data_root, pending, [TrialRecords(run_dir), *callbacks], proposed)
        cut = unfinished_trials(run_dir)
        if not cut:  # interrupted (Ctrl-C): stop now; the final stage runs at the end of --resume
            run_final_stage(spec, run_dir, data_root, console)
        elif console is not None:
            console.print(f"final stage skipped: {len(cut)} trial(s) unfinished")
    finally:
        if started_here:
            stop_local_ray()
    return run_dir


def _tune(spec: Spec, run_dir: Path, data_root: Path, pending: int, callbacks: list,
          proposed: int = 0) -> None:  # fmt: skip
    # Probe results carry the scheduler's metric, final results the searcher's: neither has both.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # capsearch prints its own progress
    metrics, modes = objectives(spec)
    searcher = TrialSearch(
        space=functools.partial(define_space, space=spec.search_space),
        metric=metrics[0] if len(metrics) == 1 else metrics,
        mode=modes[0] if len(modes) == 1 else modes,
        sampler=make_sampler(spec, proposed),
        study_name=spec.search.study_name,
        storage=study_storage(run_dir),
        spec=spec,
        run_dir=run_dir,
    )
    trainable = tune.with_parameters(_trainable, run_dir=str(run_dir), data_root=str(data_root))
    resources = {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu}
    tuner = tune.Tuner(
        tune.with_resources(trainable, resources),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=trial_scheduler(spec),
            num_samples=pending,
            max_concurrent_trials=spec.search.concurrency,
            reuse_actors=True,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=time.strftime("session-%Y%m%d-%H%M%S"),
            storage_path=str(run_dir / "ray"),
            verbose=0,
            callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
        ),
    )
    tuner.fit()
    if searcher.study_error is not None:  # the study file failed: no trial started after that
        raise searcher.study_error
