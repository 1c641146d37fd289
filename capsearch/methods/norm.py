"""Norm tuning: train only the affine scale and shift of the normalisation layers in the chosen units."""

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

_NORMS = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.BatchNorm2d, torch.nn.InstanceNorm2d)


def is_norm(module: torch.nn.Module) -> bool:
    """Whether a module is a normalisation layer (torch's, or any class whose name ends in Norm)."""
    return isinstance(module, _NORMS) or type(module).__name__.endswith("Norm")


@dataclass
class Norm(MethodConfig):
    """No hyper-parameters: every norm's weight and bias in the units is trained."""


@register_method("norm", Norm)
def apply(unet: torch.nn.Module, units: Sequence[Unit], cfg: Norm) -> list[str]:
    """Unfreeze the affine parameters of the norms in the units; return their names."""
    params = []
    for name in unit_modules(units):
        module = resolve_module(unet, name)
        if is_norm(module):
            if has_weight(module):
                claim(unet, name, "train", "norm")
            params.extend(module.parameters(recurse=False))
    return mark_trainable(unet, params)
