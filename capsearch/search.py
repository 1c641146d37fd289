"""The outer loop: Ray Tune runs the trials that Optuna proposes; the paper's baselines go first.

Optuna's study lives in `RUN/optuna.db` (SQLite, so optuna-dashboard opens it); each trial writes its
record, delta, metrics and samples under `RUN/trials/tNNN/`. A run is resumed from those records: a
finished trial (ok, error, nan, stopped) is never rerun, an interrupted one is tried again.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.search.optuna import OptunaSearch

from capsearch.config import Spec, read_yaml, spec_from_dict
from capsearch.errors import UserError
from capsearch.final import run_final_stage
from capsearch.report import (
    PARAMS_FILE,
    RESULT_FILE,
    SPEC_FILE,
    final_view,
    load_trials,
    ordered,
    results_table,
    trial_dir,
    write_json,
    write_report,
)
from capsearch.reward import OBJECTIVES, compute_reward

STUDY_FILE = "optuna.db"
TINY_MODELS = ("tiny", "tiny:random")
REPORTED = ("fid", "kid", "alignment", "amd", "amd_heldout", "extracted", "extracted_fraction",
            "strength_ratio", "trainable_pct", "reward")  # fmt: skip


# --- run folder and one-time preparation -------------------------------------------------------------


def prepare_run_dir(spec: Spec, out: Path, resume: bool) -> Path:
    """Create the run folder with spec.yaml, or check that a resumed run was started with this spec."""
    import yaml

    run_dir = Path(out).resolve()
    saved = run_dir / SPEC_FILE
    data = spec.to_dict()
    if saved.is_file():
        if not resume:
            raise UserError(
                f"{run_dir} already holds a search; finish it with --resume or choose another --out"
            )
        old = spec_from_dict(read_yaml(saved), source=str(saved)).to_dict()
        where = first_difference(old, data)
        if where is not None:
            raise UserError(
                f"the spec differs from the one {run_dir} was started with (at {where})"
            )
        return run_dir
    if resume:
        raise UserError(f"nothing to resume: {run_dir} holds no search ({SPEC_FILE} is missing)")
    run_dir.mkdir(parents=True, exist_ok=True)
    saved.write_text(yaml.safe_dump(data, sort_keys=False))
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


def prepare_data(spec: Spec, run_dir: Path, console: Any = None) -> Path:
    """The training data folder: an existing one, or phantoms generated into the run folder once."""
    from capsearch.data import metadata_path

    if spec.data.path is not None:
        root = Path(spec.data.path).expanduser().resolve()
        metadata_path(root)
        return root
    root = run_dir / "data"
    if not (root / "metadata.jsonl").is_file():
        from capsearch.worlds.phantom import write_phantom_dataset

        if console is not None:
            console.print(f"generating the phantom data set in {root} (once)")
        settings = spec.data.phantom.model_dump()
        if settings["held_out_images"] is None:
            settings["held_out_images"] = held_out_images_needed(spec)
        write_phantom_dataset(root, **settings, progress=console is not None)
    return root


def held_out_images_needed(spec: Spec) -> int:
    """Images each held-out split needs: reference_ratio × the most samples any evaluation compares."""
    samples = [spec.evaluate.samples] + (
        [spec.final.samples(spec.evaluate)] if spec.final.enabled else []
    )
    return math.ceil(spec.evaluate.reference_ratio * max(samples))


def uses_phantom_scorer(spec: Spec) -> bool:
    """Whether evaluation scores with the phantom scorer (pixel-space models under extractor auto)."""
    from capsearch.features import resolve_extractor

    return resolve_extractor(spec.evaluate.extractor, spec.model) == "phantom"


def ensure_scorer(spec: Spec, data_root: Path, console: Any = None) -> None:
    """Train the phantom scorer once if evaluation needs it and it is not installed."""
    if not uses_phantom_scorer(spec):
        return
    from capsearch.scorer import SCORER_DIR, load_scorer, train_scorer

    try:
        load_scorer()
    except UserError:
        if spec.data.phantom is None:
            raise
        if console is not None:
            console.print(f"training the phantom scorer into {SCORER_DIR} (once)")
        train_scorer(data_root, SCORER_DIR, epochs=10, size=32, progress=console is not None)


def check_inputs(spec: Spec) -> None:
    """Fail before the run folder is made if the base model or the data folder is not here."""
    from capsearch import models
    from capsearch.data import metadata_path

    if spec.model in TINY_MODELS:
        models.load_pipeline(spec.model)
    else:
        models._resolve_folder(spec.model)  # the resolution every trial's load_pipeline does
    if spec.data.path is not None:
        metadata_path(Path(spec.data.path).expanduser())


# --- the Optuna study -------------------------------------------------------------------------------


def objectives(spec: Spec) -> tuple[list[str], list[str]]:
    """Metric names and Ray modes ("min"/"max") the study optimises."""
    if spec.objective.mode == "reward":
        return ["reward"], ["max"]
    return list(spec.objective.pareto), [OBJECTIVES[n] for n in spec.objective.pareto]


def make_sampler(spec: Spec) -> Any:
    """The Optuna sampler the spec names, seeded."""
    import warnings

    import optuna

    s = spec.search
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    if s.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=s.seed, population_size=s.population_size)
    with warnings.catch_warnings():  # constant_liar is flagged experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=s.seed, n_startup_trials=s.startup_trials, constant_liar=s.concurrency > 1
        )


def study_storage(run_dir: Path) -> Any:
    """The run's SQLite Optuna storage."""
    import optuna

    return optuna.storages.RDBStorage(f"sqlite:///{Path(run_dir) / STUDY_FILE}")


def open_study(spec: Spec, run_dir: Path) -> Any:
    """Create or load the run's Optuna study."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _, modes = objectives(spec)
    return optuna.create_study(
        storage=study_storage(run_dir),
        study_name=spec.search.study_name,
        directions=["minimize" if m == "min" else "maximize" for m in modes],
        sampler=make_sampler(spec),
        load_if_exists=True,
    )


def plan_trials(spec: Spec, study: Any, run_dir: Path) -> int:
    """Settle interrupted trials, enqueue the baselines not yet run; return how many trials remain."""
    from optuna.trial import TrialState

    for record in load_trials(run_dir, finished_only=False):
        if record["status"] == "running":  # started, never finished: the run was interrupted
            write_json(Path(record["dir"]) / RESULT_FILE, {**record, "status": "interrupted"})
    finished = {r["number"]: r for r in load_trials(run_dir)}
    metrics, _ = objectives(spec)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        record = finished.get(t.number)
        values = [_finite(record.get("metrics", {}).get(m, record.get(m))) for m in metrics] \
            if record and record.get("status") == "ok" else []  # fmt: skip
        if values and all(v is not None for v in values):
            study.tell(t.number, values if len(values) > 1 else values[0])
        else:
            study.tell(t.number, state=TrialState.FAIL)
    done = {r.get("baseline") for r in finished.values()}
    waiting = {t.user_attrs.get("baseline") for t in study.get_trials(states=(TrialState.WAITING,))}
    left = 0
    for point in spec.baseline_points:
        if point.name in done:
            continue
        left += 1
        if point.name not in waiting:
            study.enqueue_trial(dict(point.params), user_attrs={"baseline": point.name})
    searched = sum(1 for r in finished.values() if not r.get("baseline"))
    return left + max(0, spec.search.num_samples - searched)


def _finite(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


class TrialSearch(OptunaSearch):
    """OptunaSearch that stores probe losses as intermediate values and failed trials as failed."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """Record a probe's score (capsearch.probe; single-objective studies only: Optuna's limit)."""
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or isinstance(self.metric, list) or "probe_score" not in result:
            return
        ot_trial.report(float(result["probe_score"]), step=int(result.get("training_step", 0)))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        """Tell Optuna: complete with finite objectives, pruned if stopped early, failed otherwise."""
        result = dict(result or {})
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and trial_id not in self._completed_trials:
            ot_trial.set_user_attr("ray_trial_id", trial_id)
            for key in ("trial", "status", "error", *REPORTED):
                if key in result:
                    ot_trial.set_user_attr(key, result[key])
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        complete = result.get("status") == "ok" and all(
            _finite(result.get(m)) is not None for m in metrics
        )
        if complete:
            super().on_trial_complete(trial_id, result, error=False)
        else:
            stopped = "status" not in result and not error  # ASHA stopped it at this probe
            if stopped and ot_trial is not None:
                self.on_trial_result(trial_id, result)  # Ray passes the stopping probe only here
                ot_trial.set_user_attr("status", "stopped")
            super().on_trial_complete(trial_id, None, error=not stopped)


# --- one trial --------------------------------------------------------------------------------------


def trial_settings(spec: Spec, params: dict[str, Any], baseline: str | None) -> dict[str, Any]:
    """Method spec, training settings (mitigations included) and group choices of a trial."""
    from capsearch.space import (
        base_mitigations,
        group_choices,
        params_to_method_spec,
        params_to_mitigations,
        params_to_train,
    )

    space = spec.search_space
    train = spec.train.model_dump()
    train.update(params_to_train(params, space))
    if baseline:
        train.update(spec.baseline(baseline).train)
    # Every trial's base mitigations, then its chosen one: recorded here, so reports show them all.
    base = base_mitigations(train.pop("caption_dropout"), train["mitigations"])
    train["mitigations"] = params_to_mitigations(params, space, base)
    return {
        "method_spec": params_to_method_spec(params, space),
        "train": train,
        "groups": group_choices(params, space),
    }


def run_trial(
    spec: Spec,
    params: dict[str, Any],
    baseline: str | None,
    number: int,
    run_dir: Path,
    data_root: Path,
    report: Callable[[dict], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune, evaluate and score one trial; any failure is recorded, never raised."""
    import torch

    folder = trial_dir(run_dir, number)
    folder.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(spec.resources.cpu)
    record: dict[str, Any] = {
        "trial": folder.name,
        "number": number,
        "baseline": baseline,
        "params": params,
        "status": "running",
        "started": time.time(),
    }
    started = time.time()
    try:
        write_json(folder / PARAMS_FILE, record)
        record.update(trial_settings(spec, params, baseline))
        write_json(folder / PARAMS_FILE, record)
        record.update(_train_and_evaluate(spec, record, folder, run_dir, data_root, report))
    except UserError as exc:
        record.update(status="error", error=str(exc))
    except Exception as exc:  # a failing trial must not stop the search: record it and move on
        record.update(status="error", error=f"{type(exc).__name__}: {exc}")
        (folder / "error.txt").write_text(traceback.format_exc())
    record["seconds"] = round(time.time() - started, 1)
    if record["status"] == "ok":
        try:
            record["reward"] = compute_reward(
                record["metrics"], spec.objective.weights.model_dump()
            )
        except ValueError as exc:
            record.update(status="error", error=f"no reward: {exc}")
    write_json(folder / RESULT_FILE, record)
    return record


def _train_and_evaluate(spec, record, folder, run_dir, data_root, report) -> dict[str, Any]:
    import torch

    from capsearch.delta import save_delta
    from capsearch.evaluate import EvalConfig, evaluate, scalar_metrics
    from capsearch.methods import apply_methods
    from capsearch.models import load_pipeline
    from capsearch.space import FROZEN
    from capsearch.train import TrainConfig, finetune

    pipe = load_pipeline(spec.model)
    if spec.resources.gpu > 0 and torch.cuda.is_available():
        pipe.to("cuda")
    total = sum(p.numel() for p in pipe.unet.parameters())
    out: dict[str, Any] = {"total": total, "trainable": 0, "steps": 0}
    entries = record["method_spec"]
    if all(e["method"] in FROZEN for e in entries):  # Freeze: the base model as it is, no training
        apply_methods(pipe.unet, [{"method": "freeze", "units": []}])
        save_delta(pipe.unet, folder / "delta", base_model=spec.model)
    else:
        probes_to_ray = report is not None and (
            not record["baseline"] or spec.search.scheduler.name == "fifo"
        )  # ASHA must never stop a baseline: it only sees searched trials' probes

        def on_event(event: str, payload: dict) -> None:
            if probes_to_ray and event == "probe" and "probe_score" in payload:
                keys = ("probe_score", "heldout_loss", "train_loss", "loss_gap", "strength_ratio")
                report(
                    {
                        "training_step": payload["step"],
                        **{k: payload[k] for k in keys if k in payload},
                    }
                )

        result = finetune(pipe, entries, data_root, TrainConfig(**record["train"]),
                          callbacks=[on_event], out_dir=folder, quiet=True)  # fmt: skip
        out.update(
            trainable=result.trainable,
            steps=result.steps,
            train_seconds=result.seconds,
            final_loss=result.final_loss,
            mitigation_counts=result.mitigation_counts,
        )
        if result.status == "stopped":  # Ctrl-C reached the trial: leave it unfinished for --resume
            raise KeyboardInterrupt
        if result.status != "ok":
            return {**out, "status": result.status, "error": result.message or result.status}
    out["trainable_pct"] = 100.0 * out["trainable"] / max(total, 1)
    settings = spec.evaluate.model_dump()
    settings["cache_dir"] = settings["cache_dir"] or str(Path(run_dir) / "cache")
    started = time.time()
    metrics = evaluate(pipe, data_root, EvalConfig(**settings), out_dir=folder)
    scalars = scalar_metrics(metrics)
    scalars["trainable_pct"] = out["trainable_pct"]
    return {
        **out,
        "status": "ok",
        "metrics": scalars,
        "intervals": metrics["intervals"],
        "noise_floor": metrics["noise_floor"],
        "eval_seconds": round(time.time() - started, 1),
    }


def final_result(record: dict[str, Any]) -> dict[str, Any]:
    """What a trial reports to Ray when it ends: status, finite metrics and reward, error line."""
    out: dict[str, Any] = {
        "status": record["status"],
        "trial": record["trial"],
        "training_step": record.get("steps", 0),
    }
    for key in REPORTED:
        value = _finite(record.get("metrics", {}).get(key, record.get(key)))
        if value is not None:
            out[key] = value
    if record.get("error"):
        out["error"] = str(record["error"]).splitlines()[0][:300]
    return out


def _trainable(config: dict, spec_data: dict, run_dir: str, data_root: str) -> None:
    """The Ray Tune function trainable: one trial, reporting probes and then its final result."""
    spec = spec_from_dict(spec_data, source=SPEC_FILE)
    params = {k: v for k, v in config.items() if k not in ("_number", "baseline")}
    record = run_trial(spec, params, config.get("baseline"), int(config["_number"]),
                       Path(run_dir), Path(data_root), report=tune.report)  # fmt: skip
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
        record: dict[str, Any] = {
            "trial": folder.name,
            "number": int(number),
            "baseline": trial.config.get("baseline"),
            "params": {},
        }
        if (folder / PARAMS_FILE).is_file():
            record.update(json.loads((folder / PARAMS_FILE).read_text()))
        last = trial.last_result or {}
        record.update(status=status, steps=last.get("training_step", 0))
        if error:
            record["error"] = error
        write_json(folder / RESULT_FILE, record)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """A trial that ended without writing its record was stopped by the scheduler."""
        self._settle(trial, "stopped", "stopped early by ASHA (probe score behind its rung)")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """A trial whose worker failed outside capsearch's own error handling."""
        message = "the Ray worker failed"
        if trial.error_file and Path(trial.error_file).is_file():
            lines = [ln for ln in Path(trial.error_file).read_text().splitlines() if ln.strip()]
            message += f": {lines[-1][:300]}" if lines else ""
        self._settle(trial, "error", message)


def max_steps(spec: Spec) -> int:
    """The most training steps any trial can run (ASHA's max_t)."""
    steps = [spec.train.steps] + [b.train.get("steps", 0) for b in spec.baseline_points]
    p = spec.search_space.steps
    if p is not None:
        steps += [int(p.high)] if p.kind == "int" else [int(v) for v in (p.choices or [p.value])]
    return max(steps)


def run_search(
    spec: Spec,
    out: Path,
    resume: bool = False,
    console: Any = None,
    callbacks: tuple = (),
) -> Path:
    """Run (or finish) a search into the folder `out`; return the path of its report.md.

    Uses the Ray cluster the caller connected to, or starts a local one sized to this machine.
    """
    import ray

    check_inputs(spec)
    run_dir = prepare_run_dir(spec, out, resume)
    data_root = prepare_data(spec, run_dir, console)
    ensure_scorer(spec, data_root, console)
    study = open_study(spec, run_dir)
    pending = plan_trials(spec, study, run_dir)
    started_here = not ray.is_initialized()
    if started_here:
        prepare_ray_start()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 logging_level="WARNING")  # fmt: skip
    try:
        _check_resources(spec)
        if pending:
            _tune(spec, run_dir, data_root, pending, [TrialRecords(run_dir), *callbacks])
        run_final_stage(spec, run_dir, data_root, console)
    finally:
        if started_here:
            ray.shutdown()
    if console is not None:
        records = ordered(load_trials(run_dir), spec)
        console.print(results_table(records, title=f"{spec.name}: {len(records)} trials"))
        finals = [final_view(r) for r in records if r.get("final")]
        if finals:
            title = f"final re-evaluation ({spec.final.split} split, seed {spec.final.seed}), 95% intervals"
            console.print(results_table(finals, title=title, intervals=True))
    return write_report(run_dir)


def prepare_ray_start() -> None:
    """Prepare a local Ray start: quiet notices that do not apply, trials at normal priority."""
    import logging

    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR
    )
    logging.getLogger("ray.tune.tune").setLevel(logging.ERROR)  # its resume hint is Ray's, not ours
    # Ray starts workers at nice 15 to keep its own services responsive; here the trials are the
    # work, and at 15 they get a fraction of a core whenever anything else runs on the machine.
    os.environ.setdefault("RAY_worker_niceness", "0")


def _check_resources(spec: Spec) -> None:
    import ray

    have = ray.cluster_resources()
    for key, want in (("CPU", spec.resources.cpu), ("GPU", spec.resources.gpu)):
        if want > have.get(key, 0):
            raise UserError(
                f"resources.{key.lower()}: a trial asks for {want:g} but the Ray cluster has "
                f"{have.get(key, 0):g}; lower it or join a bigger cluster with --address"
            )


def _tune(spec: Spec, run_dir: Path, data_root: Path, pending: int, callbacks: list) -> None:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from capsearch.space import define_space

    # Probe results carry the scheduler's metric, final results the searcher's: neither has both.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # capsearch prints its own progress
    metrics, modes = objectives(spec)
    searcher = TrialSearch(
        space=functools.partial(define_space, space=spec.search_space),
        metric=metrics[0] if len(metrics) == 1 else metrics,
        mode=modes[0] if len(modes) == 1 else modes,
        sampler=make_sampler(spec),
        study_name=spec.search.study_name,
        storage=study_storage(run_dir),
    )
    sched = spec.search.scheduler
    scheduler = (
        ASHAScheduler(time_attr="training_step", metric="probe_score", mode="min",
                      max_t=max_steps(spec), grace_period=sched.grace_period,
                      reduction_factor=sched.reduction_factor,
                      stop_last_trials=False)  # a trial's last probe must not stop its evaluation
        if sched.name == "asha" else FIFOScheduler()
    )  # fmt: skip
    trainable = tune.with_parameters(
        _trainable, spec_data=spec.to_dict(), run_dir=str(run_dir), data_root=str(data_root)
    )
    resources = {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu}
    tuner = tune.Tuner(
        tune.with_resources(trainable, resources),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
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
