"""Results of a search run: trial records, the results table, the Pareto plot and report.md.

A run folder holds `spec.yaml` (the resolved spec), `optuna.db` (the Optuna study), and one folder per
trial, `trials/tNNN/` (NNN: the Optuna trial number) with `params.json` when it starts and
`result.json` when it ends, next to its `delta/`, `metrics.json` and `samples.png`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from capsearch.errors import UserError
from capsearch.final import COMPARED, read_final, separation

if TYPE_CHECKING:
    from capsearch.config import Spec

SPEC_FILE = "spec.yaml"
PARAMS_FILE = "params.json"
RESULT_FILE = "result.json"
REPORT_FILE = "report.md"
PARETO_FILE = "pareto.png"
FINISHED = ("ok", "error", "nan", "stopped")  # "interrupted" and "running" trials do not count

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


def trial_dir(run_dir: Path, number: int) -> Path:
    """The folder of the trial with that Optuna number."""
    return Path(run_dir) / "trials" / f"t{number:03d}"


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (a reader never sees half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


def read_run_spec(run_dir: Path) -> Spec:
    """The resolved spec a run folder was started with (UserError if it is not a run folder)."""
    from capsearch.config import read_yaml, spec_from_dict

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist")
    if not (run_dir / SPEC_FILE).is_file():
        raise UserError(f"{run_dir} is not a capsearch run folder (no {SPEC_FILE})")
    return spec_from_dict(read_yaml(run_dir / SPEC_FILE), source=str(run_dir / SPEC_FILE))


def load_trials(run_dir: Path, finished_only: bool = True) -> list[dict[str, Any]]:
    """Trial records in Optuna order; with finished_only=False also running/interrupted ones."""
    folder = Path(run_dir) / "trials"
    records = []
    for sub in sorted(folder.glob("t*")) if folder.is_dir() else []:
        record = None
        for name in (RESULT_FILE, PARAMS_FILE):
            path = sub / name
            if path.is_file():
                try:
                    record = json.loads(path.read_text())
                    break
                except (OSError, json.JSONDecodeError):
                    continue  # a result being written: fall back to the start record
        if record is None:
            continue
        record.setdefault("status", "running")
        record["dir"] = str(sub)
        final = read_final(sub)
        if final is not None:
            record["final"] = final
        if not finished_only or record["status"] in FINISHED:
            records.append(record)
    return records


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
    for m in record.get("train", {}).get("mitigations", []):
        hyper = ",".join(f"{k}={_short(v)}" for k, v in m.items() if k != "name")
        text += f" · {m['name']}" + (f"({hyper})" if hyper else "")
    if "lr" in params:
        text += f" · lr={_short(params['lr'])}"
    return text


def compact_name(record: dict[str, Any]) -> str:
    """A one-line name for terminal tables: the paper's name, or method counts, mitigation, lr."""
    if record.get("baseline") or record.get("groups") is None:
        return display_name(record)
    methods = [m.split("(")[0] for m in record["groups"].values() if m not in ("frozen", "freeze")]
    counts = {m: methods.count(m) for m in dict.fromkeys(methods)}
    text = " ".join(f"{m}×{n}" if n > 1 else m for m, n in counts.items()) or "all frozen"
    text += "".join(f" +{m['name']}" for m in record.get("train", {}).get("mitigations", []))
    lr = record.get("params", {}).get("lr")
    return text + (f" lr {_short(lr)}" if lr is not None else "")


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return "/".join(map(str, value))
    return str(value)


def _num(record: dict[str, Any], key: str) -> float | None:
    value = record.get("metrics", {}).get(key, record.get(key))
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _cell(record: dict[str, Any], key: str, spec: str, intervals: bool) -> str:
    """A metric with its 95% interval, e.g. `157.34 [150.12, 165.01]` (the value alone if it has none)."""
    text = _fmt(_num(record, key), spec)
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
            -(_num(r, "reward") if _num(r, "reward") is not None else -math.inf),
            r.get("number", 0),
        ),
    )
    return baselines + searched


def best_trial(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The best trial: highest reward in the final re-evaluation if any trial has one, else in the search.

    A winner is chosen on an evaluation it was not searched on whenever the final stage ran; the
    search's own reward only decides runs without a final stage (None if no trial succeeded).
    """
    final = [r for r in records if _num(r.get("final") or {}, "reward") is not None]
    if final:
        return max(final, key=lambda r: _num(r["final"], "reward"))
    ok = [r for r in records if r.get("status") == "ok" and _num(r, "reward") is not None]
    return max(ok, key=lambda r: _num(r, "reward")) if ok else None


def table_rows(
    records: list[dict[str, Any]], compact: bool = False, intervals: bool = False
) -> list[list[str]]:
    """Rows in the paper's format: trial, method, FID, KID, AMD, image-text, extracted, trainable %, reward.

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
                _cell(r, "fid", ".2f", intervals),
                _cell(r, "kid", ".4f", intervals),
                _cell(r, "amd", ".3f", intervals),
                _cell(r, "alignment", ".2f", intervals),
                _cell(r, "extracted", ".0f", intervals),
                _fmt(_num(r, "trainable_pct"), ".3g" if compact else ".3f"),
                _fmt(_num(r, "reward"), ".3f"),
                str(r.get("status", "")),
            ]
        )
    return rows


COLUMNS = ["trial", "method", "FID ↓", "KID ↓", "AMD ↑", "image-text ↑", "extracted ↓",
           "trainable %", "reward ↑", "status"]  # fmt: skip
SHORT_COLUMNS = ["trial", "method", "FID↓", "KID↓", "AMD↑", "txt↑", "ext↓", "train%", "reward↑",
                 "status"]  # fmt: skip


def results_table(records: list[dict[str, Any]], title: str = "", intervals: bool = False) -> Any:
    """A rich table of trial records (running ones included if given), metrics ± their intervals."""
    from rich.table import Table

    show_status = any(r.get("status") != "ok" for r in records)  # all ok: the column says nothing
    columns = SHORT_COLUMNS if show_status else SHORT_COLUMNS[:-1]
    table = Table(title=title or None, caption="* baseline", padding=(0, 1))
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i in (0, 1, 9) else "right",
                         no_wrap=i != 1, overflow="fold", min_width=18 if i == 1 else None)  # fmt: skip
    for record, row in zip(records, table_rows(records, compact=True, intervals=intervals)):
        style = "bold" if record.get("baseline") else None
        table.add_row(*row[: len(columns)], style=style)
    return table


def pareto_plot(records: list[dict[str, Any]], path: Path) -> Path | None:
    """FID against AMD, extracted images as colour, baselines labelled; None if nothing to plot."""
    from capsearch.reward import pareto_front

    points = [r for r in records if _num(r, "fid") is not None and _num(r, "amd") is not None]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fid = [_num(r, "fid") for r in points]
    amd = [_num(r, "amd") for r in points]
    ext = [_num(r, "extracted") or 0.0 for r in points]
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    front = sorted(
        pareto_front([{"fid": f, "amd": a} for f, a in zip(fid, amd)], ["fid", "amd"]),
        key=lambda i: fid[i],
    )
    if len(front) > 1:
        ax.step(
            [fid[i] for i in front],
            [amd[i] for i in front],
            where="post",
            color="0.6",
            lw=1,
            zorder=1,
            label="Pareto front",
        )
    for is_base, marker in ((True, "s"), (False, "o")):
        idx = [i for i, r in enumerate(points) if bool(r.get("baseline")) == is_base]
        if idx:
            sc = ax.scatter(
                [fid[i] for i in idx],
                [amd[i] for i in idx],
                c=[ext[i] for i in idx],
                cmap="viridis",
                vmin=min(ext),
                vmax=max(max(ext), min(ext) + 1),
                marker=marker,
                s=60,
                edgecolors="k",
                zorder=2,
                label="baselines" if is_base else "searched",
            )
    for i, r in enumerate(points):
        label = display_name(r) if r.get("baseline") else Path(r.get("dir", "")).name
        ax.annotate(label, (fid[i], amd[i]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    if max(fid) / max(min(fid), 1e-9) > 20:
        ax.set_xscale("log")
    else:
        ax.ticklabel_format(axis="x", useOffset=False)
    ax.ticklabel_format(axis="y", useOffset=False)
    fig.colorbar(sc, ax=ax, label="extracted images ↓")
    ax.set_xlabel("FID ↓")
    ax.set_ylabel("AMD ↑ (mean min. cosine distance to training set)")
    ax.set_title("Quality against memorisation")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def best_config_yaml(record: dict[str, Any]) -> str:
    """The YAML snippet that reproduces a trial: method spec, training settings, mitigations."""
    train = dict(record.get("train", {}))
    mitigations = train.pop("mitigations", record.get("mitigations", []))
    snippet = {"methods": record.get("method_spec", []), "train": train, "mitigations": mitigations}
    return yaml.safe_dump(snippet, sort_keys=False, default_flow_style=None, width=100)


def write_report(run_dir: Path) -> Path:
    """Write report.md (table, Pareto plot, samples, best configuration) into the run folder."""
    from capsearch.reward import pareto_front

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
        f"sampler {spec.search.sampler}, objective {_objective_text(spec)}. "
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
    lines += _noise_floor_lines(done, "searched")
    finals = [final_view(r) for r in done if r.get("final")]
    if finals:
        lines += _final_lines(spec, finals)
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
    best = best_trial(done)
    if best is not None:
        name = Path(best["dir"]).name
        chosen = (
            f"final reward {_num(best['final'], 'reward'):.3f} on the {best['final'].get('split')} "
            f"split (search reward {_num(best, 'reward'):.3f})"
            if best.get("final")
            else f"reward {_num(best, 'reward'):.3f} (no final re-evaluation: chosen on the "
            "evaluation it was searched on)"
        )
        lines += [
            "",
            "## Best configuration",
            "",
            f"Trial {name} ({display_name(best)}), {chosen}. "
            f"Export it with `capsearch export {run_dir} --trial {name} --out EXPORT`.",
            "",
            "```yaml",
            best_config_yaml(best).rstrip(),
            "```",
        ]
        if (Path(best["dir"]) / "samples.png").is_file():
            lines += ["", f"![samples of {name}](trials/{name}/samples.png)"]
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
    path.write_text("\n".join(lines) + "\n")
    return path


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


def _noise_floor_lines(records: list[dict[str, Any]], what: str) -> list[str]:
    """One paragraph: FID and KID between disjoint sets of real held-out images at the sample count."""
    floors = [r.get("noise_floor") for r in records if r.get("noise_floor")]
    if not floors:
        return []
    f = floors[0]
    parts = []
    for key, label, fmt in (("fid", "FID", ".2f"), ("kid", "KID", ".4f")):
        if isinstance(f.get(key), dict):
            v = f[key]
            parts.append(
                f"{label} {format(v['mean'], fmt)} (95% of repeats in "
                f"[{format(v['low'], fmt)}, {format(v['high'], fmt)}])"
            )
    if not parts:
        return []
    return [
        "",
        f"Noise floor of the {what} evaluation: real held-out images against other real held-out "
        f"images, {f.get('n', '?')} of each, score " + " and ".join(parts) + ". A difference "
        "between trials smaller than this spread is not a difference. Intervals are 95%: FID and KID "
        "by a delete-one-prompt jackknife, AMD and image-text score by resampling prompts, extracted "
        'images by resampling attacked prompts (docs/metrics.md, "Intervals").',
    ]


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
    finals = sorted(finals, key=lambda r: (not r.get("baseline"), -(_num(r, "reward") or -1e9)))
    rows = [row[:-1] for row in table_rows(finals, intervals=True)]
    lines += _markdown_table(COLUMNS[:-1], rows, finals)
    lines += _noise_floor_lines(finals, "final")
    scored = [r for r in finals if _num(r, "reward") is not None]
    if not scored:
        return lines
    best = max(scored, key=lambda r: _num(r, "reward"))
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


def _objective_text(spec: Spec) -> str:
    if spec.objective.mode == "pareto":
        return "Pareto front over " + ", ".join(spec.objective.pareto)
    w = spec.objective.weights
    return (
        f"reward = −{w.fid:g}·ln FID + {w.alignment:g}·image-text − {w.amd:g}·max(0, 1 − AMD/AMD_heldout) "
        f"− {w.extracted:g}·extracted fraction"
    )
