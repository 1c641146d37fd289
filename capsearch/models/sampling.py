"""Sampling: classifier-free-guided DDIM (or any diffusers scheduler), deterministic per seed, batched."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import diffusers
import torch

from capsearch.errors import UserError

# The dtype `generate` runs the UNet's calls under (autocast), None: the UNet's own. Set for the
# length of one evaluation by `sampling_precision`, so every pass that samples shares it.
_AUTOCAST: ContextVar[torch.dtype | None] = ContextVar("capsearch_sampling_autocast", default=None)

PRECISION_DTYPES = {"no": None, "bf16": torch.bfloat16}


@contextmanager
def sampling_precision(precision: str) -> Iterator[None]:
    """Inside, `generate` calls the UNet under bf16 autocast ("bf16") or as it is ("no"); the
    scheduler's arithmetic, the latents and the decoded images stay in the pipeline's dtype."""
    token = _AUTOCAST.set(PRECISION_DTYPES[precision])
    try:
        yield
    finally:
        _AUTOCAST.reset(token)


SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}


def make_scheduler(pipe, name: str = "ddim"):
    """A fresh inference scheduler of the given name built from the pipeline's training scheduler config."""
    cls_name = SCHEDULERS.get(name.lower(), name)
    cls = getattr(diffusers, cls_name, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise UserError(
            f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)} or a diffusers class name"
        )
    return cls.from_config(pipe.scheduler.config)


def sample_noise(shape: tuple[int, ...], seed: int, indices) -> torch.Tensor:
    """Initial noise [len(indices), *shape]; sample i depends only on (seed, i), not on its batch."""
    return torch.stack(
        [
            torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + i))
            for i in indices
        ]
    )


@torch.no_grad()
def generate(
    pipe,
    prompts: list[str],
    n_per_prompt: int = 1,
    steps: int = 25,
    guidance: float = 3.0,
    seed: int = 0,
    batch_size: int = 64,
    scheduler: str = "ddim",
    progress=None,
    on_step=None,
) -> torch.Tensor:
    """Images [len(prompts)·n, C, H, W] in [-1, 1], prompt-major; sample i's noise depends only on (seed, i).

    `on_step(first, t, eps_uncond, eps_cond)`, if given, sees both noise predictions of samples
    first..first+B at every step (the unconditional one is then computed even at guidance 1).
    Inside `sampling_precision("bf16")` the UNet's calls run under bf16 autocast; its predictions are
    cast back to the latents' dtype before guidance and the scheduler's step.
    """
    all_prompts = [p for p in prompts for _ in range(n_per_prompt)]
    if not all_prompts:
        c, h, w = pipe.latent_shape
        return torch.empty(0, c if pipe.vae is None else 3, h, w)
    device, dtype = pipe.device, pipe.dtype
    shape = pipe.latent_shape
    autocast = _AUTOCAST.get()
    noise = sample_noise(shape, seed, range(len(all_prompts)))
    uncond = pipe.encode_prompts([""])
    out = []
    was_training = pipe.unet.training
    pipe.unet.eval()
    for start in range(0, len(all_prompts), batch_size):
        chunk = all_prompts[start : start + batch_size]
        sched = make_scheduler(pipe, scheduler)
        sched.set_timesteps(steps, device=device)
        latents = noise[start : start + len(chunk)].to(device, dtype) * sched.init_noise_sigma
        cond = pipe.encode_prompts(chunk)
        use_cfg = guidance != 1.0 or on_step is not None
        ehs = torch.cat([uncond.expand(len(chunk), -1, -1), cond]) if use_cfg else cond
        for t in sched.timesteps:
            inp = torch.cat([latents, latents]) if use_cfg else latents
            inp = sched.scale_model_input(inp, t)
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                eps = pipe.unet(inp, t, encoder_hidden_states=ehs).sample
            eps = eps.to(latents.dtype)
            if use_cfg:
                eps_u, eps_c = eps.chunk(2)
                if on_step is not None:
                    on_step(start, t, eps_u, eps_c)
                # classifier-free guidance (Ho & Salimans 2022)
                eps = eps_u + guidance * (eps_c - eps_u)
            latents = sched.step(eps, t, latents).prev_sample
        out.append(pipe.decode(latents).float().cpu())
        if progress is not None:
            progress(len(chunk))
    pipe.unet.train(was_training)
    return torch.cat(out)


def save_grid(images: torch.Tensor, path, nrow: int = 8, captions: list[str] | None = None) -> None:
    """Write images in [-1, 1] as a PNG grid (with captions under each tile when given)."""
    # lazy: matplotlib loads only where a plot is drawn
    import matplotlib

    matplotlib.use("Agg")
    # lazy: matplotlib loads only where a plot is drawn
    import matplotlib.pyplot as plt

    from capsearch.figures import save_figure

    n = len(images)
    ncol = min(nrow, n)
    nrows = (n + ncol - 1) // ncol
    fig, axes = plt.subplots(
        nrows, ncol, figsize=(1.6 * ncol, (1.6 + (0.5 if captions else 0)) * nrows), squeeze=False
    )
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= n:
            continue
        img = images[k].float()
        img = img[0] if img.shape[0] == 1 else img.mean(0)
        ax.imshow(img.numpy(), cmap="gray", vmin=-1, vmax=1)
        if captions:
            ax.set_title(_wrap(captions[k]), fontsize=4.5)
    fig.tight_layout()
    save_figure(fig, path, dpi=110, grey=True)  # grey levels, captions in black: a grey PNG
    plt.close(fig)


def _wrap(text: str, width: int = 34, lines: int = 3) -> str:
    words, rows, cur = text.split(), [], ""
    for w in words:
        if len(cur) + len(w) + 1 > width:
            rows.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    rows.append(cur)
    return "\n".join(rows[:lines]) + ("…" if len(rows) > lines else "")
