"""How the best trial is chosen from the final stage's evaluations, over its training seeds.

The final stage evaluates each finalist on its split with its own sampling seed (`final.split`,
`final.seed`): the trial's own training in `final/` and, with `final.train_seeds`, each other training in
`final_seedS/`. The best trial is chosen on those evaluations only, never on the search's (the
evaluation a trial was searched on is partly why it was picked; docs/search.md, "The final stage").

Without constraints: the highest final reward, averaged over the training seeds where there are several
(final_choice). With constraints (`objective.constraints`), a finalist *holds* them when
- every constraint but `extraction_bound` holds on each of its evaluations, its own training's and every
  other seed's (a mean within a bound can hide one seed far past it), and
- `extraction_bound` holds on the bound pooled over all those evaluations' attacks: the one-sided 95%
  Wilson upper bound (Wilson 1927) on the extraction rate, the attacked captions with an extraction
  summed over the evaluations against the attacked captions summed (pooled_bound).
Finalists that hold rank first, by mean final reward; those that do not rank after them, the smallest
worst-seed violation first (the largest total excess on any one evaluation, plus the pooled bound's).
A count bound such as `extracted: 0` is read per seed: an upper confidence bound is never 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from capsearch.metrics.extraction import BOUND_LEVEL
from capsearch.metrics.intervals import wilson_upper
from capsearch.search.constraints import Constraints, describe, violation
from capsearch.search.records import FinalResult, Reevaluation, Scored, SeedMean

POOLED = "extraction_bound"  # the constraint read from the bound pooled over training seeds
ATTACKED = "attacked"  # an evaluation's attacked captions (metrics, beside extraction_bound)
HITS = "extracted_captions"  # those of them with an extraction


def final_choice(final: FinalResult) -> FinalResult | SeedMean:
    """What a finalist is ranked on: its final re-evaluation, or with re-evaluations trained on other
    seeds (`seeds`), the mean reward and metrics over all of them and how many there were (`n_seeds`).
    A value missing from any of them (an evaluation that failed) has no mean: such a finalist has no
    reward and ranks last."""
    runs: list[Scored] = [final, *final.seeds]
    if len(runs) == 1:
        return final
    keys = {k for r in runs for k in r.metrics}
    means = {}
    for key in sorted(keys) + ["reward"]:
        values = [v for r in runs if (v := r.value(key)) is not None]
        if len(values) == len(runs):
            means[key] = sum(values) / len(values)
    reward = means.pop("reward", None)
    return SeedMean(metrics=means, reward=reward, n_seeds=len(runs))


def rank_key(record: Scored, constraints: Constraints | None = None) -> tuple[float, float]:
    """Sort key of an evaluated record (its own metrics, or a trial's `final`), best first: within the
    constraints before over them (smaller total violation first), then the higher reward."""
    reward = record.value("reward")
    total = violation(record.value, constraints or {})
    return total, -(reward if reward is not None else -math.inf)


def pooled_counts(runs: list[Reevaluation]) -> tuple[int, int] | None:
    """(attacked captions with an extraction, attacked captions) summed over evaluations; None if any
    of them did not record both (or attacked nothing)."""
    hits = attacked = 0
    for run in runs:
        h, n = run.value(HITS), run.value(ATTACKED)
        if h is None or n is None or n < 1:
            return None
        hits, attacked = hits + int(h), attacked + int(n)
    return hits, attacked


def pooled_bound(runs: list[Reevaluation]) -> float | None:
    """The one-sided 95% Wilson upper bound on the extraction rate pooled over the evaluations' attacks
    (one evaluation without its counts: its own recorded bound); None where it cannot be known."""
    counts = pooled_counts(runs)
    if counts is not None:
        return wilson_upper(*counts, BOUND_LEVEL)
    return runs[0].value(POOLED) if len(runs) == 1 else None


@dataclass(frozen=True)
class SeedCheck:
    """One finalist against the constraints over its training seeds (seed None: its own training)."""

    violations: dict[int | None, float]  # per evaluation: total excess of every per-seed constraint
    bound: float | None  # the pooled extraction bound
    counts: tuple[int, int] | None  # its (extracted captions, attacked captions)
    pooled_excess: float  # how far the pooled bound lies past its constraint (0: within or none)
    reward: float | None  # the mean final reward
    n_seeds: int

    @property
    def worst(self) -> float:
        """The worst-seed violation: the largest per-evaluation excess plus the pooled bound's."""
        return max(self.violations.values()) + self.pooled_excess

    @property
    def holds(self) -> bool:
        return self.worst == 0

    @property
    def worst_seed(self) -> int | None:
        return max(self.violations, key=lambda s: self.violations[s])


def seed_check(final: FinalResult, constraints: Constraints) -> SeedCheck:
    """Check a finalist's constraints on each of its final evaluations and the pooled bound."""
    runs: list[Reevaluation] = [final, *final.seeds]
    per_seed = {k: v for k, v in constraints.items() if k != POOLED}
    violations = {run.train_seed: violation(run.value, per_seed) for run in runs}
    bound = pooled_bound(runs)
    limit = {POOLED: constraints[POOLED]} if POOLED in constraints else {}
    excess = violation(lambda _: bound, limit)
    return SeedCheck(violations, bound, pooled_counts(runs), excess,
                     final_choice(final).value("reward"), len(runs))  # fmt: skip


def choice_key(final: FinalResult, constraints: Constraints | None = None) -> tuple[float, float]:
    """Sort key of a finalist, best first: without constraints its (mean) final reward; with them,
    those within them on every seed first, then by worst-seed violation, then by mean final reward."""
    if not constraints:
        return rank_key(final_choice(final))
    check = seed_check(final, constraints)
    return check.worst, -(check.reward if check.reward is not None else -math.inf)


def seed_name(seed: int | None) -> str:
    return "its own training" if seed is None else f"training seed {seed}"


def bound_text(check: SeedCheck) -> str:
    """`pooled extraction bound 0.139 (1 of 40 attacked captions)`, or "" where it is not known."""
    if check.bound is None:
        return ""
    counts = f" ({check.counts[0]} of {check.counts[1]} attacked captions)" if check.counts else ""
    return f"pooled extraction bound {check.bound:.3f}{counts}"


def seed_standing(best: SeedCheck, pool: list[SeedCheck], constraints: Constraints) -> str:
    """What the report says of the best finalist and the constraints over training seeds."""
    if not constraints:
        return ""
    bound = bound_text(best)
    bound = f"; {bound}" if bound and POOLED in constraints else ""
    if best.holds:
        held = sum(c.holds for c in pool)
        return (f"It holds the constraints ({describe(constraints)}) on each of its {best.n_seeds} "
                f"training seeds' final evaluations{bound}, as {held} of the {len(pool)} finalists "
                "do.")  # fmt: skip
    parts = []
    if max(best.violations.values()) > 0:
        parts.append(f"worst on {seed_name(best.worst_seed)}")
    if best.pooled_excess > 0:
        parts.append("the pooled extraction bound past its bound")
    return (f"**No finalist holds the constraints ({describe(constraints)}) on every training "
            f"seed**; this one has the smallest worst-seed violation ({best.worst:g}: "
            f"{' and '.join(parts)}{bound}).")  # fmt: skip
