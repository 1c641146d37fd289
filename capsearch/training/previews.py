"""Sample previews during a fine-tune: a fixed grid every `train.preview_every` steps.

Like diffusers' `--validation_prompt`, the previews draw from their own seeded generators (one per
sample, capsearch.models.sampling.sample_noise), never from the training generators; the global torch RNG is
saved and restored around them as well, so a fine-tune with previews trains exactly as one without.
Each preview is `out_dir/previews/step_NNNNNN.png` (rows: prompts; columns: seeds) and the TensorBoard
image of that step. They sample the current weights (not the EMA copy, when there is one).
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence
from pathlib import Path

import torch

from capsearch.atomic import atomic_write
from capsearch.models.sampling import generate, save_grid

PREVIEW_PROMPTS = 4  # training captions previewed when the spec gives none
PREVIEW_PER_PROMPT = 2  # samples per prompt (fixed seeds 0, 1 of PREVIEW_SEED)
PREVIEW_STEPS = 20  # DDIM steps (evaluate.steps' default)
PREVIEW_GUIDANCE = 3.0  # evaluate.guidance's default
PREVIEW_SEED = 0


def preview_prompts(given: Sequence[str], captions: Sequence[str]) -> list[str]:
    """The given prompts, or the first PREVIEW_PROMPTS distinct training captions in record order."""
    if given:
        return list(given)
    return list(dict.fromkeys(captions))[:PREVIEW_PROMPTS]


def preview_due(done: int, every: int, total: int) -> bool:
    """Whether the step just done gets a preview: every `every` steps, and the last step."""
    return every > 0 and (done % every == 0 or done == total)


def preview_path(out_dir: Path, step: int) -> Path:
    """Where the preview of `step` goes."""
    return Path(out_dir) / "previews" / f"step_{step:06d}.png"


def render_preview(
    pipe, unet: torch.nn.Module, prompts: list[str], step: int, out_dir: Path
) -> Path:
    """Sample the prompts with `unet` in place of pipe's, write the grid for `step`; its path."""
    current = dataclasses.replace(pipe, unet=unet)  # the prepared UNet being trained
    cuda = [current.device] if current.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # nothing drawn here reaches the training stream
        images = generate(
            current,
            prompts,
            n_per_prompt=PREVIEW_PER_PROMPT,
            steps=PREVIEW_STEPS,
            guidance=PREVIEW_GUIDANCE,
            seed=PREVIEW_SEED,
        )
    png = io.BytesIO()  # written whole or not at all: a killed trial leaves no half a picture
    captions = [p for p in prompts for _ in range(PREVIEW_PER_PROMPT)]
    save_grid(images, png, nrow=PREVIEW_PER_PROMPT, captions=captions)
    path = preview_path(out_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, png.getvalue())
