"""Image-text alignment: BioViL-T similarity (real world) or phantom finding agreement (phantom world)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from capsearch.errors import UserError
from capsearch.metrics.context import Computed, EvalContext, Measured
from capsearch.metrics.intervals import cluster_bootstrap


@runtime_checkable
class ImageTextScorer(Protocol):
    """Anything that scores how well each image matches its prompt."""

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Per-sample score [N] for images [N, C, H, W] in [-1, 1] and their prompts."""
        ...


def alignment_scores(
    images: torch.Tensor, prompts: Sequence[str], scorer: ImageTextScorer, batch_size: int = 64
) -> torch.Tensor:
    """Per-sample image-text scores [N], computed in batches."""
    prompts = list(prompts)
    if images.ndim != 4 or len(images) != len(prompts):
        raise UserError(
            f"alignment needs images [N, C, H, W] and N prompts, got {tuple(images.shape)} and {len(prompts)}"
        )
    if not isinstance(scorer, ImageTextScorer):
        raise UserError(
            f"{type(scorer).__name__} is not an image-text scorer (it has no score method)"
        )
    parts = [
        scorer.score(images[i : i + batch_size], prompts[i : i + batch_size]).detach().float().cpu()
        for i in range(0, len(prompts), batch_size)
    ]
    return torch.cat(parts) if parts else torch.zeros(0)


def alignment_score(
    images: torch.Tensor, prompts: Sequence[str], scorer: ImageTextScorer, batch_size: int = 64
) -> float:
    """Mean image-text score of generated images against their prompts (higher = better aligned)."""
    values = alignment_scores(images, prompts, scorer, batch_size)
    if len(values) == 0:
        raise UserError("alignment score needs at least one image")
    return float(values.double().mean())


def alignment_of(ctx: EvalContext) -> Computed:
    """Mean image-text score of the quality samples against their prompts, with its prompt bootstrap."""
    aligned = alignment_scores(ctx.gen, ctx.gen_prompts, ctx.text_scorer).double().numpy()
    interval = cluster_bootstrap(aligned, ctx.clusters, n_boot=ctx.bootstrap, seed=ctx.seed)
    return Measured(float(aligned.mean()), interval)
