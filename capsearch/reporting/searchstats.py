"""What a search cost and how it found its best: compute used, early stopping's saving, the learning
curve, and the trainable share of each unit group of a configuration (docs/results.md, "Search against
the baselines").

All of it is read from the run's records: a trial's `seconds` (its worker's wall time, training,
probes and evaluation; an ASHA-stopped trial's until it was stopped), `train_seconds`, `steps`, `cpu`,
and the final stage's `final/result.json` seconds. A trial that took its training from another run
(`search.reuse`) is counted apart: its training was paid for there.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from capsearch.reporting.describe import display_name
from capsearch.reporting.plots import _finish
from capsearch.search.records import TrialRecord
from capsearch.search.runs import load_trials, read_train_log
from capsearch.search.space import FROZEN
from capsearch.units import select_units

# Trial states the accounting tells apart.
STATES = ("ok", "stopped", "error", "nan", "corrupt", "interrupted")


def _trains(record: TrialRecord) -> bool:
    """Whether a trial trains anything (Freeze and all-frozen configurations do not)."""
    return any(e.get("method") not in FROZEN for e in record.method_spec or [])


def compute_used(records: Sequence[TrialRecord], full_length: int) -> dict[str, Any]:
    """Trials, training steps and CPU-hours of a run; the steps every trial run to `full_length` needs."""
    out: dict[str, Any] = {"trials": len(records), "by_status": {}, "reused": 0}
    steps = full = 0
    cpu_s = final_s = reused_train_s = 0.0
    for r in records:
        out["by_status"][r.status] = out["by_status"].get(r.status, 0) + 1
        cpus = float(r.cpu or 1)
        if r.reuse_from:  # trained in another run: only its evaluation ran here
            out["reused"] += 1
            reused_train_s += float(r.train_seconds or 0.0)
            cpu_s += cpus * max(0.0, float(r.seconds or 0.0))
        else:
            cpu_s += cpus * float(r.seconds or 0.0)
            if _trains(r):
                steps += int(r.steps or 0)
                full += full_length
        if r.final is not None:
            final_s += cpus * float(r.final.seconds or 0.0)
    out.update(
        steps=steps,
        steps_if_run_to_the_end=full,
        saved_fraction=(1.0 - steps / full) if full else 0.0,
        cpu_hours=(cpu_s + final_s) / 3600.0,
        search_cpu_hours=cpu_s / 3600.0,
        final_cpu_hours=final_s / 3600.0,
        reused_training_cpu_hours=reused_train_s / 3600.0,
    )
    return out


def compute_lines(used: dict[str, Any]) -> list[str]:
    """compute_used as a short markdown list."""
    states = ", ".join(f"{n} {s}" for s, n in sorted(used["by_status"].items()))
    lines = [
        f"- trials: {used['trials']} ({states}); {used['reused']} took their training from another "
        f"run (`search.reuse`, {used['reused_training_cpu_hours']:.2f} CPU-hours spent there)",
        f"- training steps: {used['steps']:,} of the {used['steps_if_run_to_the_end']:,} that running "
        f"every trained trial to the end would take: early stopping saved "
        f"{100 * used['saved_fraction']:.0f}%",
        f"- CPU-hours: {used['cpu_hours']:.2f} ({used['search_cpu_hours']:.2f} in the search, "
        f"{used['final_cpu_hours']:.2f} in the final stage)",
    ]
    return lines


def best_so_far(records: Sequence[TrialRecord], key: str = "reward") -> list[tuple[int, float]]:
    """The searched trials' learning curve: (trials proposed so far, best `key` so far), by number.

    Stopped and failed trials count as proposals that found nothing better; baselines are left out
    (they are not the sampler's proposals).
    """
    searched = sorted((r for r in records if not r.baseline), key=lambda r: r.number)
    curve, best = [], None
    for i, r in enumerate(searched, start=1):
        value = r.value(key) if r.status == "ok" else None
        if value is not None and (best is None or value > best):
            best = value
        if best is not None:
            curve.append((i, best))
    return curve


def curve_plot(
    curves: Sequence[tuple[str, list[tuple[int, float]]]],
    baselines: Sequence[tuple[str, float]],
    path: Path,
    ylabel: str = "best search reward so far ↑ (validate split)",
) -> Path | None:
    """Best reward against trials proposed, one line per run; the baselines' rewards as flat lines."""
    if not any(points for _, points in curves):
        return None
    import matplotlib  # lazy: matplotlib, only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: matplotlib, only when a plot is drawn
    import matplotlib.ticker  # lazy: matplotlib, only when a plot is drawn

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, points in curves:
        if points:  # held to half a trial past the last, so that the last step shows
            xs, ys = [p[0] for p in points] + [points[-1][0] + 0.5], [p[1] for p in points]
            ax.step(xs, ys + ys[-1:], where="post", lw=2, label=label)
            ax.plot(xs[:-1], ys, "o", ms=3, color=ax.lines[-1].get_color())
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    for i, (label, value) in enumerate(baselines):
        ax.axhline(value, ls=":", lw=1, color=f"C{(i + 3) % 10}", label=label)
    ax.set_xlabel("searched trials proposed")
    ax.set_ylabel(ylabel)
    return _finish(fig, ax, "The search's learning curve", Path(path))


def group_shares(record: TrialRecord, model: str | None = None) -> list[dict[str, Any]]:
    """Each unit group of a trial: its method and the share of the group's parameters it trains.

    The method spec is applied to a fresh base (the trial's model unless `model` is given); a
    trainable tensor counts for the entry whose units hold its module (LoRA's and DiffFit's added
    tensors included), against the base parameters of those units.
    """
    from capsearch.methods import apply_methods  # lazy: torch, diffusers
    from capsearch.models.load import load_pipeline  # lazy: torch, diffusers

    unet = load_pipeline(model or record.model).unet
    entries = [e for e in record.method_spec or [] if e.get("method") not in FROZEN]
    groups = [g for g, text in (record.groups or {}).items() if text not in FROZEN]
    if len(groups) != len(entries):  # records without group names: number the entries
        groups = [f"entry {i}" for i in range(len(entries))]
    owners: list[tuple[str, int]] = []  # (module prefix, entry index)
    base = []
    for i, entry in enumerate(entries):
        units = select_units(unet, entry["units"])
        base.append(sum(u.numel for u in units))
        owners += [(m + ".", i) for u in units for m in u.modules]
    owners.sort(key=lambda o: -len(o[0]))  # the most specific module first
    apply_methods(unet, entries)
    trained = [0] * len(entries)
    for name, p in unet.named_parameters():
        if p.requires_grad:
            owner = next((i for prefix, i in owners if name.startswith(prefix)), None)
            if owner is not None:
                trained[owner] += p.numel()
    return [
        {
            "group": g,
            "method": (record.groups or {}).get(g, e["method"]),
            "trainable": t,
            "parameters": n,
            "share": t / n if n else 0.0,
        }
        for g, e, t, n in zip(groups, entries, trained, base)
    ]


CURVE_FILE = "learning_curve.png"


def interrupted_work(run_dir: Path) -> dict[str, Any]:
    """What interrupted trials (a search stopped and resumed) trained before they stopped.

    A later trial may go on from one's checkpoint (a baseline enqueued again, a searched trial
    retried: `continued` counts those); its record counts only the part after the checkpoint. The
    part before is read from each one's train_log.jsonl: its last step, and its last line's time
    less the trial's start (logs written before lines carried a time leave the time unknown).
    """
    out: dict[str, Any] = {"trials": 0, "steps": 0, "cpu_hours": 0.0, "timed": 0, "continued": 0}
    records = load_trials(Path(run_dir), finished_only=False)
    taken = {Path(r.resume_from).parent.name for r in records if r.resume_from}
    for r in records:
        if r.status != "interrupted":
            continue
        out["trials"] += 1
        out["continued"] += r.folder.name in taken
        steps = [entry for entry in read_train_log(r.folder) if "step" in entry]
        last: dict[str, Any] = steps[-1] if steps else {}
        out["steps"] += int(last.get("step") or 0)
        if last.get("time") and r.started:
            out["timed"] += 1
            seconds = max(0.0, float(last["time"]) - r.started)
            out["cpu_hours"] += float(r.cpu or 1) * seconds / 3600.0
    return out


def report_lines(run_dir: Path, records: Sequence[TrialRecord], full_length: int) -> list[str]:
    """report.md's "Compute" section, and the learning curve when the run searched anything."""
    used = compute_used(records, full_length)
    lines = ["", "## Compute", "", *compute_lines(used)]
    cut = interrupted_work(run_dir)
    if cut["trials"]:
        hours = (
            f"{cut['cpu_hours']:.2f} CPU-hours until they stopped"
            if cut["timed"] == cut["trials"]
            else f"time known for {cut['timed']} of them ({cut['cpu_hours']:.2f} CPU-hours)"
        )
        lines.append(
            f"- interrupted trials, not counted above: {cut['trials']} ({cut['steps']:,} steps "
            f"trained, {hours}); a later trial went on from the checkpoint of {cut['continued']} "
            "of them"
        )
    curve = best_so_far(records)
    if curve:
        base = [
            (f"{display_name(r)} (baseline)", value)
            for r in records
            if r.baseline and (value := r.value("reward")) is not None
        ]
        if curve_plot([("searched", curve)], base, Path(run_dir) / CURVE_FILE) is not None:
            lines += ["", f"![learning curve]({CURVE_FILE})", "",
                      "The best search reward among the searched trials against the number proposed "
                      "(stopped ones included); dotted: the baselines' rewards."]  # fmt: skip
    return lines
