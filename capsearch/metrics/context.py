"""What one evaluation has in hand when its metrics are computed: the stages, and every hook's input.

An evaluation runs in stages (capsearch.metrics.stages), each a pass over the model that fills part of
the context: `samples` (quality samples of held-out prompts, their features and the reference's),
`attack` (the extraction attack's generations) and `strength` (the denoising-strength pass). Each row of
the metric table (capsearch.metrics.table) names the stages its hook reads, or `model` for a metric that
makes its own pass over the model (`ctx.pipe`) inside its hook; a stage runs when a row needs it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from capsearch.settings import EvalSettings

if TYPE_CHECKING:
    from capsearch.metrics.extraction import ExtractionResult
    from capsearch.metrics.neighbours import Neighbours

SAMPLES = "samples"  # generated held-out-prompt samples and features (FID, KID, AMD, image-text)
ATTACK = "attack"  # the extraction attack's generations (extracted, own-image share, NN ratio)
STRENGTH = "strength"  # Wen et al.'s denoising strength of memorised and other captions
MODEL = "model"  # the metric's own pass over the model, made in its hook
STAGES = (SAMPLES, ATTACK, STRENGTH)  # the shared passes, in the order they run


def image_size(pipe: Any) -> int:
    """The pixel size of a pipeline's images (a latent model's are 8× its latents)."""
    return pipe.unet.config.sample_size * (8 if pipe.vae is not None else 1)


class Measured(NamedTuple):
    """A hook's result: the value, its 95% interval (or None), and companion keys for metrics.json."""

    value: float
    interval: tuple[float, float] | None = None
    extra: Mapping[str, Any] = MappingProxyType({})


# A hook returns None when the evaluation holds nothing to measure it on (it is then left out).
Computed = Measured | None


@dataclass
class EvalContext:
    """Samples, features and data of one evaluation (capsearch.metrics.stages fills it, stage by stage)."""

    root: Path
    world: str  # "phantom" or "real"
    seed: int  # the resampling seed of this evaluation's intervals
    bootstrap: int  # resamplings per bootstrap interval
    prompts: list[str] = field(default_factory=list)  # held-out prompts of the quality samples
    train_records: list[dict[str, Any]] = field(default_factory=list)  # training rows, file order
    ref_feats: torch.Tensor | None = None  # held-out reference features
    pipe: Any = None  # the evaluated pipeline, for a metric's own pass over the model (MODEL)
    settings: EvalSettings | None = None
    extractor: Any = None  # the feature extractor (capsearch.metrics.features)
    text_scorer: Any = None  # the image-text scorer of this world (capsearch.metrics.alignment)
    cache: Path | None = None  # the feature cache folder
    ran: set[str] = field(default_factory=set)  # the stages that ran
    # --- samples: the quality samples, prompt-major ---
    gen: torch.Tensor | None = None  # [P·n, C, H, W]
    gen_prompts: list[str] = field(default_factory=list)  # the prompt of each sample
    clusters: np.ndarray | None = None  # the prompt index of each sample
    gen_feats: torch.Tensor | None = None
    train_feats: torch.Tensor | None = None
    noise_floor: dict[str, Any] | None = None  # the reference's (capsearch.metrics.reference)
    # --- attack: memorised captions first, then other training captions ---
    memorised: list[str] = field(default_factory=list)  # the data set's duplicated captions
    others: list[str] = field(default_factory=list)  # other training captions, seeded order
    train_images: torch.Tensor | None = None  # the training images in file order (if loaded)
    threshold: float = 0.0  # the attack's tiled-distance threshold
    attack_guidance: float = 0.0
    attack_prompts: list[str] = field(default_factory=list)
    attack_n: int = 0  # images per attacked prompt
    extraction: ExtractionResult | None = None  # the attack's result
    # The attack's images of the memorised captions among its prompts, prompt-major, and their captions.
    memorised_images: torch.Tensor | None = None
    memorised_prompts: list[str] = field(default_factory=list)
    # Their nearest and second-nearest distinct training images, with the images they were found for
    # (capsearch.metrics.neighbours.memorised_neighbours fills it once).
    memorised_neighbours: tuple[torch.Tensor, Neighbours] | None = None
    # The neighbours of the attack's samples of its other captions, by caption (their images are not kept).
    other_neighbours: dict[str, Neighbours] = field(default_factory=dict)
    # --- strength: per-prompt denoising strengths ---
    strength_memorised: np.ndarray | None = None
    strength_other: np.ndarray | None = None
