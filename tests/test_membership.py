"""Loss-based membership inference: the AUC against a brute-force count, a memoriser against chance."""

from __future__ import annotations

import itertools
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import phantom_data

from capsearch.errors import UserError
from capsearch.metrics.context import MODEL, EvalContext
from capsearch.metrics.membership import (
    _distinct,
    membership_auc,
    membership_auc_of,
    membership_losses,
)
from capsearch.metrics.table import BY_NAME
from capsearch.models.load import load_pipeline
from capsearch.search.reward import compute_reward


def brute_force_auc(members: list[float], others: list[float]) -> float:
    """Over every (member, non-member) pair: 1 if the member's loss is lower, ½ if equal."""
    pairs = list(itertools.product(members, others))
    return sum(1.0 if m < o else 0.5 if m == o else 0.0 for m, o in pairs) / len(pairs)


@pytest.mark.parametrize("seed", range(6))
def test_auc_is_the_share_of_pairs_a_member_wins(seed):
    rng = random.Random(seed)
    # small integers: many ties within and across the two lists
    members = [float(rng.randint(0, 6)) for _ in range(rng.randint(1, 9))]
    others = [float(rng.randint(2, 8)) for _ in range(rng.randint(1, 9))]
    assert membership_auc_of(members, others) == pytest.approx(brute_force_auc(members, others))


def test_auc_extremes_and_bad_input():
    assert membership_auc_of([0.1, 0.2], [0.3, 0.4, 0.5]) == 1.0  # every member below
    assert membership_auc_of([0.6, 0.9], [0.3, 0.4]) == 0.0
    assert membership_auc_of([0.5, 0.5], [0.5]) == 0.5  # all tied: chance
    assert membership_auc_of([0.1, 0.4], [0.2, 0.3]) == 0.5
    with pytest.raises(UserError, match="non-empty"):
        membership_auc_of([], [0.1])


def test_duplicated_images_count_once():
    records = [{"dup_group": None}, {"dup_group": 3}, {"dup_group": 3}, {"dup_group": None},
               {"dup_group": 4}, {"dup_group": 3}]  # fmt: skip
    assert _distinct(records) == [0, 1, 3, 4]


class Memoriser(torch.nn.Module):
    """The denoiser of a model that memorised its training images (the empirical data set's optimal
    denoiser at small t): x_t's noise read against the training image nearest to x_t / √ᾱ_t."""

    def __init__(self, unet: torch.nn.Module, alphas: torch.Tensor, images: torch.Tensor) -> None:
        super().__init__()
        self.config, self.alphas, self.images = unet.config, alphas, images
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # the pipeline's device and dtype

    def forward(self, noisy, t, encoder_hidden_states=None):
        a = self.alphas[t].view(-1, 1, 1, 1).to(noisy)
        guess = noisy / a.sqrt()
        nearest = ((guess[:, None] - self.images[None]) ** 2).flatten(2).sum(-1).argmin(1)
        return SimpleNamespace(sample=(noisy - a.sqrt() * self.images[nearest]) / (1 - a).sqrt())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return phantom_data(tmp_path_factory, seed=4, held_out_images=24)


def _context(pipe, root, seed: int = 0) -> EvalContext:
    from capsearch.settings import EvalSettings

    settings = EvalSettings(seed=seed, bootstrap=200)
    return EvalContext(root=root, world="phantom", seed=seed + 10_007, bootstrap=200, pipe=pipe,
                       settings=settings)  # fmt: skip


def test_a_memoriser_is_told_apart_and_an_unrelated_model_is_not(data):
    from capsearch.datasets.folder import load_images

    pipe = load_pipeline("tiny:random")
    chance = membership_auc(_context(pipe, data))
    members = load_images(data, "train", 32)
    pipe.unet = Memoriser(pipe.unet, pipe.scheduler.alphas_cumprod, members)
    copied = membership_auc(_context(pipe, data))
    # the memoriser predicts its training images' noise exactly: every member's loss is the lowest
    assert copied.value == 1.0 and copied.interval == (1.0, 1.0)
    assert copied.extra["membership_loss_train"] < 1e-6 < copied.extra["membership_loss_heldout"]
    # random weights never saw the data: training and held-out phantoms look alike to them
    assert 0.25 < chance.value < 0.75 and chance.interval[0] < 0.5 < chance.interval[1]
    assert chance.extra["membership_loss_train"] > 0.1


def test_fixed_seed_fixed_value_and_a_new_seed_draws_afresh(data):
    pipe = load_pipeline("tiny:random")
    first = membership_losses(pipe, data, "validate", seed=0, n=6)
    assert all(
        torch.equal(a, b) for a, b in zip(first, membership_losses(pipe, data, "validate", 0, n=6))
    )
    other = membership_losses(pipe, data, "validate", seed=1, n=6)
    assert len(first[0]) == len(first[1]) == 6 and not torch.equal(first[0], other[0])
    # the loss does not depend on how the passes are batched
    batched = membership_losses(pipe, data, "validate", seed=0, n=6, batch_size=5)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(first, batched))


def test_the_table_row_reports_it_without_weight():
    row = BY_NAME["membership_auc"]
    assert row.compute is membership_auc and row.needs == (MODEL,) and row.direction == "min"
    assert row.reward == "membership" and row.reward_default == 0.0 and not row.column
    metrics = {"fid": 20.0, "amd": 0.2, "amd_heldout": 0.25, "alignment": 0.5,
               "extracted_fraction": 0.125}  # fmt: skip
    from capsearch.config import RewardWeights

    weights = RewardWeights().model_dump()
    assert weights["membership"] == 0.0
    plain = compute_reward(metrics, weights)
    assert compute_reward({**metrics, "membership_auc": 0.9}, weights) == plain  # weight 0: no say
    on = compute_reward({**metrics, "membership_auc": 0.9}, {**weights, "membership": 1.0})
    assert on == pytest.approx(plain - 0.8)  # −max(0, 2·0.9 − 1)
    assert np.isclose(row.term(0.3, {}), 0.0)  # below chance earns nothing


@pytest.mark.slow
def test_fine_tuning_on_few_images_raises_the_auc(tmp_path):
    """Control on a real model: full fine-tuning of the tiny base on 4 patients opens the gap."""
    from capsearch.training.loop import TrainSettings, finetune
    from capsearch.worlds.phantom import write_phantom_dataset

    root = tmp_path / "data"
    write_phantom_dataset(root, patients=4, size=32, seed=3, held_out_images=40)
    pipe = load_pipeline("tiny")
    before = membership_auc_of(*(x.numpy() for x in membership_losses(pipe, root, "validate", 0)))
    settings = TrainSettings(steps=150, batch_size=8, lr=1e-3, caption_dropout=0.0)
    finetune(pipe, [{"method": "full", "units": "*"}], root, settings, quiet=True)
    after = membership_auc_of(*(x.numpy() for x in membership_losses(pipe, root, "validate", 0)))
    assert after > 0.9 and after > before + 0.2  # measured: 0.65 before, 0.98 after
