"""Fréchet distance between two sets of image features (FID, Heusel et al. 2017)."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from capsearch.errors import UserError

# Largest relative residual ‖X·X − A‖_F / ‖A‖_F accepted from scipy's sqrtm before retrying with an offset.
_SQRTM_TOLERANCE = 1e-5
# An imaginary part of √(Σ1Σ2) is rounding noise when it is this small relative to the real part.
_IMAG_TOLERANCE = 1e-3


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


def _sqrtm_product(sigma1: np.ndarray, sigma2: np.ndarray) -> np.ndarray:
    """√(Σ1·Σ2), retried with Σ + εI offsets when the product is near singular (scipy's Schur method)."""
    from scipy import linalg

    def attempt(a: np.ndarray) -> tuple[np.ndarray, float]:
        with warnings.catch_warnings():
            # A singular product is expected here and handled below by measuring the residual.
            warnings.simplefilter("ignore", linalg.LinAlgWarning)
            root = linalg.sqrtm(a)
        if not np.isfinite(root).all():
            return root, float("inf")
        scale = max(np.linalg.norm(a, "fro"), 1e-300)
        return root, float(np.linalg.norm(root @ root - a, "fro") / scale)

    root, err = attempt(sigma1 @ sigma2)
    dim = sigma1.shape[0]
    scale = max(float(np.trace(sigma1) + np.trace(sigma2)) / (2 * dim), 1e-12)
    eps = 1e-10 * scale
    # Singular covariances (N ≤ D, or constant features) give a product with zero eigenvalues, where the
    # Schur method loses accuracy; a growing ridge keeps the bias at the level of the accepted error.
    while err > _SQRTM_TOLERANCE and eps <= 1e-2 * scale:
        offset = np.eye(dim) * eps
        root, err = attempt((sigma1 + offset) @ (sigma2 + offset))
        eps *= 100
    if not np.isfinite(root).all():
        raise FloatingPointError(
            "matrix square root of Σ1·Σ2 did not converge, even with an εI offset"
        )
    if np.iscomplexobj(root):
        imag = np.abs(root.imag).max()
        if imag > _IMAG_TOLERANCE * max(1.0, np.abs(root.real).max()):
            raise FloatingPointError(
                f"√(Σ1·Σ2) has a large imaginary component ({imag:.3g}); the covariances are too degenerate "
                "(use more samples than feature dimensions)"
            )
        root = root.real
    return root


def frechet_distance_from_stats(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = (
        np.atleast_2d(sigma1).astype(np.float64),
        np.atleast_2d(sigma2).astype(np.float64),
    )
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise UserError(f"feature dimensions differ: {mu1.shape[0]} against {mu2.shape[0]}")
    # Heusel et al. 2017, eq. (6): d² = ‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2·(Σ1Σ2)^½).
    covmean = _sqrtm_product(sigma1, sigma2)
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)
    return max(float(value), 0.0)  # a squared distance: only rounding makes it negative


def frechet_distance(
    real_feats: torch.Tensor | np.ndarray, fake_feats: torch.Tensor | np.ndarray
) -> float:
    """FID between real and generated feature sets [N, D] (float64, Heusel et al. 2017)."""
    real = _as_float64(real_feats, "real")
    fake = _as_float64(fake_feats, "generated")
    if real.shape[1] != fake.shape[1]:
        raise UserError(
            f"feature dimensions differ: real {real.shape[1]}, generated {fake.shape[1]}"
        )
    mu1, sigma1 = gaussian_stats(real)
    mu2, sigma2 = gaussian_stats(fake)
    return frechet_distance_from_stats(mu1, sigma1, mu2, sigma2)
