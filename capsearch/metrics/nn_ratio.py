"""Gu et al.'s nearest-neighbour ratio: how often a memorised caption's sample is a copy by their rule.

Gu et al. 2023 ("On Memorization in Diffusion Models"; also Yoon et al. 2023) call a generated
sample memorised when its nearest training image is closer than a third of the distance to the
second-nearest one: d(x, n₁) < d(x, n₂) / 3. This metric applies the rule to the extraction attack's
samples of the memorised captions (the samples the own-image share reads) with the attack's tiled ℓ2
distance (Carlini et al. 2023), and reports the share of them that are memorised. Lower is better.

The memorisation subset stores each of its images K times, so a sample close to one has K nearest
neighbours at one distance: the second-nearest image is the nearest **distinct** one, training images
with identical pixels counting as one image (capsearch.metrics.neighbours). An exact copy of a training
image has ratio 0 and counts; a sample equidistant from two distinct images has ratio 1 and does not.
Unlike the own-image share the rule does not ask whose image it is: a caption's sample that copies
another training image counts too. The interval resamples the memorised captions (prompts), never
single samples. Missing when the attack covered no memorised caption, or the training set holds fewer
than two distinct images (no second-nearest to compare with).
"""

from __future__ import annotations

import torch

from capsearch.metrics.context import Computed, EvalContext, Measured
from capsearch.metrics.intervals import cluster_bootstrap, prompt_clusters
from capsearch.metrics.neighbours import memorised_neighbours


def nn_ratio_share(ctx: EvalContext) -> Computed:
    """The share of memorised-caption attack samples whose nearest-neighbour ratio is below 1/3."""
    neighbours = memorised_neighbours(ctx)
    if neighbours is None:
        return None  # nothing memorised to attack here: the metric is left out, not set to 0
    if not bool(torch.isfinite(neighbours.second).all()):
        return None  # one distinct training image: no second-nearest
    hit = neighbours.memorised()
    value = float(hit.mean())
    prompts = ctx.memorised_prompts
    if len(prompts) < 2:
        return Measured(value)
    clusters = prompt_clusters(len(prompts), ctx.attack_n)
    return Measured(value, cluster_bootstrap(hit, clusters, n_boot=ctx.bootstrap, seed=ctx.seed))
