"""Is the search's winner better than Full FT because of the capacity it chose, or because of its
lower learning rate? (docs/results.md, "Search against the baselines").

Usage:
    python experiments/search_control.py runs/search_vs_baselines --out DIR \
        --confirm RUN_T1_SEED1 RUN_CONFIRM_SEED1 RUN_T1_SEED3 RUN_CONFIRM_SEED3 \
        --control runs/search_control_seed0 runs/search_control_seed1 runs/search_control_seed3

W (the main run's winner, and the same parameters in the confirmation runs) and Full FT at W's learning
rate (the fixed trial `full_at_w_rate` of the control runs, experiments/search_followups.py) are compared
on every seed that has both, under the rules of the dominance check (capsearch.reporting.dominance.versus); so is
that control against Full FT at its own rate (Table 1's), which shows what the rate alone does. Writes
DIR/control.md; every number is read from the runs' records.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dominance import table_lines, versus  # noqa: E402
from search_compare import Run, baselines, confirm_records, load_run, winner  # noqa: E402
from search_followups import CONTROL  # noqa: E402

from capsearch.errors import UserError  # noqa: E402
from capsearch.search.records import TrialRecord  # noqa: E402

LABEL = "Full FT at W's rate"
FULL = "Full FT"


def _controls(runs: list[Run]) -> dict[int, TrialRecord]:
    """The finished control trial of each run by seed (UserError on a run without it or a seed
    twice)."""
    out: dict[int, TrialRecord] = {}
    for run in runs:
        found = baselines([run]).get(CONTROL)
        if found is None:
            raise UserError(f"{run.folder}: no finished trial named {CONTROL!r}")
        if run.seed in out:
            raise UserError(f"two control runs of seed {run.seed}")
        out[run.seed] = found
    return out


def _share_lines(seeds: list[int], *trials: list[TrialRecord]) -> list[str]:
    """Per seed, the own-image share of W, the control and Full FT (not judged, shown)."""

    def share(record: TrialRecord) -> str:
        value = record.final.metrics.get("nearest_own") if record.final is not None else None
        return "–" if value is None else f"{value:.2f}"

    lines = ["Own-image share (the fraction of a memorised caption's attack samples nearest to that "
             "caption's own training image; shown, not judged):", "",
             f"| seed | W | {LABEL} | {FULL} |", "|---|---|---|---|"]  # fmt: skip
    for i, seed in enumerate(seeds):
        lines.append(f"| {seed} | " + " | ".join(share(t[i]) for t in trials) + " |")
    return lines


def _sentence(result: Any, a: str, b: str) -> str:
    seeds = ", ".join(map(str, result.seeds))
    verdicts = "; ".join(f"{c.metric}: {c.verdict}" for c in result.conditions)
    return f"{a} against {b} over seeds {seeds} (positive d: {a} better): {verdicts}."


def control_lines(main: Run, confirm: list[Run], controls: list[Run]) -> list[str]:
    """control.md's lines after its title."""
    w = winner(main)
    wins, pools, seeds = confirm_records(main, w, confirm)
    by_seed = _controls(controls)
    missing = [s for s in seeds if s not in by_seed]
    if missing:
        raise UserError(f"no control run for seed(s) {', '.join(map(str, missing))}")
    ctrl = [by_seed[s] for s in seeds]
    rates = sorted({r.params.get("lr") for r in ctrl}, key=str)
    rate = rates[0]
    if len(rates) != 1 or rate is None or rate != w.params.get("lr", rate):
        raise UserError(f"the control trials' learning rates ({', '.join(map(str, rates))}) "
                        f"should be one, W's ({w.params.get('lr')})")  # fmt: skip
    full_rates = sorted({p.params.get("lr") for p in pools["full"]} - {None})
    lines = [f"W = {w.folder.name} of `{main.folder}` (lr {rate:.3g}); {LABEL}: every unit "
             f"group full, caption dropout only, lr {rate:.3g}; {FULL} at Table 1's rate "
             f"({', '.join(f'{r:.3g}' for r in full_rates)}).", "",
             *_share_lines(seeds, wins, ctrl, pools["full"]), "",
             f"## W against {LABEL}", ""]  # fmt: skip
    result = versus(wins, ctrl, seeds, LABEL)
    lines += [*table_lines(result), "", _sentence(result, "W", LABEL), ""]
    lines += [f"## {LABEL} against {FULL} (the rate alone)", ""]
    result = versus(ctrl, pools["full"], seeds, FULL, a_label=LABEL)
    lines += [*table_lines(result), "", _sentence(result, LABEL, FULL)]
    return lines


def write_control(run: Path, out: Path, confirm: list[Path], controls: list[Path],
                  command: str) -> Path:  # fmt: skip
    lines = ["# capsearch: the winner against Full FT at its learning rate", "",
             f"Written by `{command}`", "",
             *control_lines(load_run(run), [load_run(c) for c in confirm],
                            [load_run(c) for c in controls])]  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    path = out / "control.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="the main search run folder")
    ap.add_argument("--out", type=Path, required=True, help="folder for control.md")
    ap.add_argument(
        "--confirm",
        type=Path,
        nargs="*",
        default=[],
        metavar="RUN_SEED",
        help="runs of other seeds holding W as a fixed trial and their baselines",
    )
    ap.add_argument(
        "--control",
        type=Path,
        nargs="+",
        required=True,
        metavar="RUN_CONTROL",
        help="the control runs (search_control_seedN.yaml), one per seed",
    )
    args = ap.parse_args(argv)
    command = shlex.join(["python", "experiments/search_control.py", *argv])
    try:
        path = write_control(args.run, args.out, args.confirm, args.control, command)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
