"""Cost of the broad pretraining corpus: rendering its pool, and one pretraining step, against shapes.

Usage: python experiments/benchmarks/bench_corpus.py [--images 1000 --batch 64 --steps 4 --rounds 3]
Renders `--images` images of each family and of each corpus in one process (caches warmed first), then
times pretraining steps (text encoder + UNet forward and backward, AdamW, as capsearch.training.pretrain
does) on one torch thread, drawing batches from a shapes pool and a broad pool in alternated rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F

from capsearch.models.load import tiny_random
from capsearch.training.pretrain import corpus_pool
from capsearch.worlds.corpus import FAMILIES, make_corpus
from capsearch.worlds.shapes import make_shapes


def render_rates(n: int) -> dict[str, float]:
    """Images per second of each family and of each corpus, one process."""
    for render in FAMILIES.values():  # warm the report bank, lung masks and fonts
        render(np.random.default_rng(0), 32)
    rates = {}
    for name, render in FAMILIES.items():
        rng = np.random.default_rng(1)
        t0 = time.perf_counter()
        for _ in range(n):
            render(rng, 32)
        rates[name] = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    make_shapes(n, 32, seed=1)
    rates["corpus shapes"] = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    make_corpus(n, 32, seed=1)
    rates["corpus broad"] = n / (time.perf_counter() - t0)
    return {k: round(v, 1) for k, v in rates.items()}


def step_seconds(batch: int, steps: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per pretraining step on each corpus's pool, one thread, alternated rounds."""
    torch.set_num_threads(1)
    pipe = tiny_random(0)
    unet, text_encoder = pipe.unet.train(), pipe.text_encoder.train()
    text_encoder.requires_grad_(True)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.01)
    alphas = pipe.scheduler.alphas_cumprod
    pools = {}
    for corpus in ("shapes", "broad"):
        images, captions = corpus_pool(corpus, 512, 32, seed=0)
        pools[corpus] = (images, pipe.tokenize(captions))
    gen = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {c: [] for c in pools}
    for _ in range(rounds):
        for corpus, (images, ids) in pools.items():
            for k in range(steps + 1):  # the first step of each round warms up, untimed
                t0 = time.perf_counter()
                idx = torch.randint(0, len(images), (batch,), generator=gen)
                x0, noise = images[idx], torch.randn(batch, 1, 32, 32, generator=gen)
                t = torch.randint(0, 1000, (batch,), generator=gen)
                a = alphas[t].view(-1, 1, 1, 1)
                pred = unet(
                    a.sqrt() * x0 + (1 - a).sqrt() * noise,
                    t,
                    encoder_hidden_states=text_encoder(ids[idx])[0],
                ).sample
                loss = F.mse_loss(pred, noise)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                if k:
                    times[corpus].append(time.perf_counter() - t0)
    return times


def main() -> None:
    """Print render rates and step times as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    out: dict = {"cpu": platform.processor() or platform.machine(), "load": os.getloadavg()}
    out["images_per_second"] = render_rates(args.images)
    times = step_seconds(args.batch, args.steps, args.rounds)
    out["batch"] = args.batch
    out["step_seconds"] = {
        c: {"median": round(float(np.median(v)), 3), "min": round(min(v), 3), "n": len(v)}
        for c, v in times.items()
    }
    out["load_after"] = os.getloadavg()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
