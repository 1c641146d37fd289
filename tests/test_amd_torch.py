"""AMD's nearest neighbours without faiss: the torch path finds what faiss finds."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from capsearch.metrics.amd import _has_faiss, amd, nearest_train


def _feats(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def no_faiss(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError
    assert not _has_faiss()


@pytest.mark.parametrize("k, block_rows, query_rows", [(1, None, 8192), (3, 7, 5)])
def test_torch_nearest_agrees_with_faiss(monkeypatch, k, block_rows, query_rows):
    pytest.importorskip("faiss")
    gen, train = _feats(200, 32, 1), _feats(300, 32, 2)
    gen[:20] = train[[5 * i for i in range(20)]] * 3.0 + 1e-3 * _feats(20, 32, 3)  # near-copies
    gen[20] = 0.0  # no direction: distance 1 to everything, either way
    args = dict(k=k, block_rows=block_rows, query_rows=query_rows)
    ref_d, ref_i = nearest_train(gen, train, **args)
    monkeypatch.setitem(sys.modules, "faiss", None)
    assert not _has_faiss()
    got_d, got_i = nearest_train(gen, train, **args)
    assert got_d.dtype == ref_d.dtype and got_i.dtype == ref_i.dtype == torch.int64
    rows = [i for i in range(len(gen)) if i != 20]  # the zero row ties everywhere: index arbitrary
    assert torch.equal(got_i[rows], ref_i[rows])
    assert torch.allclose(got_d, ref_d, atol=1e-5, rtol=0)
    assert torch.equal(got_i[:20, 0], torch.arange(0, 100, 5))
    assert got_d[20, 0] == pytest.approx(1.0)


def test_torch_nearest_takes_numpy_and_stays_exact_across_blocks(no_faiss):
    gen, train = _feats(50, 16, 4).numpy(), _feats(90, 16, 5).numpy()
    dist, idx = nearest_train(gen, train, k=2, block_rows=13, query_rows=6)
    sim = (gen / np.linalg.norm(gen, axis=1, keepdims=True)) @ (
        train / np.linalg.norm(train, axis=1, keepdims=True)
    ).T
    best = np.argsort(-sim, axis=1)[:, :2]
    assert np.array_equal(idx.numpy(), best)
    assert np.allclose(dist.numpy(), 1 - np.take_along_axis(sim, best, axis=1), atol=1e-5)
    assert amd(train[:10], train) == pytest.approx(0.0, abs=1e-5)
