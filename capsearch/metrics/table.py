"""The one table of metrics: name, direction, labels, format, reward term, interval, how it is computed.

Everything that shows, ranks or rewards a metric reads it from here: the reward and the Pareto
objectives (capsearch.search.reward), the results tables and report (capsearch.reporting.report), the model card
(capsearch.export.trial), the progress lines of a search and `capsearch status`, and what a trial reports to
Ray (capsearch.search.trial). A metric with a `compute` hook is also computed through the table: evaluate hands
every hook the same `EvalContext` (samples, features, attack images, training records), so a new metric
is its own file, one entry here and its test.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from capsearch.metrics.context import EvalContext

# A compute hook returns the value and its 95% interval (or None when it has none), or None when the
# evaluation holds nothing to measure it on (the metric is then left out of metrics.json).
Computed = tuple[float, tuple[float, float] | None] | None


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
    compute: Callable[[EvalContext], Computed] | None = None


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


def _nearest_own(ctx: EvalContext) -> Computed:
    from capsearch.metrics.nearest_own import nearest_own_share

    return nearest_own_share(ctx)


# In the order of the results tables' columns.
METRICS: tuple[Metric, ...] = (
    Metric("fid", "FID ↓", "FID↓", ".2f", "min", column=True, progress=True, reward="fid",
           term=_log_fid),
    Metric("kid", "KID ↓", "KID↓", ".4f", "min", column=True),
    Metric("amd", "AMD ↑", "AMD↑", ".3f", "max", column=True, progress=True, reward="amd",
           term=_amd_shortfall),
    Metric("amd_heldout", "AMD of held-out real images", "AMDref", ".3f", None),
    Metric("alignment", "image-text ↑", "txt↑", ".2f", "max", column=True, progress=True,
           reward="alignment", term=lambda v, m: v),
    Metric("extracted", "extracted ↓", "ext↓", ".0f", "min", column=True, progress=True),
    Metric("nearest_own", "own-image NN ↓", "ownNN↓", ".2f", "min", column=True,
           reward="nearest_own", reward_default=0.0, term=lambda v, m: -v, compute=_nearest_own),
    Metric("extracted_fraction", "extracted per attacked prompt ↓", "ext%↓", ".3f", "min",
           card=False, reward="extracted", term=lambda v, m: -v),
    Metric("strength_ratio", "denoising-strength ratio (memorised/other) ↓", "str↓", ".2f", "min"),
    Metric("trainable_pct", "trainable %", "train%", ".3g", "min"),
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
