"""Gu et al.'s nearest-neighbour ratio: a metric row, against a brute-force numpy computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from capsearch.metrics.context import EvalContext
from capsearch.metrics.extraction import _nearest_training
from capsearch.metrics.neighbours import nearest_two
from capsearch.metrics.nn_ratio import nn_ratio_share
from capsearch.metrics.table import BY_NAME

N = 3  # attack samples per caption


def _tiled_numpy(a: np.ndarray, b: np.ndarray, tiles: int = 4) -> float:
    """Carlini et al.'s tiled ℓ2 of two [C, H, W] images in [-1, 1], written out again in numpy."""
    a, b = (a.astype(np.float64) + 1) / 2, (b.astype(np.float64) + 1) / 2
    _, h, w = a.shape
    th, tw = h // tiles, w // tiles
    worst = 0.0
    for i in range(tiles):
        for j in range(tiles):
            ta = a[:, i * th : (i + 1) * th, j * tw : (j + 1) * tw]
            tb = b[:, i * th : (i + 1) * th, j * tw : (j + 1) * tw]
            worst = max(worst, math.sqrt(((ta - tb) ** 2).sum() / ta.size))
    return worst


def _brute_force(samples: torch.Tensor, train: torch.Tensor, distinct: bool = True) -> np.ndarray:
    """Per sample 1 when nearest < second-nearest / 3, the second skipping copies of the nearest
    (pixel-identical images) unless distinct is False."""
    s, t = samples.numpy(), train.numpy()
    hits = []
    for x in s:
        d = np.array([_tiled_numpy(x, y) for y in t])
        first = int(np.argmin(d))
        others = [k for k in range(len(t)) if k != first]
        if distinct:
            others = [k for k in others if not np.array_equal(t[k], t[first])]
        hits.append(float(d[first] < min(d[k] for k in others) / 3))
    return np.array(hits)


def _train() -> torch.Tensor:
    """10 training images of 8 px: image A stored 3 times and B twice, between other images."""
    g = torch.Generator().manual_seed(3)
    a, b, c, d, e = (torch.rand(1, 1, 8, 8, generator=g) * 2 - 1 for _ in range(5))
    f = torch.rand(1, 1, 8, 8, generator=g) * 2 - 1
    return torch.cat([a, c, a, b, d, a, e, b, f, f * 0.5])


def _context(images: torch.Tensor, prompts: list[str], train: torch.Tensor) -> EvalContext:
    records = [{"text": f"r{i}"} for i in range(len(train))]
    return EvalContext(
        root=None, world="phantom", seed=0, bootstrap=200, train_records=records,
        train_images=train, attack_n=N, memorised_images=images, memorised_prompts=prompts,
    )  # fmt: skip


def _samples(train: torch.Tensor) -> torch.Tensor:
    """Near copies of A (a copy stored 3 times), of B and of C, in-between images and noise."""
    g = torch.Generator().manual_seed(4)
    noise = torch.rand(12, 1, 8, 8, generator=g) * 2 - 1
    a, b, c = train[0], train[3], train[1]
    return torch.stack([
        a + 0.02 * noise[0], a + 0.05 * noise[1], a,  # near A: counted only past A's copies
        b + 0.03 * noise[2], 0.5 * (a + b), c + 0.01 * noise[3],
        noise[4], noise[5], 0.6 * a + 0.4 * c,
        0.8 * b + 0.2 * noise[6], train[9] + 0.02 * noise[7], noise[8],
    ]).clamp(-1, 1)  # fmt: skip


def test_the_share_matches_a_brute_force_computation_that_skips_copies():
    train = _train()
    samples = _samples(train)
    prompts = ["p0", "p1", "p2", "p3"]
    expected = _brute_force(samples, train)
    naive = _brute_force(samples, train, distinct=False)
    # the case tells the rules apart: copies of A would hide the near-copies of A and B
    assert expected.sum() >= 4 and naive.sum() < expected.sum() and 0 < expected.mean() < 1
    value, (low, high), _ = nn_ratio_share(_context(samples, prompts, train))
    assert value == expected.mean()
    assert low <= value <= high and high > low  # the prompts disagree: a real spread
    # the training set read in blocks of 3 gives the same neighbours, and the attack's nearest image
    whole, blocks = nearest_two(samples, train), nearest_two(samples, train, block=3)
    assert torch.equal(whole.index, blocks.index) and torch.equal(whole.second, blocks.second)
    cache: dict = {}  # copy groups kept from a first call serve the next one
    for start, stop in ((0, 5), (5, len(samples))):
        again = nearest_two(samples[start:stop], train, block=3, groups_of=cache)
        assert sorted(cache) == [0, 3, 6, 9]  # the blocks' first rows
        mine = whole.part(start, stop)
        assert torch.equal(again.second, mine.second) and torch.equal(again.index, mine.index)
    dist, idx = _nearest_training(samples, train, 4)
    assert torch.equal(whole.index, idx) and torch.equal(whole.distance, dist)
    d_second = [
        min(_tiled_numpy(x, y) for y in train.numpy() if not np.array_equal(y, train.numpy()[i]))
        for x, i in zip(samples.numpy(), idx.tolist(), strict=True)
    ]
    assert whole.second.double().numpy() == pytest.approx(d_second, abs=1e-6)


def test_an_exact_copy_counts_and_a_sample_equidistant_from_two_images_does_not():
    g = torch.Generator().manual_seed(5)
    base = torch.zeros(1, 8, 8)
    up, down = base.clone(), base.clone()
    up[:, :2, :2], down[:, :2, :2] = 0.25, -0.25  # one tile apart, exactly as far either way
    far = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    train = torch.cat([up[None], down[None], up[None], far])  # "up" stored twice
    samples = torch.stack([far[1]] * N + [base] * N)  # a copy of a training image, then midway
    ctx = _context(samples, ["copy", "midway"], train)
    neighbours = nearest_two(ctx.memorised_images, train)
    ratio = neighbours.ratio()
    assert ratio[:3].tolist() == [0.0] * 3  # an exact copy: ratio 0, counted
    assert ratio[3:].tolist() == [1.0] * 3  # equidistant from "up" and "down": ratio 1, not counted
    value, (low, high), _ = nn_ratio_share(ctx)
    assert value == 0.5 and low < 0.5 < high
    assert nn_ratio_share(_context(samples[:3], ["copy"], train)) == (1.0, None, {})


def test_left_out_when_nothing_memorised_was_attacked_or_no_second_image_exists():
    train = _train()
    assert nn_ratio_share(_context(None, [], train)) is None
    copies = train[[0, 2, 5]]  # every training image a copy of one: no second-nearest
    assert nn_ratio_share(_context(copies, ["p"], copies)) is None


def test_the_neighbours_follow_new_images_in_the_context():
    train = _train()
    ctx = _context(train[[1, 1, 1]], ["p"], train)  # copies of C: all counted
    assert nn_ratio_share(ctx).value == 1.0
    ctx.memorised_images = torch.cat([train[[1]], 0.5 * (train[[0]] + train[[3]]), train[[4]]])
    assert nn_ratio_share(ctx).value == _brute_force(ctx.memorised_images, train).mean()


def test_the_table_row_reaches_every_reader_with_the_reward_unchanged():
    from capsearch.config import RewardWeights
    from capsearch.search.reward import compute_reward
    from capsearch.search.trial import REPORTED

    row = BY_NAME["nn_ratio"]
    assert row.compute is nn_ratio_share and row.direction == "min" and row.needs == ("attack",)
    assert row.kind == "memorisation" and row.reward == "nn_ratio" and row.reward_default == 0.0
    assert "nn_ratio" in REPORTED and RewardWeights().nn_ratio == 0.0
    m = {"fid": 50.0, "alignment": 0.3, "amd": 0.1, "amd_heldout": 0.1, "extracted_fraction": 0.1}
    weights = RewardWeights().model_dump()
    assert compute_reward(m, weights) == pytest.approx(-math.log(50.0) + 0.3 - 0.1)
    assert compute_reward({**m, "nn_ratio": 0.5}, {**weights, "nn_ratio": 2.0}) == pytest.approx(
        -math.log(50.0) + 0.3 - 0.1 - 1.0
    )
