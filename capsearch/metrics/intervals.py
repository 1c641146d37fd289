"""95% intervals for the evaluation metrics, resampling prompts, never single generated images.

Generated images come as n_per_prompt samples for each of P prompts (prompt-major). Images of one prompt
are not independent draws, and duplicating an image (an image bootstrap) forms false cliques in the
extraction attack and shrinks FID's covariance, so the unit of resampling is the prompt
(docs/metrics.md, "Intervals").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from statistics import NormalDist

import numpy as np
import torch

from capsearch.errors import UserError

Statistic = Callable[[np.ndarray], float]


def _t_quantile(q: float, dof: int) -> float:
    """Student t quantile (scipy.special: about half of scipy.stats' import time)."""
    from scipy.special import stdtrit  # lazy: scipy costs ~0.3 s at import

    return float(stdtrit(dof, q))


def _check_level(level: float) -> float:
    """Two-sided tail probability α of a confidence level in (0, 1)."""
    if not 0.0 < level < 1.0:
        raise UserError(f"interval level must be between 0 and 1, got {level}")
    return 1.0 - level


def _check_boot(level: float, n_boot: int) -> float:
    """α of a bootstrap interval's level, after checking the number of resamplings."""
    if n_boot < 1:
        raise UserError(f"n_boot must be at least 1, got {n_boot}")
    return _check_level(level)


def _labels(clusters: Sequence | np.ndarray | torch.Tensor, n: int) -> tuple[np.ndarray, int]:
    """Cluster labels → indices 0..P−1 per sample, and P (at least 2)."""
    raw = clusters.cpu().numpy() if torch.is_tensor(clusters) else np.asarray(clusters)
    if raw.ndim != 1 or len(raw) != n:
        raise UserError(f"need one cluster label per sample: {n} samples, {raw.shape} labels")
    _, index = np.unique(raw, return_inverse=True)
    n_clusters = int(index.max()) + 1 if n else 0
    if n_clusters < 2:
        raise UserError(f"an interval over clusters needs at least 2 clusters, got {n_clusters}")
    return index.reshape(-1), n_clusters


def _values(values: Sequence[float] | np.ndarray | torch.Tensor, what: str) -> np.ndarray:
    """Per-sample values as finite float64."""
    arr = (
        values.detach().cpu().double().numpy()
        if torch.is_tensor(values)
        else np.asarray(values, np.float64)
    )
    if not np.isfinite(arr).all():
        raise UserError(f"{what} contain NaN or infinite values")
    return arr


def prompt_clusters(n_prompts: int, n_per_prompt: int) -> np.ndarray:
    """Cluster label (the prompt index) of each prompt-major generated sample: [P·n]."""
    if n_prompts < 1 or n_per_prompt < 1:
        raise UserError(f"need n_prompts ≥ 1 and n_per_prompt ≥ 1, got {n_prompts}, {n_per_prompt}")
    return np.repeat(np.arange(n_prompts), n_per_prompt)


def _bootstrap_means(
    values: np.ndarray, index: np.ndarray, n_clusters: int, n_boot: int, rng: np.random.Generator
) -> np.ndarray:
    """Per-sample means of n_boot resamples of whole clusters (vectorised over cluster sums)."""
    sums = np.bincount(index, weights=values, minlength=n_clusters)
    counts = np.bincount(index, minlength=n_clusters).astype(np.float64)
    draws = rng.integers(0, n_clusters, size=(n_boot, n_clusters))
    # A resample's per-sample mean: its clusters' total over their size (unequal clusters weigh by size).
    return sums[draws].sum(axis=1) / counts[draws].sum(axis=1)


def cluster_bootstrap(
    values: Sequence[float] | np.ndarray | torch.Tensor,
    clusters: Sequence | np.ndarray | torch.Tensor,
    statistic: str | Statistic = "mean",
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval (low, high) of a statistic, resampling whole clusters (prompts) with replacement."""
    alpha = _check_boot(level, n_boot)
    arr = _values(values, "values")
    index, n_clusters = _labels(clusters, len(arr))
    rng = np.random.default_rng(seed)
    if statistic == "mean":
        if arr.ndim != 1:
            raise UserError(f"the mean statistic needs 1-D values, got shape {arr.shape}")
        boot = _bootstrap_means(arr, index, n_clusters, n_boot, rng)
    elif callable(statistic):
        members = [np.flatnonzero(index == c) for c in range(n_clusters)]
        draws = rng.integers(0, n_clusters, size=(n_boot, n_clusters))
        boot = np.array([statistic(arr[np.concatenate([members[c] for c in d])]) for d in draws])
    else:
        raise UserError(f"statistic must be 'mean' or a callable, got {statistic!r}")
    low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def cluster_bootstrap_ratio(
    numerator: Sequence[float] | np.ndarray | torch.Tensor,
    denominator: Sequence[float] | np.ndarray | torch.Tensor,
    numerator_clusters: Sequence | np.ndarray | torch.Tensor | None = None,
    denominator_clusters: Sequence | np.ndarray | torch.Tensor | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval of mean(numerator) / mean(denominator), each side's clusters resampled on its own."""
    alpha = _check_boot(level, n_boot)
    rng = np.random.default_rng(seed)
    means = []
    for values, clusters, what in (
        (numerator, numerator_clusters, "numerator"),
        (denominator, denominator_clusters, "denominator"),
    ):
        arr = _values(values, f"{what} values")
        if arr.ndim != 1:
            raise UserError(f"{what} values must be 1-D, got shape {arr.shape}")
        # Without labels every value is its own cluster (e.g. per-prompt denoising strengths).
        labels = np.arange(len(arr)) if clusters is None else clusters
        index, n_clusters = _labels(labels, len(arr))
        if what == "denominator" and arr.mean() <= 0:
            raise UserError(f"a ratio interval needs a positive denominator mean, got {arr.mean()}")
        means.append(_bootstrap_means(arr, index, n_clusters, n_boot, rng))
    # The two sides are different prompts (memorised against other), so they are resampled independently.
    low, high = np.quantile(means[0] / means[1], [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def jackknife_interval(
    stat_fn: Callable[[torch.Tensor | np.ndarray], float],
    features: torch.Tensor | np.ndarray,
    clusters: Sequence | np.ndarray | torch.Tensor,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """(estimate, low, high): delete-one-cluster jackknife standard error with a t quantile (P − 1 d.f.)."""
    alpha = _check_level(level)
    index, n_clusters = _labels(clusters, len(features))
    estimate = float(stat_fn(features))
    replicates = np.empty(n_clusters)
    for c in range(n_clusters):
        keep = index != c
        subset = features[torch.from_numpy(keep)] if torch.is_tensor(features) else features[keep]
        replicates[c] = stat_fn(subset)
    if not np.isfinite(replicates).all() or not np.isfinite(estimate):
        raise FloatingPointError("a jackknife replicate of the statistic is not finite")
    # The jackknife standard error (Efron & Tibshirani 1993, ch. 11), deleting one whole cluster at a time:
    # clusters are the independent units, the images within one prompt are not.
    se = np.sqrt((n_clusters - 1) / n_clusters * np.sum((replicates - replicates.mean()) ** 2))
    half = _t_quantile(1 - alpha / 2, n_clusters - 1) * float(se)
    return estimate, estimate - half, estimate + half


def wilson_interval(successes: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval (Wilson 1927) for a binomial proportion: (low, high) in [0, 1]."""
    alpha = _check_level(level)
    if trials < 1 or not 0 <= successes <= trials:
        raise UserError(f"need 0 ≤ successes ≤ trials and trials ≥ 1, got {successes} of {trials}")
    z = NormalDist().inv_cdf(1 - alpha / 2)
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z / denom * float(np.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)))
    # Algebraically inside [0, 1] (exactly 0 at no successes); the clip only removes float rounding.
    return max(0.0, centre - half), min(1.0, centre + half)


def wilson_upper(successes: int, trials: int, level: float = 0.95) -> float:
    """One-sided upper confidence bound on a binomial proportion at `level`: the upper end of the
    two-sided Wilson interval at level 2·level − 1 (its z is the one-sided quantile Φ⁻¹(level))."""
    if not 0.5 < level < 1.0:
        raise UserError(f"a one-sided bound's level must be between 0.5 and 1, got {level}")
    return wilson_interval(successes, trials, 2 * level - 1)[1]


def seed_interval(
    values: Sequence[float] | np.ndarray | torch.Tensor, level: float = 0.95
) -> tuple[float, float, float]:
    """(mean, low, high) of a metric measured once per sampling seed: Student t with n − 1 d.f."""
    alpha = _check_level(level)
    arr = _values(values, "seed values")
    if arr.ndim != 1 or len(arr) < 2:
        raise UserError(f"a seed interval needs at least 2 values (one per seed), got {arr.shape}")
    mean = float(arr.mean())
    quantile = _t_quantile(1 - alpha / 2, len(arr) - 1)
    half = quantile * float(arr.std(ddof=1)) / float(np.sqrt(len(arr)))
    return mean, mean - half, mean + half


def two_sample_bootstrap(
    first: Sequence[float] | np.ndarray | torch.Tensor,
    second: Sequence[float] | np.ndarray | torch.Tensor,
    statistic: Callable[[np.ndarray, np.ndarray], float],
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval of statistic(first, second), each sample resampled on its own with replacement.

    The two samples are different units (e.g. training and held-out images), so a resample keeps each
    one's size, as a stratified bootstrap does.
    """
    alpha = _check_boot(level, n_boot)
    a, b = _values(first, "first sample"), _values(second, "second sample")
    if a.ndim != 1 or b.ndim != 1 or len(a) < 2 or len(b) < 2:
        raise UserError(
            f"a two-sample interval needs two 1-D samples of ≥ 2, got {a.shape}, {b.shape}"
        )
    rng = np.random.default_rng(seed)
    boot = np.array(
        [
            statistic(a[rng.integers(0, len(a), len(a))], b[rng.integers(0, len(b), len(b))])
            for _ in range(n_boot)
        ]
    )
    low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)
