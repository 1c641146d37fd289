"""RWA, random word addition (Somepalli et al. 2023b, "Understanding and Mitigating Copying in Diffusion
Models"): insert k random tokens of the tokenizer's whole vocabulary, decoded, at random positions of a
caption. `mode: per_draw` draws them afresh each time a caption is drawn; `mode: fixed` draws them once
per training record before training (seeded), as Dutt et al.'s code does.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from capsearch.errors import UserError
from capsearch.training.mitigations.base import CAPTION, MitigationConfig, register_mitigation
from capsearch.training.mitigations.stack import CaptionDraw, add_words


@dataclass(frozen=True)
class RWA(MitigationConfig):
    """k words inserted into a caption with probability p, per draw or fixed per record."""

    k: int = 1
    p: float = 1.0
    mode: Literal["per_draw", "fixed"] = "per_draw"

    def check(self) -> None:
        """p in [0, 1], k at least 1."""
        if not 0 <= self.p <= 1:
            raise UserError(f"mitigation rwa: p must be in [0, 1], got {self.p}")
        if self.k < 1:
            raise UserError(f"mitigation rwa: k must be at least 1, got {self.k}")


def fix_captions(
    cfg: RWA, captions: list[str], groups: list, seed: int, words: list[str]
) -> dict[int, str] | None:
    """Fixed mode: each training record's words drawn once, seeded; a duplicate group shares one draw.

    Dutt et al.'s code augments every caption of its data frame once when the dataset is built, and
    its repeated memorisation rows are one data frame repeated, so copies share their words.
    """
    if cfg.mode != "fixed":
        return None
    # Its own random stream, so the per-step draws are the same in both modes.
    rng = random.Random(f"rwa-fixed:{seed}")
    shared: dict[object, str | None] = {}
    fixed = {}
    for i, (text, group) in enumerate(zip(captions, groups)):
        key = ("group", group) if group is not None else ("record", i)
        if key not in shared:
            hit = rng.random() < cfg.p
            shared[key] = add_words(text, cfg.k, words, rng) if hit else None
        if shared[key] is not None:
            fixed[i] = shared[key]
    return fixed


@register_mitigation("rwa", RWA, stage=CAPTION, order=20, prepare=fix_captions, vocabulary=True)
def apply(cfg: RWA, draw: CaptionDraw) -> int | None:
    """Per-draw mode: words added to each caption drawn with probability p (after replacement)."""
    if cfg.mode != "per_draw":
        return None  # fixed mode acted once, before training
    hit = [draw.rng.random() < cfg.p for _ in draw.texts]
    draw.texts = [
        add_words(t, cfg.k, draw.words, draw.rng) if h else t for h, t in zip(hit, draw.texts)
    ]
    return sum(hit)
