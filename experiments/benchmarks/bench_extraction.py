"""Cost of the extraction attack with the shipped tiny base, and of the ways tried to make sampling cheaper.

Usage: python experiments/benchmarks/bench_extraction.py [--prompts 4 --n 50 --steps 20] [--variants]
Target (issue: evaluation): 50 generations × 100 prompts within minutes on 2 CPU cores. Runs the attack
on `--prompts` prompts × `--n` generations (guided DDIM, 32 px) and projects the time of 100 prompts from
the measured seconds per generated image. `--variants` also times one guided UNet call (batch 128 =
64 samples × 2) in fp32, fp32 channels-last, bf16 autocast and torch.compile side by side and prints each
one's speed relative to fp32 eager in the same run.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import time

import torch

from capsearch.metrics import PHANTOM_THRESHOLD, extraction_attack
from capsearch.models.load import load_pipeline
from capsearch.worlds.phantom import write_phantom_dataset


def attack_cost(pipe, prompts: int, n: int, steps: int, train: torch.Tensor) -> tuple[float, dict]:
    """Seconds per generated image of one attack run, and its settings."""
    captions = [f"patient {i}: small left pleural effusion" for i in range(prompts)]
    t0 = time.perf_counter()
    result = extraction_attack(
        pipe, captions, train, n_per_prompt=n, threshold=PHANTOM_THRESHOLD, steps=steps
    )
    seconds = time.perf_counter() - t0
    return seconds / (prompts * n), {**result.settings, "wall_seconds": round(seconds, 1)}


def bookkeeping(prompts: int = 100, n: int = 50) -> float:
    """Seconds of the attack's own work (tiled distances, cliques, matching) on 100 × 50 near-copies."""
    gen = torch.Generator().manual_seed(13)
    train = torch.rand(500, 1, 32, 32, generator=gen) * 2 - 1

    def copier(captions: list[str], n_per_prompt: int, seed: int) -> torch.Tensor:
        rows = [int(c.split()[-1]) for c in captions]
        noise = 0.05 * torch.randn(len(rows) * n_per_prompt, 1, 32, 32, generator=gen)
        return (train[rows].repeat_interleave(n_per_prompt, dim=0) + noise).clamp(-1, 1)

    t0 = time.perf_counter()
    result = extraction_attack(
        copier, [f"image {k}" for k in range(prompts)], train, n_per_prompt=n, min_clique=10
    )
    if result.count != prompts:
        raise SystemExit(f"bookkeeping check failed: {result.count} of {prompts} copies extracted")
    return time.perf_counter() - t0


def variants(pipe, rounds: int = 3) -> dict[str, float]:
    """Best-of-rounds seconds of one guided UNet call per variant (same inputs)."""
    unet = pipe.unet.eval()
    x = torch.randn(128, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    ehs = pipe.encode_prompts(["small left pleural effusion"] * 128)
    t = torch.tensor(500)
    channels_last = copy.deepcopy(unet).to(memory_format=torch.channels_last)
    compiled = torch.compile(unet)
    runs = {
        "fp32 eager": (unet, x, False),
        "fp32 channels-last": (
            channels_last,
            x.contiguous(memory_format=torch.channels_last),
            False,
        ),
        "bf16 autocast": (unet, x, True),
        "torch.compile (inductor)": (compiled, x, False),
    }
    best: dict[str, float] = {}
    with torch.no_grad():
        for model, inp, bf16 in runs.values():  # warm-up (compiles once)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                model(inp, t, encoder_hidden_states=ehs)
        for _ in range(rounds):
            for name, (model, inp, bf16) in runs.items():
                t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    model(inp, t, encoder_hidden_states=ehs)
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--variants", action="store_true")
    args = ap.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    pipe = load_pipeline("tiny")
    import tempfile

    from capsearch.datasets.folder import load_images

    with tempfile.TemporaryDirectory() as tmp:
        write_phantom_dataset(tmp, patients=40, size=32, seed=0)
        train = load_images(tmp, "train", 32)
    per_image, settings = attack_cost(pipe, args.prompts, args.n, args.steps, train)
    projected = per_image * 100 * 50
    print(f"attack: {settings['n_generated']} images, {args.steps} guided DDIM steps: "
          f"{settings['wall_seconds']} s, {per_image * 1000:.0f} ms per image")  # fmt: skip
    print(f"projected 100 prompts × 50 generations: {projected / 60:.1f} min")
    print(
        f"the attack's own work on 100 × 50 near-copies: {bookkeeping():.2f} s (100/100 extracted)"
    )
    if args.variants:
        best = variants(pipe)
        base = best["fp32 eager"]
        for name, seconds in best.items():
            print(f"{name:26s} {seconds:.3f} s per guided call, speed ×{base / seconds:.2f}")


if __name__ == "__main__":
    main()
