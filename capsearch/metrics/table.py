"""The one table of metrics: name, direction, labels, format, reward term, interval, how it is computed.

Everything that shows, ranks or rewards a metric reads it from here: the reward, its formula's text and
the Pareto objectives (capsearch.search.reward), the results tables and report (capsearch.reporting.report),
the model card (capsearch.export.trial), the progress lines of a search and `capsearch status`, and what
a trial reports to Ray (capsearch.search.trial). Evaluation computes every row with a `compute` hook:
it runs the stages the rows need (`needs`: capsearch.metrics.context, capsearch.metrics.stages) and
hands each hook the same `EvalContext`. A new metric is its own file, one row here and its test, even
one that makes its own pass over the model (needs `MODEL`: its hook runs the model through `ctx.pipe`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from capsearch.metrics.alignment import alignment_of
from capsearch.metrics.amd import amd_heldout_of, amd_of
from capsearch.metrics.context import ATTACK, MODEL, SAMPLES, STRENGTH, Computed, EvalContext
from capsearch.metrics.denoising import strength_ratio_of
from capsearch.metrics.extraction import (
    extracted_fraction,
    extracted_images,
    extraction_bound_of,
)
from capsearch.metrics.fid import fid_of
from capsearch.metrics.kid import kid_of
from capsearch.metrics.membership import membership_auc
from capsearch.metrics.nearest_own import nearest_own_share
from capsearch.metrics.nn_ratio import nn_ratio_share


@dataclass(frozen=True)
class Metric:
    """One metric: how it is named, shown, compared, rewarded and (optionally) computed."""

    name: str
    label: str  # report and model-card label, with its direction arrow
    short: str  # terminal column and progress-line label
    fmt: str  # format spec of a value
    direction: str | None  # "min" or "max" is better; None: a reference value, not an objective
    column: bool = False  # a column of the results tables
    progress: bool = False  # shown in the one-line progress of a finished trial
    card: bool = True  # a row of the model card
    reward: str | None = None  # its weight's name in objective.weights (None: not in the reward)
    reward_default: float = 1.0  # that weight's default
    # value (and the other metrics) → its reward term before the weight, higher better
    term: Callable[[float, Mapping[str, Any]], float] | None = None
    # the evaluation context → value, interval and companion keys (None: not measured here)
    compute: Callable[[EvalContext], Computed] | None = None
    needs: tuple[str, ...] = ()  # the stages its hook reads (capsearch.metrics.context)
    kind: str = "memorisation"  # quality | memorisation | reference | cost
    # its term in the reward's formula, signed, {w} standing for its weight (objective_text)
    formula: str = ""


_FID_FLOOR = 1e-6  # ln(0) guard: an FID of exactly 0 only happens on identical feature sets


def _log_fid(value: float, metrics: Mapping[str, Any]) -> float:
    """−ln FID: halving FID is worth ln 2 whatever the feature extractor's scale."""
    return -math.log(max(value, _FID_FLOOR))


def _amd_shortfall(value: float, metrics: Mapping[str, Any]) -> float:
    """−max(0, 1 − AMD / AMD_heldout): how much closer to the training set than held-out real images."""
    reference = metrics.get("amd_heldout")
    if reference is None:
        raise ValueError(
            "metric amd_heldout is missing (the AMD term needs the held-out reference)"
        )
    reference = float(reference)
    if not math.isfinite(reference) or reference <= 0:
        raise ValueError(f"metric amd_heldout must be positive, got {reference}")
    return -max(0.0, 1.0 - value / reference)


def _membership_advantage(value: float, metrics: Mapping[str, Any]) -> float:
    """−max(0, 2·AUC − 1): the attacker's advantage over guessing (0 at chance, 1 when it always wins)."""
    return -max(0.0, 2.0 * value - 1.0)


# In the order of the results tables' columns.
METRICS: tuple[Metric, ...] = (
    Metric("fid", "FID ↓", "FID↓", ".2f", "min", column=True, progress=True, reward="fid",
           term=_log_fid, compute=fid_of, needs=(SAMPLES,), kind="quality",
           formula="− {w}·ln FID"),
    Metric("kid", "KID ↓", "KID↓", ".4f", "min", column=True, compute=kid_of, needs=(SAMPLES,),
           kind="quality"),
    Metric("amd", "AMD ↑", "AMD↑", ".3f", "max", column=True, progress=True, reward="amd",
           term=_amd_shortfall, compute=amd_of, needs=(SAMPLES,),
           formula="− {w}·max(0, 1 − AMD/AMD_heldout)"),
    Metric("amd_heldout", "AMD of held-out real images", "AMDref", ".3f", None,
           compute=amd_heldout_of, needs=(SAMPLES,), kind="reference"),
    Metric("alignment", "image-text ↑", "txt↑", ".2f", "max", column=True, progress=True,
           reward="alignment", term=lambda v, m: v, compute=alignment_of, needs=(SAMPLES,),
           kind="quality", formula="+ {w}·image-text"),
    Metric("extracted", "extracted ↓", "ext↓", ".0f", "min", column=True, progress=True,
           compute=extracted_images, needs=(ATTACK,)),
    Metric("nearest_own", "own-image NN ↓", "ownNN↓", ".2f", "min", column=True,
           reward="nearest_own", reward_default=0.0, term=lambda v, m: -v,
           compute=nearest_own_share, needs=(ATTACK,), formula="− {w}·own-image NN share"),
    Metric("nn_ratio", "NN-ratio memorised ↓", "NNr↓", ".2f", "min", reward="nn_ratio",
           reward_default=0.0, term=lambda v, m: -v, compute=nn_ratio_share, needs=(ATTACK,),
           formula="− {w}·NN-ratio share"),
    Metric("extracted_fraction", "extracted per attacked prompt ↓", "ext%↓", ".3f", "min",
           card=False, reward="extracted", term=lambda v, m: -v, compute=extracted_fraction,
           needs=(ATTACK,), formula="− {w}·extracted fraction"),
    Metric("extraction_bound", "extraction rate, 95% upper bound ↓", "extUB↓", ".3f", "min",
           compute=extraction_bound_of, needs=(ATTACK,)),
    Metric("strength_ratio", "denoising-strength ratio (memorised/other) ↓", "str↓", ".2f", "min",
           compute=strength_ratio_of, needs=(STRENGTH,)),
    Metric("membership_auc", "membership-inference AUC ↓", "MIA↓", ".3f", "min",
           reward="membership", reward_default=0.0, term=_membership_advantage,
           compute=membership_auc, needs=(MODEL,), formula="− {w}·max(0, 2·MIA AUC − 1)"),
    Metric("trainable_pct", "trainable %", "train%", ".3g", "min", kind="cost"),  # set by the trial
)  # fmt: skip
BY_NAME: dict[str, Metric] = {m.name: m for m in METRICS}


def objectives() -> dict[str, str]:
    """Every metric a Pareto search may use, with the direction that is better."""
    return {m.name: m.direction for m in METRICS if m.direction is not None}


def reward_metrics() -> list[Metric]:
    """The metrics with a reward term, in table order."""
    return [m for m in METRICS if m.reward is not None]


def column_metrics(terminal: bool = False) -> list[Metric]:
    """The metrics shown as columns of the results tables (terminal: the progress-line ones only)."""
    return [m for m in METRICS if (m.progress if terminal else m.column)]


def formula_metrics() -> list[Metric]:
    """The reward's metrics in the order its formula reads: quality terms, then memorisation ones,
    the terms a spec must switch on (default weight 0) last; each group in table order."""
    rows = reward_metrics()
    return sorted(rows, key=lambda m: (m.reward_default == 0, m.kind != "quality", rows.index(m)))


def needed_stages(metrics: tuple[Metric, ...] = METRICS) -> set[str]:
    """The stages the hooks of a table's metrics read."""
    return {stage for m in metrics if m.compute is not None for stage in m.needs}
