"""fp32 against bf16 sampling for one evaluation of a fixed model, side by side: time and every metric.

Usage: python experiments/benchmarks/bench_eval_precision.py RUN [--trial t000] [--seeds 0,1,2]
       [--workers 2] [--out DIR]
Evaluates one finished trial of RUN (its delta on its base, RUN/data) with the final stage's settings
of RUN's spec, once per sampling seed in fp32 (`evaluate.precision: no`) and once in bf16 autocast, in
`--workers` processes of one torch thread each; the precisions alternate across seeds and workers so
that a busy machine slows both alike. Prints each metric per seed, and the rule fixed before the runs
(docs/benchmarks.md, "Evaluation in bf16"): for every metric and seed, |bf16 − fp32| on the same
sampling seed is at most fp32's range over the seeds (max − min), the sampling noise of that metric on
that model; then the speed ratio, fp32 seconds / bf16 seconds. `--out` writes the table and the
per-evaluation metrics as JSON. Needs a CPU with native bf16.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import tempfile
from pathlib import Path

import torch

from capsearch.config import load_spec
from capsearch.metrics.evaluate import evaluate, scalar_metrics
from capsearch.models.delta import load_delta
from capsearch.models.load import load_pipeline
from capsearch.models.precision import cpu_has_bf16
from capsearch.search.final import FinalJob

# The metrics the rule compares: every scalar a table or the reward reads.
METRICS = ("fid", "kid", "amd", "alignment", "extracted", "nearest_own", "strength_ratio",
           "membership_auc")  # fmt: skip


def one(job: tuple[str, str, str, int]) -> dict:
    """One evaluation in a worker: (run folder, trial, precision, sampling seed) → scalars, seconds."""
    run, trial, precision, seed = job
    torch.set_num_threads(1)
    run_dir = Path(run)
    spec = load_spec(run_dir / "spec.yaml")
    job_settings = FinalJob.of(spec, run_dir).settings
    settings = job_settings.model_copy(update={"precision": precision, "seed": seed})
    pipe = load_pipeline(spec.model)
    pipe.unet = load_delta(pipe.unet, run_dir / "trials" / trial / "delta")
    with tempfile.TemporaryDirectory() as tmp:
        metrics = evaluate(pipe, run_dir / "data", settings, out_dir=Path(tmp))
    return {"precision": precision, "seed": seed, "seconds": metrics["settings"]["seconds"],
            "metrics": scalar_metrics(metrics)}  # fmt: skip


def verdict(results: list[dict], seeds: list[int]) -> tuple[list[str], bool]:
    """The table (one line per metric) and whether every metric passes the rule on every seed."""
    by = {(r["precision"], r["seed"]): r["metrics"] for r in results}
    lines, passed = [], True
    for name in METRICS:
        fp32 = [by[("no", s)].get(name) for s in seeds]
        bf16 = [by[("bf16", s)].get(name) for s in seeds]
        if any(v is None for v in fp32 + bf16):
            lines.append(f"{name:15s} not measured on this model")
            continue
        spread = max(fp32) - min(fp32)
        worst = max(abs(b - f) for b, f in zip(bf16, fp32, strict=True))
        ok = worst <= spread
        passed &= ok
        pairs = "  ".join(f"{f:.4g}/{b:.4g}" for f, b in zip(fp32, bf16, strict=True))
        lines.append(f"{name:15s} fp32/bf16 per seed {pairs}   max |Δ| {worst:.4g} vs fp32 range "
                     f"{spread:.4g}: {'within' if ok else 'OUTSIDE'}")  # fmt: skip
    return lines, passed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--trial", default="t000")
    ap.add_argument("--seeds", default="1000,1001,1002")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if not cpu_has_bf16():
        raise SystemExit("this CPU has no native bf16: bf16 sampling is refused here")
    seeds = [int(s) for s in args.seeds.split(",")]
    delta = args.run / "trials" / args.trial / "delta"
    if not (delta / "delta.safetensors").is_file():
        raise SystemExit(f"{delta} holds no delta: give a finished trial of a run with its weights")
    # alternate the precisions so that each worker runs both and each seed's pair starts apart
    jobs = []
    for i, seed in enumerate(seeds):
        pair = [("no", seed), ("bf16", seed)]
        jobs += pair if i % 2 == 0 else pair[::-1]
    jobs = [(str(args.run), args.trial, p, s) for p, s in jobs]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}; {args.run} {args.trial}, seeds {seeds}, "
          f"{args.workers} worker(s) of one thread", flush=True)  # fmt: skip
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        results = []
        for r in pool.imap_unordered(one, jobs):
            results.append(r)
            print(f"  {r['precision']:4s} seed {r['seed']}: {r['seconds']:.1f} s", flush=True)
    lines, passed = verdict(results, seeds)
    fp32_s = sum(r["seconds"] for r in results if r["precision"] == "no")
    bf16_s = sum(r["seconds"] for r in results if r["precision"] == "bf16")
    lines.append(f"rule: {'PASSED' if passed else 'FAILED'} (every metric, every seed)")
    lines.append(f"speed: fp32 {fp32_s:.0f} s / bf16 {bf16_s:.0f} s = {fp32_s / bf16_s:.2f}")
    print("\n".join(lines))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_eval_precision.txt").write_text("\n".join(lines) + "\n")
        (args.out / "bench_eval_precision.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
