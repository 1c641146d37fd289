"""`capsearch train`: one fine-tune of a model with a PEFT method on a dataset folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from capsearch.commands import writable_out
from capsearch.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    """Add `train`."""
    # lazy: `capsearch --help` loads no library
    from capsearch.settings import TrainSettings, add_flags

    p = sub.add_parser(
        "train", help="fine-tune one model with one method (the inner loop, by hand)"
    )
    p.add_argument(
        "--model",
        default="tiny",
        help="tiny | tiny-broad | tiny:random | diffusers folder | cached hub id",
    )
    p.add_argument("--data", type=Path, required=True, help="image folder with metadata.jsonl")
    p.add_argument("--method", default="full", help="a registered method (see `capsearch methods`)")
    p.add_argument(
        "--units", default="*", help="unit selection, e.g. 'down_blocks.*.attentions.*:cross_attn'"
    )
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method hyper-parameter (repeatable); lr=... is the method's own rate, lr_1d=... its "
        "second set's (svdiff: the norm-layer shifts)",
    )
    p.add_argument(
        "--spec",
        type=Path,
        help="JSON method spec (list of {method, units, ...}); overrides --method",
    )
    # One flag per TrainSettings field (--steps, --lr, --caption-dropout, ...), its default the class's.
    add_flags(p, TrainSettings, skip=("mitigations",))
    p.add_argument(
        "--mitigation",
        action="append",
        default=[],
        metavar="NAME[:k=v,...]",
        help="repeatable, stacked after --caption-dropout; e.g. rwa:k=4,p=1,mode=fixed, "
        "threshold:percentile=90",
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=_train)


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_mitigation(text: str) -> dict:
    """`rwa:k=2,p=0.5` → {"name": "rwa", "k": 2, "p": 0.5}."""
    name, _, rest = text.partition(":")
    out = {"name": name}
    for kv in filter(None, rest.split(",")):
        key, eq, val = kv.partition("=")
        if not eq:
            raise UserError(f"--mitigation {text!r}: expected KEY=VALUE after ':'")
        out[key] = _value(val)
    return out


def _train(args: argparse.Namespace) -> int:
    # lazy: `capsearch --help` loads no library
    import torch

    from capsearch.datasets.folder import read_metadata
    from capsearch.models.load import load_pipeline
    from capsearch.settings import TrainSettings, flag_values
    from capsearch.training.loop import finetune

    if not args.data.is_dir():
        raise UserError(f"data folder {args.data} does not exist")
    read_metadata(args.data)  # its records as training reads them, before the model loads
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out} exists and is not a folder")
    writable_out(args.out)
    if args.spec:
        if not args.spec.is_file():
            raise UserError(f"method spec file {args.spec} does not exist")
        try:
            spec = json.loads(args.spec.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"method spec {args.spec} is not valid JSON: {exc}") from None
        # lazy: `capsearch --help` loads no library
        from capsearch.methods import normalise_spec

        try:
            spec = normalise_spec(spec)
        except UserError as exc:
            raise UserError(f"method spec {args.spec}: {exc}") from None
    else:
        params = {}
        for kv in args.param:
            key, eq, val = kv.partition("=")
            if not eq:
                raise UserError(f"--param {kv!r}: expected KEY=VALUE")
            params[key] = _value(val)
        spec = [{"method": args.method, "units": args.units, **params}]
    pipe = load_pipeline(args.model)
    device = (
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    pipe.to(device)
    values = flag_values(args, TrainSettings)
    values.setdefault("size", pipe.unet.config.sample_size * (8 if pipe.vae is not None else 1))
    values["mitigations"] = [parse_mitigation(m) for m in args.mitigation]
    cfg = TrainSettings.parse(values, "train")
    result = finetune(pipe, spec, args.data, cfg, out_dir=args.out, resume=args.resume)
    pct = 100 * result.trainable / max(result.total, 1)
    print(
        f"{result.status}: {result.steps} steps in {result.seconds:.0f} s, final loss {result.final_loss:.4f}, "
        f"trainable {result.trainable:,} ({pct:.3f}%), mitigations {result.mitigation_counts or 'none'}"
    )
    if result.status == "nan":
        print(f"capsearch: error: {result.message}")
        return 1
    print(f"delta checkpoint: {args.out / 'delta'}; log: {args.out / 'train_log.jsonl'}")
    return 0
