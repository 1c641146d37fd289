"""One progress-bar helper for every long loop (rendering, reading, training, attacking), and the
progress of a search trial read from its training log."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

LossUpdate = Callable[[int | None, float | None], None]


def rich_bar(enabled: bool, total: int, label: str):
    """A started, transient rich progress bar with one task, or None when progress is off."""
    if not enabled:
        return None

    bar = Progress(transient=True)
    bar.add_task(label, total=total)
    bar.start()
    return bar


def running_bar(label: str, total: int | None, console: Any = None) -> tuple[Any, Any]:
    """A started rich bar `label ━━ done/total elapsed <running>` and its task, whose `running` field
    the caller fills with what is running now (the search's trials, the final stage's retrainings)."""
    bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[running]}"), console=console)  # fmt: skip
    task = bar.add_task(label, total=total, running="")
    bar.start()
    return bar, task


def loss_bar(
    enabled: bool, label: str, total: int, start: int = 0, log_every: int = 500
) -> LossUpdate:
    """`update(step, loss)` for a training loop: a rich bar with loss and speed on a terminal, a plain
    line every `log_every` steps in logs (CI, remote machines); `update(None, None)` stops the bar."""
    if not enabled:
        return lambda step, loss: None

    def loss_text(loss: float | None) -> str:
        return f"{loss:.4f}" if loss is not None and math.isfinite(loss) else "-"

    if not sys.stdout.isatty():

        def log(step: int | None, loss: float | None) -> None:
            if step is not None and (step % log_every == 0 or step == total):
                print(f"{label} step {step}/{total} loss {loss_text(loss)}", flush=True)

        return log

    prog = Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[speed]} it/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    prog.start()
    task = prog.add_task(label, total=total, completed=start, loss="-", speed="-")
    t0 = time.time()

    def update(step: int | None, loss: float | None) -> None:
        if step is None:
            prog.stop()
            return
        rate = (step - start) / max(time.time() - t0, 1e-9)
        prog.update(task, completed=step, loss=loss_text(loss), speed=f"{rate:.2f}")
        if step >= total:
            prog.stop()

    return update


def trial_progress(folder: Path, tail_bytes: int = 8192, name: str | None = None) -> str | None:
    """`tNNN step/total rate it/s` of a trial from its train_log.jsonl (a line every 10 steps) and the
    steps its params.json (a trial) or plan.json (a retraining, capsearch.search.retrain) plans; None before
    its first line. The rate spans the last logged lines. `name` replaces the folder's name."""
    log = Path(folder) / "train_log.jsonl"
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - tail_bytes))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    points = []
    for line in text.splitlines()[-12:]:
        try:
            entry = json.loads(line)
        except ValueError:  # the cut first line of the tail, or a line being written
            continue
        if isinstance(entry, dict) and isinstance(entry.get("step"), int):
            if points and entry["step"] <= points[-1][0]:
                points = []  # a resumed run logs again from its checkpoint: rate from there on
            points.append((entry["step"], entry.get("time")))
    if not points:
        return None
    total = "?"
    for plan in ("params.json", "plan.json"):
        try:
            total = json.loads((Path(folder) / plan).read_text())["train"]["steps"]
            break
        except (OSError, ValueError, KeyError, TypeError):
            continue
    text = f"{name or Path(folder).name} {points[-1][0]}/{total}"
    timed = [(s, t) for s, t in points if isinstance(t, (int, float))]
    if len(timed) >= 2 and timed[-1][1] > timed[0][1]:
        rate = (timed[-1][0] - timed[0][0]) / (timed[-1][1] - timed[0][1])
        text += f" {rate:.1f} it/s"
    return text
