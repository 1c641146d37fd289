"""Objectives of the outer loop: a scalar reward over quality and memorisation, or a Pareto front.

The scalar reward (docs/search.md) is a weighted sum of one term per metric of the table that has one
(capsearch.metrics.table, `reward`); with the table as it stands

    reward = −w_fid·ln(FID) + w_align·alignment − w_amd·max(0, 1 − AMD / AMD_heldout)
             − w_ext·extracted_fraction − w_own·own_image_share − w_nn·nn_ratio_share
             − w_mia·max(0, 2·MIA_AUC − 1)

Each term is of order one and scale-free where it matters: ln makes FID ratios count, not absolute
distances (halving FID is worth ln 2 ≈ 0.69 whatever the feature extractor's scale); the image-text
score lies in [0, 1] (phantom finding agreement) or [−1, 1] (BioViL-T cosine); the extracted fraction
(images extracted per attacked prompt, Carlini et al. 2023) in [0, 1]; the own-image share
(capsearch.metrics.nearest_own: how often an attack sample's nearest training image is its caption's
own) in [0, 1] too, and so do Gu et al.'s nearest-neighbour-ratio share (capsearch.metrics.nn_ratio)
and the membership attacker's advantage over chance (capsearch.metrics.membership). The share is a
continuous memorisation signal: it rises before the attack's thresholded count does. The weights of
the last three default to 0 (off), so the reward of a spec that does not set them is the four-term one.

The AMD term is a shortfall, not AMD itself. AMD (Dutt et al. 2024) grows with distance from the
training images, and a model that never learnt the domain (Freeze) sits farthest from them: a reward
that added AMD would pay for learning nothing. AMD_heldout is the same distance for real held-out
images of the domain, at the same sample count: what a model that learnt the domain without copying
reaches. Generating closer to the training set than that is copying, penalised in proportion (0 to 1);
generating farther earns nothing, since being off the domain is FID's business. A weight of 0 drops
its term, missing metric included.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from capsearch.metrics.table import formula_metrics, objectives, reward_metrics
from capsearch.search.constraints import describe

# Every metric a Pareto search may use, with the direction that is better (capsearch.metrics.table).
OBJECTIVES: dict[str, str] = objectives()


def reward_terms(metrics: Mapping[str, Any], weights: Mapping[str, float]) -> dict[str, float]:
    """Each weighted term of the reward (zero-weight terms are left out), from the metric table."""
    terms = {}
    for metric in reward_metrics():
        weight = float(weights.get(metric.reward, 0.0))
        if weight == 0.0:
            continue
        value = metrics.get(metric.name)
        if value is None:
            raise ValueError(f"metric {metric.name} is missing")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"metric {metric.name} is not finite ({value})")
        terms[metric.name] = weight * metric.term(value, metrics)
    return terms


def compute_reward(metrics: Mapping[str, Any], weights: Mapping[str, float]) -> float:
    """The scalar reward of one trial's metrics (higher is better); ValueError if a term is unusable."""
    return float(sum(reward_terms(metrics, weights).values()))


def objective_directions(names: Sequence[str]) -> list[str]:
    """Ray/Optuna modes ("min"/"max") of Pareto objectives."""
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown:
        raise ValueError(f"unknown objective {unknown[0]!r}; choose from {', '.join(OBJECTIVES)}")
    return [OBJECTIVES[n] for n in names]


def pareto_front(rows: Sequence[Mapping[str, Any]], names: Sequence[str]) -> list[int]:
    """Indices of the rows no other row dominates on the named objectives (rows lacking one skipped)."""
    signs = [1.0 if d == "min" else -1.0 for d in objective_directions(names)]
    points: list[tuple[int, list[float]]] = []
    for i, row in enumerate(rows):
        values = [row.get(n) for n in names]
        if all(v is not None and math.isfinite(float(v)) for v in values):
            points.append((i, [s * float(v) for s, v in zip(signs, values)]))
    front = []
    for i, p in points:
        dominated = any(
            all(a <= b for a, b in zip(q, p)) and any(a < b for a, b in zip(q, p))
            for j, q in points
            if j != i
        )
        if not dominated:
            front.append(i)
    return front


def objective_text(objective: Any) -> str:
    """The objective (a spec's `objective`) in one line, as the report states it."""
    limits = objective.constraints
    subject = f", subject to {describe(limits)}" if limits else ""
    if objective.mode == "pareto":
        return "Pareto front over " + ", ".join(objective.pareto) + subject
    pieces = []
    for metric in formula_metrics():
        weight = float(getattr(objective.weights, metric.reward))
        if weight == 0 and metric.reward_default == 0:
            continue  # a term the spec did not switch on
        pieces.append(metric.formula.format(w=f"{weight:g}"))
    # The first term's sign is written without its space ("−1·ln FID"), a leading + not at all.
    text = " ".join(pieces)
    text = text[2:] if text.startswith("+ ") else text.replace("− ", "−", 1)
    return f"reward = {text}{subject}"
