"""Threshold mitigation (Wen et al. 2024): drop from the batch's loss the samples whose text-conditional
noise prediction ‖ε(x_t, e_p) − ε(x_t, e_∅)‖₂ exceeds an absolute threshold or a batch percentile.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from capsearch.errors import UserError
from capsearch.training.mitigations.base import LOSS, MitigationConfig, register_mitigation

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Threshold(MitigationConfig):
    """A limit on the strength: an absolute `value`, or the batch's `percentile` (one of the two)."""

    value: float | None = None
    percentile: float | None = None

    def check(self) -> None:
        """Exactly one of value and percentile; a percentile inside (0, 100)."""
        if (self.value is None) == (self.percentile is None):
            raise UserError("mitigation threshold: give exactly one of value or percentile")
        if self.percentile is not None and not 0 < self.percentile < 100:
            raise UserError("mitigation threshold: percentile must be in (0, 100)")


@register_mitigation("threshold", Threshold, stage=LOSS)
def apply(cfg: Threshold, scores: torch.Tensor) -> torch.Tensor:
    """The samples kept: strength at or below the limit."""
    import torch  # lazy: the settings parse mitigation lists while the command line starts

    if cfg.value is not None:
        limit = torch.tensor(cfg.value, device=scores.device)
    else:
        limit = torch.quantile(scores.float(), cfg.percentile / 100)
    return scores <= limit
