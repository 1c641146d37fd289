"""`capsearch export`: one trial as files diffusers, ComfyUI and A1111 load (docs/export.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from capsearch.commands import writable_out


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `export` subcommand."""
    export = sub.add_parser(
        "export", help="export a trial: pipeline folder, delta, LoRA, SD checkpoint, model card"
    )
    export.add_argument("run_dir", type=Path, metavar="DIR")
    export.add_argument("--trial", default="best", help="best (default), tNNN or a baseline name")
    export.add_argument("--out", type=Path, required=True, help="new folder to write")
    export.add_argument(
        "--lora", action="store_true", help="LoRA trials: diffusers and kohya LoRA files too"
    )
    export.add_argument(
        "--single-file",
        action="store_true",
        help="SD 1.x bases: one checkpoint in the original layout (A1111, ComfyUI)",
    )
    export.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    """Write the export and print one line per file: what it is and how to load it."""
    # lazy: `capsearch --help` loads no library
    from capsearch.export.trial import export_trial

    writable_out(args.out)
    result = export_trial(
        args.run_dir, args.out, args.trial, lora=args.lora, single_file=args.single_file
    )
    print(f"exported to {result.out}:")
    for line in result.lines:
        print(f"  {line}")
    for note in result.notes:
        print(f"note: {note}")
    return 0
