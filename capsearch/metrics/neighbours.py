"""Each sample's nearest training image and its nearest *distinct* one after it (tiled ℓ2).

The extraction attack, the own-image share and Gu et al.'s nearest-neighbour ratio all measure a sample
against the training set with Carlini et al. 2023's tiled ℓ2 distance (capsearch.metrics.extraction).
The ratio also needs the second-nearest training image, and a training set that holds copies of one
image (the memorisation subset stores each of its images K times, capsearch.worlds.phantom) would give
a sample near that image K nearest neighbours at one distance, a ratio of 1 and no memorisation. So the
second-nearest image here is the nearest one that is **not a copy** of the nearest: training images
with identical pixels, as compared (after the channel match and resize the distance applies), are one
image. That groups the subset's K copies of each image, and any exact duplicates a real data set holds,
without reading `dup_group` (which marks only the copies capsearch wrote).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from capsearch.metrics.context import EvalContext
from capsearch.metrics.extraction import DEFAULT_TILES, _match_channels, _resize, tiled_distance

# Gu et al. 2023 ("On Memorization in Diffusion Models"): a sample is memorised when its nearest
# training image is closer than a third of the distance to the second-nearest one (Yoon et al. 2023 use
# the same rule).
NN_RATIO = 1.0 / 3.0


@dataclass(frozen=True)
class Neighbours:
    """Per sample: tiled distance to the nearest training image, its row, and the distance to the nearest
    training image with other pixels (inf when every training image is a copy of the nearest)."""

    distance: torch.Tensor  # [N] float
    index: torch.Tensor  # [N] long, the nearest training row (the first of equally near ones)
    second: torch.Tensor  # [N] float

    def part(self, start: int, stop: int) -> Neighbours:
        """The neighbours of samples start to stop − 1 (one caption's, of prompt-major samples)."""
        return Neighbours(
            self.distance[start:stop], self.index[start:stop], self.second[start:stop]
        )

    def ratio(self) -> np.ndarray:
        """Nearest over second-nearest distinct distance, float64: 0 for an exact copy, 1 for a sample
        equidistant from two distinct images (0 where no second image exists, 1 for 0/0)."""
        near = self.distance.double().numpy()
        second = self.second.double().numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            out = near / second
        return np.where(second == 0, 1.0, out)

    def memorised(self) -> np.ndarray:
        """Gu et al.'s rule per sample: ratio below 1/3, as float64 0/1."""
        return (self.ratio() < NN_RATIO).astype(np.float64)


def _copy_groups(chunk: torch.Tensor, groups: dict[bytes, int]) -> torch.Tensor:
    """The copy group of each image of a block: one id per distinct pixel content (a digest of its bytes)."""
    ids = []
    for image in chunk:
        key = hashlib.blake2b(image.contiguous().numpy().tobytes(), digest_size=16).digest()
        ids.append(groups.setdefault(key, len(groups)))
    return torch.tensor(ids, dtype=torch.long)


def nearest_two(
    images: torch.Tensor,
    train_images,
    tiles: int = DEFAULT_TILES,
    block: int = 2048,
    groups_of: dict[int, torch.Tensor] | None = None,
) -> Neighbours:
    """The nearest training image of each sample and the nearest one that is not a copy of it.

    The training set is read in blocks, as the attack reads it (capsearch.metrics.extraction
    `_nearest_training`, whose nearest distance and row this gives unchanged); per block the nearest
    image, its copy group and the nearest image of another group are merged into the running ones.
    `groups_of` keeps the blocks' copy groups (by the block's first row) for the next call on the same
    training set and sample size, so that repeated calls hash the training set once.
    """
    images = images.detach().float().cpu()
    n = len(images)
    best = torch.full((n,), float("inf"))
    best_idx = torch.full((n,), -1, dtype=torch.long)
    best_group = torch.full((n,), -1, dtype=torch.long)
    second = torch.full((n,), float("inf"))
    size = tuple(images.shape[-2:])
    groups: dict[bytes, int] = {}
    for start in range(0, len(train_images), block):
        chunk = train_images[start : start + block]
        chunk = (
            (chunk if torch.is_tensor(chunk) else torch.stack(list(chunk))).detach().float().cpu()
        )
        chunk = _resize(_match_channels(chunk, images.shape[1]), size)
        gid = groups_of.get(start) if groups_of is not None else None
        if gid is None:
            gid = _copy_groups(chunk, groups)
            if groups_of is not None:
                groups_of[start] = gid
        d = tiled_distance(images, chunk, tiles)
        value, idx = d.min(dim=1)
        group = gid[idx]
        # the block's nearest image of a group other than its nearest one's
        other = d.masked_fill(gid.unsqueeze(0) == group.unsqueeze(1), float("inf")).amin(dim=1)
        same = group == best_group
        better = value < best
        # same group: the second stays outside it; a new nearest group: the old nearest is outside it;
        # else the block's nearest is outside the kept group
        second = torch.where(
            same,
            torch.minimum(second, other),
            torch.where(better, torch.minimum(best, other), torch.minimum(second, value)),
        )
        best_group = torch.where(better, group, best_group)
        best_idx = torch.where(better, idx + start, best_idx)
        best = torch.where(better, value, best)
    return Neighbours(best, best_idx, second)


def memorised_neighbours(ctx: EvalContext) -> Neighbours | None:
    """The neighbours of the attack's samples of memorised captions (prompt-major), computed once per
    evaluation and kept in the context (with the images they belong to, so that other images get
    their own); None when no memorised caption was attacked."""
    images = ctx.memorised_images
    if images is None or not ctx.memorised_prompts or ctx.train_images is None:
        return None
    kept = ctx.memorised_neighbours
    if kept is None or kept[0] is not images:
        kept = ctx.memorised_neighbours = (images, nearest_two(images, ctx.train_images))
    return kept[1]
