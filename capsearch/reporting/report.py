"""Results of a search run as people read them: results tables, the quality–memorisation plot, report.md.

The run folder itself (layout, records, best trial) is capsearch.search.runs; trial names are
capsearch.reporting.describe.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from capsearch.atomic import atomic_write
from capsearch.config import Spec
from capsearch.metrics.table import column_metrics
from capsearch.reporting.describe import best_config_yaml, compact_name, display_name
from capsearch.reporting.notes import capped_lines, noise_floor_lines
from capsearch.reporting.plots import tradeoff_plot
from capsearch.reporting.searchstats import report_lines
from capsearch.reporting.tradeoff import front_lines, tradeoff_points
from capsearch.search.choice import bound_text, choice_key, seed_check, seed_standing
from capsearch.search.constraints import standing
from capsearch.search.records import Evaluation, SeedMean, TrialRecord
from capsearch.search.reward import objective_text, pareto_front
from capsearch.search.runs import (
    PARETO_FILE,
    REPORT_FILE,
    best_trial,
    final_choice,
    load_trials,
    read_run_spec,
)
from capsearch.search.schedule import max_steps

# Metrics whose intervals the report compares between the best trial and each baseline, with the
# direction that is better: the results tables' columns (capsearch.metrics.table).
COMPARED = {m.name: m.direction for m in column_metrics() if m.direction is not None}


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _cell(record: TrialRecord, key: str, spec: str, intervals: bool) -> str:
    """A metric with its 95% interval, e.g. `157.34 [150.12, 165.01]` (the value alone if it has none)."""
    text = _fmt(record.value(key), spec)
    ci = record.intervals.get(key)
    if intervals and ci and text != "–":
        text += f" [{format(ci[0], spec)}, {format(ci[1], spec)}]"
    return text


def ordered(records: list[TrialRecord], spec: Spec | None = None) -> list[TrialRecord]:
    """Baselines first (in spec order), then searched trials by reward, best first."""
    order = {b.name: i for i, b in enumerate(spec.baseline_points)} if spec else {}
    baselines = sorted(
        (r for r in records if r.baseline),
        key=lambda r: (order.get(r.baseline, len(order)), r.number),
    )
    searched = sorted(
        (r for r in records if not r.baseline),
        key=lambda r: (
            -(r.value("reward") if r.value("reward") is not None else -math.inf),
            r.number,
        ),
    )
    return baselines + searched


def table_rows(
    records: list[TrialRecord], compact: bool = False, intervals: bool = False
) -> list[list[str]]:
    """Rows in the paper's format: trial, method, the table's metric columns, trainable %, reward.

    With `intervals`, each metric carries its 95% interval (docs/metrics.md, "Intervals").
    """
    rows = []
    for r in records:
        rows.append(
            [
                r.folder.name or r.trial,
                (compact_name(r) + ("*" if r.baseline else ""))
                if compact
                else display_name(r) + (" (baseline)" if r.baseline else ""),
                *(_cell(r, m.name, m.fmt, intervals) for m in column_metrics(compact)),
                _fmt(r.value("trainable_pct"), ".3g" if compact else ".3f"),
                _fmt(r.value("reward"), ".3f"),
                r.status,
            ]
        )
    return rows


# The metric columns come from the metric table (capsearch.metrics.table), in its order.
COLUMNS = ["trial", "method", *(m.label for m in column_metrics()), "trainable %", "reward ↑",
           "status"]  # fmt: skip
# The terminal's narrower table shows the metrics of the progress lines only.
SHORT_COLUMNS = ["trial", "method", *(m.short for m in column_metrics(True)), "train%", "reward↑",
                 "status"]  # fmt: skip


def results_table(records: list[TrialRecord], title: str = "", intervals: bool = False) -> Any:
    """A rich table of trial records (running ones included if given), metrics ± their intervals."""
    from rich.table import Table  # lazy: rich only for the terminal's tables

    show_status = any(r.status != "ok" for r in records)  # all ok: the column says nothing
    columns = SHORT_COLUMNS if show_status else SHORT_COLUMNS[:-1]
    table = Table(title=title or None, caption="* baseline", padding=(0, 1))
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i in (0, 1, len(SHORT_COLUMNS) - 1) else "right",
                         no_wrap=i != 1, overflow="fold", min_width=18 if i == 1 else None)  # fmt: skip
    for record, row in zip(records, table_rows(records, compact=True, intervals=intervals)):
        style = "bold" if record.baseline else None
        table.add_row(*row[: len(columns)], style=style)
    return table


def write_report(run_dir: Path) -> Path:
    """Write report.md (table, quality–memorisation front, samples, best configuration) into the run folder."""
    run_dir = Path(run_dir)
    spec = read_run_spec(run_dir)
    records = ordered(load_trials(run_dir), spec)
    done = [r for r in records if r.status == "ok"]
    failed = [r for r in records if r.status != "ok"]
    lines = [f"# capsearch report: {spec.name}", ""]
    if spec.description:
        lines += [spec.description.strip(), ""]
    n_base = sum(1 for r in records if r.baseline)
    lines += [
        f"Model `{spec.model}`, {len(records)} finished trials ({n_base} baselines, "
        f"{len(records) - n_base} searched; {len(failed)} failed or stopped), "
        f"sampler {spec.search.sampler}, objective {objective_text(spec.objective)}. "
        f"Written {time.strftime('%Y-%m-%d %H:%M')}.",
        "",
        "## Results",
        "",
        "FID ↓ and AMD ↑ on the evaluation extractor's features, image-text score ↑, images extracted "
        "by the attack ↓ (Dutt et al. 2024, Tables 1–2); trainable % of the UNet's parameters.",
        "",
    ]
    rows = table_rows(done, intervals=True)
    if spec.objective.mode == "pareto":
        names = spec.objective.pareto
        front = set(pareto_front([{n: r.value(n) for n in names} for r in done], names))
        rows = [row[:-1] + ["★" if i in front else ""] for i, row in enumerate(rows)]
        header = COLUMNS[:-1] + ["Pareto"]
    else:
        rows = [row[:-1] for row in rows]
        header = COLUMNS[:-1]
    lines += _markdown_table(header, rows, done)
    lines += noise_floor_lines(done, "searched")
    lines += capped_lines(done)
    finals = [final_view(r) for r in done if r.final is not None]
    if finals:
        lines += _final_lines(spec, finals)
    best = best_trial(done, spec.objective.constraints)
    lines += _front_lines(done, best, spec, run_dir)
    if best is not None:
        lines += _best_lines(best, done, spec, run_dir)
    lines += report_lines(run_dir, records, max_steps(spec))
    lines += ["", "## Samples", "", "| trial | method | samples |", "|---|---|---|"]
    for r in done:
        name = r.folder.name
        lines.append(f"| {name} | {display_name(r)} | [samples.png](trials/{name}/samples.png) |")
    if failed:
        lines += ["", "## Failed or stopped trials", ""]
        for r in failed:
            error = r.error.splitlines()[0] if r.error else ""
            lines.append(
                f"- {r.folder.name} ({display_name(r)}): {r.status}"
                + (f" — {error}" if error else "")
            )
    path = run_dir / REPORT_FILE
    atomic_write(path, "\n".join(lines) + "\n")
    return path


def _front_lines(
    done: list[TrialRecord], best: TrialRecord | None, spec: Spec, run_dir: Path
) -> list[str]:
    """The quality–memorisation plot and its front as a table to pick from ([] with no point)."""
    measure, points = tradeoff_points(done, best)
    if tradeoff_plot(points, measure.label, run_dir / PARETO_FILE) is None:
        return []
    name = measure.label.split(" (")[0].rstrip(" ↓")
    return ["", "## Quality against memorisation", "", f"![held-out FID against {name}]"
            f"({PARETO_FILE})", "", f"Every successful trial on the search's evaluation "
            f"({spec.evaluate.split} split, sampling seed {spec.evaluate.seed}, the same for all): "
            f"held-out FID against the {name}, each with its interval. In colour and joined: the "
            "front, the trials no other beats on both, from which to pick by how much memorisation "
            "one accepts (below, lowest first); squares: baselines, by name; star: the best trial "
            "(chosen on the final stage where it ran).", "",
            *front_lines(measure, points, str(run_dir))]  # fmt: skip


def _best_lines(best: TrialRecord, done: list[TrialRecord], spec: Spec, run_dir: Path) -> list[str]:
    """report.md's "Best configuration": how the best trial was chosen, its YAML and samples."""
    name = best.folder.name
    if best.final is not None:
        pooled = final_choice(best.final)
        over = (
            f" averaged over {pooled.n_seeds} training seeds"
            if isinstance(pooled, SeedMean)
            else ""
        )
        chosen = (
            f"final reward {_or_nan(pooled.value('reward')):.3f}{over} on the "
            f"{best.final.split} split (search reward {best.value('reward'):.3f})"
        )
    else:
        chosen = (
            f"reward {best.value('reward'):.3f} (no final re-evaluation: chosen on the "
            "evaluation it was searched on)"
        )
    lines = [
        "",
        "## Best configuration",
        "",
        f"Trial {name} ({display_name(best)}), {chosen}. {_standing(best, done, spec)}"
        f"Export it with `capsearch export {run_dir} --trial {name} --out EXPORT`.",
        "",
        "```yaml",
        best_config_yaml(best).rstrip(),
        "```",
    ]
    if (best.folder / "samples.png").is_file():
        lines += ["", f"![samples of {name}](trials/{name}/samples.png)"]
    return lines


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value


def final_view(record: TrialRecord) -> TrialRecord:
    """A trial record seen through its final re-evaluation (metrics, intervals and reward replaced)."""
    final = record.final
    if final is None:
        raise ValueError(f"trial {record.trial} has no final re-evaluation")
    seen = {"metrics": final.metrics, "intervals": final.intervals,
            "noise_floor": final.noise_floor, "reward": final.reward}  # fmt: skip
    return record.model_copy(update=seen)


def separation(best: Evaluation, other: Evaluation, metric: str) -> str:
    """Whether best's 95% interval lies wholly on the better side of other's: better, worse or overlap."""
    a, b = best.intervals.get(metric), other.intervals.get(metric)
    if not a or not b:
        return "n/a"
    better_low = COMPARED[metric] == "max"
    if (a[0] > b[1]) if better_low else (a[1] < b[0]):
        return "better"
    if (a[1] < b[0]) if better_low else (a[0] > b[1]):
        return "worse"
    return "overlap"


def _markdown_table(
    header: list[str], rows: list[list[str]], records: list[TrialRecord]
) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for record, row in zip(records, rows):
        if record.baseline:
            row[1] = f"**{row[1]}**"
        lines.append("| " + " | ".join(c.replace("|", "/") for c in row) + " |")
    return lines


def _final_lines(spec: Spec, finals: list[TrialRecord]) -> list[str]:
    """The final re-evaluation's table and, per metric, how the best separates from each baseline."""
    first = finals[0].final
    lines = [
        "",
        "## Final re-evaluation",
        "",
        f"Every baseline and the top {spec.final.top_k} searched trials, evaluated again from their "
        f"saved deltas on the {first.split} split (the search used "
        f"{spec.evaluate.split}) with sampling seed {first.seed} "
        f"({spec.final.samples(spec.evaluate)} samples each). The best trial is chosen here.",
        "",
    ]
    finals = sorted(finals, key=lambda r: (not r.baseline, -(r.value("reward") or -1e9)))
    rows = [row[:-1] for row in table_rows(finals, intervals=True)]
    lines += _markdown_table(COLUMNS[:-1], rows, finals)
    lines += noise_floor_lines(finals, "final")
    scored = [r for r in finals if r.value("reward") is not None]
    if not scored:
        return lines
    best = min(scored, key=lambda r: choice_key(r.final, spec.objective.constraints))
    lines += _seed_lines(finals, best, spec.objective.constraints)
    others = [r for r in finals if r.baseline and r.dir != best.dir]
    if not others:
        return lines
    lines += [
        "",
        f"Does the best ({best.folder.name}, {display_name(best)}) separate from each baseline? "
        "*better*/*worse*: the two 95% intervals do not overlap; *overlap*: within noise.",
        "",
        "| baseline | " + " | ".join(COMPARED) + " |",
        "|---|" + "---|" * len(COMPARED),
    ]
    for r in others:
        cells = [separation(best, r, m) for m in COMPARED]
        lines.append(f"| {display_name(r)} | " + " | ".join(cells) + " |")
    return lines


def _seed_lines(finals: list[TrialRecord], best: TrialRecord, constraints: dict) -> list[str]:
    """The finalists trained again on other seeds (final.train_seeds): final reward per training seed,
    and the means the best is chosen on ([] when none was); with constraints, the pooled extraction
    bound and the worst-seed violation (capsearch.search.choice)."""
    if not any(r.final.seeds for r in finals):
        return []
    seeds = sorted({s.train_seed for r in finals for s in r.final.seeds})
    own = (finals[0].train or {}).get("seed", "own")
    header = ["trial", "method", f"seed {own}", *(f"seed {s}" for s in seeds),
              "mean reward ↑", "mean FID ↓", "mean extracted ↓"]  # fmt: skip
    header += ["pooled extraction bound ↓", "worst-seed violation ↓"] if constraints else []
    how = ("the best is the finalist within the constraints on every seed's evaluation (the "
           "extraction bound pooled over the seeds' attacks) with the highest mean reward"
           if constraints else "the best is chosen on the mean reward")  # fmt: skip
    lines = ["", "### Over training seeds", "", "Every finalist that trains anything trained again "
             f"on seed(s) {', '.join(map(str, seeds))} (same plan and data) and evaluated like the "
             f"table above; final reward per training seed and the means over them; {how} (Freeze "
             "trains nothing: one evaluation).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]  # fmt: skip

    def cell(value: float | None, fmt: str) -> str:
        return "–" if value is None else format(value, fmt)

    for r in finals:
        by_seed = {s.train_seed: s.value("reward") for s in r.final.seeds}
        pooled = final_choice(r.final)
        name = r.folder.name
        row = [f"**{name}**" if r.dir == best.dir else name, display_name(r),
               cell(r.final.value("reward"), ".3f"),
               *(cell(by_seed.get(s), ".3f") for s in seeds),
               cell(pooled.value("reward"), ".3f"), cell(pooled.value("fid"), ".1f"),
               cell(pooled.value("extracted"), ".1f")]  # fmt: skip
        if constraints:
            check = seed_check(r.final, constraints)
            row += [bound_text(check).removeprefix("pooled extraction bound ") or "–",
                    f"{check.worst:g}"]  # fmt: skip
        lines.append("| " + " | ".join(c.replace("|", "/") for c in row) + " |")
    return lines


def _standing(best: TrialRecord, done: list[TrialRecord], spec: Spec) -> str:
    """The best trial against the constraints, on the evaluation it was chosen on ("" without any)."""
    limits = spec.objective.constraints
    if best.final is not None and any(r.final.seeds for r in done if r.final is not None):
        pool = [seed_check(r.final, limits) for r in done if r.final is not None]
        text = seed_standing(seed_check(best.final, limits), pool, limits)
        return text + " " if text else ""
    if best.final is not None:
        stage = [final_choice(r.final) for r in done if r.final is not None]
        chosen = final_choice(best.final)
    else:
        stage, chosen = done, best
    text = standing(chosen.value, [r.value for r in stage], spec.objective.constraints)
    return text + " " if text else ""
