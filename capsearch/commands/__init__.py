"""CLI subcommands, one module per stage; heavy imports happen inside the handlers."""

from __future__ import annotations

from pathlib import Path

from capsearch.atomic import unwritable
from capsearch.errors import UserError


def writable_out(out: Path, flag: str = "--out") -> None:
    """UserError if `out` (a folder to make or fill, or a file to write) cannot be written here: found
    before any work, not as a traceback once a model has loaded or trained (`capsearch run` checks its
    run folder the same way: capsearch.search.runs.check_run_dir)."""
    why = unwritable(out)
    if why is not None:
        raise UserError(f"{flag} {out} {why}; choose a folder you can write to")
