"""Positive control: how long must full fine-tuning run on the duplicated subset before images are extracted?

Usage: python experiments/memorisation_regime.py --steps 1500 --every 250 --out experiments/results/memorisation
Full fine-tuning of the shipped tiny base on phantoms whose memorisation subset is duplicated K times with
unique captions. Every `--every` steps, `capsearch.metrics.memorisation.memorisation_probe`: the
extraction attack on the memorised captions, how close their samples come to their own image, and Wen et
al.'s denoising strength on memorised against other captions. Prints one line per checkpoint; writes
results.json and, at the end, the model (RUN/model, for experiments/memorisation_sweep.py).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from capsearch.datasets.folder import read_metadata
from capsearch.metrics.memorisation import memorisation_probe, memorised_captions
from capsearch.models.load import load_pipeline
from capsearch.training.loop import TrainSettings, finetune
from capsearch.worlds.phantom import write_phantom_dataset


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--every", type=int, default=250)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument(
        "--schedule",
        default="constant_with_warmup",
        help="any diffusers scheduler name (cosine: decays to 0 at --steps)",
    )
    ap.add_argument("--guidance", type=float, default=3.0, help="guidance of the attack's samples")
    ap.add_argument(
        "--caption-dropout",
        type=float,
        default=0.0,
        help="train on the empty caption with this probability (as Stable Diffusion was)",
    )
    ap.add_argument("--patients", type=int, default=80)
    ap.add_argument("--dup-fraction", type=float, default=0.05)
    ap.add_argument("--dup-copies", type=int, default=20)
    ap.add_argument("--n", type=int, default=16, help="generations per memorised prompt")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=Path("experiments/results/memorisation"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
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
    memorised, _, _ = memorised_captions(records)
    print(f"{len(records)} training rows, {len(memorised)} memorised captions", flush=True)
    pipe = load_pipeline("tiny")
    results, t0 = [], time.time()

    def checkpoint(event: str, payload: dict) -> None:
        if event != "step" or payload["step"] % args.every:
            return
        probe = memorisation_probe(
            pipe, data, n=args.n, guidance=args.guidance, strength_n=2, other_n=max(2, args.n // 2)
        )
        row = {
            "step": payload["step"],
            "loss": payload["loss"],
            **{k: v for k, v in probe.items() if k not in ("extracted_pairs", "settings")},
            "minutes": round((time.time() - t0) / 60, 1),
        }
        results.append(row)
        print(json.dumps(row), flush=True)
        (args.out / "results.json").write_text(
            json.dumps(
                {"args": {k: str(v) for k, v in vars(args).items()}, "rows": results}, indent=2
            )
        )

    cfg = TrainSettings(
        steps=args.steps,
        lr=args.lr,
        warmup_steps=50,
        lr_schedule=args.schedule,
        caption_dropout=args.caption_dropout,
    )
    if args.every and args.steps % args.every:
        raise SystemExit("--steps must be a multiple of --every")
    finetune(
        pipe, [{"method": "full", "units": "*"}], data, cfg, callbacks=[checkpoint], quiet=True
    )
    pipe.save(args.out / "model")  # the final model, for sweeps of the attack's settings


if __name__ == "__main__":
    main()
