"""`capsearch eval`: score one model (optionally with a delta checkpoint) on a dataset folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from capsearch.commands import writable_out
from capsearch.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    """Add `eval`."""
    # lazy: `capsearch --help` loads no library
    from capsearch.settings import EvalSettings, add_flags

    p = sub.add_parser(
        "eval",
        help="evaluate one model: FID, image-text score, AMD, extraction, denoising strength",
    )
    p.add_argument(
        "--model",
        default="tiny",
        help="tiny | tiny-broad | tiny:random | diffusers folder | cached hub id",
    )
    p.add_argument(
        "--delta", type=Path, help="a delta checkpoint folder (capsearch train --out X → X/delta)"
    )
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="auto")
    add_flags(p, EvalSettings)
    p.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
    # lazy: `capsearch --help` loads no library
    import torch

    from capsearch.datasets.folder import metadata_path, read_metadata
    from capsearch.metrics.evaluate import evaluate
    from capsearch.metrics.stages import heldout_prompts
    from capsearch.models.load import load_pipeline
    from capsearch.settings import EvalSettings, flag_values

    if not args.data.is_dir():
        raise UserError(f"data folder {args.data} does not exist")
    metadata_path(args.data)
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out} exists and is not a folder")
    writable_out(args.out)
    if args.delta and not args.delta.is_dir():
        raise UserError(f"delta folder {args.delta} does not exist")
    config = EvalSettings.parse(flag_values(args, EvalSettings), "eval")
    # the records and the held-out split as the evaluation reads them, before the model and scorer load
    heldout_prompts(read_metadata(args.data), args.data, config)
    pipe = load_pipeline(args.model)
    if args.delta:
        # lazy: `capsearch --help` loads no library
        from capsearch.models.delta import load_delta

        pipe.unet = load_delta(pipe.unet, args.delta)
    device = (
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    pipe.to(device)
    metrics = evaluate(pipe, args.data, config, out_dir=args.out, progress=True)
    shown = {
        k: round(v, 4) if isinstance(v, float) else v
        for k, v in metrics.items()
        if k not in ("settings", "extracted_pairs")
    }
    print(json.dumps(shown, indent=2))
    print(f"wrote {args.out / 'metrics.json'} and {args.out / 'samples.png'}")
    return 0
