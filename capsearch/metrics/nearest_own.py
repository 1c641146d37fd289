"""Own-image nearest neighbours: how often a memorised caption's sample is nearest its own training image.

A data set with a memorisation subset stores some training images many times under a caption no other
image has (capsearch.worlds.phantom, `dup_fraction`). The extraction attack samples those captions
first; this metric takes the same samples and asks, for each, which training image is nearest in tiled
ℓ2 distance (Carlini et al. 2023's distance, as the attack uses). A model that has not memorised the
image draws some plausible chest X-ray, whose nearest training image is its own only by chance (about
the own image's share of the training set); a model that copies it lands on it every time. Lower is
better. The interval resamples the memorised captions (prompts), never single samples.
"""

from __future__ import annotations

import numpy as np

from capsearch.metrics.context import Computed, EvalContext, Measured
from capsearch.metrics.intervals import cluster_bootstrap, prompt_clusters
from capsearch.metrics.neighbours import memorised_neighbours


def own_nearest(ctx: EvalContext) -> np.ndarray:
    """Per memorised-caption attack sample (prompt-major): 1 where its nearest training image is one
    of its caption's own training rows, else 0."""
    rows = {
        p: {i for i, r in enumerate(ctx.train_records) if r["text"] == p}
        for p in ctx.memorised_prompts
    }
    nearest = memorised_neighbours(ctx).index.tolist()
    owner = [p for p in ctx.memorised_prompts for _ in range(ctx.attack_n)]
    return np.array([t in rows[p] for p, t in zip(owner, nearest, strict=True)], float)


def nearest_own_share(ctx: EvalContext) -> Computed:
    """The share of memorised-caption attack samples whose nearest training image is their own."""
    images, prompts = ctx.memorised_images, ctx.memorised_prompts
    if images is None or not prompts or ctx.train_images is None:
        return None  # nothing memorised to attack here: the metric is left out, not set to 0
    if len(ctx.train_images) != len(ctx.train_records):
        return None  # unreadable training images: rows and images no longer line up
    own = own_nearest(ctx)
    value = float(own.mean())
    if len(prompts) < 2:
        return Measured(value)
    clusters = prompt_clusters(len(prompts), ctx.attack_n)
    return Measured(value, cluster_bootstrap(own, clusters, n_boot=ctx.bootstrap, seed=ctx.seed))
