"""The `capsearch` command line: one subcommand module per stage under `capsearch/commands/`."""

from __future__ import annotations

import argparse
import os
import sys

from capsearch.commands import data, methods, pretrain, sample, search, train
from capsearch.commands import eval as eval_command  # `eval` would shadow the builtin
from capsearch.errors import UserError

# Each module defines `register(subparsers)`, adding its subcommand(s) with `set_defaults(func=...)`,
# and imports what its handlers need inside them, so that `capsearch --help` stays fast.
COMMAND_MODULES = [data, pretrain, sample, methods, train, eval_command, search]


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are a single line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    """Build the parser with every available subcommand."""
    parser = _Parser(
        prog="capsearch",
        description="Search which parts of a text-to-image diffusion model to fine-tune so that it "
        "learns chest X-rays without memorising its training images.",
    )
    parser.add_argument("--version", action="version", version="capsearch 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors print one line and return 2."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # a bad flag (its one line printed: 2), --help or --version (0)
        return int(exc.code or 0)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        result = args.func(args)
    except UserError as exc:
        sys.stderr.write(f"capsearch: error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("capsearch: interrupted\n")
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
