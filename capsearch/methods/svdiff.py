"""SV-DIFF (Han et al. 2023, "SVDiff: Compact Parameter Space for Diffusion Fine-Tuning"): a spectral shift.

Each selected Linear/Conv2d weight W (a conv reshaped to out × in·kh·kw) is factored once,
W = U·diag(σ)·Vᵀ, and only a shift δ of its singular values is trained (paper Eq. 2):

    W_δ = U·diag(ReLU(σ + δ))·Vᵀ + R,  R = W − U·diag(σ)·Vᵀ  (the reconstruction residual)
        = W + U·diag(ReLU(σ + δ) − σ)·Vᵀ

The second line is the same matrix; it keeps W itself in place of R, so δ = 0 returns W bit for bit.
U, σ, Vᵀ are buffers (recomputed from the base weight when a delta is loaded); δ is the only parameter.
The weight is a torch parametrization, so merging is `remove_parametrizations(leave_parametrized=True)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn.utils import parametrize

from capsearch.methods import (
    MethodConfig,
    claim,
    mark_trainable,
    register_method,
    resolve_module,
    unit_modules,
)
from capsearch.units import Unit


class SpectralShift(torch.nn.Module):
    """Parametrization W ↦ W + U·diag(ReLU(σ+δ) − σ)·Vᵀ with δ (init 0) the only parameter."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
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
    """No hyper-parameters: every Linear/Conv2d weight in the units gets a spectral shift.

    Train δ with its own learning rate through `optimizer_groups(..., lr_1d=...)` (the paper uses a
    larger rate for the 1-D spectral shifts).
    """


@register_method("svdiff", SVDiff)
def apply(unet: torch.nn.Module, units: Sequence[Unit], cfg: SVDiff) -> list[str]:
    """Reparametrise the units' Linear/Conv2d weights by a spectral shift; return the δ names."""
    deltas = []
    for name in unit_modules(units):
        module = resolve_module(unet, name)
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        claim(unet, name, "reparam", "svdiff")
        shift = SpectralShift(module.weight)
        parametrize.register_parametrization(module, "weight", shift)
        deltas.append(shift.delta)
    return mark_trainable(unet, deltas)
