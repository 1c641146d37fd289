"""How much a model gives away of a data set's duplicated images: the positive control's measurement.

A data set written with a memorisation subset (`write_phantom_dataset(dup_fraction=..., dup_copies=K)`)
holds images stored K times under one caption no other image has. `memorisation_probe` samples each such
caption n times and reports, with the same images, what the extraction attack finds and how close the
samples come to their own training image; and Wen et al.'s denoising strength on those captions against
as many other training captions.
"""

from __future__ import annotations

from pathlib import Path

import torch

from capsearch.datasets.folder import in_split, load_images, read_metadata
from capsearch.errors import UserError
from capsearch.metrics.context import image_size
from capsearch.metrics.denoising import denoising_strength_per_prompt
from capsearch.metrics.extraction import (
    DEFAULT_TILES,
    PHANTOM_THRESHOLD,
    _nearest_training,
    extraction_attack,
)


def memorised_captions(records: list[dict]) -> tuple[list[str], dict[str, set[int]], list[str]]:
    """Duplicated captions (sorted), the training rows of each, and as many other captions (sorted)."""
    memorised = sorted({r["text"] for r in records if r.get("dup_group") is not None})
    rows = {c: {i for i, r in enumerate(records) if r["text"] == c} for c in memorised}
    others = sorted({r["text"] for r in records if r.get("dup_group") is None})[: len(memorised)]
    return memorised, rows, others


def memorisation_probe(
    pipe,
    root: Path | str,
    n: int = 16,
    steps: int = 20,
    guidance: float = 1.0,
    strength_n: int = 2,
    threshold: float | None = None,
    min_clique: int = 3,
    seed: int = 0,
    other_n: int = 0,
) -> dict:
    """Extraction, nearest-neighbour and denoising-strength numbers of a model on a data set's duplicates.

    Keys: `extracted` (distinct training images the attack extracts), `of` (memorised captions),
    `nearest_own` (share of samples whose nearest training image is their caption's own image),
    `copies` (share within the copy threshold of their own image), `median_dist` / `min_dist` (tiled
    distance to the nearest training image), `strength_memorised`, `strength_other`, `strength_ratio`;
    with `other_n` > 0 also `copies_other` and `median_dist_other` from other_n samples of each other
    caption (copies there would mean the threshold, not memorisation, is at work).
    """
    from capsearch.models.sampling import generate  # lazy: diffusers takes seconds to import

    records = [r for r in read_metadata(root) if in_split(r, "train")]
    memorised, own_rows, others = memorised_captions(records)
    if not memorised or not others:
        raise UserError(
            f"{root} has no memorisation subset (write it with dup_fraction > 0) or no other captions"
        )
    threshold = PHANTOM_THRESHOLD if threshold is None else threshold
    train = load_images(root, "train", image_size(pipe))
    if len(train) != len(records):
        raise UserError(f"some training images of {root} are unreadable (capsearch data check)")
    # Generate once: the attack and the nearest-neighbour numbers read the same samples.
    images = generate(pipe, memorised, n, steps=steps, guidance=guidance, seed=seed)
    dist, idx = _nearest_training(images, train, DEFAULT_TILES)
    owner = [c for c in memorised for _ in range(n)]
    own = torch.tensor([int(t) in own_rows[c] for c, t in zip(owner, idx.tolist(), strict=True)])
    attack = extraction_attack(
        lambda prompts, n_per_prompt, seed_: images,
        memorised,
        train,
        n_per_prompt=n,
        threshold=threshold,
        min_clique=min_clique,
        batch_size=len(images),  # one call with every prompt: the images above
    )
    kw = dict(steps=steps, n=strength_n, guidance=guidance, seed=seed)
    s_mem = float(denoising_strength_per_prompt(pipe, memorised, **kw).mean())
    s_other = float(denoising_strength_per_prompt(pipe, others, **kw).mean())
    result = {
        "extracted": attack.count,
        "of": len(memorised),
        "extracted_pairs": [list(e) for e in attack.extracted],
        "nearest_own": float(own.float().mean()),
        "copies": float(((dist <= threshold) & own).float().mean()),
        "median_dist": float(dist.median()),
        "min_dist": float(dist.min()),
        "strength_memorised": s_mem,
        "strength_other": s_other,
        "strength_ratio": s_mem / max(s_other, 1e-12),
        "settings": {
            "n": n,
            "steps": steps,
            "guidance": guidance,
            "strength_n": strength_n,
            "threshold": threshold,
            "min_clique": min_clique,
            "seed": seed,
        },  # fmt: skip
    }
    if other_n:
        other = generate(pipe, others, other_n, steps=steps, guidance=guidance, seed=seed + 1)
        other_dist, _ = _nearest_training(other, train, DEFAULT_TILES)
        result["copies_other"] = float((other_dist <= threshold).float().mean())
        result["median_dist_other"] = float(other_dist.median())
    return result
