"""Caption replacement (Somepalli et al. 2023b): a caption is swapped for another training record's."""

from __future__ import annotations

from dataclasses import dataclass

from capsearch.errors import UserError
from capsearch.training.mitigations.base import CAPTION, MitigationConfig, register_mitigation
from capsearch.training.mitigations.stack import CaptionDraw


@dataclass(frozen=True)
class CaptionReplace(MitigationConfig):
    """Each drawn caption replaced with probability p by a random training record's caption."""

    p: float

    def check(self) -> None:
        """p in [0, 1]."""
        if not 0 <= self.p <= 1:
            raise UserError(f"mitigation caption_replace: p must be in [0, 1], got {self.p}")


@register_mitigation("caption_replace", CaptionReplace, stage=CAPTION, order=10)
def apply(cfg: CaptionReplace, draw: CaptionDraw) -> int:
    """Replace captions first, so the other caption mitigations act on the replacement."""
    hit = [draw.rng.random() < cfg.p for _ in draw.texts]
    for j, h in enumerate(hit):
        if h:
            draw.texts[j] = draw.record_caption(draw.rng.randrange(len(draw.pool)))
    return sum(hit)
