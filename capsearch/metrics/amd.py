"""AMD: mean over generated samples of the minimum cosine distance to the training set.

Exact nearest neighbours either way: through faiss (an inner-product index, on a GPU when faiss sees
one) where it imports, else by a chunked matrix product of the normalised features in torch, on the
device the generated features are on. Both normalise the same way and merge blocks the same way.
"""

from __future__ import annotations

import numpy as np
import torch

from capsearch.errors import UserError
from capsearch.metrics.context import Computed, EvalContext, Measured
from capsearch.metrics.intervals import cluster_bootstrap

# One block of training features, normalised float32, is held twice while faiss copies it into its index:
# at 128 MB a block, 110,000 × 1,024 training features are searched in four blocks well inside 2 GB.
DEFAULT_BLOCK_BYTES = 128 * 2**20
DEFAULT_QUERY_ROWS = 8192


def _rows(feats: torch.Tensor | np.ndarray, what: str) -> tuple[int, int]:
    """(N, D) of a 2-D feature matrix, with a one-line error otherwise."""
    if len(feats.shape) != 2:
        raise UserError(f"{what} features must be 2-D [N, D], got shape {tuple(feats.shape)}")
    return int(feats.shape[0]), int(feats.shape[1])


def _normalised_block(feats: torch.Tensor | np.ndarray, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) as contiguous L2-normalised float32 (a copy of that block only)."""
    block = feats[start:stop]
    if torch.is_tensor(block):
        block = block.detach().to("cpu", torch.float32).numpy()
    block = np.array(block, dtype=np.float32, order="C", copy=True)
    norms = np.linalg.norm(block, axis=1, keepdims=True)
    # A zero vector has no direction: it stays zero, so its cosine similarity to everything is 0.
    block /= np.maximum(norms, 1e-12)
    return block


def _unit_rows(feats: torch.Tensor | np.ndarray, start: int, stop: int, device) -> torch.Tensor:
    """Rows [start, stop) as L2-normalised float32 on `device`, as _normalised_block makes them."""
    block = feats[start:stop]
    block = block.detach() if torch.is_tensor(block) else torch.from_numpy(np.asarray(block))
    block = block.to(device, torch.float32)
    return block / block.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _has_faiss() -> bool:
    try:
        import faiss  # noqa: F401  # lazy: optional, absent where it is not installed
    except ImportError:
        return False
    return True


def _flat_ip_index(dim: int):
    """An exact inner-product index: on a GPU when faiss sees one, else on the CPU."""
    import faiss  # lazy: optional (only where _has_faiss), seconds to import

    index = faiss.IndexFlatIP(dim)
    if faiss.get_num_gpus() > 0 and hasattr(faiss, "index_cpu_to_all_gpus"):
        index = faiss.index_cpu_to_all_gpus(index)
    return index


def nearest_train(
    gen_feats: torch.Tensor | np.ndarray,
    train_feats: torch.Tensor | np.ndarray,
    k: int = 1,
    block_rows: int | None = None,
    query_rows: int = DEFAULT_QUERY_ROWS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine distances [Q, k] (ascending) and indices [Q, k] of each generated sample's nearest training samples."""
    n_gen, dim = _rows(gen_feats, "generated")
    n_train, dim_train = _rows(train_feats, "training")
    if dim != dim_train:
        raise UserError(f"feature dimensions differ: generated {dim}, training {dim_train}")
    if n_train == 0 or n_gen == 0:
        raise UserError(
            "nearest-neighbour search needs at least one generated and one training sample"
        )
    if not 1 <= k <= n_train:
        raise UserError(f"k must be between 1 and the training-set size {n_train}, got {k}")
    if block_rows is None:
        block_rows = max(1, DEFAULT_BLOCK_BYTES // (4 * dim))
    if block_rows < 1 or query_rows < 1:
        raise UserError("block_rows and query_rows must be positive")

    if not _has_faiss():
        return _nearest_torch(gen_feats, train_feats, k, block_rows, query_rows)
    best_sim = np.full((n_gen, k), -np.inf, dtype=np.float32)
    best_idx = np.full((n_gen, k), -1, dtype=np.int64)
    queries = [
        (q0, _normalised_block(gen_feats, q0, min(q0 + query_rows, n_gen)))
        for q0 in range(0, n_gen, query_rows)
    ]
    for t0 in range(0, n_train, block_rows):
        t1 = min(t0 + block_rows, n_train)
        index = _flat_ip_index(dim)
        index.add(_normalised_block(train_feats, t0, t1))
        kk = min(k, t1 - t0)
        for q0, query in queries:
            q1 = q0 + len(query)
            sim, idx = index.search(query, kk)
            # Merge this block's top-k into the running top-k (blocks are disjoint, so no duplicates).
            all_sim = np.concatenate([best_sim[q0:q1], sim], axis=1)
            all_idx = np.concatenate([best_idx[q0:q1], idx + t0], axis=1)
            order = np.argsort(-all_sim, axis=1, kind="stable")[:, :k]
            best_sim[q0:q1] = np.take_along_axis(all_sim, order, axis=1)
            best_idx[q0:q1] = np.take_along_axis(all_idx, order, axis=1)
        del index
    dist = np.clip(1.0 - best_sim, 0.0, 2.0)
    return torch.from_numpy(dist), torch.from_numpy(best_idx)


def _nearest_torch(
    gen_feats: torch.Tensor | np.ndarray,
    train_feats: torch.Tensor | np.ndarray,
    k: int,
    block_rows: int,
    query_rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """nearest_train without faiss: exact cosine top-k by normalised matrix products, chunked."""
    device = gen_feats.device if torch.is_tensor(gen_feats) else torch.device("cpu")
    n_gen, n_train = len(gen_feats), len(train_feats)
    best_sim = torch.full((n_gen, k), -torch.inf, device=device)
    best_idx = torch.full((n_gen, k), -1, dtype=torch.long, device=device)
    queries = [
        (q0, _unit_rows(gen_feats, q0, min(q0 + query_rows, n_gen), device))
        for q0 in range(0, n_gen, query_rows)
    ]
    for t0 in range(0, n_train, block_rows):
        t1 = min(t0 + block_rows, n_train)
        block = _unit_rows(train_feats, t0, t1, device)
        for q0, query in queries:
            q1 = q0 + len(query)
            sim, idx = (query @ block.T).topk(min(k, t1 - t0), dim=1)
            # The same running top-k merge as the faiss path (blocks are disjoint).
            all_sim = torch.cat([best_sim[q0:q1], sim], dim=1)
            all_idx = torch.cat([best_idx[q0:q1], idx + t0], dim=1)
            order = torch.argsort(-all_sim, dim=1, stable=True)[:, :k]
            best_sim[q0:q1] = all_sim.gather(1, order)
            best_idx[q0:q1] = all_idx.gather(1, order)
    return (1.0 - best_sim).clamp(0.0, 2.0).cpu(), best_idx.cpu()


def amd(
    gen_feats: torch.Tensor | np.ndarray,
    train_feats: torch.Tensor | np.ndarray,
    block_rows: int | None = None,
) -> float:
    """Average minimum cosine distance of generated samples to the training set (higher = less copying)."""
    dist, _ = nearest_train(gen_feats, train_feats, k=1, block_rows=block_rows)
    return float(dist[:, 0].double().mean())


def amd_of(ctx: EvalContext) -> Computed:
    """AMD of the quality samples to the training set, with its prompt-bootstrap interval."""
    nearest = nearest_train(ctx.gen_feats, ctx.train_feats)[0][:, 0].double().numpy()
    interval = cluster_bootstrap(nearest, ctx.clusters, n_boot=ctx.bootstrap, seed=ctx.seed)
    return Measured(float(nearest.mean()), interval)


def amd_heldout_of(ctx: EvalContext) -> Computed:
    """AMD of real held-out images, as many as the quality samples: the reward's reference."""
    # Real held-out images' own distance to the training set, at the generated sample count: the AMD
    # a model that learnt the domain without copying would reach (the reward's AMD term).
    n_gen = len(ctx.gen_feats)
    pick = np.random.default_rng(ctx.seed).choice(len(ctx.ref_feats), size=n_gen, replace=False)
    nearest = nearest_train(ctx.ref_feats[pick], ctx.train_feats)[0][:, 0].double().numpy()
    return Measured(float(nearest.mean()))
