"""Positive control: how long must full fine-tuning run on the duplicated subset before images are extracted?

Usage: python experiments/memorisation_regime.py --steps 1500 --every 250 --out experiments/results/memorisation
Full fine-tuning of the shipped tiny base on phantoms whose memorisation subset is duplicated K times with
unique captions. Every `--every` steps: the extraction attack on the memorised captions and Wen et al.'s
denoising strength on memorised against other captions. Prints one line per checkpoint; writes results.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from capsearch.data import load_images, read_metadata
from capsearch.metrics import PHANTOM_THRESHOLD, extraction_attack
from capsearch.metrics.denoising import denoising_strength_per_prompt
from capsearch.models import load_pipeline
from capsearch.train import TrainConfig, finetune
from capsearch.worlds.phantom import write_phantom_dataset


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--every", type=int, default=250)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--patients", type=int, default=80)
    ap.add_argument("--dup-fraction", type=float, default=0.05)
    ap.add_argument("--dup-copies", type=int, default=20)
    ap.add_argument("--n", type=int, default=16, help="generations per memorised prompt")
    ap.add_argument("--out", type=Path, default=Path("experiments/results/memorisation"))
    args = ap.parse_args()
    data = args.out / "data"
    if not (data / "metadata.jsonl").exists():
        write_phantom_dataset(
            data,
            patients=args.patients,
            size=64,
            seed=11,
            dup_fraction=args.dup_fraction,
            dup_copies=args.dup_copies,
        )
    records = [r for r in read_metadata(data) if r["split"] == "train"]
    memorised = sorted({r["text"] for r in records if r.get("dup_group") is not None})
    others = sorted({r["text"] for r in records if r.get("dup_group") is None})[: len(memorised)]
    train_images = load_images(data, "train", 32)
    print(f"{len(records)} training rows, {len(memorised)} memorised captions", flush=True)
    pipe = load_pipeline("tiny")
    results, t0 = [], time.time()

    def checkpoint(event: str, payload: dict) -> None:
        if event != "step" or payload["step"] % args.every:
            return
        ext = extraction_attack(
            pipe,
            memorised,
            train_images,
            n_per_prompt=args.n,
            threshold=PHANTOM_THRESHOLD,
            min_clique=3,
            steps=20,
        )
        kw = dict(steps=20, n=2)
        s_mem = float(denoising_strength_per_prompt(pipe, memorised, **kw).mean())
        s_oth = float(denoising_strength_per_prompt(pipe, others, **kw).mean())
        row = {
            "step": payload["step"],
            "loss": payload["loss"],
            "extracted": ext.count,
            "of": len(memorised),
            "strength_memorised": s_mem,
            "strength_other": s_oth,
            "ratio": s_mem / s_oth,
            "minutes": round((time.time() - t0) / 60, 1),
        }
        results.append(row)
        print(json.dumps(row), flush=True)
        (args.out / "results.json").write_text(
            json.dumps(
                {"args": {k: str(v) for k, v in vars(args).items()}, "rows": results}, indent=2
            )
        )

    cfg = TrainConfig(
        steps=args.steps, lr=args.lr, warmup_steps=50, lr_schedule="constant_with_warmup"
    )
    finetune(
        pipe, [{"method": "full", "units": "*"}], data, cfg, callbacks=[checkpoint], quiet=True
    )


if __name__ == "__main__":
    main()
