"""LoKr (Yeh et al. 2024, LyCORIS): a Kronecker-product update ΔW = (α/r)·W1 ⊗ W2, via peft.

Each dimension is split into two factors near its square root (peft's `factorization`); W2 is a
rank-r product unless r is at least half its size. peft zeroes W2 at init, so ΔW starts at exactly 0.
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
class LoKr(MethodConfig):
    """Rank r of the second factor, scale α (update scaled by α/r), rank dropout, factor split."""

    rank: int = 4
    alpha: float = 4.0
    dropout: float = 0.0
    decompose_both: bool = False  # also factor W1 as a rank-r product
    factor: int = -1  # -1: split each dimension near its square root

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise UserError(f"lokr.rank must be at least 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"lokr.dropout must be in [0, 1), got {self.dropout}")
        if self.factor == 0 or self.factor < -1:
            raise UserError(f"lokr.factor must be -1 or a positive integer, got {self.factor}")


@register_method("lokr", LoKr, example_units="*:*_attn")
def apply(unet: torch.nn.Module, units: Sequence[Unit], cfg: LoKr) -> list[str]:
    """Inject LoKr into the units' Linear/Conv2d modules; return the factor names."""
    # lazy: peft loads only when its methods are applied
    from peft import LoKrConfig

    def make(targets: str) -> LoKrConfig:
        return LoKrConfig(
            r=cfg.rank,
            alpha=cfg.alpha,
            rank_dropout=cfg.dropout,
            decompose_both=cfg.decompose_both,
            decompose_factor=cfg.factor,
            target_modules=targets,
        )

    return inject(unet, units, make, "lokr")
