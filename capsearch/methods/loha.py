"""LoHa (Hyeon-Woo et al. 2022, FedPara; LyCORIS): a Hadamard product of two rank-r updates, via peft.

ΔW = (α/r)·(W1a·W1b) ⊙ (W2a·W2b); peft zeroes one factor at init, so ΔW starts at exactly 0.
Conv2d weights are flattened to out × in·kh·kw (peft's default, use_effective_conv2d off).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from capsearch.errors import UserError
from capsearch.methods._peft import inject
from capsearch.methods.base import MethodConfig, register_method
from capsearch.units import Unit


@dataclass
class LoHa(MethodConfig):
    """Rank r of each factor, scale α (update scaled by α/r) and rank dropout."""

    rank: int = 4
    alpha: float = 4.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise UserError(f"loha.rank must be at least 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"loha.dropout must be in [0, 1), got {self.dropout}")


@register_method("loha", LoHa, example_units="*:*_attn")
def apply(unet: torch.nn.Module, units: Sequence[Unit], cfg: LoHa) -> list[str]:
    """Inject LoHa into the units' Linear/Conv2d modules; return the factor names."""
    # lazy: peft loads only when its methods are applied
    from peft import LoHaConfig

    def make(targets: str) -> LoHaConfig:
        return LoHaConfig(
            r=cfg.rank, alpha=cfg.alpha, rank_dropout=cfg.dropout, target_modules=targets
        )

    return inject(unet, units, make, "loha")
