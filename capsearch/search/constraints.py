"""Hard limits on metrics (`objective.constraints`): which trials are feasible, for the sampler and ranks.

A constraint names a metric and a bound on the side its better direction says (capsearch.metrics.table):
`extracted: 0` reads "extracted ≤ 0", `alignment: 0.3` reads "image-text ≥ 0.3". A scalar reward prices
memorisation against quality (one extracted image of 20 costs as much as a 5% higher FID at the default
weights); a constraint does not trade: a trial over the bound ranks below every trial within it.

Where it acts:
- the sampler: each evaluated trial's violations are told to Optuna (`Trial.set_constraint`), which TPE
  and NSGA-II use to prefer feasible regions (Optuna's constrained TPE, Watanabe & Hutter 2023, and
  constrained domination, Deb et al. 2002); the random sampler proposes blind of every result anyway.
  A trial ASHA stopped has no evaluation, hence no constraint value, and is ranked by its probe score;
- the final stage's finalists: feasible on the search's evaluation first (capsearch.search.final.finalists);
- the best trial of a run (report, export, `capsearch.search.runs.best_trial`): feasible on the final
  re-evaluation first, then by reward. Among infeasible trials, the smaller total violation ranks first.

A constrained metric missing from an evaluation counts as violated (an infinite violation): a limit that
cannot be checked is not met.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from capsearch.metrics.table import BY_NAME, objectives

# metric name → bound; the metric's direction says which side of the bound is allowed
Constraints = Mapping[str, float]
# a metric's finite value in one evaluation, or None (e.g. `partial(record_value, record)`)
Getter = Callable[[str], "float | None"]


def check_constraints(constraints: Constraints) -> None:
    """ValueError naming the first constraint that is not on a metric with a better direction."""
    known = objectives()
    for name, bound in constraints.items():
        if name not in known:
            raise ValueError(f"unknown constrained metric {name!r}; choose from {', '.join(known)}")
        if not math.isfinite(float(bound)):
            raise ValueError(f"the bound of {name!r} must be a finite number, got {bound}")


def margins(value: Getter, constraints: Constraints) -> dict[str, float]:
    """Each constrained metric's signed distance past its bound, as Optuna takes constraints: ≤ 0 within
    (how far inside), > 0 over (how far beyond), inf when the metric is missing."""
    out = {}
    for name, bound in constraints.items():
        v = value(name)
        if v is None:
            out[name] = math.inf
        elif BY_NAME[name].direction == "min":
            out[name] = v - float(bound)
        else:
            out[name] = float(bound) - v
    return out


def violation(value: Getter, constraints: Constraints) -> float:
    """The total violation, how far past their bounds the metrics lie summed: 0 for a trial within
    every constraint (always 0 without constraints)."""
    return float(sum(max(0.0, m) for m in margins(value, constraints).values()))


def _label(name: str) -> str:
    """A metric's report label without its direction arrow."""
    return BY_NAME[name].label.rstrip(" ↑↓")


def describe(constraints: Constraints) -> str:
    """`extracted ≤ 0, image-text ≥ 0.3`: the constraints as the report and the terminal show them."""
    return ", ".join(
        f"{_label(name)} {'≤' if BY_NAME[name].direction == 'min' else '≥'} {float(bound):g}"
        for name, bound in constraints.items()
    )


def standing(best: Getter, pool: list[Getter], constraints: Constraints) -> str:
    """What a report says of the best trial and the constraints ("" without any): whether it is within
    them on the evaluation it was chosen on, and how many of that evaluation's trials were."""
    if not constraints:
        return ""
    feasible = sum(violation(g, constraints) == 0 for g in pool)
    if violation(best, constraints) == 0:
        return (f"It is within the constraints ({describe(constraints)}), as {feasible} of the "
                f"{len(pool)} trials of that evaluation are.")  # fmt: skip
    over = ", ".join(
        f"{_label(name)} {'missing' if math.isinf(m) else f'{m:g} past its bound'}"
        for name, m in margins(best, constraints).items()
        if m > 0
    )
    return (f"**No trial of that evaluation is within the constraints** ({describe(constraints)}); "
            f"this one is nearest ({over}).")  # fmt: skip
