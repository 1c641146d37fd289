"""Score one model as the paper does: FID, image-text score, AMD, extracted images, denoising strength.

Every metric comes with a 95% interval (docs/metrics.md, "Intervals"): generated samples are grouped by
prompt, and an interval resamples or deletes whole prompts, never single generated images (duplicated
images would form cliques in the attack and shrink FID's covariance). FID and KID are measured against
held-out real images (`split`, never the training set: copying training images would lower a
training-set FID), with a reference at least `reference_ratio` times the generated sample count, and
with the noise floor of that reference beside them: FID between two disjoint sets of real held-out
images of the generated set's size, what FID looks like when nothing is wrong.

The evaluation runs in stages (capsearch.metrics.stages: samples → attack → strength), each only when a
metric of the table needs it, then computes every metric of the table (capsearch.metrics.table) from
what the stages left in the context; a metric with its own pass over the model makes it in its hook.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from capsearch.atomic import atomic_target
from capsearch.faults import maybe_fail
from capsearch.metrics.caption_table import CAPTION_TABLE, save_caption_table
from capsearch.metrics.context import MODEL, SAMPLES, STAGES
from capsearch.metrics.memorised_grid import MEMORISED_GRID, save_memorised_grid
from capsearch.metrics.stages import PASSES, prepare
from capsearch.metrics.table import METRICS, needed_stages
from capsearch.models.precision import resolve_sampling_precision
from capsearch.models.sampling import sampling_precision, save_grid
from capsearch.settings import EvalSettings

__all__ = ["EvalSettings", "evaluate", "scalar_metrics"]


def _interval(low: float, high: float) -> list[float]:
    return [float(low), float(high)]


def scalar_metrics(metrics: dict) -> dict[str, float]:
    """The finite-or-not numbers of an evaluation's metrics (no intervals, settings or lists)."""
    return {
        k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def evaluate(
    pipe: Any,
    data_root: Path | str,
    config: EvalSettings | None = None,
    out_dir: Path | None = None,
    progress: bool = False,
) -> dict:
    """Evaluate a pipeline against a dataset folder; write metrics.json, samples.png and (after an
    attack) memorised.png and memorisation.csv to out_dir."""
    config = config or EvalSettings()
    t0 = time.time()

    def log(msg: str) -> None:
        if progress:
            print(f"  eval: {msg} ({time.time() - t0:.0f} s)", flush=True)

    precision = resolve_sampling_precision(config.precision, cuda=pipe.device.type == "cuda")
    ctx = prepare(pipe, data_root, config)
    needed = needed_stages(METRICS) | {
        SAMPLES
    }  # samples.png and the noise floor come from the samples
    with sampling_precision(precision):
        for stage in STAGES:
            if stage in needed:
                log(PASSES[stage](pipe, ctx))
                ctx.ran.add(stage)
    metrics: dict[str, Any] = {}
    intervals: dict[str, list[float]] = {}
    for metric in METRICS:
        if metric.compute is None or not set(metric.needs) <= ctx.ran | {MODEL}:
            continue
        measured = metric.compute(ctx)
        if measured is None:  # nothing to measure it on here: left out, not set to 0
            continue
        metrics[metric.name] = measured.value
        metrics.update(measured.extra)
        if measured.interval is not None:
            intervals[metric.name] = _interval(*measured.interval)
    log("metrics done")
    metrics["intervals"] = intervals
    metrics["noise_floor"] = ctx.noise_floor
    attacked = {"attack_prompts": len(ctx.attack_prompts)} if ctx.extraction is not None else {}
    metrics["settings"] = {
        **config.model_dump(),
        "precision": precision,  # what auto resolved to on this machine
        "world": ctx.world,
        "extractor": ctx.extractor.name,
        "extraction_threshold": ctx.threshold,
        "extraction_guidance": ctx.attack_guidance,
        "prompts": len(ctx.prompts),
        "samples": len(ctx.gen),
        "memorised_prompts": len(ctx.memorised),
        "reference_images": len(ctx.ref_feats),
        "train_images": len(ctx.train_feats),
        **attacked,
        "seconds": round(time.time() - t0, 1),
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_target(out / "metrics.json") as tmp:
            tmp.write_text(json.dumps(metrics, indent=2))
            maybe_fail(out.name, "metrics")  # tests only: an injected fault (capsearch.faults)
        save_grid(ctx.gen[:32], out / "samples.png", nrow=8, captions=ctx.gen_prompts[:32])
        extracted = {pair[0] for pair in metrics.get("extracted_pairs", [])}
        save_memorised_grid(ctx, extracted, out / MEMORISED_GRID)
        save_caption_table(ctx, out / CAPTION_TABLE)  # per attacked caption, beside the grid
    return metrics
