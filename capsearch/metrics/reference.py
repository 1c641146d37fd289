"""The reference's noise floor: FID and KID between disjoint subsets of real held-out images.

What FID looks like when nothing is wrong: two sets of real held-out images of the generated set's size
and the reference's, compared as an evaluation compares generated samples with the reference
(docs/metrics.md, "Intervals"). Small-sample FID is biased upwards, so a model's FID is read against it.
"""

from __future__ import annotations

import numpy as np
import torch

from capsearch.errors import UserError
from capsearch.metrics.fid import _as_float64, frechet_distance
from capsearch.metrics.intervals import _check_level
from capsearch.metrics.kid import kernel_inception_distance


def noise_floor(
    reference_feats: torch.Tensor | np.ndarray,
    n: int,
    repeats: int = 50,
    seed: int = 0,
    reference_n: int | None = None,
    kid: bool = True,
    level: float = 0.95,
) -> dict:
    """FID (and KID) between disjoint random subsets of real held-out features: what "nothing wrong" scores."""
    alpha = _check_level(level)
    feats = _as_float64(reference_feats, "held-out")
    m = n if reference_n is None else reference_n
    if n < 2 or m < 2 or repeats < 1:
        raise UserError(
            f"noise floor needs n ≥ 2, reference_n ≥ 2, repeats ≥ 1; got {n}, {m}, {repeats}"
        )
    if len(feats) < n + m:
        raise UserError(
            f"noise floor needs {n + m} held-out samples (two disjoint subsets of {m} and {n}), got {len(feats)}"
        )
    rng = np.random.default_rng(seed)
    values: dict[str, list[float]] = {"fid": [], "kid": []} if kid else {"fid": []}
    for _ in range(repeats):
        perm = rng.permutation(len(feats))
        # The first m play the reference, the next n the generated set, as the evaluation compares them.
        ref, fake = feats[perm[:m]], feats[perm[m : m + n]]
        values["fid"].append(frechet_distance(ref, fake))
        if kid:
            values["kid"].append(kernel_inception_distance(ref, fake))
    out: dict = {"n": n, "reference_n": m, "repeats": repeats, "level": level}
    for name, vals in values.items():
        vals = np.asarray(vals)
        low, high = np.quantile(vals, [alpha / 2, 1 - alpha / 2])
        out[name] = {"mean": float(vals.mean()), "low": float(low), "high": float(high)}
    return out
