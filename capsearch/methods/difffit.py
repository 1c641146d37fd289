"""DiffFit (Xie et al. 2023, "DiffFit: Unlocking Transferability of Large Diffusion Models via Simple
Parameter-Efficient Fine-Tuning"): biases, norms and learnable scale factors γ (init 1) on residual branches.

A block's update `x ← x + branch(x)` becomes `x ← x + γ ⊙ branch(x)`. γ sits on the branch's output
projection (attention `to_out[0]`, feed-forward's last Linear, resnet `conv2`), scaling its output
channels, so `γ ⊙ (W a + b) = (γ ⊙ W) a + γ ⊙ b` folds into that projection's weight and bias on export.
At γ = 1 the output is exactly the original one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from capsearch.errors import UserError
from capsearch.methods.base import (
    MethodConfig,
    claim,
    has_weight,
    mark_trainable,
    register_method,
    resolve_module,
    unit_modules,
)
from capsearch.methods.norm import is_norm
from capsearch.units import Unit

GAMMA = (
    "difffit_gamma"  # parameter name on the scaled module, e.g. `...attn1.to_out.0.difffit_gamma`
)
_BRANCHES = ("attn1", "attn2", "ff", "resnet")
_SHAPES = ("channel", "scalar")


@dataclass
class DiffFit(MethodConfig):
    """Which residual branches get γ, its shape, and whether biases and norms train too."""

    gamma_on: tuple[str, ...] = ("attn1", "attn2", "ff")  # any of attn1, attn2, ff, resnet
    gamma_shape: str = "channel"  # "channel": one γ per output channel; "scalar": one per branch
    train_bias: bool = True
    train_norm: bool = True

    def __post_init__(self) -> None:
        unknown = set(self.gamma_on) - set(_BRANCHES)
        if unknown:
            raise UserError(
                f"difffit.gamma_on has unknown branch(es) {sorted(unknown)}; use {', '.join(_BRANCHES)}"
            )
        if self.gamma_shape not in _SHAPES:
            raise UserError(
                f"difffit.gamma_shape must be channel or scalar, got {self.gamma_shape!r}"
            )


def _gamma_targets(units: Sequence[Unit], gamma_on: tuple[str, ...]) -> list[str]:
    """Output projections of the chosen branches inside the units."""
    targets = []
    for unit in units:
        if unit.kind == "self_attn" and "attn1" in gamma_on:
            targets += [m for m in unit.modules if m.endswith(".attn1.to_out.0")]
        elif unit.kind == "cross_attn" and "attn2" in gamma_on:
            targets += [m for m in unit.modules if m.endswith(".attn2.to_out.0")]
        elif unit.kind == "ff" and "ff" in gamma_on:
            # the last module of each feed-forward (diffusers: ff.net.2) is its output projection
            last: dict[str, str] = {}
            for m in unit.modules:
                last[m.split(".ff.")[0]] = m
            targets += list(last.values())
        elif unit.kind == "conv" and "resnet" in gamma_on and ".resnets." in unit.block:
            targets += [m for m in unit.modules if m.endswith(".conv2")]
    return targets


def _scale_output(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: the branch output times γ (γ broadcast over channels: last dim, or dim 1 of convs)."""
    gamma = getattr(module, GAMMA)
    if isinstance(module, torch.nn.Conv2d):
        gamma = gamma.view(-1, 1, 1)
    return output * gamma


def add_gamma(module: torch.nn.Module, scalar: bool) -> torch.nn.Parameter:
    """Give a Linear/Conv2d a trainable output scale γ (init 1) and the hook applying it."""
    weight = module.weight
    size = 1 if scalar else weight.shape[0]
    gamma = torch.nn.Parameter(torch.ones(size, device=weight.device, dtype=weight.dtype))
    module.register_parameter(GAMMA, gamma)
    module.register_forward_hook(_scale_output)
    return gamma


@torch.no_grad()
def fold_gammas(unet: torch.nn.Module) -> None:
    """Fold every γ into its module's weight and bias and remove the hook (γ ⊙ (Wa + b))."""
    for module in unet.modules():
        gamma = module._parameters.get(GAMMA)
        if gamma is None:
            continue
        weight = module.weight
        weight.mul_(gamma.view(-1, *([1] * (weight.ndim - 1))).to(weight.dtype))
        if module.bias is not None:
            module.bias.mul_(gamma.to(module.bias.dtype))
        del module._parameters[GAMMA]
        for key, hook in list(module._forward_hooks.items()):
            if hook is _scale_output:
                del module._forward_hooks[key]


@register_method("difffit", DiffFit, fold=fold_gammas)
def apply(unet: torch.nn.Module, units: Sequence[Unit], cfg: DiffFit) -> list[str]:
    """Add γ to the units' branches and unfreeze γ, biases and norms; return their names."""
    params: list[torch.nn.Parameter] = []
    for name in _gamma_targets(units, cfg.gamma_on):
        claim(unet, name, "scale", "difffit")
        params.append(add_gamma(resolve_module(unet, name), cfg.gamma_shape == "scalar"))
    for name in unit_modules(units):
        module = resolve_module(unet, name)
        if cfg.train_norm and is_norm(module):
            if has_weight(module):
                claim(unet, name, "train", "difffit")
            params.extend(module.parameters(recurse=False))
        elif cfg.train_bias and module._parameters.get("bias") is not None:
            params.append(module._parameters["bias"])
    return mark_trainable(unet, params)
