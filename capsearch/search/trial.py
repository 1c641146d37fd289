"""One trial: its plan → apply methods → fine-tune → evaluate → record.

A `TrialPlan` is everything a trial runs: method entries, training settings (mitigations included),
evaluation settings, seeds, model and resources. The search builds it once, in the driver, from the spec
and the parameters Optuna proposes (`build_plan`, which validates it); the plan travels to the Ray worker
as plain data and is written once, as the trial's `params.json`. Any failure of a trial is recorded in
its `result.json`, never raised into the search.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from capsearch.config import load_spec
from capsearch.errors import UserError
from capsearch.methods import apply_methods
from capsearch.metrics.evaluate import evaluate, scalar_metrics
from capsearch.metrics.table import METRICS
from capsearch.models.delta import load_delta, save_delta
from capsearch.models.load import load_pipeline
from capsearch.search.records import RECORD_VERSION, TrialRecord
from capsearch.search.reward import compute_reward
from capsearch.search.runs import PARAMS_FILE, RESULT_FILE, load_trials, trial_dir, write_record
from capsearch.search.space import (
    FROZEN,
    group_choices,
    params_to_method_spec,
    params_to_mitigations,
    params_to_train,
)
from capsearch.settings import EvalSettings, Strict, TrainSettings, same_training
from capsearch.training.loop import finetune

if TYPE_CHECKING:
    from capsearch.config import Spec

# What a finished trial reports to Ray (and Optuna's user attributes): every table metric, the reward.
REPORTED = (*(m.name for m in METRICS), "reward")
TRAIN_FILE = "train_result.json"  # capsearch.training.loop.finetune's record of one fine-tune
PROBE_KEYS = (
    "probe_score",
    "heldout_loss",
    "train_loss",
    "loss_gap",
    "strength_ratio",
    "own_share",
)


class TrialPlan(Strict):
    """Everything one trial runs, built and validated once (build_plan), serialisable as JSON."""

    number: int
    baseline: str | None = None
    params: dict[str, Any]  # Optuna's parameters, as proposed
    model: str
    method_spec: list[dict[str, Any]]  # method entries for capsearch.methods.apply_methods
    groups: dict[str, str]  # each unit group's method as short text, for tables
    train: TrainSettings
    evaluate: EvalSettings
    cpu: int
    gpu: float
    reward_weights: dict[str, float]
    report_probes: bool  # probes go to the scheduler (ASHA never sees a baseline's)
    # The checkpoint of an interrupted trial with this very plan (resumable_checkpoint): training goes on
    # from its step instead of step 0.
    resume_from: str | None = None
    # A searched trial enqueued again because trial `retry_of` was interrupted (same parameters).
    retry_of: int | None = None
    # A finished trial of a `search.reuse` run with this very training (reusable_trial): its delta and
    # training record stand in for training.
    reuse_from: str | None = None


def build_plan(
    spec: Spec, params: dict[str, Any], baseline: str | None, number: int, run_dir: Path
) -> TrialPlan:
    """The plan of trial `number`: the spec's settings with the trial's parameters applied."""
    space = spec.search_space
    train = spec.train.model_dump()
    train.update(params_to_train(params, space))
    if baseline:
        train.update(spec.baseline(baseline).train)
    # The spec's mitigations of every trial, then the chosen one (caption dropout stays its own field).
    train["mitigations"] = params_to_mitigations(params, space, train["mitigations"])
    settings = TrainSettings.parse(train, "train")  # its mitigations too: one line if one is twice
    evaluate = spec.evaluate.model_copy(
        update={"cache_dir": spec.evaluate.cache_dir or str(Path(run_dir) / "cache")}
    )
    return TrialPlan(
        number=number,
        baseline=baseline,
        params=dict(params),
        model=spec.model,
        method_spec=params_to_method_spec(params, space),
        groups=group_choices(params, space),
        train=settings,
        evaluate=evaluate,
        cpu=spec.resources.cpu,
        gpu=spec.resources.gpu,
        reward_weights=spec.objective.weights.model_dump(),
        report_probes=not baseline or spec.search.scheduler.name == "fifo",
    )


def trains_alike(record: TrialRecord, plan: dict[str, Any]) -> bool:
    """Whether a trial record trained exactly as a plan (as JSON) would: model, method spec, settings."""
    same = record.model == plan["model"] and record.method_spec == plan["method_spec"]
    return same and same_training(record.train or {}, plan["train"])


def resumable_checkpoint(run_dir: Path, plan: TrialPlan) -> str | None:
    """The newest checkpoint of an interrupted trial that ran exactly this plan's training, if any.

    A resumed search enqueues an interrupted baseline again as a new trial (a new number and folder);
    with a checkpoint of the same method spec and training settings, it goes on from there.
    """
    mine = plan.model_dump(mode="json")
    found = None
    for record in load_trials(run_dir, finished_only=False):
        ckpt = record.folder / "checkpoint"
        same = record.baseline == mine["baseline"] and trains_alike(record, mine)
        if record.status == "interrupted" and same and ckpt.is_dir():
            found = str(ckpt)
    return found


def reusable_trial(spec: Spec, plan: TrialPlan) -> str | None:
    """A finished trial of a `search.reuse` run that trained exactly this plan: its folder, if any.

    Same model, data spec, method spec and training settings, status ok, its delta and training record
    kept: the trial takes that delta instead of training (run_trial) and is evaluated under this run's
    settings. A reuse folder that holds no such trial is passed over (the trial then trains). A relative
    reuse folder is taken from the current folder, and the trial folder returned is absolute.
    """
    mine = plan.model_dump(mode="json")
    for folder in map(Path, spec.search.reuse):
        other = load_spec(folder / "spec.yaml", check_model=False)  # checked by check_inputs
        if other.model != spec.model or other.data.model_dump() != spec.data.model_dump():
            continue
        for record in load_trials(folder):
            kept = all((record.folder / f).exists() for f in (TRAIN_FILE, "delta"))
            if record.status == "ok" and trains_alike(record, mine) and kept:
                # absolute: a trial's worker may run in another folder (Ray Tune moves it to its own)
                return str(record.folder.resolve())
    return None


def run_trial(
    plan: TrialPlan,
    run_dir: Path,
    data_root: Path,
    report: Callable[[dict], None] | None = None,
) -> TrialRecord:
    """Fine-tune, evaluate and score one planned trial; any failure is recorded, never raised."""

    folder = trial_dir(run_dir, plan.number)
    folder.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(plan.cpu)
    record: dict[str, Any] = {
        "version": RECORD_VERSION,
        "trial": folder.name,
        **plan.model_dump(mode="json"),
        "status": "running",
        "started": time.time(),
        "node": _ray_node(),  # the Ray node it ran on (a cluster joined with --address has several)
    }
    started = time.time()
    try:
        write_record(folder / PARAMS_FILE, record)
        record.update(_train_and_evaluate(plan, folder, data_root, report))
    except UserError as exc:
        record.update(status="error", error=str(exc))
    except Exception as exc:  # a failing trial must not stop the search: record it and move on
        record.update(status="error", error=f"{type(exc).__name__}: {exc}")
        with contextlib.suppress(OSError):  # a full disk: the record below matters more
            (folder / "error.txt").write_text(traceback.format_exc())
    record["seconds"] = round(time.time() - started, 1)
    if record["status"] == "ok":
        try:
            record["reward"] = compute_reward(record["metrics"], plan.reward_weights)
        except ValueError as exc:
            record.update(status="error", error=f"no reward: {exc}")
    return write_record(folder / RESULT_FILE, record)


def _ray_node() -> str | None:
    """The ID of the Ray node this process runs on; None outside Ray."""
    try:
        import ray  # lazy: a trial run outside a search (experiments) needs no Ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # an old or odd runtime context: the record does without it
        return None


def failed_record(
    name: str, number: int, baseline: str | None, params: dict[str, Any], error: str
) -> dict[str, Any]:
    """The record of a trial whose plan could not be built (its parameters recorded as proposed)."""
    return {"version": RECORD_VERSION, "trial": name, "number": number, "baseline": baseline,
            "params": params, "status": "error", "error": error}  # fmt: skip


def _train_and_evaluate(plan: TrialPlan, folder: Path, data_root: Path, report) -> dict[str, Any]:
    pipe = load_pipeline(plan.model)
    if plan.gpu > 0 and torch.cuda.is_available():
        pipe.to("cuda")
    total = sum(p.numel() for p in pipe.unet.parameters())
    out: dict[str, Any] = {"total": total, "trainable": 0, "steps": 0}
    entries = plan.method_spec
    if all(e["method"] in FROZEN for e in entries):  # Freeze: the base model as it is, no training
        save_frozen_delta(pipe, folder, plan.model)
    elif plan.reuse_from:
        out.update(_reuse_training(pipe, Path(plan.reuse_from), folder))
    else:

        def on_event(event: str, payload: dict) -> None:
            if report is not None and plan.report_probes and event == "probe":
                if "probe_score" in payload:
                    probe = {k: payload[k] for k in PROBE_KEYS if k in payload}
                    report({"training_step": payload["step"], **probe})

        resume = _take_checkpoint(plan, folder)
        result = finetune(pipe, entries, data_root, plan.train, callbacks=[on_event],
                          out_dir=folder, resume=resume, quiet=True)  # fmt: skip
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
    started = time.time()
    metrics = evaluate(pipe, data_root, plan.evaluate, out_dir=folder)
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


def save_frozen_delta(pipe: Any, folder: Path, model: str) -> None:
    """Freeze's delta in folder/delta: the base model as it is, nothing trained."""
    applied = apply_methods(pipe.unet, [{"method": "freeze", "units": []}])
    save_delta(pipe.unet, folder / "delta", applied=applied, base_model=model)


def _reuse_training(pipe: Any, source: Path, folder: Path) -> dict[str, Any]:
    """Take a finished trial's delta and training record instead of training; what it trained."""

    shutil.copytree(source / "delta", folder / "delta", dirs_exist_ok=True)
    for name in (TRAIN_FILE, "train_log.jsonl"):
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)
    pipe.unet = load_delta(pipe.unet, folder / "delta")
    trained = json.loads((folder / TRAIN_FILE).read_text())
    return {
        "trainable": trained["trainable"],
        "steps": trained["steps"],
        "train_seconds": trained["seconds"],
        "final_loss": trained["final_loss"],
        "mitigation_counts": trained["mitigation_counts"],
    }


def _take_checkpoint(plan: TrialPlan, folder: Path) -> bool:
    """Copy the interrupted trial's checkpoint into this trial's folder; whether there is one to resume."""
    own = folder / "checkpoint"
    if own.is_dir():
        return True
    if plan.resume_from and Path(plan.resume_from).is_dir():
        shutil.copytree(plan.resume_from, own)
        return True
    return False


def final_result(record: TrialRecord) -> dict[str, Any]:
    """What a trial reports to Ray when it ends: status, finite metrics and reward, error line."""
    out: dict[str, Any] = {
        "status": record.status,
        "trial": record.trial,
        "training_step": record.steps or 0,
    }
    for key in REPORTED:
        value = record.value(key)
        if value is not None:
            out[key] = value
    if record.error:
        out["error"] = record.error.splitlines()[0][:300]
    return out
