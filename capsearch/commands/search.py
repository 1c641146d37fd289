"""`capsearch run | validate | status | report | export`: the bi-level search from the command line."""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

from capsearch.atomic import unwritable
from capsearch.commands import export as export_command
from capsearch.commands import writable_out
from capsearch.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `run`, `validate`, `status`, `report` and `export` subcommands."""
    run = sub.add_parser("run", help="run (or resume) a search described by a spec file")
    run.add_argument("spec", type=Path, help="search spec (e.g. search_spaces/tiny.yaml)")
    run.add_argument(
        "--out",
        type=Path,
        help="run folder (default: a new runs/NAME[-N]; with --resume the newest)",
    )
    run.add_argument(
        "--address", help="join a running Ray cluster: auto or HOST:PORT (default: start one here)"
    )
    run.add_argument(
        "--dashboard", action="store_true", help="serve Ray's dashboard on 127.0.0.1, print its URL"
    )
    run.add_argument("--resume", action="store_true", help="finish an interrupted run in --out")
    run.add_argument(
        "--retry-errors",
        action="store_true",
        help="with --resume: run again the trials that ended in error (a failed worker, an exception)",
    )
    _add_set(run)
    run.set_defaults(func=_run)

    validate = sub.add_parser(
        "validate",
        help="check a spec file without running: what `run` would refuse before its first trial",
    )
    validate.add_argument("spec", type=Path)
    validate.add_argument(
        "--address",
        help="check the resources against this Ray cluster (auto or HOST:PORT), as `run --address` "
        "would join it (default: a Ray instance started here)",
    )
    _add_set(validate)
    validate.set_defaults(func=_validate)

    status = sub.add_parser("status", help="show the trials of a run so far")
    status.add_argument("run_dir", type=Path, metavar="DIR")
    status.set_defaults(func=_status)

    report = sub.add_parser(
        "report",
        help="write RUN/report.md (table, quality-memorisation front, best config); several runs (seeds): --out DIR",
    )
    report.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN")
    report.add_argument(
        "--out",
        type=Path,
        help="write one report over the runs as seeds of one experiment into this folder "
        "(needed with several runs)",
    )
    report.set_defaults(func=_report)

    export_command.register(sub)  # capsearch/commands/export.py


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec value, e.g. --set search.num_samples=4 (repeatable)",
    )


def _run(args: argparse.Namespace) -> int:
    # lazy: `capsearch --help` loads no library
    from rich.console import Console

    from capsearch.config import load_spec
    from capsearch.search import cluster

    console = Console()
    # first of all: a killed search's workers would train on for a minute
    reaped = cluster.reap_orphans()
    if reaped:
        console.print(f"stopped {len(reaped)} Ray worker(s) that a killed search had left running")
    if args.retry_errors and not args.resume:
        raise UserError("--retry-errors runs failed trials of an existing run again: add --resume")
    spec = load_spec(args.spec, args.overrides)
    out = args.out or default_run_dir(spec.name or args.spec.stem, args.resume, spec)
    # lazy: `capsearch --help` loads no library
    from capsearch.search.loop import run_search
    from capsearch.search.runs import unfinished_trials
    from capsearch.search.study import StudyNotSaved

    def join() -> bool:  # once the spec, its inputs and the run folder are checked
        return cluster.connect(args.address, args.dashboard, console)

    try:
        console.print(f"search {spec.name!r} → {out}  (Optuna study: {out}/optuna.db)")
        run_dir = run_search(spec, out, resume=args.resume, console=console, join=join,
                             callbacks=(_progress(out),), retry_errors=args.retry_errors)  # fmt: skip
    except KeyboardInterrupt:
        console.print(
            f"interrupted; finish it with `capsearch run {args.spec} --out {out} --resume`"
        )
        raise
    except StudyNotSaved as exc:
        if not exc.resumable:
            raise
        raise UserError(f"{exc}: `capsearch run {args.spec} --out {out} --resume`") from None
    console.print(f"report: {_summarise(run_dir, spec, console)}")
    cut = unfinished_trials(out)
    if cut:  # Ray ended the session on Ctrl-C with these trials still running
        console.print(
            f"interrupted with {len(cut)} trial(s) unfinished; finish the search with "
            f"`capsearch run {args.spec} --out {out} --resume`"
        )
        return 130
    return 0


def _summarise(run_dir: Path, spec: Any, console: Any) -> Path:
    """Print a finished search's results tables and write its report.md; return the report's path."""
    # lazy: `capsearch --help` loads no library
    from capsearch.reporting.report import final_view, ordered, results_table, write_report
    from capsearch.search.runs import load_trials

    records = ordered(load_trials(run_dir), spec)
    console.print(results_table(records, title=f"{spec.name}: {len(records)} trials"))
    finals = [final_view(r) for r in records if r.final is not None]
    if finals:
        title = (
            f"final re-evaluation ({spec.final.split} split, seed {spec.final.seed}); "
            "95% intervals in report.md"
        )
        console.print(results_table(finals, title=title))
    return write_report(run_dir)


def default_run_dir(name: str, resume: bool, spec: Any = None) -> Path:
    """runs/NAME, or runs/NAME-2, -3, ... when taken; with resume, the newest that exists.

    With `spec`, a run a refusal or a stop left before its first trial record is not taken: the
    search starts there afresh, as it would with --out (capsearch.search.runs.check_run_dir).
    """
    candidates = [Path("runs") / name] + [Path("runs") / f"{name}-{i}" for i in range(2, 1000)]
    taken = [c for c in candidates if c.exists()]
    if resume:
        if not taken:
            raise UserError(f"nothing to resume: no runs/{name} folder; pass --out")
        return taken[-1]
    return next(c for c in candidates if not c.exists() or _left_before_a_trial(c, spec))


def _left_before_a_trial(folder: Path, spec: Any) -> bool:
    """Whether `folder` holds what a search left before its first trial record (a spec.yaml it wrote)."""
    if spec is None or not (folder / "spec.yaml").is_file():
        return False
    from capsearch.search.runs import check_run_dir  # lazy: `capsearch --help` loads no library

    try:
        return check_run_dir(spec, folder, resume=False)[1]
    except UserError:
        return False


def _progress(run_dir: Path) -> Any:
    """A Ray Tune callback printing each trial's start and result under a rich progress bar."""
    # lazy: `capsearch --help` loads no library
    from ray import tune

    from capsearch.metrics.table import METRICS
    from capsearch.progress import running_bar, trial_progress
    from capsearch.reporting.describe import display_name
    from capsearch.search.runs import RESULT_FILE, read_record, trial_dir

    class Printer(tune.Callback):
        def setup(self, total_num_samples: int = 0, **info: Any) -> None:
            self.bar, self.task = running_bar("trials", total_num_samples or None)
            self.polled = 0.0

        def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
            """The running trials' step/total and rate, from their train_log.jsonl (every 2 s)."""
            if time.time() - self.polled < 2:  # Tune's loop turns many times a second
                return
            self.polled = time.time()
            lines = [trial_progress(trial_dir(Path(run_dir), int(t.config["_number"])))
                     for t in trials if t.status == "RUNNING" and "_number" in t.config]  # fmt: skip
            self.bar.update(self.task, running="  ".join(line for line in lines if line))

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            name = trial.config.get("baseline") or "searched"
            line = f"started t{trial.config.get('_number', 0):03d} ({name})"
            plan = trial.config.get("plan") or {}
            if plan.get("resume_from"):  # an interrupted trial's checkpoint
                line += f", going on from {Path(plan['resume_from']).parent.name}'s checkpoint"
            if plan.get("reuse_from"):  # a finished trial of a search.reuse run: no training
                line += f", trained as {plan['reuse_from']}"
            self.bar.console.print(line, highlight=False)

        def _done(self, trial: Any) -> None:
            path = trial_dir(Path(run_dir), int(trial.config.get("_number", 0))) / RESULT_FILE
            record = read_record(path)
            if record is None:  # no record (a worker killed before it wrote one), or a damaged one
                self.bar.console.print(f"? {path.parent.name}: no record", highlight=False)
                self.bar.advance(self.task)
                return
            m = record.metrics
            shown = [metric for metric in METRICS if metric.progress and metric.name in m]
            text = " ".join(f"{metric.short.rstrip('↑↓')} {m[metric.name]:.3g}" for metric in shown)
            if record.reward is not None:
                text += f" → {record.reward:.3f}"
            if record.error:
                text += f" {record.error.splitlines()[0][:120]}"
            took = f" ({record.seconds} s)" if record.seconds is not None else ""
            line = (
                f"{record.status} {path.parent.name} {display_name(record)}{took}: {text.strip()}"
            )
            self.bar.console.print(line, highlight=False)
            self.bar.advance(self.task)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._done(trial)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._done(trial)

        def on_experiment_end(self, trials: list, **info: Any) -> None:
            self.bar.stop()

    return Printer()


def _validate(args: argparse.Namespace) -> int:
    # lazy: `capsearch --help` loads no library
    from capsearch.config import load_spec
    from capsearch.search.coverage import check_units
    from capsearch.search.final import final_text
    from capsearch.search.inputs import check_inputs
    from capsearch.search.reward import objective_text

    spec = load_spec(args.spec, args.overrides, check_model=False)
    coverage = check_units(spec, source=str(args.spec))
    # What `run` checks before it writes its run folder, shared with it (capsearch.search.inputs); a
    # model, data or reuse folder that is not here is a note: the spec may be meant for another machine.
    notes = [coverage["note"]] if coverage["note"] else []
    notes += check_inputs(spec, here=False)
    notes += _check_cluster(spec, args.address)
    space = spec.search_space
    print(f"{args.spec}: valid spec {spec.name!r} (model {spec.model})")
    for group in space.groups:
        print(
            f"  group {group.name}: units {', '.join(group.units)}; methods {', '.join(group.methods)}"
        )
    pct = 100 * coverage["grouped_parameters"] / max(coverage["parameters"], 1)
    print(
        f"  groups cover {coverage['grouped_units']} of {coverage['units']} units "
        f"({pct:.1f}% of {coverage['parameters']:,} parameters)"
    )
    names = ", ".join(b.name for b in spec.baseline_points) or "none"
    print(f"  baselines: {names}; searched trials: {spec.search.num_samples}")
    print(f"  objective: {objective_text(spec.objective)}")
    print(f"  final stage: {final_text(spec)}")
    if pct < 100 and spec.baseline_points:
        print("  note: baselines train only the grouped units, not the whole UNet")
    for note in notes:
        print(f"  note: {note}")
    return 0


def _check_cluster(spec: Any, address: str | None) -> list[str]:
    """The spec's resources against the cluster `run --address` would join, or else against the Ray
    instance `run` would start here; a note instead where RAY_ADDRESS names a cluster (for `--address
    auto`) and no --address says which is meant."""
    # lazy: Ray loads only where a spec is checked against a cluster
    from capsearch.search import cluster

    if address is None:
        if os.environ.get("RAY_ADDRESS"):
            return [
                f"resources not checked: RAY_ADDRESS names a cluster ({os.environ['RAY_ADDRESS']}); "
                "give --address to check them there (without it, `run` starts Ray here)"
            ]
        cluster.check_resources(spec, cluster.local_resources())
        return []
    cluster.connect(address, False, None)
    try:
        cluster.check_resources(spec)
    finally:
        cluster.stop_local_ray()  # leaves a joined cluster running
    return []


def _status(args: argparse.Namespace) -> int:
    # lazy: `capsearch --help` loads no library
    from rich.console import Console

    from capsearch.reporting.report import ordered, results_table
    from capsearch.search.runs import load_trials, read_run_spec

    spec = read_run_spec(args.run_dir)
    records = ordered(load_trials(args.run_dir, finished_only=False), spec)
    planned = len(spec.baseline_points) + spec.search.num_samples
    counts = Counter(r.status for r in records)
    console = Console()
    console.print(results_table(records, title=f"{spec.name} in {args.run_dir}"))
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no trials yet"
    console.print(f"{summary}; {planned} planned ({len(spec.baseline_points)} baselines)")
    return 0


def _report(args: argparse.Namespace) -> int:
    if args.out is None:
        if len(args.run_dirs) > 1:
            raise UserError(
                f"{len(args.run_dirs)} runs make one report over seeds: give its folder with --out DIR"
            )
        # lazy: `capsearch --help` loads no library
        from capsearch.reporting.report import write_report
        from capsearch.search.runs import read_run_spec

        run = args.run_dirs[0]
        read_run_spec(run)  # a run folder, before whether it can be written
        why = unwritable(run)
        if why is not None:
            raise UserError(
                f"{run} {why}: the report is written into the run folder; give --out DIR to write "
                "it elsewhere"
            )
        print(f"wrote {write_report(run)}")
        return 0
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out} exists and is not a folder")
    writable_out(args.out)
    # lazy: `capsearch --help` loads no library
    from capsearch.reporting.seeds import write_seeds_report

    print(f"wrote {write_seeds_report(args.run_dirs, args.out)}")
    return 0
