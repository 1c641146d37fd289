"""The final stage: baselines and the top searched trials re-evaluated on fresh seeds, on another split.

The search picks trials on one evaluation (the validate split, one sampling seed); a winner chosen on
the evaluation it was searched on is partly chosen for its noise. After the search, every baseline and
the `final.top_k` searched trials with the highest search reward are evaluated again from their saved
deltas (no retraining) on the test split, with the final stage's own sampling seed and sample counts.
Each finalist's `trials/tNNN/final/` holds that evaluation's metrics.json, samples.png and result.json;
the report's best trial and `capsearch export --trial best` come from it.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from capsearch.errors import UserError
from capsearch.metrics.table import column_metrics
from capsearch.runs import FINAL_DIR, RESULT_FILE, load_trials, write_json

if TYPE_CHECKING:
    from capsearch.config import Spec

# Metrics whose intervals the report compares between the best trial and each baseline, with the
# direction that is better: the results tables' columns (capsearch.metrics.table).
COMPARED = {m.name: m.direction for m in column_metrics() if m.direction is not None}


def _reward(record: dict[str, Any]) -> float | None:
    value = record.get("reward")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def finalists(records: list[dict[str, Any]], top_k: int) -> list[dict[str, Any]]:
    """Every successful baseline, then the top_k successful searched trials by search reward."""
    ok = [r for r in records if r.get("status") == "ok" and _reward(r) is not None]
    baselines = [r for r in ok if r.get("baseline")]
    searched = sorted(
        (r for r in ok if not r.get("baseline")), key=lambda r: (-_reward(r), r.get("number", 0))
    )
    return baselines + searched[:top_k]


def final_dir(record: dict[str, Any]) -> Path:
    """The folder of a trial's final re-evaluation."""
    return Path(record["dir"]) / FINAL_DIR


def reevaluate(spec: Spec, record: dict[str, Any], data_root: Path, run_dir: Path) -> dict:
    """Evaluate one finished trial again from its delta with the final stage's settings; record it."""
    import torch

    from capsearch.delta import load_delta
    from capsearch.metrics.evaluate import evaluate, scalar_metrics
    from capsearch.models import load_pipeline
    from capsearch.reward import compute_reward

    delta = Path(record["dir"]) / "delta"
    if not (delta / "delta.safetensors").is_file():
        raise UserError(f"trial {Path(record['dir']).name} has no delta to re-evaluate ({delta})")
    started = time.time()
    pipe = load_pipeline(spec.model)
    pipe.unet = load_delta(pipe.unet, delta)
    if spec.resources.gpu > 0 and torch.cuda.is_available():
        pipe.to("cuda")
    settings = spec.final.settings(spec.evaluate)
    settings = settings.model_copy(
        update={"cache_dir": settings.cache_dir or str(Path(run_dir) / "cache")}
    )
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
    try:
        result["reward"] = compute_reward(result["metrics"], spec.objective.weights.model_dump())
    except ValueError as exc:
        result["error"] = f"no reward: {exc}"
    write_json(out / RESULT_FILE, result)
    return result


def _task(spec_data: dict, record: dict, data_root: str, run_dir: str, threads: int) -> dict:
    """A Ray task: one re-evaluation in a worker process."""
    import torch

    from capsearch.config import spec_from_dict

    torch.set_num_threads(threads)
    spec = spec_from_dict(spec_data, source="spec.yaml")
    try:
        return reevaluate(spec, record, Path(data_root), Path(run_dir))
    except UserError as exc:
        return {"trial": record.get("trial"), "error": str(exc)}


def run_final_stage(spec: Spec, run_dir: Path, data_root: Path, console: Any = None) -> list[dict]:
    """Re-evaluate the finalists that have no final result yet (in Ray tasks when Ray is up)."""
    if not spec.final.enabled:
        return []
    chosen = finalists(load_trials(run_dir), spec.final.top_k)
    todo = [r for r in chosen if not (final_dir(r) / RESULT_FILE).is_file()]
    if not todo:
        return []
    if console is not None:
        console.print(
            f"final stage: re-evaluating {len(todo)} of {len(chosen)} finalists on the "
            f"{spec.final.split} split, seed {spec.final.seed} "
            f"({spec.final.samples(spec.evaluate)} samples each)"
        )
    import ray

    if not ray.is_initialized():
        return [reevaluate(spec, r, data_root, run_dir) for r in todo]
    remote = ray.remote(num_cpus=spec.resources.cpu, num_gpus=spec.resources.gpu)(_task)
    pending = {
        remote.remote(spec.to_dict(), r, str(data_root), str(run_dir), spec.resources.cpu): r
        for r in todo
    }
    results = []
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        record = pending.pop(done[0])
        result = ray.get(done[0])
        results.append(result)
        if console is not None:
            name = Path(record["dir"]).name
            what = result.get("error") or f"reward {result.get('reward', float('nan')):.3f}"
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
