"""`capsearch sample`: draw images from a model (optionally with a delta checkpoint) into a PNG grid."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from capsearch.commands import writable_out
from capsearch.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    """Add `sample`."""
    p = sub.add_parser("sample", help="generate images for prompts and save a grid")
    p.add_argument("--model", default="tiny")
    p.add_argument("--delta", type=Path, help="delta checkpoint folder to apply")
    p.add_argument("--prompt", action="append", required=True, help="repeatable")
    p.add_argument("--n", type=int, default=4, help="images per prompt")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--scheduler", default="ddim")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="PNG file")
    p.set_defaults(func=_sample)


def _sample(args: argparse.Namespace) -> int:
    # lazy: `capsearch --help` loads no library
    from capsearch.models.load import load_pipeline
    from capsearch.models.sampling import generate, save_grid

    for flag, value in (("--n", args.n), ("--steps", args.steps)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if not math.isfinite(args.guidance):
        raise UserError(f"--guidance must be a finite number, got {args.guidance}")
    if args.out.is_dir():
        raise UserError(f"--out {args.out} is a folder; give the PNG file to write")
    if args.out.parent.is_file():
        raise UserError(f"--out {args.out}: {args.out.parent} is a file, not a folder")
    writable_out(args.out)
    pipe = load_pipeline(args.model)
    trained = pipe.scheduler.config.num_train_timesteps
    if args.steps > trained:
        raise UserError(
            f"--steps must be at most the model's {trained} training timesteps, got {args.steps}"
        )
    if args.delta:
        # lazy: `capsearch --help` loads no library
        from capsearch.models.delta import load_delta

        if not args.delta.is_dir():
            raise UserError(f"delta folder {args.delta} does not exist")
        pipe.unet = load_delta(pipe.unet, args.delta)
    images = generate(
        pipe, args.prompt, args.n, args.steps, args.guidance, args.seed, scheduler=args.scheduler
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_grid(
        images, args.out, nrow=args.n, captions=[p for p in args.prompt for _ in range(args.n)]
    )
    print(f"wrote {args.out} ({len(images)} images)")
    return 0
