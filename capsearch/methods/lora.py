"""LoRA (Hu et al. 2022): a trainable low-rank update W + (α/r)·B·A on each Linear/Conv2d, through peft.

Conv2d layers get A as a k×k conv to r channels and B as a 1×1 conv back (peft's LoRA Conv2d).
B starts at zero, so the adapted UNet starts exactly at the base UNet.
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
class LoRA(MethodConfig):
    """Rank r, scale α (the update is scaled by α/r) and dropout on the adapter input."""

    rank: int = 4
    alpha: float = 4.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise UserError(f"lora.rank must be at least 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"lora.dropout must be in [0, 1), got {self.dropout}")


@register_method("lora", LoRA, example_units="*:*_attn")
def apply(unet: torch.nn.Module, units: Sequence[Unit], cfg: LoRA) -> list[str]:
    """Inject LoRA into the units' Linear/Conv2d modules; return the A and B names."""
    # lazy: peft loads only when its methods are applied
    from peft import LoraConfig

    def make(targets: str) -> LoraConfig:
        return LoraConfig(
            r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets
        )

    return inject(unet, units, make, "lora")
