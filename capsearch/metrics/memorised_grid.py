"""The memorised captions' picture: each one's training image beside the samples the attack drew for it.

One row per memorised caption (those the attack covered, as many as fit in `max_tiles` tiles): its
training image in the first column, then the first `per_caption` of the attack's samples for that
caption, titled with the caption and, when the attack extracted that image, "extracted". Written by
`capsearch.metrics.evaluate` as memorised.png beside samples.png, so that a reader sees what an
extraction count means for each method.
"""

from __future__ import annotations

from pathlib import Path

MEMORISED_GRID = "memorised.png"
# whole rows of at most this many tiles: 20 captions of 9 tiles make ~200 KB even as a compact PNG
# (capsearch.figures); 56 (6 rows of 9) make ~70 KB
MAX_TILES = 56


def save_memorised_grid(
    ctx, extracted: set[str], path: Path, per_caption: int = 8, max_tiles: int = MAX_TILES
) -> Path | None:
    """Write the grid; None (nothing written) when no memorised caption was attacked."""
    import torch

    from capsearch.models.sampling import save_grid

    images, prompts = ctx.memorised_images, ctx.memorised_prompts
    if images is None or not prompts or ctx.train_images is None:
        return None
    if len(ctx.train_images) != len(ctx.train_records):
        return None  # unreadable training images: rows and images no longer line up
    k = min(per_caption, ctx.attack_n)
    tiles, titles = [], []
    for j, prompt in enumerate(prompts[: max(1, max_tiles // (k + 1))]):
        own = next(i for i, r in enumerate(ctx.train_records) if r["text"] == prompt)
        samples = images[j * ctx.attack_n : j * ctx.attack_n + k]
        tiles += [ctx.train_images[own : own + 1], samples]
        mark = " [extracted]" if prompt in extracted else ""
        titles += [f"train{mark}: {prompt}"] + [f"sample {s + 1}" for s in range(len(samples))]
    save_grid(torch.cat(tiles), path, nrow=k + 1, captions=titles)
    return path
