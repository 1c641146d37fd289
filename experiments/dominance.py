"""Does the search's winner dominate the trained baselines? (docs/results.md, "Search against the
baselines: the plan").

The winner W dominates if, on the final re-evaluations: its held-out FID and image-text score are at
least as good as Full FT's; its extracted count and AMD at least as good as the better PEFT baseline's
(DiffFit or SV-DIFF, per metric, the better by its mean over seeds); its FID is better than Freeze's;
and it extracts nothing. "At least as good" is "not reversed" and "better" is "holds" under the rules of
docs/results.md, "How each verdict will be decided": over several seeds the paired differences and their
95% Student-t interval (capsearch.reporting.seeds.paired, capsearch.metrics.intervals.seed_interval); on one seed
the within-run 95% intervals, where disjoint intervals decide and overlapping ones are "not shown".
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capsearch.errors import UserError
from capsearch.metrics.intervals import seed_interval  # Student t, n − 1 d.f.
from capsearch.metrics.table import BY_NAME
from capsearch.reporting.seeds import PEFT, Entry, Pool, display, paired, paired_verdict
from capsearch.search.records import TrialRecord

WINNER = "W"  # the winner's name in the pool and the tables
OTHER = "other"  # the key of versus()'s second trial in its pool
NEEDED = ("freeze", "full", *PEFT)  # the trained baselines the plan compares with, and Freeze
METRICS = ("fid", "amd", "alignment", "extracted")
NOT_REVERSED, HOLDS, NOTHING = "not reversed", "holds", "nothing extracted"
DIFF_FMT = {
    "extracted": ".2f"
}  # a mean of count differences needs decimals (as capsearch.reporting.seeds)


@dataclass(frozen=True)
class Condition:
    """One condition of the target: W against a baseline on one metric, and how it was judged."""

    text: str  # e.g. "FID at least as good as Full FT's"
    a: str  # display names
    b: str
    metric: str
    need: str  # NOT_REVERSED, HOLDS or NOTHING
    seeds: tuple[int, ...]
    values: tuple[tuple[float, float], ...]  # (A, B) per seed
    intervals: tuple[tuple[tuple[float, float] | None, tuple[float, float] | None], ...]
    disjoint: tuple[bool | None, ...]  # per seed: A's and B's within-run intervals disjoint
    diffs: tuple[float, ...]  # per seed d, positive: A better
    mean: float  # mean d over the seeds
    low: float | None  # its 95% Student-t interval (None on one seed)
    high: float | None
    verdict: str  # "holds", "reversed", "not shown"; for NOTHING what W extracted
    passed: bool


@dataclass(frozen=True)
class Dominance:
    """The target judged: W's trial per seed, one row per condition, and the overall verdict."""

    winner: tuple[str, ...]  # W's trial folder name per seed
    seeds: tuple[int, ...]
    conditions: tuple[Condition, ...]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.conditions)


def _name(record: TrialRecord) -> str:
    return record.folder.name or record.trial or "a trial"


def _entry(record: TrialRecord, role: str, seed: int) -> Entry:
    """A record's final re-evaluation as a pool entry; UserError if it has none or lacks a metric."""
    final = record.final
    where = f"{_name(record)} ({role}, seed {seed})"
    if final is None or not final.metrics:
        raise UserError(
            f"{where} has no final re-evaluation (final/result.json): dominance is judged on the "
            "final stage's numbers only; run the final stage first"
        )
    entry = Entry(role, seed, Path(record.dir or "."), dict(final.metrics), dict(final.intervals),
                  True, None)  # fmt: skip
    missing = [m for m in METRICS if entry.value(m) is None]
    if missing:
        raise UserError(f"{where}: its final re-evaluation has no {', '.join(missing)}")
    return entry


def _per_seed(value: Any, n: int | None, what: str) -> list[TrialRecord]:
    """A record or a list of records (one per seed) as a list, checked against the number of seeds."""
    items = [value] if isinstance(value, TrialRecord) else list(value)
    if n is not None and len(items) != n:
        raise UserError(f"{what}: {len(items)} records for {n} seeds (one per seed, in seed order)")
    return items


def _compare(pool: Pool, seeds: Sequence[int], b: str, metric: str, need: str, text: str,
             label: str | None = None, a_label: str = WINNER) -> Condition:  # fmt: skip
    """W against baseline b on a metric under the paired rules (one seed: the within-run intervals)."""
    pairs = paired(pool, WINNER, b, metric)
    diffs = tuple(d for _, d, _ in pairs)
    disjoint = tuple(x for _, _, x in pairs)
    cis = tuple((pool[WINNER][s].interval(metric), pool[b][s].interval(metric)) for s in seeds)
    if len(seeds) >= 2:
        mean, low, high = seed_interval(list(diffs))
        verdict = paired_verdict(low, high)
    else:
        mean, low, high = diffs[0], None, None
        if disjoint[0] is None:
            side = WINNER if cis[0][0] is None else b
            trial = pool[side][seeds[0]].trial.name
            who = ("the winner" if a_label == WINNER else a_label) if side == WINNER else (
                label or display(b))  # fmt: skip
            raise UserError(
                f"{trial} ({who}): its final "
                f"re-evaluation has no 95% interval for {metric}, which a one-seed verdict needs"
            )
        verdict = (
            "not shown" if not disjoint[0] or mean == 0 else "holds" if mean > 0 else "reversed"
        )
    passed = verdict != "reversed" if need == NOT_REVERSED else verdict == "holds"
    values = tuple((pool[WINNER][s].value(metric), pool[b][s].value(metric)) for s in seeds)
    return Condition(text, a_label, label or display(b), metric, need, tuple(seeds), values, cis, disjoint,
                     diffs, mean, low, high, verdict, passed)  # fmt: skip


def _nothing_extracted(pool: Pool, seeds: Sequence[int]) -> Condition:
    """W extracts no image on any seed (shown beside Freeze's count)."""
    values = tuple((pool[WINNER][s].value("extracted"), pool["freeze"][s].value("extracted"))
                   for s in seeds)  # fmt: skip
    cis = tuple((pool[WINNER][s].interval("extracted"), pool["freeze"][s].interval("extracted"))
                for s in seeds)  # fmt: skip
    hits = [(s, w) for s, (w, _) in zip(seeds, values) if w > 0]
    verdict = (
        ("W extracts 0 on every seed" if len(seeds) > 1 else "W extracts 0")
        if not hits
        else "; ".join(
            f"W extracts {w:.0f}" + (f" on seed {s}" if len(seeds) > 1 else "") for s, w in hits
        )
    )
    diffs = tuple(f - w + 0.0 for w, f in values)  # positive: W extracts fewer than Freeze
    return Condition("nothing extracted (Freeze's count beside)", WINNER, display("freeze"), "extracted", NOTHING,
                     tuple(seeds), values, cis, (None,) * len(seeds), diffs,
                     statistics.mean(diffs), None, None, verdict, not hits)  # fmt: skip


def _better_peft(pool: Pool, seeds: Sequence[int], metric: str) -> list[str]:
    """The PEFT baseline(s) better on a metric by the mean over seeds (both when they tie)."""
    sign = 1.0 if BY_NAME[metric].direction == "max" else -1.0
    score = {n: sign * statistics.mean(pool[n][s].value(metric) for s in seeds) for n in PEFT}
    best = max(score.values())
    return [n for n in PEFT if score[n] == best]


def dominance(
    winner: TrialRecord | Sequence[TrialRecord],
    baselines_by_name: Mapping[str, TrialRecord | Sequence[TrialRecord]],
    seeds: Sequence[int] | None = None,
) -> Dominance:
    """Judge the plan's target: W (a record, or one per seed) against the baselines of the same seeds.

    `baselines_by_name` maps "freeze", "full", "difffit", "svdiff" (others are ignored) to a record or
    one record per seed, in the order of `seeds` (default: each winner record's training seed). Records
    are as capsearch.search.runs.load_trials returns them; only their final re-evaluation ("final") is used,
    and a record without one is a UserError naming it.
    """
    wins = _per_seed(winner, None, "the winner")
    if seeds is None:
        seeds = [int((r.train or {}).get("seed", i)) for i, r in enumerate(wins)]
    seeds = [int(s) for s in seeds]
    if not wins or len(wins) != len(seeds) or len(set(seeds)) != len(seeds):
        raise UserError(f"the winner needs one record per seed, distinct seeds (got {len(wins)} "
                        f"records for seeds {seeds})")  # fmt: skip
    missing = [display(n) for n in NEEDED if n not in baselines_by_name]
    if missing:
        raise UserError(f"dominance needs the baselines {', '.join(missing)} (not found)")
    pool: Pool = {WINNER: {s: _entry(r, "the winner", s) for s, r in zip(seeds, wins)}}
    for name in NEEDED:
        records = _per_seed(baselines_by_name[name], len(seeds), f"baseline {display(name)}")
        pool[name] = {s: _entry(r, display(name), s) for s, r in zip(seeds, records)}
    order = sorted(range(len(seeds)), key=lambda i: seeds[i])  # seeds.paired goes by sorted seed
    seeds, wins = [seeds[i] for i in order], [wins[i] for i in order]
    rows = [
        _compare(pool, seeds, "full", metric, NOT_REVERSED, f"{what} at least as good as Full FT's")
        for metric, what in (("fid", "FID"), ("alignment", "image-text score"))
    ]
    for metric, what in (("extracted", "extracted count"), ("amd", "AMD")):
        best = _better_peft(pool, seeds, metric)
        for n in best:
            why = "the better PEFT baseline" if len(best) == 1 else (
                "PEFT baselines tied on the mean, W held to each")  # fmt: skip
            text = f"{what} at least as good as {display(n)}'s ({why})"
            rows.append(_compare(pool, seeds, n, metric, NOT_REVERSED, text))
    rows.append(_compare(pool, seeds, "freeze", "fid", HOLDS, "FID better than Freeze's"))
    rows.append(_nothing_extracted(pool, seeds))
    return Dominance(tuple(_name(r) for r in wins), tuple(seeds), tuple(rows))


def versus(
    a: Sequence[TrialRecord],
    b: Sequence[TrialRecord],
    seeds: Sequence[int],
    label: str,
    a_label: str = WINNER,
) -> Dominance:
    """One trial (`a_label`, W by default) against another (`label`, e.g. a control) on each of the
    four metrics, one record each per seed in the order of `seeds`, under the same rules as
    `dominance`; each condition is "at least as good"."""
    seeds = [int(s) for s in seeds]
    wins, others = _per_seed(a, len(seeds), a_label), _per_seed(b, len(seeds), label)
    pool: Pool = {WINNER: {s: _entry(r, a_label, s) for s, r in zip(seeds, wins)},
                  OTHER: {s: _entry(r, label, s) for s, r in zip(seeds, others)}}  # fmt: skip
    order = sorted(range(len(seeds)), key=lambda i: seeds[i])
    seeds, wins = [seeds[i] for i in order], [wins[i] for i in order]
    rows = [_compare(pool, seeds, OTHER, m, NOT_REVERSED, f"{BY_NAME[m].label} against {label}",
                     label, a_label) for m in METRICS]  # fmt: skip
    return Dominance(tuple(_name(r) for r in wins), tuple(seeds), tuple(rows))


def _value(value: float, ci: tuple[float, float] | None, metric: str) -> str:
    fmt = ".0f" if metric == "extracted" else BY_NAME[metric].fmt
    interval = f" [{ci[0]:{fmt}}, {ci[1]:{fmt}}]" if ci else ""
    return f"{value:{fmt}}{interval}"


def _difference(c: Condition) -> str:
    fmt = DIFF_FMT.get(c.metric, BY_NAME[c.metric].fmt)
    if c.need == NOTHING:
        return "–"
    if c.low is None:
        return f"d = {c.mean:{fmt}}; intervals {'disjoint' if c.disjoint[0] else 'overlap'}"
    n = len(c.seeds)
    return (f"mean d {c.mean:{fmt}} [{c.low:{fmt}}, {c.high:{fmt}}]; intervals disjoint on "
            f"{sum(x is True for x in c.disjoint)} of {n} seeds")  # fmt: skip


def dominance_lines(result: Dominance) -> list[str]:
    """The dominance table in markdown and a one-sentence verdict."""
    lines, many = table_lines(result), len(result.seeds) > 1
    failed = [c for c in result.conditions if not c.passed]
    where = f"over seeds {', '.join(map(str, result.seeds))}" if many else (
        f"on seed {result.seeds[0]} (within-run intervals only)")  # fmt: skip
    if not failed:
        sentence = (f"W dominates the baselines {where}: all {len(result.conditions)} conditions "
                    "pass.")  # fmt: skip
    else:
        reasons = "; ".join(f"{c.text} ({c.verdict})" for c in failed)
        sentence = (f"W does not dominate the baselines {where}: {len(failed)} of "
                    f"{len(result.conditions)} conditions fail — {reasons}.")  # fmt: skip
    return lines + ["", sentence]


def table_lines(result: Dominance) -> list[str]:
    """The conditions as a markdown table, after a line saying how they were judged."""
    many = len(result.seeds) > 1
    rule = (
        f"paired by seed over seeds {', '.join(map(str, result.seeds))}: mean d and its 95% "
        "Student-t interval (n − 1 d.f.)"
        if many
        else f"one seed ({result.seeds[0]}): the within-run 95% intervals; disjoint intervals "
        'decide, overlapping ones are "not shown"'
    )
    trials = ", ".join(f"{t} (seed {s})" for t, s in zip(result.winner, result.seeds))
    a = result.conditions[0].a if result.conditions else WINNER
    lines = [
        f"{a} = {trials}. Each condition on the final re-evaluations, {rule}; d = A − B, "
        f"signed so that positive means {a} is better. "
        '"At least as good" passes unless the verdict is "reversed"; "better" passes only if it '
        '"holds".',
        "",
        "| condition | metric | A vs B | " + ("per seed: A / B" if many else "A / B") +
        " | difference | verdict | pass |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for c in result.conditions:
        cells = [f"{_value(va, ca, c.metric)} / {_value(vb, cb, c.metric)}"
                 for (va, vb), (ca, cb) in zip(c.values, c.intervals)]  # fmt: skip
        if many:
            cells = [f"seed {s}: {cell}" for s, cell in zip(c.seeds, cells)]
        row = [c.text, BY_NAME[c.metric].label, f"{c.a} vs {c.b}", "; ".join(cells),
               _difference(c), c.verdict, "yes" if c.passed else "**no**"]  # fmt: skip
        lines.append("| " + " | ".join(x.replace("|", "/") for x in row) + " |")
    return lines
