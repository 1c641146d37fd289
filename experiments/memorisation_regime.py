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

import torch

from capsearch.data import load_images, read_metadata
from capsearch.metrics import PHANTOM_THRESHOLD, extraction_attack
from capsearch.metrics.denoising import denoising_strength_per_prompt
from capsearch.metrics.extraction import _nearest_training
from capsearch.models import load_pipeline
from capsearch.sample import generate
from capsearch.train import TrainConfig, finetune
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
    memorised = sorted({r["text"] for r in records if r.get("dup_group") is not None})
    others = sorted({r["text"] for r in records if r.get("dup_group") is None})[: len(memorised)]
    train_images = load_images(data, "train", 32)
    if len(train_images) != len(records):
        raise SystemExit("some training images are unreadable; regenerate the data folder")
    # Training rows of each memorised caption (its K identical files).
    own_rows = {c: {i for i, r in enumerate(records) if r["text"] == c} for c in memorised}
    print(f"{len(records)} training rows, {len(memorised)} memorised captions", flush=True)
    pipe = load_pipeline("tiny")
    results, t0 = [], time.time()

    def checkpoint(event: str, payload: dict) -> None:
        if event != "step" or payload["step"] % args.every:
            return
        # Generate once; the attack and the nearest-neighbour diagnostics read the same images.
        images = generate(
            pipe, memorised, n_per_prompt=args.n, steps=20, guidance=args.guidance, seed=0
        )
        dist, idx = _nearest_training(images, train_images, tiles=4)
        owner = [c for c in memorised for _ in range(args.n)]
        own = [int(t) in own_rows[c] for c, t in zip(owner, idx.tolist(), strict=True)]
        copies = (dist <= PHANTOM_THRESHOLD).tolist()
        other_imgs = generate(
            pipe, others, n_per_prompt=max(2, args.n // 2), steps=20, guidance=args.guidance, seed=1
        )
        other_dist, _ = _nearest_training(other_imgs, train_images, tiles=4)
        cached = {tuple(memorised): images}
        ext = extraction_attack(
            lambda prompts, n, seed: cached[tuple(prompts)],
            memorised,
            train_images,
            n_per_prompt=args.n,
            threshold=PHANTOM_THRESHOLD,
            min_clique=3,
            batch_size=len(memorised) * args.n,
        )
        kw = dict(steps=20, n=2, guidance=args.guidance)
        s_mem = float(denoising_strength_per_prompt(pipe, memorised, **kw).mean())
        s_oth = float(denoising_strength_per_prompt(pipe, others, **kw).mean())
        row = {
            "step": payload["step"],
            "loss": payload["loss"],
            "extracted": ext.count,
            "of": len(memorised),
            # share of memorised-caption samples whose nearest training image is their own image
            "nearest_own": sum(own) / len(own),
            # share of samples within the copy threshold of a training image (their own one)
            "copies_memorised": sum(c and o for c, o in zip(copies, own, strict=True)) / len(own),
            "copies_other": float((other_dist <= PHANTOM_THRESHOLD).float().mean()),
            "median_dist_memorised": float(dist.median()),
            "median_dist_other": float(other_dist.median()),
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
        steps=args.steps,
        lr=args.lr,
        warmup_steps=50,
        lr_schedule=args.schedule,
        mitigations=(
            [{"name": "caption_dropout", "p": args.caption_dropout}] if args.caption_dropout else []
        ),
    )
    if args.every and args.steps % args.every:
        raise SystemExit("--steps must be a multiple of --every")
    finetune(
        pipe, [{"method": "full", "units": "*"}], data, cfg, callbacks=[checkpoint], quiet=True
    )
    pipe.save(args.out / "model")  # the final model, for sweeps of the attack's settings


if __name__ == "__main__":
    main()
