"""Fréchet distance between two sets of image features (FID, Heusel et al. 2017)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from capsearch.errors import UserError
from capsearch.metrics.context import Computed, EvalContext, Measured
from capsearch.metrics.intervals import jackknife_interval

# Eigenvalues of a covariance within this fraction of its largest one are rounding, not signal: features
# arrive as float32 (relative precision 6e-8), and eigh's own error is ~1e-16·D of the largest eigenvalue.
# Below −_ROUNDING·λmax an eigenvalue is materially negative: the matrix is not a covariance.
_ROUNDING = 1e-10
# A final distance is a difference of terms of size ‖μ1 − μ2‖² + Tr Σ1 + Tr Σ2; a negative value smaller
# than this fraction of that size is cancellation error in float64, anything larger is a bug.
_FINAL_ROUNDING = 1e-9


class _Gaussian(NamedTuple):
    """A feature set's mean, a factor F of its covariance (Σ = F·Fᵀ) and Tr Σ = ‖F‖²_F."""

    mu: np.ndarray
    factor: np.ndarray
    trace: float


def _as_float64(feats: torch.Tensor | np.ndarray, what: str) -> np.ndarray:
    """Features as a 2-D float64 array, with a one-line error for a bad shape."""
    arr = (
        feats.detach().cpu().double().numpy()
        if torch.is_tensor(feats)
        else np.asarray(feats, np.float64)
    )
    if arr.ndim != 2:
        raise UserError(f"{what} features must be a 2-D array [N, D], got shape {tuple(arr.shape)}")
    if arr.shape[0] < 2:
        raise UserError(
            f"{what} features need at least 2 samples for a covariance, got {arr.shape[0]}"
        )
    if not np.isfinite(arr).all():
        raise UserError(f"{what} features contain NaN or infinite values")
    return arr


def gaussian_stats(feats: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (float64) of a feature matrix [N, D]."""
    arr = _as_float64(feats, "input")
    return arr.mean(axis=0), np.cov(arr, rowvar=False, ddof=1).reshape(arr.shape[1], arr.shape[1])


def _psd_sqrt(sigma: np.ndarray, what: str) -> np.ndarray:
    """Symmetric √Σ from eigh; rounding-level eigenvalues become 0, a materially negative one raises."""
    if not np.allclose(sigma, sigma.T, rtol=1e-10, atol=1e-12 * max(np.abs(sigma).max(), 1e-300)):
        raise UserError(f"{what} covariance is not symmetric")
    w, v = np.linalg.eigh(sigma)
    floor = _ROUNDING * max(float(w[-1]), 0.0)
    if w[0] < -floor:
        raise FloatingPointError(
            f"{what} covariance is not positive semi-definite: eigenvalue {w[0]:.3g} against a largest "
            f"of {w[-1]:.3g}"
        )
    # Zero both signs of rounding-level eigenvalues: kept, their square roots (up to 1e-5·√λmax) would
    # pose as signal in Tr((Σ1Σ2)^½) and could push d(x, x) below zero.
    w = np.where(w > floor, w, 0.0)
    return (v * np.sqrt(w)) @ v.T


def _gaussian(arr: np.ndarray) -> _Gaussian:
    """Mean and covariance factor of features [N, D]: the centred data when N ≤ D, else √Σ."""
    n, dim = arr.shape
    mu = arr.mean(axis=0)
    centred = arr - mu
    if n <= dim:
        # Σ = Xcᵀ·Xc/(N − 1) exactly, so the data are a factor of Σ: no square root of a singular matrix.
        factor = centred.T / np.sqrt(n - 1)
    else:
        factor = _psd_sqrt(centred.T @ centred / (n - 1), "feature")
    return _Gaussian(mu, factor, float(np.sum(factor * factor)))


def _frechet(a: _Gaussian, b: _Gaussian) -> float:
    """Heusel et al. 2017, eq. (6), with Tr((Σ1Σ2)^½) as the nuclear norm of F1ᵀ·F2."""
    # Σ1Σ2 = F1·F1ᵀ·F2·F2ᵀ has the nonzero eigenvalues of (F1ᵀF2)(F1ᵀF2)ᵀ, i.e. the squared singular
    # values of F1ᵀF2; so Tr((Σ1Σ2)^½) is their sum. Singular values are never negative and carry an
    # absolute error of ~1e-16·‖F1ᵀF2‖, without the square root of rounding noise an eigenvalue route
    # takes near zero (−4e-8 relative for d(x, x) at N = 10, D = 64, against 1e-16 here).
    trace_sqrt = float(np.linalg.svd(a.factor.T @ b.factor, compute_uv=False).sum())
    diff = a.mu - b.mu
    mean_term = float(diff @ diff)
    value = mean_term + a.trace + b.trace - 2.0 * trace_sqrt
    scale = mean_term + a.trace + b.trace
    if value < 0.0:
        if value < -_FINAL_ROUNDING * max(scale, 1e-300):
            raise FloatingPointError(
                f"Fréchet distance came out negative ({value:.6g}, terms of size {scale:.6g}): "
                "not rounding; please report this with the features"
            )
        # A squared distance between two Gaussians: a negative this small is float64 cancellation.
        value = 0.0
    return value


def frechet_distance_from_stats(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = (
        np.atleast_2d(sigma1).astype(np.float64),
        np.atleast_2d(sigma2).astype(np.float64),
    )
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise UserError(f"feature dimensions differ: {mu1.shape[0]} against {mu2.shape[0]}")
    if sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        raise UserError(f"covariance shape {sigma1.shape} does not match a mean of {mu1.shape}")
    factors = [_psd_sqrt(s, what) for s, what in ((sigma1, "first"), (sigma2, "second"))]
    a, b = (_Gaussian(m, f, float(np.sum(f * f))) for m, f in zip((mu1, mu2), factors))
    return _frechet(a, b)


def feature_pair(
    real_feats: torch.Tensor | np.ndarray, fake_feats: torch.Tensor | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Real and generated features as float64 [N, D] arrays of one dimension (one-line errors)."""
    real = _as_float64(real_feats, "real")
    fake = _as_float64(fake_feats, "generated")
    if real.shape[1] != fake.shape[1]:
        raise UserError(
            f"feature dimensions differ: real {real.shape[1]}, generated {fake.shape[1]}"
        )
    return real, fake


def frechet_distance(
    real_feats: torch.Tensor | np.ndarray, fake_feats: torch.Tensor | np.ndarray
) -> float:
    """FID between real and generated feature sets [N, D] (float64, Heusel et al. 2017)."""
    real, fake = feature_pair(real_feats, fake_feats)
    return _frechet(_gaussian(real), _gaussian(fake))


def frechet_distance_to(
    reference_feats: torch.Tensor | np.ndarray,
) -> Callable[[torch.Tensor | np.ndarray], float]:
    """FID against a fixed reference set, its statistics computed once (for jackknife and noise floor)."""
    reference = _as_float64(reference_feats, "reference")
    stats = _gaussian(reference)

    def distance(fake_feats: torch.Tensor | np.ndarray) -> float:
        fake = _as_float64(fake_feats, "generated")
        if fake.shape[1] != reference.shape[1]:
            raise UserError(
                f"feature dimensions differ: reference {reference.shape[1]}, generated {fake.shape[1]}"
            )
        return _frechet(stats, _gaussian(fake))

    return distance


def fid_of(ctx: EvalContext) -> Computed:
    """FID of the quality samples against the held-out reference, with its delete-one-prompt interval."""
    # The reference's statistics are computed once for the estimate and all jackknife replicates.
    value, low, high = jackknife_interval(
        frechet_distance_to(ctx.ref_feats), ctx.gen_feats, ctx.clusters
    )
    return Measured(value, (low, high))
