"""Acceptance check for the tiny base: does DiffFit reach a phantom FID within 2× of full fine-tuning?

Usage: python experiments/difffit_vs_full.py --steps 400 --out experiments/results/difffit_vs_full
Fine-tunes the shipped tiny base with each method for the same number of steps on the same phantom data,
evaluates each (and the frozen base) with the same settings and prints a table; writes results.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from capsearch.metrics.evaluate import EvalSettings, evaluate
from capsearch.models.load import load_pipeline
from capsearch.training.loop import TrainSettings, finetune
from capsearch.worlds.phantom import write_phantom_dataset

RUNS = {
    "freeze": ([{"method": "freeze"}], 1e-4),
    "full": ([{"method": "full", "units": "*"}], 1e-4),
    "difffit": (
        [{"method": "difffit", "units": "*"}],
        1e-3,
    ),  # DiffFit uses ~10x the full-FT rate (Xie et al.)
    "svdiff": ([{"method": "svdiff", "units": "*"}], 1e-3),
    "attention": ([{"method": "attention", "units": "*"}], 1e-4),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--patients", type=int, default=300)
    ap.add_argument("--methods", default="freeze,full,difffit,svdiff,attention")
    ap.add_argument("--out", type=Path, default=Path("experiments/results/difffit_vs_full"))
    ap.add_argument(
        "--lr", action="append", default=[], metavar="METHOD=LR", help="override a method's rate"
    )
    ap.add_argument("--tag", default="", help="suffix of the result names (e.g. _lr3e-3)")
    args = ap.parse_args()
    lrs = {k: float(v) for k, v in (item.split("=") for item in args.lr)}
    data = args.out / "data"
    if not (data / "metadata.jsonl").exists():
        # held-out patients for a FID reference of 4x the 128 samples (never the training images)
        write_phantom_dataset(data, patients=args.patients, size=64, seed=0, held_out_images=512)
    ecfg = EvalSettings(
        n_prompts=32, n_per_prompt=4, extraction_prompts=4, extraction_n=8, strength_prompts=4
    )
    results = {}
    for name in args.methods.split(","):
        spec, lr = RUNS[name]
        lr = lrs.get(name, lr)
        pipe = load_pipeline("tiny")
        t0 = time.time()
        steps = 1 if name == "freeze" else args.steps
        res = (
            finetune(
                pipe, spec, data, TrainSettings(steps=steps, lr=lr, caption_dropout=0.0), quiet=True
            )
            if name != "freeze"
            else None
        )
        m = evaluate(pipe, data, ecfg, out_dir=args.out / (name + args.tag))
        results[name + args.tag] = {
            "fid": m["fid"],
            "amd": m["amd"],
            "alignment": m["alignment"],
            "lr": lr,
            "steps": 0 if res is None else res.steps,
            "final_loss": None if res is None else res.final_loss,
            "trainable": 0 if res is None else res.trainable,
            "seconds": round(time.time() - t0, 1),
        }
        print(name + args.tag, json.dumps(results[name + args.tag]), flush=True)
        old = (
            json.loads((args.out / "results.json").read_text())
            if (args.out / "results.json").exists()
            else {}
        )
        (args.out / "results.json").write_text(json.dumps({**old, **results}, indent=2))
    everything = json.loads((args.out / "results.json").read_text())
    if "full" in everything and "difffit" + args.tag in everything:
        ratio = everything["difffit" + args.tag]["fid"] / everything["full"]["fid"]
        print(f"DiffFit / full FID ratio: {ratio:.2f} (target ≤ 2)")


if __name__ == "__main__":
    main()
