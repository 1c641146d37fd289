"""`capsearch run | validate | status | report | export`: the bi-level search from the command line."""

from __future__ import annotations

import argparse
import os
import socket
import time
from pathlib import Path
from typing import Any

from capsearch.commands import export as export_command
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
        "validate", help="check a spec file (keys, types, units) without running"
    )
    validate.add_argument("spec", type=Path)
    _add_set(validate)
    validate.set_defaults(func=_validate)

    status = sub.add_parser("status", help="show the trials of a run so far")
    status.add_argument("run_dir", type=Path, metavar="DIR")
    status.set_defaults(func=_status)

    report = sub.add_parser(
        "report",
        help="write RUN/report.md (table, Pareto plot, best config); several runs (seeds): --out DIR",
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
    from rich.console import Console

    from capsearch.config import load_spec
    from capsearch.search.cluster import reap_orphans

    console = Console()
    reaped = reap_orphans()  # first of all: a killed search's workers would train on for a minute
    if reaped:
        console.print(f"stopped {len(reaped)} Ray worker(s) that a killed search had left running")
    if args.retry_errors and not args.resume:
        raise UserError("--retry-errors runs failed trials of an existing run again: add --resume")
    spec = load_spec(args.spec, args.overrides)
    out = args.out or default_run_dir(spec.name or args.spec.stem, args.resume)
    connected = connect_ray(args.address, args.dashboard, console)
    from capsearch.search.loop import run_search
    from capsearch.search.study import StudyNotSaved

    try:
        console.print(f"search {spec.name!r} → {out}  (Optuna study: {out}/optuna.db)")
        report = run_search(spec, out, resume=args.resume, console=console,
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
    finally:
        if connected:
            from capsearch.search.cluster import stop_local_ray

            stop_local_ray()  # also for a joined cluster: leaves it running, removes no entry
    from capsearch.search.runs import unfinished_trials

    console.print(f"report: {report}")
    cut = unfinished_trials(out)
    if cut:  # Ray ended the session on Ctrl-C with these trials still running
        console.print(
            f"interrupted with {len(cut)} trial(s) unfinished; finish the search with "
            f"`capsearch run {args.spec} --out {out} --resume`"
        )
        return 130
    return 0


def default_run_dir(name: str, resume: bool) -> Path:
    """runs/NAME, or runs/NAME-2, -3, ... when taken; with resume, the newest that exists."""
    candidates = [Path("runs") / name] + [Path("runs") / f"{name}-{i}" for i in range(2, 1000)]
    taken = [c for c in candidates if c.exists()]
    if resume:
        if not taken:
            raise UserError(f"nothing to resume: no runs/{name} folder; pass --out")
        return taken[-1]
    return next(c for c in candidates if not c.exists())


def connect_ray(address: str | None, dashboard: bool, console: Any) -> bool:
    """Join a cluster (--address) or start a local one with a dashboard; False if neither was asked."""
    if address is None and not dashboard:
        return False
    import ray

    from capsearch.search.loop import prepare_ray_start

    prepare_ray_start()
    quiet = {"log_to_driver": False, "logging_level": "WARNING"}
    explicit = address is not None and address != "auto"
    if explicit:
        _check_reachable(address)
        _token_mode_for_this_machine(address)
    try:
        if address is not None:
            context = ray.init(address=address, **quiet)
        else:
            from capsearch.search.cluster import start_local_ray

            context = start_local_ray(
                console,
                num_cpus=os.cpu_count(),
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                dashboard_port=_free_port(),
                **quiet,
            )
    except ConnectionError as exc:
        hint = _token_hint(address) if explicit else ""
        raise UserError(f"cannot reach a Ray cluster at {address}: {exc}{hint}") from None
    if dashboard:
        url = dashboard_url(context)
        if url is None:
            console.print("Ray's dashboard is not running on this cluster")
        else:
            note = ""
            if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
                # ray.init turns token authentication on for a local dashboard: the page asks once.
                note = (
                    " (token authentication: paste the output of `ray get-auth-token` when asked)"
                )
            console.print(f"Ray dashboard: {url}{note}")
    return True


def _check_reachable(address: str) -> None:
    """Fail in seconds, not minutes (Ray retries), when HOST:PORT does not answer."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return  # ray://... and other forms: leave them to Ray
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise UserError(f"cannot reach a Ray cluster at {address}: {exc}") from None


def _token_mode_for_this_machine(address: str) -> None:
    """Send this machine's Ray token to a cluster on this machine, as Ray does for `--address auto`.

    A `ray start --head` on a machine that holds a token (~/.ray/auth_token, which any local
    `ray.init` writes, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH) turns token authentication on. Ray's
    driver sends the token unasked only when it finds the cluster itself (`auto`); for an explicit
    address it sends none unless RAY_AUTH_MODE=token, and the connection fails after ~20 s. A
    HOST:PORT of this very machine is the `auto` case written out, so it gets `auto`'s rule; a
    token is never sent to another machine unasked (that would hand it to whoever listens there).
    """
    if os.environ.get("RAY_AUTH_MODE") is not None or not _is_this_machine(address):
        return
    try:  # Ray's own rule for `auto` (Ray 2.60): token mode if a token is found locally
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray without token authentication: nothing to send
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _is_this_machine(address: str) -> bool:
    import ipaddress

    import psutil

    host = address.rpartition(":")[0].strip("[]")
    try:
        ips = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    own = {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs}
    return all(ipaddress.ip_address(ip).is_loopback or ip in own for ip in ips)


def _token_hint(address: str) -> str:
    """What to do when an explicit address refused the connection: most often a missing token."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        how = "check that this machine has the head's token"
    else:
        how = "set RAY_AUTH_MODE=token and give this machine the head's token"
    return (
        f"; if the cluster uses token authentication (a `ray start --head` on a machine with a "
        f"token turns it on), {how}: copy the head's ~/.ray/auth_token here, or set "
        "RAY_AUTH_TOKEN to what `ray get-auth-token` prints on the head"
    )


def dashboard_url(context: Any) -> str | None:
    """The dashboard's http URL from a ray.init context, or None."""
    url = getattr(context, "dashboard_url", None)
    if not url:
        return None
    return url if url.startswith("http") else f"http://{url}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _progress(run_dir: Path) -> Any:
    """A Ray Tune callback printing each trial's start and result under a rich progress bar."""
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
    from capsearch.config import load_spec
    from capsearch.search.coverage import check_units
    from capsearch.search.final import final_text
    from capsearch.search.reward import objective_text

    spec = load_spec(args.spec, args.overrides, check_model=False)
    coverage = check_units(spec, source=str(args.spec))
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
    if coverage["note"]:
        print(f"  note: {coverage['note']}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from collections import Counter

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
        from capsearch.reporting.report import write_report

        print(f"wrote {write_report(args.run_dirs[0])}")
        return 0
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out} exists and is not a folder")
    from capsearch.reporting.seeds import write_seeds_report

    print(f"wrote {write_seeds_report(args.run_dirs, args.out)}")
    return 0
