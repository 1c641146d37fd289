"""`capsearch pretrain shapes|scorer`: build the tiny base model and the phantom scorer."""

from __future__ import annotations

import argparse
from pathlib import Path

from capsearch.commands import writable_out
from capsearch.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    """Add `pretrain shapes` and `pretrain scorer`."""
    p = sub.add_parser("pretrain", help="pretrain the tiny base model or the phantom scorer")
    ps = p.add_subparsers(dest="what", metavar="WHAT", required=True, parser_class=type(p))
    s = ps.add_parser(
        "shapes",
        help="train the tiny UNet + text encoder on the procedural shapes world (or --corpus broad)",
    )
    s.add_argument("--out", type=Path, required=True, help="output pipeline folder")
    s.add_argument("--steps", type=int, default=20000)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--lr", type=float, default=5e-4)
    s.add_argument("--pool-size", type=int, default=50000, help="number of pre-rendered scenes")
    s.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--ema-decay", type=float, default=0.999)
    s.add_argument("--workers", type=int, default=1, help="processes rendering the scene pool")
    s.add_argument(
        "--corpus",
        choices=("shapes", "broad"),
        default="shapes",
        help="shapes (the shipped base's world) or broad (many captioned image families, "
        "radiographs among them; capsearch.worlds.corpus)",
    )
    s.add_argument(
        "--minutes", type=float, default=None, help="fit the schedule to this training-time budget"
    )
    s.add_argument(
        "--checkpoint-every",
        type=int,
        default=1000,
        help="steps between resumable checkpoints (a CPU run cut short loses at most these)",
    )
    s.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help="stop (and checkpoint) after this many seconds",
    )
    s.set_defaults(func=_shapes)
    c = ps.add_parser(
        "scorer", help="train the phantom finding classifier (FID/AMD features, image-text score)"
    )
    c.add_argument(
        "--data", type=Path, required=True, help="phantom dataset folder (capsearch data phantom)"
    )
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--epochs", type=int, default=10)
    c.add_argument("--size", type=int, default=32)
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=_scorer)


def _out_folder(out: Path) -> None:
    """UserError if --out names something that is not a folder (found before any work, not after)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    writable_out(out)


def _shapes(args: argparse.Namespace) -> int:
    for name in ("steps", "batch_size", "pool_size", "workers", "checkpoint_every"):
        value = getattr(args, name)
        if value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.lr <= 0:
        raise UserError(f"--lr must be positive, got {args.lr}")
    if not 0 <= args.ema_decay < 1:
        raise UserError(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    for name in ("minutes", "time_limit"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
    _out_folder(args.out)
    if args.device.startswith("cuda"):
        # lazy: `capsearch --help` loads no library
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"--device {args.device}: no CUDA device is visible")
    # lazy: `capsearch --help` loads no library
    from capsearch.training.pretrain import pretrain_shapes

    meta = pretrain_shapes(
        args.out,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        pool_size=args.pool_size,
        device=args.device,
        seed=args.seed,
        ema_decay=args.ema_decay,
        workers=args.workers,
        checkpoint_every=args.checkpoint_every,
        time_limit=args.time_limit,
        time_budget=args.minutes * 60 if args.minutes else None,
        corpus=args.corpus,
    )
    print(
        f"wrote {args.out} ({meta['steps']} steps, final loss {meta['final_loss_ema']}, {meta['train_seconds']} s)"
    )
    return 0


def _scorer(args: argparse.Namespace) -> int:
    if not args.data.is_dir():
        raise UserError(f"phantom dataset folder {args.data} does not exist")
    if args.epochs < 1:
        raise UserError(f"--epochs must be at least 1, got {args.epochs}")
    if args.size < 8:
        raise UserError(f"--size must be at least 8, got {args.size}")
    _out_folder(args.out)
    # lazy: `capsearch --help` loads no library
    from capsearch.metrics.scorer import train_scorer

    result = train_scorer(
        args.data, args.out, epochs=args.epochs, size=args.size, seed=args.seed, progress=True
    )
    print(f"wrote {args.out}: held-out AUROC {result.get('auroc')}")
    return 0
