"""Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying MMD GANs"): unbiased MMD² of features."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from capsearch.errors import UserError
from capsearch.metrics.context import Computed, EvalContext, Measured
from capsearch.metrics.fid import _as_float64, feature_pair
from capsearch.metrics.intervals import jackknife_interval

# Rows of the first set per kernel block: a block is block_rows × N float64, so 2,048 × 10,000 is 160 MB.
DEFAULT_BLOCK_ROWS = 2048


class _Kernel:
    """Bińkowski et al. 2018, Sec. 5: k(x, y) = (γ·xᵀy + c)^degree, by default γ = 1/d, c = 1, degree 3."""

    def __init__(self, dim: int, degree: int, gamma: float | None, coef: float, block_rows: int):
        if degree < 1 or block_rows < 1:
            raise UserError(
                f"KID needs degree ≥ 1 and block_rows ≥ 1, got {degree} and {block_rows}"
            )
        self.degree, self.coef, self.block_rows = degree, coef, block_rows
        self.gamma = 1.0 / dim if gamma is None else gamma

    def pair_sum(self, x: np.ndarray, y: np.ndarray) -> float:
        """Σ_i Σ_j k(x_i, y_j), computed in blocks of rows so the full kernel matrix is never held."""
        total = 0.0
        for start in range(0, len(x), self.block_rows):
            block = x[start : start + self.block_rows] @ y.T
            total += float(((block * self.gamma + self.coef) ** self.degree).sum())
        return total

    def within_sum(self, x: np.ndarray) -> float:
        """Σ_{i≠j} k(x_i, x_j): all pairs of one set without the diagonal."""
        diag = (np.einsum("ij,ij->i", x, x) * self.gamma + self.coef) ** self.degree
        return self.pair_sum(x, x) - float(diag.sum())


def _mmd2(kernel: _Kernel, x: np.ndarray, within_x: float, y: np.ndarray) -> float:
    """Unbiased MMD² (Gretton et al. 2012, eq. 3) of x and y, given x's within-set kernel sum."""
    m, n = len(x), len(y)
    # Both within-set terms leave out i = j, which is what removes the bias of the plug-in estimate.
    return (
        within_x / (m * (m - 1))
        + kernel.within_sum(y) / (n * (n - 1))
        - 2.0 * kernel.pair_sum(x, y) / (m * n)
    )


def kernel_inception_distance(
    real_feats: torch.Tensor | np.ndarray,
    fake_feats: torch.Tensor | np.ndarray,
    degree: int = 3,
    gamma: float | None = None,
    coef: float = 1.0,
    block_rows: int = DEFAULT_BLOCK_ROWS,
) -> float:
    """KID: unbiased MMD² over all samples with k(x, y) = (xᵀy/d + 1)³ (may be negative near 0)."""
    real, fake = feature_pair(real_feats, fake_feats)
    kernel = _Kernel(real.shape[1], degree, gamma, coef, block_rows)
    return _mmd2(kernel, real, kernel.within_sum(real), fake)


def kernel_inception_distance_to(
    reference_feats: torch.Tensor | np.ndarray,
    degree: int = 3,
    gamma: float | None = None,
    coef: float = 1.0,
    block_rows: int = DEFAULT_BLOCK_ROWS,
) -> Callable[[torch.Tensor | np.ndarray], float]:
    """KID against a fixed reference set, its within-set kernel sum computed once (for the jackknife)."""
    reference = _as_float64(reference_feats, "reference")
    kernel = _Kernel(reference.shape[1], degree, gamma, coef, block_rows)
    within = kernel.within_sum(reference)

    def distance(fake_feats: torch.Tensor | np.ndarray) -> float:
        fake = _as_float64(fake_feats, "generated")
        if fake.shape[1] != reference.shape[1]:
            raise UserError(
                f"feature dimensions differ: reference {reference.shape[1]}, generated {fake.shape[1]}"
            )
        return _mmd2(kernel, reference, within, fake)

    return distance


def kid_of(ctx: EvalContext) -> Computed:
    """KID of the quality samples against the held-out reference, with its delete-one-prompt interval."""
    distance = kernel_inception_distance_to(ctx.ref_feats)
    value, low, high = jackknife_interval(distance, ctx.gen_feats, ctx.clusters)
    return Measured(value, (low, high))
