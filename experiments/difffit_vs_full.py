"""Acceptance check for the tiny base: does DiffFit reach a phantom FID within 2× of full fine-tuning?

Usage: python experiments/difffit_vs_full.py --steps 400 --out experiments/results/difffit_vs_full
Each method is one trial of the library (`capsearch.search.trial.run_trial`: the shipped tiny base, the
method on the whole UNet, fine-tuned for the same number of steps on the same phantom data, evaluated with
the same settings; the frozen base too), its record in OUT/trials/tNNN/. Prints a table and writes the
summary OUT/results.json (FID, AMD, image-text score, rate, steps, final loss, trainable, seconds).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from capsearch.config import ObjectiveSpec
from capsearch.search.trial import TrialPlan, run_trial
from capsearch.settings import EvalSettings, TrainSettings
from capsearch.worlds.phantom import write_phantom_dataset

RUNS = {
    "freeze": ([{"method": "freeze"}], 1e-4),
    "full": ([{"method": "full", "units": "*"}], 1e-4),
    "difffit": ([{"method": "difffit", "units": "*"}], 1e-3),  # ~10x full FT's rate (Xie et al.)
    "svdiff": ([{"method": "svdiff", "units": "*"}], 1e-3),
    "attention": ([{"method": "attention", "units": "*"}], 1e-4),
}


def plan(number: int, name: str, lr: float, steps: int, evaluate: EvalSettings) -> TrialPlan:
    """The trial of one method: its entries on the whole UNet at `lr` for `steps`, no caption dropout."""
    spec, _ = RUNS[name]
    return TrialPlan(
        number=number,
        baseline=name,
        params={},
        model="tiny",
        method_spec=spec,
        groups={"unet": name},
        train=TrainSettings(steps=steps, lr=lr, caption_dropout=0.0),
        evaluate=evaluate,
        cpu=torch.get_num_threads(),
        gpu=0,
        reward_weights=ObjectiveSpec().weights.model_dump(),
        report_probes=False,
    )


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
    ap.add_argument("--n-prompts", type=int, default=32, help="held-out prompts (4 samples each)")
    args = ap.parse_args()
    lrs = {k: float(v) for k, v in (item.split("=") for item in args.lr)}
    data = args.out / "data"
    if not (data / "metadata.jsonl").exists():
        # held-out patients for a FID reference of 4x the 128 samples (never the training images)
        write_phantom_dataset(data, patients=args.patients, size=64, seed=0, held_out_images=512)
    evaluate = EvalSettings(n_prompts=args.n_prompts, n_per_prompt=4, extraction_prompts=4,
                            extraction_n=8, strength_prompts=4)  # fmt: skip
    summary = args.out / "results.json"
    results = json.loads(summary.read_text()) if summary.exists() else {}
    trials = args.out / "trials"
    first = len(list(trials.glob("t*"))) if trials.is_dir() else 0
    for number, name in enumerate(args.methods.split(","), start=first):
        lr = lrs.get(name, RUNS[name][1])
        record = run_trial(plan(number, name, lr, args.steps, evaluate), args.out, data)
        if record.status != "ok":
            raise SystemExit(f"{name}: {record.status}: {record.error}")
        m = record.metrics
        results[name + args.tag] = {
            "fid": m["fid"], "amd": m["amd"], "alignment": m["alignment"], "lr": lr,
            "steps": record.steps, "final_loss": record.final_loss,
            "trainable": record.trainable, "seconds": record.seconds, "trial": record.trial,
        }  # fmt: skip
        print(name + args.tag, json.dumps(results[name + args.tag]), flush=True)
        summary.write_text(json.dumps(results, indent=2))
    if "full" in results and "difffit" + args.tag in results:
        ratio = results["difffit" + args.tag]["fid"] / results["full"]["fid"]
        print(f"DiffFit / full FID ratio: {ratio:.2f} (target ≤ 2)")


if __name__ == "__main__":
    main()
