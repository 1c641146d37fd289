"""Results of a search run as people read them: trial names, results tables, the Pareto plot, report.md.

The run folder itself (layout, records, best trial) is capsearch.search.runs.
"""

from __future__ import annotations

import math
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from capsearch.atomic import atomic_write
from capsearch.metrics.table import column_metrics
from capsearch.reporting.notes import capped_lines, noise_floor_lines
from capsearch.search.constraints import standing
from capsearch.search.final import COMPARED, separation
from capsearch.search.reward import objective_text
from capsearch.search.runs import (
    PARETO_FILE,
    REPORT_FILE,
    best_trial,
    final_choice,
    load_trials,
    rank_key,
    read_run_spec,
    record_value,
)

if TYPE_CHECKING:
    from capsearch.config import Spec

# The paper's names (Dutt et al. 2024, Tables 1-2) for the baseline methods and mitigations.
PAPER_NAMES = {
    "freeze": "Freeze",
    "full": "Full FT",
    "attention": "Attn Tuning",
    "difffit": "DiffFit",
    "svdiff": "SV-DIFF",
    "rwa": "RWA",
    "threshold": "Threshold Mitigation",
}


def display_name(record: dict[str, Any]) -> str:
    """A trial's name for tables: the paper's name for a baseline, the group methods otherwise."""
    baseline = record.get("baseline")
    if baseline:
        method, _, mitigation = baseline.partition("+")
        name = PAPER_NAMES.get(method, method)
        return f"{name} + {PAPER_NAMES.get(mitigation, mitigation)}" if mitigation else name
    return method_summary(record)


def method_summary(record: dict[str, Any]) -> str:
    """Short text of a trial's method spec and mitigations, e.g. `attn_up=lora(rank=4) · rwa(k=2)`."""
    params = record.get("params", {})
    groups = record.get("groups")
    if groups is not None:  # {group: "lora(rank=4)" | "frozen"}
        parts = [f"{g}={m}" for g, m in groups.items() if m not in ("frozen", "freeze")]
    else:
        parts = []
        for entry in record.get("method_spec", []):
            hyper = {k: v for k, v in entry.items() if k not in ("method", "units")}
            text = ",".join(f"{k}={_short(v)}" for k, v in hyper.items())
            units = "/".join(entry.get("units", []))
            parts.append(f"{units}={entry['method']}" + (f"({text})" if text else ""))
    text = " ".join(parts) or "all frozen"
    for m in trial_mitigations(record):
        hyper = ",".join(f"{k}={_short(v)}" for k, v in m.items() if k != "name")
        text += f" · {m['name']}" + (f"({hyper})" if hyper else "")
    if "lr" in params:
        text += f" · lr={_short(params['lr'])}"
    return text


def trial_mitigations(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Every mitigation a trial trained with, caption dropout first (records of either version)."""
    from capsearch.search.space import base_mitigations

    # Version 2 keeps caption dropout in its own field; version 1 has it among the mitigations.
    train = record.get("train", {})
    return base_mitigations(train.get("caption_dropout") or 0.0, train.get("mitigations", []))


def compact_name(record: dict[str, Any]) -> str:
    """A one-line name for terminal tables: the paper's name, or method counts, mitigation, lr."""
    if record.get("baseline") or record.get("groups") is None:
        return display_name(record)
    methods = [m.split("(")[0] for m in record["groups"].values() if m not in ("frozen", "freeze")]
    counts = {m: methods.count(m) for m in dict.fromkeys(methods)}
    text = " ".join(f"{m}×{n}" if n > 1 else m for m, n in counts.items()) or "all frozen"
    text += "".join(f" +{m['name']}" for m in trial_mitigations(record))
    lr = record.get("params", {}).get("lr")
    return text + (f" lr {_short(lr)}" if lr is not None else "")


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return "/".join(map(str, value))
    return str(value)


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _cell(record: dict[str, Any], key: str, spec: str, intervals: bool) -> str:
    """A metric with its 95% interval, e.g. `157.34 [150.12, 165.01]` (the value alone if it has none)."""
    text = _fmt(record_value(record, key), spec)
    ci = (record.get("intervals") or {}).get(key)
    if intervals and ci and text != "–":
        text += f" [{format(ci[0], spec)}, {format(ci[1], spec)}]"
    return text


def ordered(records: list[dict[str, Any]], spec: Spec | None = None) -> list[dict[str, Any]]:
    """Baselines first (in spec order), then searched trials by reward, best first."""
    order = {b.name: i for i, b in enumerate(spec.baseline_points)} if spec else {}
    baselines = sorted(
        (r for r in records if r.get("baseline")),
        key=lambda r: (order.get(r["baseline"], len(order)), r.get("number", 0)),
    )
    searched = sorted(
        (r for r in records if not r.get("baseline")),
        key=lambda r: (
            -(record_value(r, "reward") if record_value(r, "reward") is not None else -math.inf),
            r.get("number", 0),
        ),
    )
    return baselines + searched


def table_rows(
    records: list[dict[str, Any]], compact: bool = False, intervals: bool = False
) -> list[list[str]]:
    """Rows in the paper's format: trial, method, the table's metric columns, trainable %, reward.

    With `intervals`, each metric carries its 95% interval (docs/metrics.md, "Intervals").
    """
    rows = []
    for r in records:
        rows.append(
            [
                Path(r.get("dir", "")).name or str(r.get("trial", "")),
                (compact_name(r) + ("*" if r.get("baseline") else ""))
                if compact
                else display_name(r) + (" (baseline)" if r.get("baseline") else ""),
                *(_cell(r, m.name, m.fmt, intervals) for m in column_metrics(compact)),
                _fmt(record_value(r, "trainable_pct"), ".3g" if compact else ".3f"),
                _fmt(record_value(r, "reward"), ".3f"),
                str(r.get("status", "")),
            ]
        )
    return rows


# The metric columns come from the metric table (capsearch.metrics.table), in its order.
COLUMNS = ["trial", "method", *(m.label for m in column_metrics()), "trainable %", "reward ↑",
           "status"]  # fmt: skip
# The terminal's narrower table shows the metrics of the progress lines only.
SHORT_COLUMNS = ["trial", "method", *(m.short for m in column_metrics(True)), "train%", "reward↑",
                 "status"]  # fmt: skip


def results_table(records: list[dict[str, Any]], title: str = "", intervals: bool = False) -> Any:
    """A rich table of trial records (running ones included if given), metrics ± their intervals."""
    from rich.table import Table

    show_status = any(r.get("status") != "ok" for r in records)  # all ok: the column says nothing
    columns = SHORT_COLUMNS if show_status else SHORT_COLUMNS[:-1]
    table = Table(title=title or None, caption="* baseline", padding=(0, 1))
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i in (0, 1, len(SHORT_COLUMNS) - 1) else "right",
                         no_wrap=i != 1, overflow="fold", min_width=18 if i == 1 else None)  # fmt: skip
    for record, row in zip(records, table_rows(records, compact=True, intervals=intervals)):
        style = "bold" if record.get("baseline") else None
        table.add_row(*row[: len(columns)], style=style)
    return table


def best_config_yaml(record: dict[str, Any]) -> str:
    """The YAML snippet that reproduces a trial: method spec, training settings, mitigations."""
    train = dict(record.get("train", {}))
    mitigations = train.pop("mitigations", record.get("mitigations", []))
    snippet = {"methods": record.get("method_spec", []), "train": train, "mitigations": mitigations}
    return yaml.safe_dump(snippet, sort_keys=False, default_flow_style=None, width=100)


def write_report(run_dir: Path) -> Path:
    """Write report.md (table, Pareto plot, samples, best configuration) into the run folder."""
    from capsearch.search.reward import pareto_front

    run_dir = Path(run_dir)
    spec = read_run_spec(run_dir)
    records = ordered(load_trials(run_dir), spec)
    done = [r for r in records if r.get("status") == "ok"]
    failed = [r for r in records if r.get("status") != "ok"]
    lines = [f"# capsearch report: {spec.name}", ""]
    if spec.description:
        lines += [spec.description.strip(), ""]
    n_base = sum(1 for r in records if r.get("baseline"))
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
        front = set(
            pareto_front([{**r.get("metrics", {}), **r} for r in done], spec.objective.pareto)
        )
        rows = [row[:-1] + ["★" if i in front else ""] for i, row in enumerate(rows)]
        header = COLUMNS[:-1] + ["Pareto"]
    else:
        rows = [row[:-1] for row in rows]
        header = COLUMNS[:-1]
    lines += _markdown_table(header, rows, done)
    lines += noise_floor_lines(done, "searched")
    lines += capped_lines(done)
    finals = [final_view(r) for r in done if r.get("final")]
    if finals:
        lines += _final_lines(spec, finals)
    from capsearch.reporting.plots import pareto_plot

    plot = pareto_plot(done, run_dir / PARETO_FILE)
    if plot is not None:
        lines += [
            "",
            "## Quality against memorisation",
            "",
            f"![Pareto plot]({PARETO_FILE})",
            "",
            "Squares: baselines; circles: searched trials; colour: extracted images.",
        ]
    best = best_trial(done, spec.objective.constraints)
    if best is not None:
        name = Path(best["dir"]).name
        pooled = final_choice(best["final"]) if best.get("final") else {}
        over = f" averaged over {pooled['n_seeds']} training seeds" if "n_seeds" in pooled else ""
        chosen = (
            f"final reward {_or_nan(record_value(pooled, 'reward')):.3f}{over} on the "
            f"{best['final'].get('split')} split (search reward {record_value(best, 'reward'):.3f})"
            if best.get("final")
            else f"reward {record_value(best, 'reward'):.3f} (no final re-evaluation: chosen on the "
            "evaluation it was searched on)"
        )
        lines += [
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
        if (Path(best["dir"]) / "samples.png").is_file():
            lines += ["", f"![samples of {name}](trials/{name}/samples.png)"]
    from capsearch.reporting.searchstats import report_lines
    from capsearch.search.schedule import max_steps

    lines += report_lines(run_dir, records, max_steps(spec))
    lines += ["", "## Samples", "", "| trial | method | samples |", "|---|---|---|"]
    for r in done:
        name = Path(r["dir"]).name
        lines.append(f"| {name} | {display_name(r)} | [samples.png](trials/{name}/samples.png) |")
    if failed:
        lines += ["", "## Failed or stopped trials", ""]
        for r in failed:
            error = (r.get("error") or "").splitlines()[0] if r.get("error") else ""
            lines.append(
                f"- {Path(r['dir']).name} ({display_name(r)}): {r['status']}"
                + (f" — {error}" if error else "")
            )
    path = run_dir / REPORT_FILE
    atomic_write(path, "\n".join(lines) + "\n")
    return path


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value


def final_view(record: dict[str, Any]) -> dict[str, Any]:
    """A trial record seen through its final re-evaluation (metrics, intervals and reward replaced)."""
    final = record["final"]
    return {
        **record,
        "metrics": final.get("metrics", {}),
        "intervals": final.get("intervals", {}),
        "noise_floor": final.get("noise_floor"),
        "reward": final.get("reward"),
    }


def _markdown_table(header: list[str], rows: list[list[str]], records: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for record, row in zip(records, rows):
        if record.get("baseline"):
            row[1] = f"**{row[1]}**"
        lines.append("| " + " | ".join(c.replace("|", "/") for c in row) + " |")
    return lines


def _final_lines(spec: Spec, finals: list[dict[str, Any]]) -> list[str]:
    """The final re-evaluation's table and, per metric, how the best separates from each baseline."""
    first = finals[0]["final"]
    lines = [
        "",
        "## Final re-evaluation",
        "",
        f"Every baseline and the top {spec.final.top_k} searched trials, evaluated again from their "
        f"saved deltas on the {first.get('split')} split (the search used "
        f"{spec.evaluate.split}) with sampling seed {first.get('seed')} "
        f"({spec.final.samples(spec.evaluate)} samples each). The best trial is chosen here.",
        "",
    ]
    finals = sorted(
        finals, key=lambda r: (not r.get("baseline"), -(record_value(r, "reward") or -1e9))
    )
    rows = [row[:-1] for row in table_rows(finals, intervals=True)]
    lines += _markdown_table(COLUMNS[:-1], rows, finals)
    lines += noise_floor_lines(finals, "final")
    scored = [r for r in finals if record_value(r, "reward") is not None]
    if not scored:
        return lines
    best = min(scored, key=lambda r: rank_key(final_choice(r["final"]), spec.objective.constraints))
    lines += _seed_lines(finals, best)
    others = [r for r in finals if r.get("baseline") and r["dir"] != best["dir"]]
    if not others:
        return lines
    name = Path(best["dir"]).name
    lines += [
        "",
        f"Does the best ({name}, {display_name(best)}) separate from each baseline? *better*/*worse*: "
        "the two 95% intervals do not overlap; *overlap*: within noise.",
        "",
        "| baseline | " + " | ".join(COMPARED) + " |",
        "|---|" + "---|" * len(COMPARED),
    ]
    for r in others:
        cells = [separation(best, r, m) for m in COMPARED]
        lines.append(f"| {display_name(r)} | " + " | ".join(cells) + " |")
    return lines


def _seed_lines(finals: list[dict[str, Any]], best: dict[str, Any]) -> list[str]:
    """The finalists trained again on other seeds (final.train_seeds): final reward per training seed,
    and the means the best is chosen on ([] when none was)."""
    if not any(r["final"].get("seeds") for r in finals):
        return []
    seeds = sorted({s.get("train_seed") for r in finals for s in r["final"].get("seeds", [])})
    own = finals[0].get("train", {}).get("seed", "own")
    header = ["trial", "method", f"seed {own}", *(f"seed {s}" for s in seeds),
              "mean reward ↑", "mean FID ↓", "mean extracted ↓"]  # fmt: skip
    lines = ["", "### Over training seeds", "", "Every finalist that trains anything trained again "
             f"on seed(s) {', '.join(map(str, seeds))} (same plan and data) and evaluated like the "
             "table above; final reward per training seed, and the means over them, on which the "
             "best is chosen (Freeze trains nothing: one evaluation).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]  # fmt: skip

    def cell(value: float | None, fmt: str) -> str:
        return "–" if value is None else format(value, fmt)

    for r in finals:
        by_seed = {s.get("train_seed"): s for s in r["final"].get("seeds", [])}
        pooled = final_choice(r["final"])
        name = Path(r["dir"]).name
        row = [f"**{name}**" if r["dir"] == best["dir"] else name, display_name(r),
               cell(record_value(r["final"], "reward"), ".3f"),
               *(cell(record_value(by_seed.get(s, {}), "reward"), ".3f") for s in seeds),
               cell(record_value(pooled, "reward"), ".3f"), cell(record_value(pooled, "fid"), ".1f"),
               cell(record_value(pooled, "extracted"), ".1f")]  # fmt: skip
        lines.append("| " + " | ".join(c.replace("|", "/") for c in row) + " |")
    return lines


def _standing(best: dict[str, Any], done: list[dict[str, Any]], spec: Spec) -> str:
    """The best trial against the constraints, on the evaluation it was chosen on ("" without any)."""
    final = bool(best.get("final"))
    stage = [final_choice(r["final"]) for r in done if r.get("final")] if final else done
    values = [partial(record_value, r) for r in stage]
    chosen = final_choice(best["final"]) if final else best
    text = standing(partial(record_value, chosen), values, spec.objective.constraints)
    return text + " " if text else ""
