"""Several runs as seeds of one experiment: the paper's tables as mean ± sd over seeds, and its claims.

`capsearch report RUN [RUN ...] --out DIR` writes DIR/report.md and DIR/quality_memorisation.png. The
baseline trials of all runs with the same seed form one pool (Table 2's run of a seed holds "full+rwa",
Table 1's run of that seed "full"); comparisons between methods are paired by seed, and every verdict
follows docs/results.md, "How each verdict will be decided". Numbers come from each trial's final
re-evaluation; a trial without one shows its search-stage numbers, marked †.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capsearch.atomic import atomic_write
from capsearch.errors import UserError
from capsearch.metrics.intervals import seed_interval  # Student t, n − 1 d.f.
from capsearch.metrics.table import BY_NAME
from capsearch.reporting.describe import PAPER_NAMES
from capsearch.reporting.plots import seeds_plot
from capsearch.search.records import finite
from capsearch.search.runs import FINAL_DIR, REPORT_FILE, load_trials, read_run_spec

PLOT_FILE = "quality_memorisation.png"
MEMORISED_FILE = "memorised.png"  # capsearch.metrics.memorised_grid.MEMORISED_GRID, in final/
METHODS = ("freeze", "full", "attention", "difffit", "svdiff")  # Table 1's row order
MITIGATIONS = {"rwa": "RWA", "threshold": "Threshold"}  # Table 2's, each after its method
TABLE = ("fid", "amd", "alignment", "extracted")
EXTRA = ("kid", "nearest_own", "strength_ratio")  # per-seed columns when a trial has them
DIFF_FMT = {"extracted": ".2f"}  # a mean of count differences needs decimals
PEFT = ("difffit", "svdiff")

# Dutt et al. 2024, Capacity Control is an Effective Memorization Mitigation Mechanism in
# Text-Conditional Diffusion Models, ICML, Tables 1 and 2 (MIMIC-CXR, Stable Diffusion v1.5):
# FID ↓, AMD ↑, image-text ↑, extracted images ↓.
PAPER = {
    "freeze": (323.78, 0.801, 0.23, 0),
    "full": (35.79, 0.029, 0.60, 356),
    "attention": (40.28, 0.031, 0.59, 358),
    "difffit": (15.19, 0.061, 0.69, 69),
    "svdiff": (12.77, 0.062, 0.72, 63),
    "full+rwa": (67.48, 0.041, 0.58, 320),
    "full+threshold": (25.43, 0.048, 0.62, 298),
    "attention+rwa": (49.71, 0.035, 0.52, 324),
    "attention+threshold": (25.43, 0.041, 0.62, 299),
    "difffit+rwa": (17.18, 0.060, 0.67, 64),
    "difffit+threshold": (15.31, 0.067, 0.69, 51),
    "svdiff+rwa": (41.25, 0.059, 0.52, 58),
    "svdiff+threshold": (23.64, 0.068, 0.64, 45),
}


@dataclass(frozen=True)
class Entry:
    """One baseline trial of one seed: the numbers it is reported with."""

    baseline: str
    seed: int
    trial: Path  # the trial folder, under the run folder as given on the command line
    metrics: dict[str, Any]
    intervals: dict[str, Any]
    final: bool  # False: no final re-evaluation, search-stage numbers (†)
    attacked: int | None  # memorised captions the extraction attack ran on

    def value(self, key: str) -> float | None:
        return finite(self.metrics.get(key))

    def interval(self, key: str) -> tuple[float, float] | None:
        ci = self.intervals.get(key)
        return (float(ci[0]), float(ci[1])) if ci and len(ci) == 2 else None


@dataclass(frozen=True)
class Run:
    folder: str
    name: str
    seed: int
    baselines: int
    failed: int
    minutes: float


Pool = dict[str, dict[int, Entry]]  # baseline name → seed → entry


def display(baseline: str) -> str:
    """The paper's name of a baseline: "Full FT", "DiffFit + Threshold"."""
    method, _, mitigation = baseline.partition("+")
    name = PAPER_NAMES.get(method, method)
    return f"{name} + {MITIGATIONS.get(mitigation, mitigation)}" if mitigation else name


def row_order(names: Any) -> list[str]:
    """Table 1's methods, then each with its mitigations in the same order, then the rest sorted."""
    known = list(METHODS) + [f"{m}+{x}" for m in METHODS[1:] for x in MITIGATIONS]
    return [n for n in known if n in names] + sorted(n for n in names if n not in known)


def _attacked(trial: Path, final: bool) -> int | None:
    path = trial / (FINAL_DIR if final else "") / "metrics.json"
    try:
        return int(json.loads(path.read_text())["settings"]["attack_prompts"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_pool(run_dirs: list[Path]) -> tuple[list[Run], Pool]:
    """Every run's summary and the pool of baseline trials (UserError on a baseline twice per seed)."""
    runs, pool, owner = [], {}, {}
    for run_dir in run_dirs:
        spec = read_run_spec(run_dir)
        seed = spec.data.phantom.seed if spec.data.phantom is not None else spec.train.seed
        records = load_trials(run_dir)
        based = [r for r in records if r.baseline]
        ok = [r for r in based if r.status == "ok" and r.metrics]
        seconds = sum(
            float(r.seconds or 0) + float((r.final.seconds if r.final is not None else None) or 0)
            for r in records
        )
        runs.append(Run(str(run_dir), spec.name or "", seed, len(ok), len(based) - len(ok),
                        seconds / 60))  # fmt: skip
        for r in ok:
            name, final = r.baseline, bool(r.final is not None and r.final.metrics)
            source = r.final if final else r
            if seed in pool.get(name, {}):
                raise UserError(
                    f"runs {owner[name, seed]} and {run_dir} both hold baseline {name!r} "
                    f"for seed {seed}"
                )
            pool.setdefault(name, {})[seed] = Entry(
                name, seed, r.folder, source.metrics, source.intervals, final,
                _attacked(r.folder, final))  # fmt: skip
            owner[name, seed] = str(run_dir)
    return sorted(runs, key=lambda r: (r.seed, r.folder)), pool


def _disjoint(a: tuple[float, float] | None, b: tuple[float, float] | None) -> bool | None:
    return None if a is None or b is None else a[1] < b[0] or b[1] < a[0]


def paired(pool: Pool, a: str, b: str, metric: str) -> list[tuple[int, float, bool | None]]:
    """Per common seed: d (positive: A better) and whether the within-run intervals are disjoint."""
    sign = 1.0 if BY_NAME[metric].direction == "max" else -1.0
    out = []
    for seed in sorted(set(pool.get(a, {})) & set(pool.get(b, {}))):
        ea, eb = pool[a][seed], pool[b][seed]
        va, vb = ea.value(metric), eb.value(metric)
        if va is not None and vb is not None:
            d = sign * (va - vb) + 0.0  # + 0.0: no "-0.00" for equal values
            out.append((seed, d, _disjoint(ea.interval(metric), eb.interval(metric))))
    return out


def claims(pool: Pool) -> list[tuple[int, str, str, str]]:
    """The claims of docs/results.md whose two sides share a seed: (number, A, B, metric)."""
    wanted = [(n, a, "full", m) for n, ms in ((1, ["extracted"]), (2, ["fid", "alignment"]),
              (3, ["amd"])) for m in ms for a in PEFT]  # fmt: skip
    for name in (n for n in row_order(pool) if "+" in n):
        wanted += [(4, name, name.partition("+")[0], m) for m in ("extracted", "amd", "fid")]
    wanted.append((5, "attention", "full", "extracted"))
    return [c for c in wanted if paired(pool, c[1], c[2], c[3])]


CLAIM_TEXT = {
    1: "PEFT extracts fewer images than Full FT",
    2: "PEFT's quality is better than Full FT's",
    3: "PEFT's AMD is higher",
    4: "the mitigation lowers memorisation further",
    5: "Attn Tuning memorises like Full FT",
}


def paired_verdict(low: float, high: float) -> str:
    """Rule 2 of docs/results.md on a t-interval of paired differences (positive: A better)."""
    return "holds" if low > 0 else "reversed" if high < 0 else "not shown"


def verdict(pool: Pool, number: int, a: str, b: str, metric: str) -> list[str]:
    """A claim's row: claim, metric, A vs B, seeds, mean d [t-interval], verdict, disjointness."""
    pairs = paired(pool, a, b, metric)
    seeds, d, disjoint = zip(*pairs)
    n, fmt = len(pairs), DIFF_FMT.get(metric, BY_NAME[metric].fmt)
    known = sum(x is not None for x in disjoint)
    within = f"disjoint on {sum(x is True for x in disjoint)} of {n} seed{'s' * (n > 1)}" + (
        f" ({n - known} without intervals)" if known < n else ""
    )
    if n >= 2:
        mean, low, high = seed_interval(list(d))
        diff = f"{mean:{fmt}} [{low:{fmt}}, {high:{fmt}}]"
        excludes = low > 0 or high < 0
    else:
        mean, low, high = d[0], None, None
        diff = f"{mean:{fmt}} (1 seed)"
        excludes = disjoint[0] is True
    prefix = "" if n >= 2 else "1 seed: within-run intervals only; "
    if number == 5:
        text = _claim5(pool, pairs, excludes, mean, n)
    elif n >= 2:
        text = paired_verdict(low, high)
    elif excludes:
        text = f"{display(a if mean > 0 else b)} better, intervals disjoint"
    else:
        text = "not shown"
    claim = CLAIM_TEXT[number]
    if number == 4 and metric == "fid":
        claim = "at a cost in quality (paper: the mitigated method's FID is worse, i.e. reversed)"
    label = BY_NAME[metric].label.replace("image-text", "image-text score")
    return [str(number), claim, label, f"{display(a)} vs {display(b)}",
            ", ".join(map(str, seeds)), diff, prefix + text, within]  # fmt: skip


def _claim5(pool: Pool, pairs: list, excludes: bool, mean: float, n: int) -> str:
    """Rule 4: the extracted difference's interval contains 0 and Attn extracts wherever Full does."""
    extracted = [(s, pool["attention"][s].value("extracted"), pool["full"][s].value("extracted"))
                 for s, _, _ in pairs]  # fmt: skip
    misses = [f"extracts {a:.0f} on seed {s} where Full FT extracts {f:.0f}"
              for s, a, f in extracted if f >= 1 and a < 1]  # fmt: skip
    reasons = [
        ("the t-interval excludes 0" if n >= 2 else "the within-run intervals are disjoint")
        + f" (Attn Tuning extracts {'fewer' if mean > 0 else 'more'})"
    ]
    reasons = (reasons if excludes else []) + (
        ["Attn Tuning " + "; ".join(misses)] if misses else []
    )
    if not reasons and all(f < 1 for _, _, f in extracted):
        return "not testable: Full FT extracts nothing on any seed"  # nothing to memorise like
    return "holds" if not reasons else "does not hold: " + "; ".join(reasons)


def _summary(entries: list[Entry], metric: str, seeds: int) -> str:
    """`mean ± sd` over seeds (sample sd), † when a seed has no final re-evaluation."""
    used = [e for e in entries if e.value(metric) is not None]
    if not used:
        return "–"
    values = [e.value(metric) for e in used]
    fmt = (".1f" if len(values) > 1 else ".0f") if metric == "extracted" else BY_NAME[metric].fmt
    text = format(values[0], fmt)
    if len(values) > 1:
        text = f"{statistics.mean(values):{fmt}} ± {statistics.stdev(values):{fmt}}"
    if len(values) < seeds:
        text += f" ({len(values)} of {seeds} seeds)"
    if metric == "extracted":
        attacked = sorted({e.attacked for e in used if e.attacked is not None})
        if attacked:  # the same captions on every seed, else their range
            span = [attacked[0]] if len(attacked) == 1 else [attacked[0], attacked[-1]]
            text += " / " + "–".join(map(str, span))
    return text + ("†" if any(not e.final for e in used) else "")


def _cell(entry: Entry, metric: str) -> str:
    value = entry.value(metric)
    if value is None:
        return "–"
    fmt = BY_NAME[metric].fmt
    ci = entry.interval(metric)
    text = format(value, fmt) + (f" [{ci[0]:{fmt}}, {ci[1]:{fmt}}]" if ci else "")
    if metric == "extracted" and entry.attacked is not None:
        text += f" / {entry.attacked}"
    return text


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]


def seeds_report_lines(runs: list[Run], pool: Pool, out: Path) -> list[str]:
    """report.md's lines; everything sorted, so that only the `Written` line depends on the time."""
    names = ", ".join(sorted({r.name for r in runs}))
    lines = [f"# capsearch seeds report: {names}", "", "Runs (seed: the phantom data's, else "
             "training's; compute: the seconds / 60 of every finished trial, searched ones too, "
             "and of its final re-evaluation):", ""]  # fmt: skip
    for r in runs:
        failed = f", {r.failed} failed" if r.failed else ""
        lines.append(f"- `{r.folder}`: spec `{r.name}`, seed {r.seed}, {r.baselines} finished "
                     f"baseline trials{failed}, {r.minutes:.1f} CPU-minutes")  # fmt: skip
    lines += ["", f"Written {time.strftime('%Y-%m-%d %H:%M')}", "", "## Table (paper format)", ""]
    order = row_order(pool)
    labels = [BY_NAME[m].label for m in TABLE]
    rows = []
    for name in order:
        entries = [pool[name][s] for s in sorted(pool[name])]
        seeds = ", ".join(str(e.seed) for e in entries)
        rows.append([display(name), *(_summary(entries, m, len(entries)) for m in TABLE),
                     seeds if len(entries) > 1 else f"{seeds} (1 seed)"])  # fmt: skip
    lines += [
        "Mean ± sample standard deviation (ddof 1) over seeds of each trial's final re-evaluation on "
        "the test split; extracted: images the attack extracted / memorised captions it attacked.",
        "",
        *_table(["method", *labels, "seeds"], rows),
    ]
    if any(not e.final for by_seed in pool.values() for e in by_seed.values()):
        lines += ["", "† at least one seed has no final re-evaluation: its search-stage numbers "
                  "(the split it was searched or tuned on) are used."]  # fmt: skip
    paper = [[display(n), *(format(v, BY_NAME[m].fmt) for v, m in zip(PAPER[n], TABLE))]
             for n in order if n in PAPER]  # fmt: skip
    if paper:
        lines += ["", "The paper's numbers (Dutt et al. 2024, ICML, Tables 1 and 2; MIMIC-CXR, "
                  "Stable Diffusion v1.5):", "", *_table(["method", *labels], paper)]  # fmt: skip
    lines += _per_seed_lines(pool, order) + _verdict_lines(pool)
    lines += _plot_lines(pool, order, out) + _memorised_lines(pool, order, out)
    return lines


def _per_seed_lines(pool: Pool, order: list[str]) -> list[str]:
    entries = [pool[n][s] for n in order for s in sorted(pool[n])]
    extra = [m for m in EXTRA if any(e.value(m) is not None for e in entries)]
    header = ["method", "seed", "trial", *(BY_NAME[m].label for m in TABLE + tuple(extra))]
    rows = [[display(e.baseline), str(e.seed), f"{e.trial.parents[1].name}/{e.trial.name}"
             + ("" if e.final else "†"),
             *(_cell(e, m) for m in TABLE), *(_cell(e, m) for m in extra)]
            for e in entries]  # fmt: skip
    return ["", "## Per seed", "", "Each trial's value with its within-run 95% interval "
            '(docs/metrics.md, "Intervals").', "", *_table(header, rows)]  # fmt: skip


def _verdict_lines(pool: Pool) -> list[str]:
    lines = ["", "## Verdicts", ""]
    found = claims(pool)
    if not found:
        return lines + ["No claim of docs/results.md has both its sides on a common seed."]
    lines += [
        'The rules of docs/results.md, "How each verdict will be decided": per seed d = A − B, '
        "signed so that positive means A is better; mean of d and its 95% Student-t interval over "
        "seeds (n − 1 degrees of freedom). Holds: mean > 0 and the interval excludes 0; reversed: "
        "mean < 0 and the interval excludes 0; not shown otherwise. Claim 5 holds when the interval "
        "contains 0 and Attn Tuning extracts at least one image on every seed on which Full FT does.",
        "",
    ]
    header = ["#", "claim", "metric", "A vs B", "seeds", "mean d [95% t-interval]", "verdict",
              "within-run 95% intervals"]  # fmt: skip
    return lines + _table(header, [verdict(pool, *c) for c in found])


def _plot_lines(pool: Pool, order: list[str], out: Path) -> list[str]:
    series = []
    for name in order:
        points = [(e.value("extracted"), e.value("fid")) for _, e in sorted(pool[name].items())]
        points = [p for p in points if p[0] is not None and p[1] is not None]
        if points:
            dagger = "†" if any(not e.final for e in pool[name].values()) else ""
            series.append((display(name) + dagger, points))
    if seeds_plot(series, out / PLOT_FILE) is None:
        return []
    return ["", "## Quality against memorisation", "", f"![held-out FID against extracted "
            f"images]({PLOT_FILE})", "", "Small markers: one seed each; large markers: the mean "
            "over seeds with ± 1 sample standard deviation."]  # fmt: skip


def _memorised_lines(pool: Pool, order: list[str], out: Path) -> list[str]:
    links = []
    for name in order:
        first = pool[name][min(pool[name])]
        path = first.trial / FINAL_DIR / MEMORISED_FILE
        if path.is_file():
            rel = os.path.relpath(path, out)
            links.append(f"- {display(name)} (seed {first.seed}, {first.trial.name}): "
                         f"[{rel}]({rel})")  # fmt: skip
    if not links:
        return []
    return ["", "## Memorised captions", "", "Per method, its first seed's grid: the training "
            "image, then the attack's samples, for each memorised caption.", "", *links]  # fmt: skip


def write_seeds_report(run_dirs: list[Path], out: Path) -> Path:
    """Write OUT/report.md and OUT/quality_memorisation.png for runs that are seeds of one experiment."""
    runs, pool = load_pool([Path(r) for r in run_dirs])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / REPORT_FILE
    atomic_write(path, "\n".join(seeds_report_lines(runs, pool, out)) + "\n")
    return path
