"""The search against the baselines and against a random search (docs/results.md, "Search against the
baselines: the plan").

Usage:
    python experiments/search_compare.py runs/search_vs_baselines runs/search_random --out DIR \
        [--confirm RUN_SEED1 RUN_SEED3 ...] [--stops runs/search_stops] \
        [--transfer runs/search_transfer]

Writes DIR/search.md and DIR/learning_curve.png: the learning curves of the runs (best search reward
against searched trials proposed; each labelled by its spec's sampler), each run's winner (the searched
trial with the best final reward) and how many searched trials were proposed before it, the main run's
final table, the found configuration with the share of each unit group it trains, the compute of each
run, and whether the winner dominates the baselines on the main run's seed (within-run intervals) and,
with --confirm, over that seed and the confirmation runs' seeds (paired rules); DIR/front.png, FID
against extracted images at both stages; with --stops, whether ASHA's stops were right (the stopped
trials run to the end: would they have been finalists?); with --transfer, W and the baselines on the
transfer world and whether W dominates there. In a confirmation run
the winner is the fixed trial (`baselines.fixed`) whose parameters equal the winner's. Every number is
read from the runs' records.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling dominance.py
from dominance import NEEDED, dominance, dominance_lines  # noqa: E402

from capsearch.atomic import atomic_write  # noqa: E402
from capsearch.errors import UserError
from capsearch.reporting.describe import best_config_yaml, display_name
from capsearch.reporting.plots import front_plot
from capsearch.reporting.report import COLUMNS, final_view, ordered, table_rows
from capsearch.reporting.searchstats import (
    best_so_far,
    compute_lines,
    compute_used,
    curve_plot,
    group_shares,
)
from capsearch.search.records import SeedMean, TrialRecord
from capsearch.search.runs import best_trial, final_choice, load_trials, read_run_spec
from capsearch.search.schedule import max_steps

REPORT = "search.md"
CURVE = "learning_curve.png"
FRONT = "front.png"


@dataclass(frozen=True)
class Run:
    folder: Path
    spec: Any
    seed: int
    records: list[TrialRecord]


def load_run(folder: Path) -> Run:
    """A run folder's spec, seed (the phantom data's, else training's, as capsearch.reporting.seeds) and trials."""
    spec = read_run_spec(folder)
    seed = spec.data.phantom.seed if spec.data.phantom is not None else spec.train.seed
    return Run(Path(folder), spec, int(seed), load_trials(folder))


def searched(run: Run) -> list[TrialRecord]:
    """The sampler's proposals (every finished trial that is not a baseline), by trial number."""
    return sorted((r for r in run.records if not r.baseline), key=lambda r: r.number)


def winner(run: Run) -> TrialRecord:
    """The searched trial with the best final reward (UserError if no searched trial has one)."""
    finals = [
        r for r in searched(run) if r.final is not None and r.final.value("reward") is not None
    ]
    if not finals:
        raise UserError(
            f"{run.folder}: no searched trial has a final re-evaluation with a reward "
            "(the winner is chosen on the final stage); run it first"
        )
    return best_trial(finals, run.spec.objective.constraints)  # ranks by the final evaluation


def baselines(runs: list[Run]) -> dict[str, TrialRecord]:
    """The finished (ok) baseline trials of runs of one seed by name (UserError on a name found twice;
    a baseline that errored and was run again with --retry-errors is found once)."""
    out: dict[str, TrialRecord] = {}
    for run in runs:
        for r in run.records:
            name = r.baseline if r.status == "ok" else None
            if name and name in out:
                raise UserError(f"baseline {name!r} appears twice for seed {run.seed} "
                                f"({out[name].dir} and {r.dir})")  # fmt: skip
            if name:
                out[name] = r
    return out


def _name(record: TrialRecord) -> str:
    return record.folder.name


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]


def curve_lines(runs: list[Run], out: Path) -> list[str]:
    """The learning curves of all runs in one plot; the main run's baselines as flat lines."""
    labels = [str(r.spec.search.sampler) for r in runs]
    labels = [f"{x} ({r.spec.name})" if labels.count(x) > 1 else x for x, r in zip(labels, runs)]
    curves = [(label, best_so_far(run.records)) for label, run in zip(labels, runs)]
    base = [(f"{display_name(r)} (baseline)", v) for r in runs[0].records
            if r.baseline and (v := r.value("reward")) is not None]  # fmt: skip
    if curve_plot(curves, base, out / CURVE) is None:
        return ["", "## Learning curve", "", "No searched trial of any run has a search reward."]
    return ["", "## Learning curve", "", f"![learning curves]({CURVE})", "",
            "The best search reward (validate split) among the searched trials against the number "
            "proposed, stopped and failed ones included, one line per run, labelled by its sampler; "
            "dotted: the main run's baselines.", *shared_lines(runs)]  # fmt: skip


def configurations(run: Run) -> list[dict[str, Any]]:
    """A run's distinct searched configurations in the order first proposed (a retry of an interrupted
    trial repeats its parameters: counted once)."""
    out: list[dict[str, Any]] = []
    for r in searched(run):
        if r.params and r.params not in out:
            out.append(r.params)
    return out


def shared_lines(runs: list[Run]) -> list[str]:
    """How many searched configurations each other run shares with the main run, and how many of the
    first ones in the same order: samplers on one seed draw the same random start (TPE's start-up
    trials are its random sampler's draws), which makes a comparison of them paired there."""
    main = configurations(runs[0])
    lines = []
    for run in runs[1:]:
        theirs = configurations(run)
        lead = next((i for i, (a, b) in enumerate(zip(main, theirs)) if a != b),
                    min(len(main), len(theirs)))  # fmt: skip
        same = sum(p in main for p in theirs)
        lines += ["", f"`{run.folder}` ({run.spec.search.sampler}) shares {same} of its "
                  f"{len(theirs)} distinct searched configurations with `{runs[0].folder}`; the "
                  f"first {lead} are the same, in the same order."]  # fmt: skip
    return lines


def _final_reward(w: TrialRecord) -> str:
    """The final reward a winner was chosen on: its own, or the mean over final.train_seeds."""
    pooled = final_choice(w.final)
    reward = pooled.value("reward")
    over = f", mean of {pooled.n_seeds} training seeds" if isinstance(pooled, SeedMean) else ""
    return f"{'–' if reward is None else format(reward, '.3f')} ({w.final.split}{over})"


def winner_lines(runs: list[Run], wins: list[TrialRecord]) -> list[str]:
    """Each run's winner: its final and search rewards and how many proposals came before it."""
    rows = []
    for run, w in zip(runs, wins):
        numbers = [r.number for r in searched(run)]
        rank = numbers.index(w.number) + 1
        search = w.value("reward")
        rows.append([f"`{run.folder}`", str(run.spec.search.sampler), _name(w), display_name(w),
                     f"{rank} of {len(numbers)} ({rank - 1} before it)",
                     _final_reward(w),
                     "–" if search is None else f"{search:.3f}"])  # fmt: skip
    header = ["run", "sampler", "winner", "configuration", "proposed as searched trial",
              "final reward ↑ (split)", "search reward ↑"]  # fmt: skip
    return ["", "## Winners", "", "The winner of a run is its searched trial with the best final "
            "reward (baselines are not candidates).", "", *_table(header, rows)]  # fmt: skip


def final_lines(run: Run, w: TrialRecord, which: str = "main run") -> list[str]:
    """A run's final re-evaluation: baselines (spec order), then finalists by final reward."""
    views = ordered([final_view(r) for r in run.records if r.final is not None], run.spec)
    rows = []
    for view, row in zip(views, table_rows(views, intervals=True)):
        if view.dir == w.dir:
            row[1] = f"**W: {row[1]}**"
        rows.append(row[:-1])  # without the status column
    split = w.final.split
    return ["", f"## Final re-evaluation ({which})", "", f"Baselines and finalists of "
            f"`{run.folder}`, evaluated again on the {split} split (sampling seed "
            f"{w.final.seed}); values with their within-run 95% intervals.", "",
            *_table(COLUMNS[:-1], rows)]  # fmt: skip


def _point(record: TrialRecord, w: TrialRecord, final: bool) -> dict[str, Any] | None:
    """A trial as a front_plot point at the search stage or (final) its final re-evaluation."""
    view = final_view(record) if final else record
    fid, ext = view.value("fid"), view.value("extracted")
    if fid is None or ext is None:
        return None
    kind = "winner" if record.dir == w.dir else "baseline" if record.baseline else "searched"
    label = display_name(record) if record.baseline else _name(record)
    return {"label": label, "kind": kind, "fid": fid, "extracted": ext,
            "intervals": view.intervals if final else None}  # fmt: skip


def front_lines(run: Run, w: TrialRecord, out: Path) -> list[str]:
    """The front plot: every evaluated trial at the search stage, the finalists at the final stage."""
    stages = []
    for final, title in ((False, "search stage (validate split): every evaluated trial"),
                         (True, "final stage (test split, fresh seeds): 95% intervals")):  # fmt: skip
        pts = [p for r in run.records if (not final or r.final is not None)
               and (p := _point(r, w, final)) is not None]  # fmt: skip
        stages.append((title, pts))
    if front_plot(stages, out / FRONT) is None:
        return []
    return ["", "## Quality against memorisation", "", f"![front]({FRONT})", "",
            "FID against extracted images of the main run: left, every trial the search evaluated "
            "(ASHA-stopped ones were not); right, the baselines and finalists re-evaluated. Grey: the "
            "trials no other trial beats on both axes."]  # fmt: skip


def stops_lines(main: Run, w: TrialRecord, stops: Run) -> list[str]:
    """Were ASHA's stops right? Each stopped trial run to the end (`stopped_tNNN` fixed trials of the
    stops run, same seed and evaluation). The plan's rule: a stop was wrong if the trial's final reward
    beats the winner's. Also shown: whether its search reward would have made it a finalist."""
    if stops.seed != main.seed:
        raise UserError(f"{stops.folder} has seed {stops.seed}; the stops check runs on the main "
                        f"run's seed {main.seed}")  # fmt: skip
    ranked = sorted((v for r in searched(main) if (v := r.value("reward")) is not None),
                    reverse=True)  # fmt: skip
    k = main.spec.final.top_k
    bar = ranked[k - 1] if 0 < k <= len(ranked) else None
    w_final = w.final.value("reward")
    rows, wrong = [], 0
    for r in sorted(stops.records, key=lambda r: r.number):
        name = str(r.baseline or "")
        if not name.startswith("stopped_"):
            continue
        source = next((x for x in main.records if _name(x) == name[len("stopped_") :]), None)
        if source is None or source.params != r.params:
            raise UserError(f"{stops.folder}: {name} does not match a trial of {main.folder} "
                            "with its parameters")  # fmt: skip
        search = r.value("reward")
        final = r.final.value("reward") if r.final is not None else None
        finalist = search is not None and bar is not None and search >= bar
        beats = final is not None and w_final is not None and final > w_final
        wrong += bool(beats)
        rows.append([_name(source), display_name(source), f"{source.steps or 0:,}",
                     _fmt(search), "yes" if finalist else "no", _fmt(final),
                     "yes" if beats else "no"])  # fmt: skip
    if not rows:
        return ["", "## Were the stops right?", "", f"`{stops.folder}` holds no stopped trial."]
    header = [
        "stopped trial",
        "configuration",
        "stopped at step",
        "search reward at the end ↑",
        f"finalist (≥ {_fmt(bar)}, top {k})",
        "final reward ↑",
        f"beats W ({_fmt(w_final)})",
    ]
    verdict = ("every stop was right: no stopped trial, run to the end, beats the winner's final "
               "reward" if not wrong else f"{wrong} of {len(rows)} stops were wrong: run to the end, "
               "they beat the winner's final reward")  # fmt: skip
    return ["", "## Were the stops right?", "", f"Trials ASHA stopped, run to the end in "
            f"`{stops.folder}` on the same seed and evaluation: {verdict}.", "",
            *_table(header, rows)]  # fmt: skip


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def transfer_lines(main: Run, w: TrialRecord, transfer: Run) -> list[str]:
    """W unchanged (the fixed trial with its parameters) and the baselines on another world."""
    matches = [r for r in transfer.records if r.baseline and r.params == w.params]
    if len(matches) != 1:
        raise UserError(f"{transfer.folder}: {len(matches)} trials have the winner's parameters "
                        "(one is needed: `found` of search_transfer.yaml)")  # fmt: skip
    tw = matches[0]
    views = ordered([final_view(r) for r in transfer.records if r.final is not None], transfer.spec)
    rows = []
    for view, row in zip(views, table_rows(views, intervals=True)):
        if view.dir == tw.dir:
            row[1] = f"**W: {row[1]}**"
        rows.append(row[:-1])
    pool = {k: v for k, v in baselines([transfer]).items() if v is not tw}
    result = dominance(tw, pool, seeds=[transfer.seed])
    return ["", "## Transfer", "", f"W ({_name(w)} of `{main.folder}`) unchanged, retrained with "
            f"the baselines on `{transfer.folder}` (phantom seed {transfer.seed}, not searched on), "
            f"final stage as the main run's; within-run 95% intervals.", "",
            *_table(COLUMNS[:-1], rows), "", *dominance_lines(result)]  # fmt: skip


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}%"


def config_lines(w: TrialRecord) -> list[str]:
    """The found configuration as YAML and the share of each unit group's parameters it trains."""
    shares = group_shares(w)
    rows = [[s["group"], str(s["method"]), f"{s['trainable']:,}", f"{s['parameters']:,}",
             f"{100 * s['share']:.2f}"] for s in shares]  # fmt: skip
    lines = ["", "## Found configuration", "", f"Trial {_name(w)} ({display_name(w)}); trainable "
             f"{_pct(w.value('trainable_pct'))} of the UNet.", "", "```yaml",
             best_config_yaml(w).rstrip(), "```", ""]  # fmt: skip
    if not rows:
        return lines + ["It trains no unit group."]
    header = ["group", "method", "trainable parameters", "group parameters", "share %"]
    return lines + ["Per unit group (frozen groups left out):", "", *_table(header, rows)]


def compute_section(runs: list[Run]) -> list[str]:
    lines = ["", "## Compute"]
    for run in runs:
        used = compute_used(run.records, max_steps(run.spec))
        lines += ["", f"`{run.folder}` ({run.spec.search.sampler}):", "", *compute_lines(used)]
    return lines


def confirm_records(main: Run, w: TrialRecord, confirm: list[Run]) -> tuple[list, dict, list]:
    """W and the baselines per seed: the main run's seed, then each confirmation seed (sorted)."""
    by_seed: dict[int, list[Run]] = {}
    # the finalists' other trainings in the final stage: the winner was chosen on them
    chosen_on = set(main.spec.final.train_seeds)
    for run in confirm:
        if run.seed == main.seed:
            raise UserError(f"{run.folder} has seed {run.seed}, the main run's: confirmation runs "
                            "are other seeds")  # fmt: skip
        if run.spec.train.seed in chosen_on:
            raise UserError(f"{run.folder} trains on seed {run.spec.train.seed}, one the winner was "
                            "chosen on (final.train_seeds): confirmation runs are seeds it was never "
                            "evaluated on")  # fmt: skip
        by_seed.setdefault(run.seed, []).append(run)
    seeds, wins, pools = [main.seed], [w], [baselines([main])]
    for seed in sorted(by_seed):
        runs = by_seed[seed]
        named = baselines(runs)  # the finished fixed trials and baselines of this seed
        matches = [r for r in named.values() if r.params == w.params]
        folders = ", ".join(str(r.folder) for r in runs)
        if len(matches) != 1:
            found = "no trial" if not matches else f"{len(matches)} trials"
            raise UserError(f"{found} of {folders} (seed {seed}) has the winner's parameters "
                            f"({_name(w)}'s params.json): run it there as a `baselines.fixed` "
                            "trial")  # fmt: skip
        seeds.append(seed)
        wins.append(matches[0])
        pools.append({k: v for k, v in named.items() if v is not matches[0]})
    for n in NEEDED:  # name the seed that lacks a baseline (dominance would only name the baseline)
        lacking = [s for s, p in zip(seeds, pools) if n not in p]
        if lacking:
            raise UserError(f"baseline {n!r} is missing for seed(s) {', '.join(map(str, lacking))}")
    return wins, {n: [p[n] for p in pools] for n in NEEDED}, seeds


def compare_lines(main: Run, others: list[Run], confirm: list[Run], out: Path,
                  stops: Run | None = None, transfer: Run | None = None) -> list[str]:  # fmt: skip
    """search.md's lines after its title."""
    runs = [main, *others]
    wins = [winner(run) for run in runs]
    w = wins[0]
    lines = ["", "Runs:", ""]
    for run in runs:
        n_base = sum(1 for r in run.records if r.baseline)
        lines.append(f"- `{run.folder}`: spec `{run.spec.name}`, sampler {run.spec.search.sampler}, "
                     f"seed {run.seed}, {len(searched(run))} searched trials and {n_base} baselines "
                     "finished")  # fmt: skip
    lines += curve_lines(runs, out) + winner_lines(runs, wins) + final_lines(main, w)
    lines += front_lines(main, w, out) + config_lines(w) + compute_section(runs)
    if stops is not None:
        lines += stops_lines(main, w, stops)
    one = dominance(w, baselines([main]), seeds=[main.seed])
    lines += ["", f"## Dominance on seed {main.seed} (the main run)", "", *dominance_lines(one)]
    for run, win in zip(others, wins[1:]):  # each other sampler's winner, by the same rules
        which = f"the {run.spec.search.sampler} run"
        theirs = dominance(win, baselines([run]), seeds=[run.seed])
        lines += final_lines(run, win, which)
        lines += ["", f"## Dominance on seed {run.seed} ({which})", "",
                  f"W here is `{run.folder}`'s winner.", "", *dominance_lines(theirs)]  # fmt: skip
    if confirm:
        wins3, named, seeds = confirm_records(main, w, confirm)
        many = dominance(wins3, named, seeds=seeds)
        lines += ["", f"## Dominance over seeds {', '.join(map(str, many.seeds))}", "",
                  "W unchanged on each seed (on the confirmation seeds the fixed trial with W's "
                  "parameters), against that seed's baselines.", "",
                  *dominance_lines(many)]  # fmt: skip
    if transfer is not None:
        lines += transfer_lines(main, w, transfer)
    return lines


def write_compare(run: Path, random: Path | None, out: Path, confirm: list[Path],
                  command: str, stops: Path | None = None,
                  transfer: Path | None = None) -> Path:  # fmt: skip
    """Write OUT/search.md (and the learning-curve and front plots); return its path."""
    main = load_run(run)
    others = [load_run(random)] if random is not None else []
    confirms = [load_run(c) for c in confirm]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# capsearch search comparison: {main.spec.name}", "", f"Written by `{command}`"]
    lines += compare_lines(main, others, confirms, out,
                           load_run(stops) if stops is not None else None,
                           load_run(transfer) if transfer is not None else None)  # fmt: skip
    path = out / REPORT
    atomic_write(path, "\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and write the comparison; a user error prints one line, returns 2."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, metavar="RUN", help="the main search run folder")
    ap.add_argument("random", type=Path, nargs="?", metavar="RUN_RANDOM",
                    help="the same search with the random sampler")  # fmt: skip
    ap.add_argument("--out", type=Path, required=True, help="folder for search.md and the plot")
    ap.add_argument("--confirm", type=Path, nargs="+", default=[], metavar="RUN_SEED",
                    help="runs of other seeds holding W as a fixed trial and their baselines")  # fmt: skip
    ap.add_argument(
        "--stops",
        type=Path,
        metavar="RUN_STOPS",
        help="the run of ASHA-stopped trials run to the end (search_stops.yaml)",
    )
    ap.add_argument(
        "--transfer",
        type=Path,
        metavar="RUN_TRANSFER",
        help="W and the baselines on the transfer world (search_transfer.yaml)",
    )
    args = ap.parse_args(argv)
    words = sys.argv[1:] if argv is None else argv
    command = "python " + shlex.join([sys.argv[0] if argv is None else __file__, *words])
    command = command.replace(str(Path(__file__).resolve().parents[1]) + "/", "")
    try:
        path = write_compare(args.run, args.random, args.out, args.confirm, command, args.stops,
                             args.transfer)  # fmt: skip
    except UserError as exc:
        sys.stderr.write(f"search_compare: error: {exc}\n")
        return exc.exit_code
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
