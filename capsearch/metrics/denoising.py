"""Denoising strength (Wen et al. 2024): magnitude of the text-conditional noise prediction."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from capsearch.errors import UserError
from capsearch.metrics.context import Computed, EvalContext, Measured
from capsearch.metrics.intervals import cluster_bootstrap_ratio


@torch.no_grad()
def threshold_scores(
    unet: torch.nn.Module,
    noisy: torch.Tensor,
    t: torch.Tensor | int,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    cond_pred: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample ‖ε(x_t, e_p) − ε(x_t, e_∅)‖₂ [B]; pass cond_pred to reuse an existing conditional prediction."""
    batch = noisy.shape[0]
    if uncond.shape[0] == 1 and batch > 1:
        uncond = uncond.expand(batch, *uncond.shape[1:])
    if cond_pred is None:
        cond_pred = unet(noisy, t, encoder_hidden_states=cond).sample
    uncond_pred = unet(noisy, t, encoder_hidden_states=uncond).sample
    # Wen et al. 2024, eq. (4): d = ‖ε_θ(x_t, e_p) − ε_θ(x_t, e_∅)‖₂ over the whole sample (all channels).
    return (cond_pred.detach() - uncond_pred).flatten(1).float().norm(dim=1)


@torch.no_grad()
def denoising_strength_per_prompt(
    pipe: object,
    prompts: Sequence[str],
    steps: int = 25,
    n: int = 4,
    guidance: float = 3.0,
    seed: int = 0,
    batch_size: int = 64,
) -> torch.Tensor:
    """Wen et al.'s detection metric per prompt [P]: mean over n DDIM trajectories and all their steps.

    The trajectories are those of `capsearch.models.sampling.generate` with the same seed (same per-sample noise,
    same guided DDIM steps), so the strength of a prompt belongs to the images generated for it.
    """
    from capsearch.models.sampling import generate  # lazy: diffusers takes seconds to import

    prompts = list(prompts)
    if not prompts:
        raise UserError("denoising strength needs at least one prompt")
    if steps < 1 or n < 1:
        raise UserError(f"denoising strength needs steps ≥ 1 and n ≥ 1, got steps={steps}, n={n}")
    total = torch.zeros(len(prompts) * n, dtype=torch.float64)
    counts = torch.zeros(len(prompts) * n, dtype=torch.long)

    def accumulate(first: int, t, eps_uncond: torch.Tensor, eps_cond: torch.Tensor) -> None:
        # Wen et al. 2024, eq. (4), averaged over the trajectory (their detection uses 1..T steps).
        norm = (eps_cond - eps_uncond).flatten(1).double().norm(dim=1).cpu()
        total[first : first + len(norm)] += norm
        counts[first : first + len(norm)] += 1

    generate(pipe, prompts, n, steps, guidance, seed, batch_size, "ddim", on_step=accumulate)
    return (total / counts).view(len(prompts), n).mean(dim=1).float()


def denoising_strength(
    pipe: object,
    prompts: Sequence[str],
    steps: int = 25,
    n: int = 4,
    guidance: float = 3.0,
    seed: int = 0,
    batch_size: int = 64,
) -> float:
    """Mean denoising strength over prompts, generations and DDIM steps (higher = more memorisation)."""
    values = denoising_strength_per_prompt(pipe, prompts, steps, n, guidance, seed, batch_size)
    return float(values.double().mean())


def strength_ratio_of(ctx: EvalContext) -> Computed:
    """Denoising strength of memorised captions over other training captions (the strength stage's)."""
    s_mem, s_other = ctx.strength_memorised, ctx.strength_other
    if s_mem is None or s_other is None:
        return None  # no memorised captions, or no others, to compare
    interval = None
    if len(s_mem) > 1 and len(s_other) > 1:
        interval = cluster_bootstrap_ratio(s_mem, s_other, n_boot=ctx.bootstrap, seed=ctx.seed)
    extra = {"strength_memorised": float(s_mem.mean()), "strength_other": float(s_other.mean())}
    return Measured(float(s_mem.mean() / max(s_other.mean(), 1e-12)), interval, extra)
