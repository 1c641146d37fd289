"""Attention-projection tuning: train the query/key/value/output projections of self- and/or cross-attention.

A narrower variant of the paper's "Attn Tuning" baseline (capsearch/methods/attention.py): only the
attention matrices (and the output bias), not the norms, proj_in/out or feed-forwards of the
transformer blocks. On SD v1.5 it trains 93.5M parameters (10.9%), against Attn Tuning's 267.2M (31.1%).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from capsearch.errors import UserError
from capsearch.methods.base import (
    MethodConfig,
    claim,
    mark_trainable,
    register_method,
    resolve_module,
)
from capsearch.units import Unit

_KINDS = {"both": ("self_attn", "cross_attn"), "self": ("self_attn",), "cross": ("cross_attn",)}
_QKV = (".to_q", ".to_k", ".to_v")
_OUT = (".to_out.0",)


@dataclass
class AttnProj(MethodConfig):
    """Which attention to train and whether to leave the output projection frozen."""

    which: str = "both"  # "both" | "self" | "cross"
    qkv_only: bool = False  # True: only to_q/to_k/to_v, not to_out

    def __post_init__(self) -> None:
        if self.which not in _KINDS:
            raise UserError(
                f"attn_proj.which must be one of {', '.join(_KINDS)}, got {self.which!r}"
            )


@register_method("attn_proj", AttnProj)
def apply(unet: torch.nn.Module, units: Sequence[Unit], cfg: AttnProj) -> list[str]:
    """Unfreeze the projection weights (and biases) of the chosen attentions; return their names."""
    suffixes = _QKV if cfg.qkv_only else _QKV + _OUT
    params = []
    for unit in units:
        if unit.kind not in _KINDS[cfg.which]:
            continue
        for name in unit.modules:
            if name.endswith(suffixes):
                claim(unet, name, "train", "attn_proj")
                params.extend(resolve_module(unet, name).parameters(recurse=False))
    return mark_trainable(unet, params)
