"""`capsearch.training.loop.finetune` against a plain diffusers-style loop, side by side in one process; per-method cost.

Usage: python experiments/benchmarks/bench_finetune.py [--steps 30] [--methods full,attention,difffit,svdiff,lora]
The plain loop is written the way diffusers' examples/text_to_image/train_text_to_image.py trains (tokenise,
encode, add_noise, UNet, MSE, AdamW) on the same tiny model, data and batch. The two alternate in rounds so
that machine noise hits both alike. Target: finetune/plain steps-per-second ratio ≥ 0.95.
Per method: median step time and the process's peak RSS growth, each method in a fresh subprocess.

`--cache`: instead, `finetune` with its frozen encodings cached (`train.cache_encodings`, the default)
against encoding every step, same steps and data (caption dropout 0.1, as trials train), rounds
alternated and the order flipped each round; prints the cached/per-step steps-per-second ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def plain_loop(pipe, images, captions, steps: int, batch: int, seed: int) -> float:
    """A diffusers-example-style loop; returns steps per second."""
    unet = pipe.unet.train().requires_grad_(True)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(images), (batch,), generator=g)
        x0 = images[idx]
        with torch.no_grad():
            ehs = pipe.text_encoder(pipe.tokenize([captions[i] for i in idx]))[0]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        pred = unet(pipe.scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=ehs).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    return steps / (time.perf_counter() - t0)


def capsearch_loop(
    data, steps: int, batch: int, seed: int, spec=None, cache: bool = True, dropout: float = 0.0
) -> float:
    from capsearch.models.load import load_pipeline
    from capsearch.training.loop import TrainSettings, finetune

    pipe = load_pipeline("tiny:random")
    cfg = TrainSettings(steps=steps, batch_size=batch, seed=seed, caption_dropout=dropout,
                        cache_encodings=cache)  # fmt: skip
    res = finetune(pipe, spec or [{"method": "full", "units": "*"}], data, cfg, quiet=True)
    return res.steps / res.seconds  # the loop's own time: set-up (and a VAE's encoding) not counted


def cache_rounds(data, steps: int, rounds: int, batch: int = 16) -> None:
    """finetune with cached encodings against encoding every step, rounds alternated."""
    rates: dict[bool, list[float]] = {True: [], False: []}
    for r in range(rounds):
        for cache in (True, False) if r % 2 == 0 else (False, True):
            rates[cache].append(capsearch_loop(data, steps, batch, r, cache=cache, dropout=0.1))
        print(f"round {r}: cached {rates[True][-1]:.2f} steps/s, "
              f"encoding every step {rates[False][-1]:.2f} steps/s")  # fmt: skip
    ratio = sum(rates[True]) / sum(rates[False])
    print(f"cached / encoding every step, steps-per-second ratio: {ratio:.3f}")
    from capsearch.datasets.folder import ImageCaptionDataset
    from capsearch.models.load import load_pipeline

    pipe = load_pipeline("tiny:random")
    texts = ImageCaptionDataset(data, "train", 32).captions[:batch]
    times = []
    for _ in range(21):  # the first one warms up
        t0 = time.perf_counter()
        pipe.encode_prompts(texts)
        times.append(time.perf_counter() - t0)
    ms = 1000 * statistics.median(times[1:])
    print(f"text encoder alone, batch {batch}: {ms:.1f} ms (median of 20)")


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def one_method(method: str, data: str, steps: int) -> None:
    """Train one method in this (fresh) process; print step time and peak RSS growth during training."""
    from capsearch.models.load import load_pipeline
    from capsearch.training.loop import TrainSettings, finetune

    pipe = load_pipeline("tiny:random")
    spec = [{"method": method, "units": "*" if method != "attention" else "*:*_attn"}]
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark (Linux)
    rss0 = _status_kb("VmRSS")
    res = finetune(
        pipe, spec, data, TrainSettings(steps=steps, batch_size=16, caption_dropout=0.0), quiet=True
    )
    peak = _status_kb("VmHWM")
    row = {"method": method, "s_per_step": res.seconds / res.steps, "trainable": res.trainable,
           "peak_rss_growth_mb": (peak - rss0) / 1024}  # fmt: skip
    print(json.dumps(row))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--methods", default="full,attention,difffit,svdiff,lora")
    ap.add_argument("--one-method")
    ap.add_argument("--data")
    ap.add_argument("--cache", action="store_true", help="cached encodings against per-step ones")
    args = ap.parse_args()
    if args.one_method:
        one_method(args.one_method, args.data, args.steps)
        return
    from capsearch.datasets.folder import ImageCaptionDataset, load_images
    from capsearch.models.load import load_pipeline
    from capsearch.worlds.phantom import write_phantom_dataset

    data = Path(tempfile.mkdtemp()) / "phantom"
    write_phantom_dataset(data, patients=60, size=32, seed=0)
    images, captions = (
        load_images(data, "train", 32),
        ImageCaptionDataset(data, "train", 32).captions,
    )
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    )
    if args.cache:
        print(f"{len(captions)} training images, {len(set(captions))} distinct captions, batch 16")
        cache_rounds(data, args.steps, args.rounds)
        return
    plain, ours = [], []
    for r in range(args.rounds):
        pipe = load_pipeline("tiny:random")
        plain.append(plain_loop(pipe, images, captions, args.steps, 16, r))
        ours.append(capsearch_loop(data, args.steps, 16, r))
        print(f"round {r}: plain {plain[-1]:.2f} steps/s, finetune {ours[-1]:.2f} steps/s")
    ratio = sum(ours) / sum(plain)
    print(f"finetune / plain steps-per-second ratio: {ratio:.3f} (target ≥ 0.95)")
    print("method, s/step, trainable, peak RSS growth (MB)")
    for m in args.methods.split(","):
        out = (
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--one-method",
                    m,
                    "--data",
                    str(data),
                    "--steps",
                    str(args.steps),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        d = json.loads(out)
        print(
            f"{d['method']}, {d['s_per_step']:.3f}, {d['trainable']:,}, {d['peak_rss_growth_mb']:.0f}"
        )


if __name__ == "__main__":
    main()
