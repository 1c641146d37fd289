"""The quality–memorisation front of a run as a result to pick from: every evaluated trial's held-out FID
against a memorisation measure, both with their intervals, the trials no other beats on both marked.

One evaluation for every point: each trial's search-stage evaluation (the same split, sampling seed and
sample counts for all of them, baselines included), so that the points are comparable; the final stage
re-evaluates only the finalists. The memorisation measure is the first of MEASURES that the most
points have: the extraction rate (attacked captions with an extraction out of those attacked, with its
two-sided 90% Wilson interval, whose top is the one-sided 95% bound `extraction_bound`), the own-image
share (its prompt-bootstrap interval), or, in records older than both, the extracted count (its Wilson
interval in images). report.md draws it (capsearch.reporting.plots.tradeoff_plot) and lists the front.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from capsearch.metrics.intervals import wilson_interval
from capsearch.reporting.describe import display_name
from capsearch.search.records import Evaluation, TrialRecord

Interval = tuple[float, float] | None


def _interval(record: Evaluation, key: str) -> Interval:
    ci = record.intervals.get(key)
    return (float(ci[0]), float(ci[1])) if ci and len(ci) == 2 else None


def _extraction_rate(record: Evaluation) -> tuple[float, Interval] | None:
    hits, attacked = record.value("extracted_captions"), record.value("attacked")
    if hits is None or attacked is None or attacked < 1:
        return None
    return hits / attacked, wilson_interval(int(hits), int(attacked), 0.90)


def _metric(key: str) -> Callable[[Evaluation], tuple[float, Interval] | None]:
    def read(record: Evaluation) -> tuple[float, Interval] | None:
        value = record.value(key)
        return None if value is None else (value, _interval(record, key))

    return read


@dataclass(frozen=True)
class Measure:
    """A memorisation measure on the x axis: its name, axis label and how a record gives it."""

    name: str
    label: str
    read: Callable[[Evaluation], tuple[float, Interval] | None]
    fmt: str


MEASURES = (
    Measure("extraction_rate", "extraction rate ↓ (bars: 90% Wilson; top: the 95% bound)",
            _extraction_rate, ".3f"),
    Measure("nearest_own", "own-image NN share ↓ (bars: 95% interval)", _metric("nearest_own"),
            ".2f"),
    Measure("extracted", "extracted images ↓ (bars: 95% Wilson interval)", _metric("extracted"),
            ".0f"),
)  # fmt: skip


def dominated(p: dict[str, Any], q: dict[str, Any]) -> bool:
    """Whether q beats p: at most p's FID and memorisation, and lower on one of them."""
    return q["fid"] <= p["fid"] and q["x"] <= p["x"] and (q["fid"] < p["fid"] or q["x"] < p["x"])


def tradeoff_points(
    records: list[TrialRecord], best: TrialRecord | None = None
) -> tuple[Measure, list[dict[str, Any]]]:
    """The chosen measure and one point per successful trial that has an FID and it, by trial number:
    `trial`, `method`, `label` (a baseline's name, else the trial folder), `kind` (baseline, searched
    or best),
    `fid`, `fid_ci`, `x`, `x_ci` and `front` (no other point beats it on both)."""
    ok = [r for r in records if r.status == "ok" and r.value("fid") is not None]
    counts = [sum(m.read(r) is not None for r in ok) for m in MEASURES]
    measure = MEASURES[counts.index(max(counts))]
    points = []
    for r in sorted(ok, key=lambda r: r.number):
        read = measure.read(r)
        if read is None:
            continue
        kind = "best" if best is not None and r.dir == best.dir else "searched"
        kind = "baseline" if r.baseline and kind != "best" else kind
        points.append({"trial": r.folder.name, "kind": kind, "method": display_name(r),
                       "label": display_name(r) if r.baseline else r.folder.name,
                       "fid": r.value("fid"), "fid_ci": _interval(r, "fid"),
                       "x": read[0], "x_ci": read[1]})  # fmt: skip
    for p in points:
        p["front"] = not any(dominated(p, q) for q in points)
    return measure, points


def _cell(value: float, ci: Interval, fmt: str) -> str:
    return format(value, fmt) + (f" [{ci[0]:{fmt}}, {ci[1]:{fmt}}]" if ci else "")


def front_lines(measure: Measure, points: list[dict[str, Any]], run_dir: str) -> list[str]:
    """report.md's table of the front, lowest memorisation first, each with its export command."""
    front = sorted((p for p in points if p["front"]), key=lambda p: (p["x"], p["fid"]))
    if not front:
        return []
    header = ["trial", "method", "FID ↓ [95%]", f"{measure.label.split(' (')[0]} [interval]",
              "export"]  # fmt: skip
    rows = [[p["trial"], p["method"],
             _cell(p["fid"], p["fid_ci"], ".2f"), _cell(p["x"], p["x_ci"], measure.fmt),
             f"`capsearch export {run_dir} --trial {p['trial']} --out EXPORT`"] for p in front]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
