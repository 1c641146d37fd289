"""One progress-bar helper for every long loop (rendering, reading, training, attacking)."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable

LossUpdate = Callable[[int | None, float | None], None]


def rich_bar(enabled: bool, total: int, label: str):
    """A started, transient rich progress bar with one task, or None when progress is off."""
    if not enabled:
        return None
    from rich.progress import Progress

    bar = Progress(transient=True)
    bar.add_task(label, total=total)
    bar.start()
    return bar


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
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

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
