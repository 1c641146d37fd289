"""One training step of the tiny UNet (batch 16, AdamW, 32×32, text encoder frozen) on this machine.

Usage: python experiments/benchmarks/bench_step.py [--repeats 15]
Target (issue: tiny architecture): ≤ 0.6 s per step on 2 CPU cores. Prints the median and the ratio to it.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from capsearch.models.load import load_pipeline


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    pipe = load_pipeline("tiny:random")
    unet = pipe.unet.train().requires_grad_(True)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(args.batch_size, 1, 32, 32, generator=g) * 2 - 1
    ehs = pipe.encode_prompts(["a small bright circle in the centre"] * args.batch_size)
    times = []
    for i in range(args.repeats + 3):
        t0 = time.perf_counter()
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (args.batch_size,), generator=g)
        loss = F.mse_loss(
            unet(pipe.scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=ehs).sample, noise
        )
        loss.backward()
        opt.step()
        opt.zero_grad()
        if i >= 3:  # warm-up steps excluded
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    n = sum(p.numel() for p in unet.parameters())
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print(
        f"tiny UNet {n / 1e6:.2f}M params, batch {args.batch_size}, 32x32: median {med:.3f} s/step (min {min(times):.3f}, max {max(times):.3f})"
    )
    print(f"ratio to the 0.6 s target: {med / 0.6:.2f} ({'meets' if med <= 0.6 else 'misses'} it)")


if __name__ == "__main__":
    main()
