"""One progress-bar helper for every long loop (rendering, reading, training, attacking)."""

from __future__ import annotations


def rich_bar(enabled: bool, total: int, label: str):
    """A started, transient rich progress bar with one task, or None when progress is off."""
    if not enabled:
        return None
    from rich.progress import Progress

    bar = Progress(transient=True)
    bar.add_task(label, total=total)
    bar.start()
    return bar
