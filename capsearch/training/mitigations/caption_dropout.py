"""Caption dropout: the empty prompt instead of the caption, which also trains the unconditional branch
that classifier-free guidance samples with (Stable Diffusion and Dutt et al.'s code use p = 0.1).

Every fine-tune applies it through its shorthand, the `train.caption_dropout` field (0 turns it off),
before the mitigations of `train.mitigations`.
"""

from __future__ import annotations

from dataclasses import dataclass

from capsearch.errors import UserError
from capsearch.training.mitigations.base import CAPTION, MitigationConfig, register_mitigation
from capsearch.training.mitigations.stack import CaptionDraw


@dataclass(frozen=True)
class CaptionDropout(MitigationConfig):
    """Each drawn caption dropped with probability p."""

    p: float

    def check(self) -> None:
        """p in [0, 1]."""
        if not 0 <= self.p <= 1:
            raise UserError(f"mitigation caption_dropout: p must be in [0, 1], got {self.p}")


@register_mitigation("caption_dropout", CaptionDropout, stage=CAPTION, order=30, shorthand="p")
def apply(cfg: CaptionDropout, draw: CaptionDraw) -> int:
    """Drop captions last, so an augmented caption can still be dropped and dropout keeps its p."""
    draw.dropped = [draw.rng.random() < cfg.p for _ in draw.texts]
    draw.texts = ["" if d else t for d, t in zip(draw.dropped, draw.texts)]
    return sum(draw.dropped)
