"""The memorised captions' picture: each one's training image beside the samples the attack drew for it.

One row per memorised caption the attack covered, the extracted ones first: its training image in the
first column, then the first of the attack's samples for that caption (`per_caption`, fewer where that
lets every caption's row fit in `max_tiles` tiles, at least 2), titled with the caption and, when the
attack extracted that image, "extracted"; rows past `max_tiles` are left out. Written by
`capsearch.metrics.evaluate` as memorised.png beside samples.png, so that a reader sees what an
extraction count means for each method.
"""

from __future__ import annotations

from pathlib import Path

import torch

from capsearch.metrics.context import EvalContext
from capsearch.models.sampling import save_grid

MEMORISED_GRID = "memorised.png"
# At most this many tiles: 20 captions of 9 tiles make ~200 KB even as a compact PNG (capsearch.figures);
# 60 hold the paper runs' 20 captions with 2 samples each, under 150 KB.
MAX_TILES = 60


def save_memorised_grid(
    ctx: EvalContext,
    extracted: set[str],
    path: Path,
    per_caption: int = 8,
    max_tiles: int = MAX_TILES,
) -> Path | None:
    """Write the grid; None (nothing written) when no memorised caption was attacked."""
    images, prompts = ctx.memorised_images, ctx.memorised_prompts
    if images is None or not prompts or ctx.train_images is None:
        return None
    if len(ctx.train_images) != len(ctx.train_records):
        return None  # unreadable training images: rows and images no longer line up
    k = min(per_caption, ctx.attack_n, max(2, max_tiles // len(prompts) - 1))
    order = sorted(range(len(prompts)), key=lambda j: prompts[j] not in extracted)  # stable
    tiles, titles = [], []
    for j in order[: max(1, max_tiles // (k + 1))]:
        prompt = prompts[j]
        own = next(i for i, r in enumerate(ctx.train_records) if r["text"] == prompt)
        samples = images[j * ctx.attack_n : j * ctx.attack_n + k]
        tiles += [ctx.train_images[own : own + 1], samples]
        mark = " [extracted]" if prompt in extracted else ""
        titles += [f"train{mark}: {prompt}"] + [f"sample {s + 1}" for s in range(len(samples))]
    save_grid(torch.cat(tiles), path, nrow=k + 1, captions=titles)
    return path
