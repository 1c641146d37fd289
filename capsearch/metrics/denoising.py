"""Denoising strength (Wen et al. 2024): magnitude of the text-conditional noise prediction."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from capsearch.errors import UserError


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
    """Wen et al.'s detection metric per prompt [P]: mean over n DDIM trajectories and all their steps."""
    from diffusers import DDIMScheduler

    from capsearch.sample import sample_noise

    prompts = list(prompts)
    if not prompts:
        raise UserError("denoising strength needs at least one prompt")
    if steps < 1 or n < 1:
        raise UserError(f"denoising strength needs steps ≥ 1 and n ≥ 1, got steps={steps}, n={n}")
    unet = pipe.unet
    device, dtype = pipe.device, pipe.dtype
    channels, size = unet.config.in_channels, unet.config.sample_size
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps, device=device)
    uncond = pipe.encode_prompts([""]).to(device, dtype)
    was_training = unet.training
    unet.eval()
    per_prompt = []
    per_call = max(1, batch_size // n)
    try:
        for p0 in range(0, len(prompts), per_call):
            chunk = prompts[p0 : p0 + per_call]
            cond = pipe.encode_prompts(chunk).to(device, dtype).repeat_interleave(n, dim=0)
            batch = cond.shape[0]
            context = torch.cat([uncond.expand(batch, -1, -1), cond])
            # The same per-sample noise as capsearch.sample.generate: independent of the batch.
            first = p0 * n
            x = sample_noise((channels, size, size), seed, range(first, first + batch)).to(
                device, dtype
            )
            x = x * scheduler.init_noise_sigma
            total = torch.zeros(batch, dtype=torch.float64)
            for t in scheduler.timesteps:
                x_in = scheduler.scale_model_input(x, t)
                eps = unet(torch.cat([x_in, x_in]), t, encoder_hidden_states=context).sample
                eps_uncond, eps_cond = eps.chunk(2)
                text_part = eps_cond - eps_uncond
                # Wen et al. 2024, eq. (4), averaged over the trajectory (their detection uses 1..T steps).
                total += text_part.flatten(1).double().norm(dim=1).cpu()
                x = scheduler.step(eps_uncond + guidance * text_part, t, x).prev_sample
            per_prompt.append((total / len(scheduler.timesteps)).view(len(chunk), n).mean(dim=1))
    finally:
        unet.train(was_training)
    return torch.cat(per_prompt).float()


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
