"""BitFit: train only the bias vectors of the chosen units (Ben Zaken et al. 2022)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from capsearch.methods.base import (
    MethodConfig,
    mark_trainable,
    register_method,
    resolve_module,
    unit_modules,
)
from capsearch.units import Unit


@dataclass
class BitFit(MethodConfig):
    """No hyper-parameters: every bias in the units is trained."""


@register_method("bitfit", BitFit)
def apply(unet: torch.nn.Module, units: Sequence[Unit], cfg: BitFit) -> list[str]:
    """Unfreeze the biases of the units (norm biases included); return their names."""
    biases = []
    for name in unit_modules(units):
        bias = resolve_module(unet, name)._parameters.get("bias")
        if bias is not None:
            biases.append(bias)
    return mark_trainable(unet, biases)
