"""Attention tuning, the paper's "Attn Tuning" baseline: every parameter of the UNet's transformer blocks.

Dutt et al. 2024 (Table 1) fine-tune "attention"; their code (Raman1121/Diffusion_Memorization_HPO,
`adaptors.enable_attention_update`) unfreezes every UNet parameter whose name contains `attentions`,
i.e. the whole Transformer2DModel blocks: GroupNorm, proj_in/out, attn1, attn2, the LayerNorms and
the feed-forward. On SD v1.5 that is 267.2M parameters (31.1% of the UNet). The narrower q/k/v/out
variant is `attn_proj`.
"""

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


def in_attention_block(unit: Unit) -> bool:
    """Whether the unit lies inside a `*.attentions.N` block (a Transformer2DModel)."""
    return "attentions" in unit.block.split(".")


@dataclass
class Attention(MethodConfig):
    """No hyper-parameters: every parameter of the chosen units inside attention blocks is trained."""


@register_method("attention", Attention, example_units="mid_block")
def apply(unet: torch.nn.Module, units: Sequence[Unit], cfg: Attention) -> list[str]:
    """Unfreeze every parameter of the units that lie in attention blocks; return their names."""
    params = []
    for name in unit_modules([u for u in units if in_attention_block(u)]):
        module = resolve_module(unet, name)
        if has_weight(module):
            claim(unet, name, "train", "attention")
        params.extend(module.parameters(recurse=False))
    return mark_trainable(unet, params)
