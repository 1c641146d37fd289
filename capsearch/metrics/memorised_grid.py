"""The memorised captions' picture: each one's training image beside the samples the attack drew for it.

One row per memorised caption (those the attack covered): its training image in the first column, then
the first `per_caption` of the attack's samples for that caption, titled with the caption and, when the
attack extracted that image, "extracted". Written by `capsearch.metrics.evaluate` as memorised.png beside
samples.png, so that a reader sees what an extraction count means for each method.
"""

from __future__ import annotations

from pathlib import Path

import torch

from capsearch.metrics.context import EvalContext
from capsearch.models.sampling import save_grid

MEMORISED_GRID = "memorised.png"


def save_memorised_grid(
    ctx: EvalContext, extracted: set[str], path: Path, per_caption: int = 8
) -> Path | None:
    """Write the grid; None (nothing written) when no memorised caption was attacked."""
    images, prompts = ctx.memorised_images, ctx.memorised_prompts
    if images is None or not prompts or ctx.train_images is None:
        return None
    if len(ctx.train_images) != len(ctx.train_records):
        return None  # unreadable training images: rows and images no longer line up
    k = min(per_caption, ctx.attack_n)
    tiles, titles = [], []
    for j, prompt in enumerate(prompts):
        own = next(i for i, r in enumerate(ctx.train_records) if r["text"] == prompt)
        samples = images[j * ctx.attack_n : j * ctx.attack_n + k]
        tiles += [ctx.train_images[own : own + 1], samples]
        mark = " [extracted]" if prompt in extracted else ""
        titles += [f"train{mark}: {prompt}"] + [f"sample {s + 1}" for s in range(len(samples))]
    save_grid(torch.cat(tiles), path, nrow=k + 1, captions=titles)
    return path
