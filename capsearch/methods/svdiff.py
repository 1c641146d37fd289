"""SV-DIFF (Han et al. 2023, "SVDiff: Compact Parameter Space for Diffusion Fine-Tuning"): a spectral shift.

Each selected Linear/Conv2d weight W (a conv reshaped to out × in·kh·kw) is factored once,
W = U·diag(σ)·Vᵀ, and only a shift δ of its singular values is trained (paper Eq. 2):

    W_δ = U·diag(ReLU(σ + δ))·Vᵀ + R,  R = W − U·diag(σ)·Vᵀ  (the reconstruction residual)
        = W + U·diag(ReLU(σ + δ) − σ)·Vᵀ

The second line is the same matrix; it keeps W itself in place of R, so δ = 0 returns W bit for bit.
U, σ, Vᵀ are buffers (recomputed from the base weight when a delta is loaded); δ is the only parameter.
The weight is a torch parametrization, so merging is `remove_parametrizations(leave_parametrized=True)`.

Norm layers are shifted too, as in SVDiff's code (mkshing/svdiff-pytorch, which the paper's authors
also use): a GroupNorm/LayerNorm weight w is a 1 × C matrix with one singular value ‖w‖, so its shift is
one scalar per layer and rescales the whole weight, w ↦ w·ReLU(‖w‖ + δ)/‖w‖. Those norm-layer shifts
are the method's second parameter set: that code trains the spectral shifts at 1e-3 and the norm
shifts at a separate, much smaller rate, 1e-6 (an entry's `lr` and `lr_1d` here). Every δ is 1-D, so
the split is by role, not by tensor dimension. Norm biases stay frozen, as there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn.utils import parametrize

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

_PARAMETRIZED = ".parametrizations."
LAYERS = (torch.nn.Linear, torch.nn.Conv2d)  # weights whose whole spectrum is shifted


class SpectralShift(torch.nn.Module):
    """Parametrization W ↦ W + U·diag(ReLU(σ+δ) − σ)·Vᵀ with δ (init 0) the only parameter."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        # A 1-D norm weight becomes a C × 1 matrix: one singular value, its norm.
        matrix = weight.detach().reshape(weight.shape[0], -1).float()
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        # Not persistent: they are a function of the frozen base weight, so deltas stay small.
        self.register_buffer("u", u, persistent=False)
        self.register_buffer("s", s, persistent=False)
        self.register_buffer("vh", vh, persistent=False)
        self.delta = torch.nn.Parameter(torch.zeros_like(s))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The shifted weight."""
        shift = torch.relu(self.s + self.delta) - self.s
        update = (self.u * shift) @ self.vh
        return weight + update.reshape(weight.shape).to(weight.dtype)


@dataclass
class SVDiff(MethodConfig):
    """Whether norm-layer weights get a shift too (SVDiff's own code does; off reproduces δ on W only)."""

    shift_norms: bool = True


def is_norm_shift(unet: torch.nn.Module, name: str) -> bool:
    """Whether a trainable parameter is the spectral shift of a norm layer's weight (the second set)."""
    owner, found, _ = name.partition(_PARAMETRIZED)
    return bool(found) and is_norm(unet.get_submodule(owner))


@register_method("svdiff", SVDiff, secondary=is_norm_shift)
def apply(unet: torch.nn.Module, units: Sequence[Unit], cfg: SVDiff) -> list[str]:
    """Reparametrise the units' Linear/Conv2d (and norm) weights by a spectral shift; return the δ names."""
    deltas = []
    for name in unit_modules(units):
        module = resolve_module(unet, name)
        norm = cfg.shift_norms and is_norm(module)
        if not has_weight(module) or not (isinstance(module, LAYERS) or norm):
            continue
        claim(unet, name, "reparam", "svdiff")  # refuses a weight another entry already changes
        shift = SpectralShift(module.weight)
        parametrize.register_parametrization(module, "weight", shift)
        deltas.append(shift.delta)
    return mark_trainable(unet, deltas)
