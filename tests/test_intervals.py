"""Intervals: prompt-cluster bootstrap, delete-one-prompt jackknife, Wilson, seed t-interval, noise floor."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import capsearch.metrics.intervals as intervals
import capsearch.metrics.reference as reference
from capsearch.errors import UserError
from capsearch.metrics import (
    ExtractionResult,
    cluster_bootstrap,
    cluster_bootstrap_ratio,
    extraction_interval,
    frechet_distance,
    frechet_distance_to,
    jackknife_interval,
    kernel_inception_distance_to,
    noise_floor,
    prompt_clusters,
    seed_interval,
    wilson_interval,
)


def _clustered(n_prompts: int, n_per_prompt: int, between: float, within: float, seed: int):
    """Per-sample values with a shared offset per prompt (prompt-major) and their cluster labels."""
    rng = np.random.default_rng(seed)
    offsets = np.repeat(rng.normal(0.0, between, n_prompts), n_per_prompt)
    return offsets + rng.normal(0.0, within, n_prompts * n_per_prompt), prompt_clusters(
        n_prompts, n_per_prompt
    )


def test_prompt_clusters_are_prompt_major():
    assert prompt_clusters(3, 2).tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(UserError):
        prompt_clusters(0, 4)


def test_cluster_bootstrap_is_deterministic_and_vectorised_like_the_loop():
    values, clusters = _clustered(25, 8, between=1.0, within=0.3, seed=1)
    fast = cluster_bootstrap(values, clusters, n_boot=500, seed=3)
    assert fast == cluster_bootstrap(values, clusters, n_boot=500, seed=3)
    assert fast != cluster_bootstrap(values, clusters, n_boot=500, seed=4)
    # The callable path draws the same clusters from the same seed and evaluates them one by one.
    looped = cluster_bootstrap(values, clusters, statistic=np.mean, n_boot=500, seed=3)
    assert fast == pytest.approx(looped, rel=1e-12)
    assert fast[0] < values.mean() < fast[1]


def test_cluster_bootstrap_width_follows_prompts_not_images():
    values, clusters = _clustered(40, 10, between=1.0, within=0.1, seed=2)
    low, high = cluster_bootstrap(values, clusters, n_boot=2000, seed=0)
    prompt_means = values.reshape(40, 10).mean(axis=1)
    # Percentile interval ≈ mean ± 1.96·sd(prompt means)/√P when prompts are the independent units.
    expected = 2 * 1.96 * prompt_means.std(ddof=1) / math.sqrt(40)
    assert 0.8 * expected < high - low < 1.2 * expected
    # Treating each image as independent would claim an interval about √10 times narrower.
    low_i, high_i = cluster_bootstrap(values, np.arange(len(values)), n_boot=2000, seed=0)
    assert high_i - low_i < 0.5 * (high - low)


def test_cluster_bootstrap_covers_the_true_mean():
    hits = 0
    for rep in range(200):
        values, clusters = _clustered(30, 6, between=1.0, within=0.5, seed=100 + rep)
        low, high = cluster_bootstrap(values, clusters, n_boot=400, seed=rep)
        hits += low <= 0.0 <= high
    assert (
        0.88 <= hits / 200 <= 0.99
    )  # nominal 0.95; a percentile bootstrap at 30 clusters runs a bit low


def test_cluster_bootstrap_rejects_bad_input():
    with pytest.raises(UserError):
        cluster_bootstrap([1.0, 2.0], [0, 0])  # one cluster
    with pytest.raises(UserError):
        cluster_bootstrap([1.0, 2.0, 3.0], [0, 1])
    with pytest.raises(UserError):
        cluster_bootstrap([1.0, 2.0], [0, 1], level=1.5)
    with pytest.raises(UserError):
        cluster_bootstrap([1.0, float("nan")], [0, 1])
    with pytest.raises(UserError):
        cluster_bootstrap([1.0, 2.0], [0, 1], statistic="median")


def test_cluster_bootstrap_ratio():
    rng = np.random.default_rng(5)
    memorised, other = 1.5 + 0.2 * rng.random(9), 1.0 + 0.2 * rng.random(9)
    low, high = cluster_bootstrap_ratio(memorised, other, n_boot=1000, seed=1)
    assert low < memorised.mean() / other.mean() < high
    # A ratio scales with its numerator: the same draws give exactly twice the interval.
    assert cluster_bootstrap_ratio(2 * memorised, other, n_boot=1000, seed=1) == pytest.approx(
        (2 * low, 2 * high), rel=1e-12
    )
    # Constant sides: no spread at all.
    assert cluster_bootstrap_ratio([3.0, 3.0], [2.0, 2.0]) == pytest.approx((1.5, 1.5))
    # Per-sample values with prompt labels give the ratio of per-sample means.
    num, num_clusters = _clustered(6, 4, between=0.1, within=0.1, seed=6)
    low, high = cluster_bootstrap_ratio(num + 2, other, numerator_clusters=num_clusters)
    assert low < (num + 2).mean() / other.mean() < high
    with pytest.raises(UserError):
        cluster_bootstrap_ratio(memorised, -other)


def test_jackknife_of_a_mean_is_the_standard_error_of_prompt_means():
    values, clusters = _clustered(12, 5, between=1.0, within=0.2, seed=7)
    estimate, low, high = jackknife_interval(np.mean, values, clusters)
    prompt_means = values.reshape(12, 5).mean(axis=1)
    se = prompt_means.std(ddof=1) / math.sqrt(12)
    t_975_11 = 2.200985160082949  # Student t, 11 degrees of freedom
    assert estimate == pytest.approx(values.mean())
    assert (high - low) / 2 == pytest.approx(t_975_11 * se, rel=1e-9)
    as_tensor = jackknife_interval(lambda v: float(v.mean()), torch.from_numpy(values), clusters)
    assert as_tensor == pytest.approx((estimate, low, high))


def _prompt_features(rng: np.random.Generator, n_prompts: int, n_per_prompt: int, dim: int):
    """Generated features with a per-prompt offset: images of one prompt are alike."""
    centres = np.repeat(rng.normal(0.0, 0.7, (n_prompts, dim)), n_per_prompt, axis=0)
    return 0.3 + centres + rng.normal(0.0, 0.7, (n_prompts * n_per_prompt, dim))


@pytest.mark.parametrize("metric", ["fid", "kid"])
def test_jackknife_standard_error_matches_fresh_draws(metric):
    rng = np.random.default_rng(8)
    reference = rng.normal(0.0, 1.0, (800, 6))
    stat = (frechet_distance_to if metric == "fid" else kernel_inception_distance_to)(reference)
    clusters = prompt_clusters(20, 5)
    values, half_widths = [], []
    for _ in range(60):
        estimate, low, high = jackknife_interval(stat, _prompt_features(rng, 20, 5, 6), clusters)
        assert low < estimate < high
        values.append(estimate)
        half_widths.append((high - low) / 2)
    # The jackknife's standard error should match the spread over fresh sets of prompts.
    se_jack = np.mean(half_widths) / 2.093  # t quantile, 19 degrees of freedom
    assert 0.6 < se_jack / np.std(values, ddof=1) < 1.6


def test_jackknife_fid_is_the_fid_and_deletes_whole_prompts(monkeypatch):
    rng = np.random.default_rng(9)
    reference, gen = rng.normal(size=(300, 8)), _prompt_features(rng, 12, 4, 8)
    estimate, low, high = jackknife_interval(
        frechet_distance_to(reference), gen, prompt_clusters(12, 4)
    )
    assert estimate == pytest.approx(frechet_distance(reference, gen), rel=1e-12)
    assert low < estimate < high
    sizes = []
    jackknife_interval(lambda f: sizes.append(len(f)) or 0.0, gen, prompt_clusters(12, 4))
    assert sizes == [48] + [44] * 12
    with pytest.raises(FloatingPointError):
        jackknife_interval(lambda f: float("nan"), gen, prompt_clusters(12, 4))


def test_wilson_interval():
    z2 = 1.959963984540054**2
    # No successes: [0, z²/(n + z²)], not the degenerate [0, 0] a bootstrap would give.
    assert wilson_interval(0, 20) == pytest.approx((0.0, z2 / (20 + z2)))
    low, high = wilson_interval(7, 20)
    assert (1 - high, 1 - low) == pytest.approx(wilson_interval(13, 20))
    assert wilson_interval(10, 20) == pytest.approx((0.2993, 0.7007), abs=1e-4)
    assert wilson_interval(20, 20)[1] == 1.0
    with pytest.raises(UserError):
        wilson_interval(3, 2)


def test_extraction_interval_counts_prompts_with_an_extraction():
    extracted = [("a", 1, 0), ("a", 4, 2), ("c", 7, 40)]  # prompt "a" extracted two images
    result = ExtractionResult(3, extracted, {"n_prompts": 10})
    hits, low, high = extraction_interval(result)
    assert hits == 2
    assert (low, high) == pytest.approx(tuple(10 * b for b in wilson_interval(2, 10)))
    with pytest.raises(UserError):
        extraction_interval({"count": 3})


def test_seed_interval():
    mean, low, high = seed_interval([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert high - mean == pytest.approx(4.302652729911275 / math.sqrt(3))  # t quantile, 2 d.f.
    with pytest.raises(UserError):
        seed_interval([1.0])


def test_noise_floor_compares_disjoint_real_subsets(monkeypatch):
    rng = np.random.default_rng(10)
    feats = np.column_stack([np.arange(100.0), rng.normal(size=(100, 4))])
    seen = []

    def recording_fid(ref, fake):
        seen.append((ref[:, 0].copy(), fake[:, 0].copy()))
        return frechet_distance(ref[:, 1:], fake[:, 1:])

    monkeypatch.setattr(reference, "frechet_distance", recording_fid)
    floor = noise_floor(feats, n=20, repeats=5, seed=2, reference_n=30)
    assert len(seen) == 5 and floor["n"] == 20 and floor["reference_n"] == 30
    for ref_ids, fake_ids in seen:
        assert len(ref_ids) == 30 and len(fake_ids) == 20
        assert not set(ref_ids) & set(fake_ids)
        assert len(set(ref_ids) | set(fake_ids)) == 50
    assert floor["fid"]["low"] <= floor["fid"]["mean"] <= floor["fid"]["high"]
    assert floor["kid"]["low"] <= floor["kid"]["mean"] <= floor["kid"]["high"]


def test_noise_floor_is_what_same_distribution_scores():
    rng = np.random.default_rng(11)
    held_out = rng.normal(size=(400, 8))
    floor = noise_floor(held_out, n=50, repeats=40, seed=0)
    assert floor == noise_floor(held_out, n=50, repeats=40, seed=0)
    assert abs(floor["kid"]["mean"]) < 0.05  # unbiased: near 0 for the same distribution
    # FID's small-sample bias for two n-sample sets of N(0, I_d): E‖μ1 − μ2‖² = 2d/n = 0.32, and the
    # covariance term ≈ ‖Σ1 − Σ2‖²_F/4 ≈ (d² + d)/(2n) = 0.72: far from 0 though nothing differs.
    assert 0.5 < floor["fid"]["mean"] < 2.5
    shifted = rng.normal(size=(50, 8)) + 1.0
    assert frechet_distance(held_out[:50], shifted) > floor["fid"]["high"]
    with pytest.raises(UserError, match="needs 100 held-out samples"):
        noise_floor(held_out[:99], n=50)


def test_two_sample_bootstrap_keeps_each_samples_size():
    sizes = []

    def difference(a: np.ndarray, b: np.ndarray) -> float:
        sizes.append((len(a), len(b)))
        return float(a.mean() - b.mean())

    first, second = np.arange(10.0), np.arange(4.0) + 100
    low, high = intervals.two_sample_bootstrap(first, second, difference, n_boot=300, seed=1)
    assert set(sizes) == {(10, 4)} and len(sizes) == 300
    assert low <= first.mean() - second.mean() <= high and low < high
    assert (low, high) == intervals.two_sample_bootstrap(
        first, second, difference, n_boot=300, seed=1
    )
    with pytest.raises(UserError, match="two 1-D samples"):
        intervals.two_sample_bootstrap([1.0], second, difference)
