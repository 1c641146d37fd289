"""Freeze: train nothing (the paper's lower baseline; the pretrained UNet as is)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from capsearch.methods.base import MethodConfig, register_method
from capsearch.units import Unit


@dataclass
class Freeze(MethodConfig):
    """No hyper-parameters: every weight keeps its pretrained value."""


@register_method("freeze", Freeze)
def apply(unet: torch.nn.Module, units: Sequence[Unit], cfg: Freeze) -> list[str]:
    """Train nothing; return no parameter names."""
    return []
