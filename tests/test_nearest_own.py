"""Own-image nearest neighbour: a metric added through the metric table alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from capsearch.metrics.context import EvalContext
from capsearch.metrics.nearest_own import nearest_own_share
from capsearch.metrics.table import BY_NAME


def _context(memorised_images, prompts, n):
    g = torch.Generator().manual_seed(0)
    train = torch.rand(6, 1, 16, 16, generator=g) * 2 - 1
    records = [{"text": "a"}, {"text": "a"}, {"text": "b"}, {"text": "c"}, {"text": "d"},
               {"text": "e"}]  # fmt: skip
    empty = torch.zeros(0)
    return EvalContext(
        root=None, world="phantom", seed=0, bootstrap=200, prompts=[], gen=empty,
        clusters=np.zeros(0), gen_feats=empty, ref_feats=empty, train_feats=empty,
        train_records=records, train_images=train, attack_n=n,
        memorised_images=memorised_images, memorised_prompts=prompts,
    ), train  # fmt: skip


def test_copies_of_the_own_image_score_one_and_others_do_not():
    ctx, train = _context(None, [], 3)
    copies = torch.cat([train[[1, 1, 0]], train[[2, 2, 2]]])  # "a" rows 0-1, "b" row 2
    ctx.memorised_images, ctx.memorised_prompts = copies, ["a", "b"]
    value, (low, high), _ = nearest_own_share(ctx)
    assert value == 1.0 and low == high == 1.0
    # the samples of "b" are copies of "c"'s image: half the samples miss their own image
    ctx.memorised_images = torch.cat([train[[1, 1, 0]], train[[3, 3, 3]]])
    value, (low, high), _ = nearest_own_share(ctx)
    assert value == pytest.approx(0.5) and low <= 0.5 <= high and high - low > 0


def test_left_out_when_nothing_memorised_was_attacked():
    ctx, _ = _context(None, [], 3)
    assert nearest_own_share(ctx) is None


def test_the_table_row_reaches_every_reader():
    from capsearch.reporting.report import COLUMNS
    from capsearch.search.trial import REPORTED

    row = BY_NAME["nearest_own"]
    assert row.compute is nearest_own_share and row.direction == "min" and row.column and row.card
    assert row.needs == ("attack",)  # computed from the extraction attack's samples
    assert "own-image NN ↓" in COLUMNS and "nearest_own" in REPORTED
