"""Full fine-tuning of the chosen units: every parameter they hold is trained in place."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from capsearch.methods.base import (
    MethodConfig,
    claim,
    has_weight,
    mark_trainable,
    register_method,
    resolve_module,
    unit_modules,
)
from capsearch.units import Unit


@dataclass
class Full(MethodConfig):
    """No hyper-parameters beyond the training loop's learning rate."""


@register_method("full", Full, example_units="mid_block")
def apply(unet: torch.nn.Module, units: Sequence[Unit], cfg: Full) -> list[str]:
    """Unfreeze every parameter of the units; return their names."""
    params = []
    for name in unit_modules(units):
        module = resolve_module(unet, name)
        if has_weight(module):
            claim(unet, name, "train", "full")
        params.extend(module.parameters(recurse=False))
    return mark_trainable(unet, params)
