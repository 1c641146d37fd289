"""The final stage: baselines and the top searched trials re-evaluated on fresh seeds, on another split.

The search picks trials on one evaluation (the validate split, one sampling seed); a winner chosen on
the evaluation it was searched on is partly chosen for its noise. After the search, every baseline and
the `final.top_k` searched trials with the highest search reward are evaluated again from their saved
deltas (no retraining) on the test split, with the final stage's own sampling seed and sample counts.
A finalist whose delta is gone (a run resumed from its records, kept without weights) is trained again
from its record first (capsearch.retrain), and its final result says so.
Each finalist's `trials/tNNN/final/` holds that evaluation's metrics.json, samples.png and result.json;
the report's best trial and `capsearch export --trial best` come from it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from capsearch.constraints import Constraints
from capsearch.errors import UserError
from capsearch.metrics.table import column_metrics
from capsearch.runs import FINAL_DIR, RESULT_FILE, load_trials, rank_key, record_value, write_json
from capsearch.settings import EvalSettings

if TYPE_CHECKING:
    from capsearch.config import Spec

# Metrics whose intervals the report compares between the best trial and each baseline, with the
# direction that is better: the results tables' columns (capsearch.metrics.table).
COMPARED = {m.name: m.direction for m in column_metrics() if m.direction is not None}


def finalists(
    records: list[dict[str, Any]], top_k: int, constraints: Constraints | None = None
) -> list[dict[str, Any]]:
    """Every successful baseline, then the top_k successful searched trials by search reward (those
    within the spec's constraints on the search's evaluation first: capsearch.constraints)."""
    ok = [r for r in records if r.get("status") == "ok" and record_value(r, "reward") is not None]
    baselines = [r for r in ok if r.get("baseline")]
    searched = sorted(
        (r for r in ok if not r.get("baseline")),
        key=lambda r: (*rank_key(r, constraints), r.get("number", 0)),
    )
    return baselines + searched[:top_k]


def final_dir(record: dict[str, Any]) -> Path:
    """The folder of a trial's final re-evaluation."""
    return Path(record["dir"]) / FINAL_DIR


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


def reevaluate(job: FinalJob, record: dict[str, Any], data_root: Path) -> dict:
    """Evaluate one finished trial again from its delta with the final stage's settings; record it."""
    import torch

    from capsearch.delta import load_delta
    from capsearch.metrics.evaluate import evaluate, scalar_metrics
    from capsearch.models import load_pipeline
    from capsearch.reward import compute_reward

    delta = Path(record["dir"]) / "delta"
    retrained = None
    if not (delta / "delta.safetensors").is_file():  # resumed from records kept without weights
        from capsearch.retrain import retrain_delta

        # the retraining keeps its own seconds: `seconds` below stays the evaluation's
        retrained = retrain_delta(record, data_root)
    started = time.time()
    pipe = load_pipeline(job.model)
    pipe.unet = load_delta(pipe.unet, delta)
    if job.gpu > 0 and torch.cuda.is_available():
        pipe.to("cuda")
    settings = job.settings
    out = final_dir(record)
    metrics = evaluate(pipe, data_root, settings, out_dir=out)
    scalars = scalar_metrics(metrics)
    scalars["trainable_pct"] = record.get("metrics", {}).get("trainable_pct")
    result = {
        "trial": record.get("trial"),
        "split": settings.split,
        "seed": settings.seed,
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
    write_json(out / RESULT_FILE, result)
    return result


def _task(job: FinalJob, record: dict, data_root: str) -> dict:
    """A Ray task: one re-evaluation in a worker process."""
    import torch

    torch.set_num_threads(job.threads)
    try:
        return reevaluate(job, record, Path(data_root))
    except UserError as exc:
        return {"trial": record.get("trial"), "error": str(exc)}


def final_todo(spec: Spec, run_dir: Path) -> list[dict[str, Any]]:
    """The finalists still without a final result (none when the final stage is off)."""
    if not spec.final.enabled:
        return []
    chosen = finalists(load_trials(run_dir), spec.final.top_k, spec.objective.constraints)
    return [r for r in chosen if not (final_dir(r) / RESULT_FILE).is_file()]


def run_final_stage(spec: Spec, run_dir: Path, data_root: Path, console: Any = None) -> list[dict]:
    """Re-evaluate the finalists that have no final result yet (in Ray tasks when Ray is up)."""
    todo = final_todo(spec, run_dir)
    if not todo:
        return []
    chosen = finalists(load_trials(run_dir), spec.final.top_k, spec.objective.constraints)
    if console is not None:
        console.print(
            f"final stage: re-evaluating {len(todo)} of {len(chosen)} finalists on the "
            f"{spec.final.split} split, seed {spec.final.seed} "
            f"({spec.final.samples(spec.evaluate)} samples each)"
        )
    import ray

    job = FinalJob.of(spec, run_dir)
    if not ray.is_initialized():
        return [reevaluate(job, r, data_root) for r in todo]
    remote = ray.remote(num_cpus=spec.resources.cpu, num_gpus=spec.resources.gpu)(_task)
    pending = {remote.remote(job, r, str(data_root)): r for r in todo}
    results = []
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        record = pending.pop(done[0])
        result = ray.get(done[0])
        results.append(result)
        if console is not None:
            name = Path(record["dir"]).name
            what = result.get("error") or f"reward {result.get('reward', float('nan')):.3f}"
            if result.get("retrained"):  # its delta was gone: trained again from its record first
                again = result["retrained"]
                same = "identical to" if again["identical"] else "differs from"
                what += f"; trained again from its record, {again['steps']} steps, {same} it"
            console.print(f"  final {name}: {what} ({len(results)}/{len(todo)})")
    return results


def separation(best: dict[str, Any], other: dict[str, Any], metric: str) -> str:
    """Whether best's 95% interval lies wholly on the better side of other's: better, worse or overlap."""
    a = (best.get("intervals") or {}).get(metric)
    b = (other.get("intervals") or {}).get(metric)
    if not a or not b:
        return "n/a"
    better_low = COMPARED[metric] == "max"
    if (a[0] > b[1]) if better_low else (a[1] < b[0]):
        return "better"
    if (a[1] < b[0]) if better_low else (a[0] > b[1]):
        return "worse"
    return "overlap"
