"""How the attack's sampling settings change what a memorising model gives away.

Usage: python experiments/memorisation_sweep.py --run experiments/results/memorisation_cosine
       [--guidance 1 3 7.5] [--steps 20 50] [--n 16]
Reads RUN/model (saved by experiments/memorisation_regime.py) and RUN/data; for each guidance × DDIM
steps: the share of memorised-caption samples nearest to their own training image, the share within
the copy threshold, the median tiled distance, the extraction attack's count and Wen et al.'s denoising
strength on memorised against as many other training captions (4 trajectories each). Writes RUN/sweep.json
and RUN/sweep_samples.png (for each guidance of the first --steps value, four memorised captions: a row
of their training image, then seven samples).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from capsearch.datasets.folder import load_images, read_metadata
from capsearch.metrics.memorisation import memorisation_probe, memorised_captions
from capsearch.models.load import load_pipeline
from capsearch.models.sampling import generate, save_grid


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0, 7.5])
    ap.add_argument("--steps", type=int, nargs="+", default=[20])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = args.run / "data"
    records = [r for r in read_metadata(data) if r["split"] == "train"]
    memorised, own_rows, _ = memorised_captions(records)
    train = load_images(data, "train", 32)
    pipe = load_pipeline(str(args.run / "model"))
    rows, grid = [], []
    for steps in args.steps:
        for guidance in args.guidance:
            probe = memorisation_probe(
                pipe, data, n=args.n, steps=steps, guidance=guidance, strength_n=4
            )
            row = {"steps": steps, "guidance": guidance}
            row.update((k, v) for k, v in probe.items() if k not in ("extracted_pairs", "settings"))
            rows.append(row)
            print(json.dumps(row), flush=True)
            if steps == args.steps[0]:
                images = generate(pipe, memorised[:4], 7, steps=steps, guidance=guidance, seed=0)
                for k, caption in enumerate(memorised[:4]):
                    grid.append(train[min(own_rows[caption])])
                    grid.extend(images[k * 7 : (k + 1) * 7])
    (args.run / "sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
    save_grid(torch.stack(grid), args.run / "sweep_samples.png", nrow=8)
    print(f"wrote {args.run / 'sweep.json'} and sweep_samples.png")


if __name__ == "__main__":
    main()
