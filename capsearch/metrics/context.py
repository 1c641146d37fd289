"""What one evaluation has in hand when its metrics are computed: the input of every table hook."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch


@dataclass
class EvalContext:
    """Samples, features and data of one evaluation (capsearch.metrics.evaluate builds it)."""

    root: Path
    world: str  # "phantom" or "real"
    seed: int  # the resampling seed of this evaluation's intervals
    bootstrap: int  # resamplings per bootstrap interval
    prompts: list[str]  # held-out prompts of the quality samples
    gen: torch.Tensor  # quality samples [P·n, C, H, W], prompt-major
    clusters: np.ndarray  # the prompt index of each quality sample
    gen_feats: torch.Tensor
    ref_feats: torch.Tensor  # held-out reference features
    train_feats: torch.Tensor
    train_records: list[dict[str, Any]]  # the training split's metadata rows, in file order
    train_images: torch.Tensor | None = None  # the training images in the same order (if loaded)
    threshold: float = 0.0  # the attack's tiled-distance threshold
    attack_prompts: list[str] = field(default_factory=list)
    attack_n: int = 0  # images per attacked prompt
    # The attack's images of the memorised captions among its prompts, prompt-major, and their captions.
    memorised_images: torch.Tensor | None = None
    memorised_prompts: list[str] = field(default_factory=list)
