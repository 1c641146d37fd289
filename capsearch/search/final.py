"""The final stage: baselines and the top searched trials re-evaluated on fresh seeds, on another split.

The search picks trials on one evaluation (the validate split, one sampling seed); a winner chosen on
the evaluation it was searched on is partly chosen for its noise. After the search, every baseline and
the `final.top_k` searched trials with the highest search reward are evaluated again from their saved
deltas (no retraining) on the test split, with the final stage's own sampling seed and sample counts.
A finalist whose delta is gone (a run resumed from its records, kept without weights) is trained again
from its record first (capsearch.search.retrain), and its final result says so.
Each finalist's `trials/tNNN/final/` holds that evaluation's metrics.json, samples.png and result.json;
the report's best trial and `capsearch export --trial best` come from it.

With `final.train_seeds`, every finalist that trains anything is also trained again on each of those
seeds (same plan and data, another initialisation, batch order and noise: capsearch.search.retrain) into
`trials/tNNN/final_seedS/` and evaluated there like its `final/`; the best trial is then chosen on the
final reward averaged over its seeds (capsearch.search.choice.final_choice), so that the choice does not
rest on the one training it was searched with; with constraints, among the finalists within them on
every seed's evaluation (the extraction bound pooled over the seeds: capsearch.search.choice). Freeze
trains nothing, so its seed changes nothing: it keeps its one evaluation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from capsearch.errors import UserError
from capsearch.metrics.evaluate import evaluate, scalar_metrics
from capsearch.models.delta import load_delta
from capsearch.models.load import load_pipeline
from capsearch.progress import running_bar, trial_progress
from capsearch.search.constraints import Constraints
from capsearch.search.records import FinalResult, SeedResult, TrialRecord
from capsearch.search.retrain import RETRAIN_DIR, retrain_delta, trains_nothing
from capsearch.search.reward import compute_reward
from capsearch.search.runs import (
    FINAL_DIR,
    FINAL_SEED_DIR,
    RESULT_FILE,
    load_trials,
    rank_key,
    write_record,
)
from capsearch.settings import EvalSettings

if TYPE_CHECKING:
    from capsearch.config import Spec


def finalists(
    records: list[TrialRecord], top_k: int, constraints: Constraints | None = None
) -> list[TrialRecord]:
    """Every successful baseline, then the top_k successful searched trials by search reward (those
    within the spec's constraints on the search's evaluation first: capsearch.search.constraints)."""
    ok = [r for r in records if r.status == "ok" and r.value("reward") is not None]
    baselines = [r for r in ok if r.baseline]
    searched = sorted(
        (r for r in ok if not r.baseline), key=lambda r: (*rank_key(r, constraints), r.number)
    )
    return baselines + searched[:top_k]


def final_text(spec: Spec) -> str:
    """What the final stage does, in one line (`capsearch validate`)."""
    f = spec.final
    if not f.enabled:
        return "off (the best trial is chosen on the search's own evaluation)"
    text = (f"the baselines and the {f.top_k} best searched trials re-evaluated on the {f.split} "
            f"split, sampling seed {f.seed}")  # fmt: skip
    if f.train_seeds:
        seeds = ", ".join(map(str, f.train_seeds))
        text += f", each also trained on seed(s) {seeds}; the best chosen on the mean"
        if spec.objective.constraints:
            text += " among those within the constraints on every seed"
    return text


def final_dir(record: TrialRecord, seed: int | None = None) -> Path:
    """The folder of a trial's final re-evaluation (trained again on `seed`, if given)."""
    return record.folder / (FINAL_DIR if seed is None else FINAL_SEED_DIR.format(seed))


@dataclass(frozen=True)
class FinalJob:
    """What every re-evaluation of one final stage shares, built once from the spec in the driver."""

    model: str
    settings: EvalSettings
    reward_weights: dict[str, float]
    gpu: float
    threads: int

    @classmethod
    def of(cls, spec: Spec, run_dir: Path) -> FinalJob:
        """The final stage's job: the search's evaluation with the final stage's overrides."""
        settings = spec.final.settings(spec.evaluate)
        cache = settings.cache_dir or str(Path(run_dir) / "cache")
        return cls(spec.model, settings.model_copy(update={"cache_dir": cache}),
                   spec.objective.weights.model_dump(), spec.resources.gpu,
                   spec.resources.cpu)  # fmt: skip


@dataclass(frozen=True)
class FailedReevaluation:
    """A re-evaluation that ended in a UserError in its Ray task (nothing was written for it)."""

    trial: str
    error: str


def reevaluate(
    job: FinalJob, record: TrialRecord, data_root: Path, seed: int | None = None
) -> FinalResult | SeedResult:
    """Evaluate one finished trial again from its delta with the final stage's settings; record it.
    With `seed`, the trial is first trained again on that training seed (final.train_seeds)."""

    out = final_dir(record, seed)
    delta = (record.folder if seed is None else out) / "delta"
    retrained = None
    if not (delta / "delta.safetensors").is_file():  # another seed, or records kept without weights
        # the retraining keeps its own seconds: `seconds` below stays the evaluation's
        retrained = retrain_delta(record, data_root, delta.parent, seed)
    started = time.time()
    pipe = load_pipeline(job.model)
    pipe.unet = load_delta(pipe.unet, delta)
    if job.gpu > 0 and torch.cuda.is_available():
        pipe.to("cuda")
    settings = job.settings
    metrics = evaluate(pipe, data_root, settings, out_dir=out)
    scalars = scalar_metrics(metrics)
    scalars["trainable_pct"] = record.metrics.get("trainable_pct")
    result = {
        "trial": record.trial,
        "split": settings.split,
        "seed": settings.seed,
        **({} if seed is None else {"train_seed": seed}),
        "metrics": {k: v for k, v in scalars.items() if v is not None},
        "intervals": metrics["intervals"],
        "noise_floor": metrics["noise_floor"],
        "seconds": round(time.time() - started, 1),
    }
    if retrained is not None:
        result["retrained"] = retrained
    try:
        result["reward"] = compute_reward(result["metrics"], job.reward_weights)
    except ValueError as exc:
        result["error"] = f"no reward: {exc}"
    return write_record(out / RESULT_FILE, result, FinalResult if seed is None else SeedResult)


def _task(
    job: FinalJob, record: TrialRecord, data_root: str, seed: int | None = None
) -> FinalResult | SeedResult | FailedReevaluation:
    """A Ray task: one re-evaluation in a worker process."""
    torch.set_num_threads(job.threads)
    try:
        return reevaluate(job, record, Path(data_root), seed)
    except UserError as exc:
        return FailedReevaluation(record.trial, str(exc))


def final_todo(spec: Spec, run_dir: Path) -> list[tuple[TrialRecord, int | None]]:
    """The finalists' re-evaluations still without a result, as (record, training seed: None for the
    trial's own training, else one of final.train_seeds); none when the final stage is off."""
    if not spec.final.enabled:
        return []
    chosen = finalists(load_trials(run_dir), spec.final.top_k, spec.objective.constraints)
    todo = []
    for r in chosen:
        seeds = [] if trains_nothing(r) else spec.final.train_seeds
        todo += [(r, s) for s in (None, *seeds) if not (final_dir(r, s) / RESULT_FILE).is_file()]
    return todo


def run_final_stage(
    spec: Spec, run_dir: Path, data_root: Path, console: Any = None
) -> list[FinalResult | SeedResult | FailedReevaluation]:
    """Re-evaluate the finalists that have no final result yet (in Ray tasks when Ray is up)."""
    todo = final_todo(spec, run_dir)
    if not todo:
        return []
    chosen = finalists(load_trials(run_dir), spec.final.top_k, spec.objective.constraints)
    if console is not None:
        seeds = spec.final.train_seeds
        also = f"; each also trained again on seed(s) {', '.join(map(str, seeds))}" if seeds else ""
        console.print(
            f"final stage: {len(todo)} re-evaluation(s) of {len(chosen)} finalists on the "
            f"{spec.final.split} split, seed {spec.final.seed} "
            f"({spec.final.samples(spec.evaluate)} samples each){also}"
        )
    # lazy: Ray loads only where trials run, not for `capsearch validate`
    import ray

    job = FinalJob.of(spec, run_dir)
    if not ray.is_initialized():
        return [reevaluate(job, r, data_root, s) for r, s in todo]
    remote = ray.remote(num_cpus=spec.resources.cpu, num_gpus=spec.resources.gpu)(_task)
    pending = {remote.remote(job, r, str(data_root), s): (r, s) for r, s in todo}
    results = []
    bar = _StageBar(console, len(todo)) if console is not None else None
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=2.0 if bar else None)
            if not done:  # still running: the retrainings' steps on the bar
                if bar is not None:
                    bar.running(pending.values())
                continue
            record, seed = pending.pop(done[0])
            result = ray.get(done[0])
            results.append(result)
            if bar is not None:
                name = final_dir(record, seed).relative_to(record.folder.parent)
                bar.done(f"  final {name}: {_outcome(result)} ({len(results)}/{len(todo)})")
    finally:
        if bar is not None:
            bar.stop()
    return results


def retraining_progress(record: TrialRecord, seed: int | None) -> str | None:
    """`tNNN retraining step/total rate it/s` while a finalist is trained again for the final stage
    (capsearch.search.retrain's log), None when it is not being retrained (or not yet)."""
    folder = record.folder if seed is None else final_dir(record, seed)
    what = "retraining" if seed is None else f"training on seed {seed}"
    return trial_progress(folder / RETRAIN_DIR, name=f"{record.folder.name} {what}")


class _StageBar:
    """The final stage's progress: re-evaluations done, and each running retraining's step and rate."""

    def __init__(self, console: Any, total: int) -> None:
        self.bar, self.task = running_bar("final", total, console)

    def running(self, pending: Any) -> None:
        lines = [retraining_progress(record, seed) for record, seed in pending]
        self.bar.update(self.task, running="  ".join(line for line in lines if line))

    def done(self, line: str) -> None:
        self.bar.console.print(line, highlight=False)
        self.bar.advance(self.task)

    def stop(self) -> None:
        self.bar.stop()


def _outcome(result: FinalResult | SeedResult | FailedReevaluation) -> str:
    """One re-evaluation's line: its reward or error, and what was trained for it."""
    if isinstance(result, FailedReevaluation):
        return result.error
    reward = result.reward if result.reward is not None else float("nan")
    what = result.error or f"reward {reward:.3f}"
    again = result.retrained
    if again is not None and again.seed is not None:  # final.train_seeds: another seed first
        what += f"; trained on seed {again.seed}, {again.steps} steps"
    elif again is not None:  # its delta was gone: trained again from its record first
        same = "identical to" if again.identical else "differs from"
        what += f"; trained again from its record, {again.steps} steps, {same} it"
    if again is not None and again.went_on_from_step is not None:  # cut short earlier
        what += f" (went on from its checkpoint at step {again.went_on_from_step})"
    return what
