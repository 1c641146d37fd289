"""Each baseline's learning rate, chosen on a seed that none of the paper tables uses.

Usage:
    python experiments/rate_sweep.py --out experiments/results/rate_sweep --methods full,attention \
        --threads 1        # one process per core; the two halves of the sweep side by side
    python experiments/rate_sweep.py --out experiments/results/rate_sweep --summary

For each method and rate: the baseline of `--spec` (the method on the whole UNet), with the spec's
schedule (cosine to 0, warm-up) shortened to `--steps`, trained on the spec's data drawn with `--seed`;
then the probe's held-out diffusion loss (capsearch.training.probe: fixed held-out images, noise and timesteps,
the same for every run) together with the memorisation signals the probe also measures, at every quarter
of the schedule (the curve is kept: a rate that diverges shows it, and at the tables' own length it ends
high, so it is not chosen). The rate with the lowest held-out loss at the end is the method's; while that is the highest (lowest) rate tried, the grid is
extended by one more step of √10 (`--rates METHOD=RATE,...` runs extra rates). A short proxy: the
cost is stated in docs/results.md.
Each run writes RUN/<method>_<rate>.json as soon as it finishes; runs already there are skipped.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from capsearch.config import load_spec
from capsearch.models.load import load_pipeline
from capsearch.search.inputs import prepare_data
from capsearch.search.trial import build_plan
from capsearch.training.loop import finetune

RATES = {
    "full": [1e-4, 3e-4, 1e-3],
    "attention": [1e-4, 3e-4, 1e-3],
    "difffit": [1e-3, 3e-3, 1e-2],
    "svdiff": [1e-3, 3e-3, 1e-2],
}
PEFT_RATE_IN_ENTRIES = (
    "difffit",
    "svdiff",
    "lora",
)  # these carry their rate in their method entries


def sweep_one(spec, method: str, rate: float, steps: int, out: Path, data: Path) -> dict:
    plan = build_plan(spec, spec.baseline(method).params, method, 0, out)
    quarter = steps // 4 if steps % 4 == 0 else steps  # probes at every quarter of the schedule
    train = plan.train.model_copy(
        update={"steps": steps, "probe_every": quarter, "checkpoint_every": 0}
    )
    if method in PEFT_RATE_IN_ENTRIES:
        entries = [dict(e, lr=rate) if "lr" in e else e for e in plan.method_spec]
    else:
        entries, train = plan.method_spec, train.model_copy(update={"lr": rate})
    pipe = load_pipeline(plan.model)
    started = time.time()
    result = finetune(pipe, entries, data, train, quiet=True)
    if result.status != "ok":
        raise SystemExit(f"{method} at {rate:g}: training ended {result.status}: {result.message}")
    probe = result.probes[-1]
    return {
        "method": method,
        "lr": rate,
        "steps": steps,
        "seed": spec.train.seed,
        "data_seed": spec.data.phantom.seed,
        "trainable": result.trainable,
        "final_loss": result.final_loss,
        **{
            k: probe.get(k)
            for k in ("heldout_loss", "train_loss", "loss_gap", "strength_ratio", "probe_score")
        },
        "probes": [[p["step"], p.get("heldout_loss")] for p in result.probes],
        "minutes": round((time.time() - started) / 60, 2),
    }


def summary(out: Path) -> dict:
    rows = [
        json.loads(p.read_text()) for p in sorted(out.glob("*_*.json")) if p.name != "chosen.json"
    ]
    chosen = {}
    print(f"{'method':<10} {'lr':>8} {'held-out loss':>14} {'gap':>8} {'strength':>9} {'min':>6}")
    for method in RATES:
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["lr"])
        mine = [r for r in mine if r["steps"] == max(x["steps"] for x in mine)]
        if not mine:
            continue
        best = min(mine, key=lambda r: r["heldout_loss"])
        chosen[method] = best["lr"]
        for r in mine:
            mark = "  <- chosen" if r is best else ""
            print(f"{method:<10} {r['lr']:>8.0e} {r['heldout_loss']:>14.5f} {r['loss_gap']:>8.4f} "
                  f"{r['strength_ratio']:>9.3f} {r['minutes']:>6.1f}{mark}")  # fmt: skip
    (out / "chosen.json").write_text(json.dumps(chosen, indent=2) + "\n")
    return chosen


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", default="experiments/paper_regime.yaml")
    ap.add_argument(
        "--seed", type=int, default=11, help="data, training and probe seed (not a table seed)"
    )
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--methods", default=",".join(RATES))
    ap.add_argument("--rates", help="METHOD=RATE[,RATE...]: run these rates instead of the grid")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=Path("experiments/results/rate_sweep"))
    ap.add_argument("--summary", action="store_true", help="print the table and write chosen.json")
    args = ap.parse_args()
    if args.summary:
        summary(args.out)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = load_spec(args.spec, [f"data.phantom.seed={args.seed}", f"train.seed={args.seed}"])
    args.out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(spec, args.out)
    plan = {m: RATES[m] for m in args.methods.split(",")}
    if args.rates:
        method, _, rates = args.rates.partition("=")
        plan = {method: [float(r) for r in rates.split(",")]}
    for method, rates in plan.items():
        for rate in rates:
            path = args.out / f"{method}_{rate:g}.json"
            if path.exists():
                continue
            row = sweep_one(spec, method, rate, args.steps, args.out, data)
            print(json.dumps(row), flush=True)
            path.write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
