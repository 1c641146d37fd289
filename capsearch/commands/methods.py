"""`capsearch methods` (PEFT methods and their sizes) and `capsearch units` (the UNet's named units)."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

MODELS_HELP = "tiny or tiny-broad (the phantom-world UNet), sd15-config (SD v1.5 shapes, no weights) or a model spec"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `methods` and `units` subcommands."""
    methods = subparsers.add_parser(
        "methods", help="list the PEFT methods with their trainable parameter counts"
    )
    methods.add_argument("--model", default="tiny", help=MODELS_HELP)
    methods.add_argument(
        "--units", default="*", help="unit selection each method is applied to (default: all units)"
    )
    methods.set_defaults(func=_run_methods)
    units = subparsers.add_parser("units", help="list the UNet's named units with parameter counts")
    units.add_argument("--model", default="tiny", help=MODELS_HELP)
    units.add_argument("--select", default=None, help="only units matching this pattern")
    units.set_defaults(func=_run_units)


def unet_factory(model: str) -> Callable[[], torch.nn.Module]:
    """A function returning a fresh UNet for a model spec (`tiny`, `sd15-config`, or a pipeline spec)."""
    if model in ("tiny", "tiny-broad"):  # one architecture (capsearch.models.tiny)
        # lazy: `capsearch --help` loads no library
        from capsearch.models.tiny import build_tiny_unet

        return build_tiny_unet
    if model == "sd15-config":
        return _sd15_on_meta
    # lazy: `capsearch --help` loads no library
    # lazy: `capsearch --help` loads no library

    from capsearch.models.load import load_pipeline

    unet = load_pipeline(model).unet
    return lambda: copy.deepcopy(unet)


def _sd15_on_meta() -> torch.nn.Module:
    """Stable Diffusion v1.5's UNet built from its config on the meta device (shapes, no memory)."""
    # lazy: `capsearch --help` loads no library
    import torch
    from diffusers import UNet2DConditionModel

    from capsearch.models.tiny import SD15_UNET_CONFIG

    with torch.device("meta"):
        return UNet2DConditionModel(**SD15_UNET_CONFIG)


def method_size(make_unet: Callable[[], torch.nn.Module], spec: Any) -> tuple[int, int]:
    """(trainable, total base) parameter counts of a method spec applied to a fresh UNet."""
    # lazy: `capsearch --help` loads no library
    from capsearch.methods import apply_methods, count_trainable

    unet = make_unet()
    total = sum(p.numel() for p in unet.parameters())
    apply_methods(unet, spec)
    return count_trainable(unet), total


def default_hyper(name: str) -> str:
    """A method's default hyper-parameters as `k=v` text."""
    # lazy: `capsearch --help` loads no library
    from capsearch.methods import get_method

    cfg = get_method(name).config()
    return ", ".join(f"{k}={_short(v)}" for k, v in dataclasses.asdict(cfg).items()) or "-"


def _short(value: Any) -> str:
    return "/".join(value) if isinstance(value, tuple) else str(value)


def _run_methods(args: argparse.Namespace) -> int:
    # lazy: `capsearch --help` loads no library
    from rich.console import Console
    from rich.table import Table

    from capsearch.methods import method_names

    logging.getLogger("capsearch.methods").setLevel(logging.ERROR)
    make_unet = unet_factory(args.model)
    table = Table(title=f"PEFT methods on {args.model}, units {args.units!r}")
    for column in ("method", "hyper-parameters", "trainable", "% of UNet", "delta (fp32)"):
        table.add_column(
            column, justify="left" if column in ("method", "hyper-parameters") else "right"
        )
    for name in method_names():
        trainable, total = method_size(make_unet, {"method": name, "units": args.units})
        table.add_row(
            name,
            default_hyper(name),
            f"{trainable:,}",
            f"{100 * trainable / total:.4f}",
            human_bytes(4 * trainable),
        )
    Console().print(table)
    return 0


def _run_units(args: argparse.Namespace) -> int:
    # lazy: `capsearch --help` loads no library
    from rich.console import Console
    from rich.table import Table

    from capsearch.units import list_units, select_units

    unet = unet_factory(args.model)()
    units = list_units(unet)
    total = sum(u.numel for u in units)
    if args.select is not None:
        units = select_units(units, args.select)
    table = Table(title=f"{len(units)} units of {args.model} ({total:,} parameters)")
    for column in ("unit", "kind", "parameters", "%"):
        table.add_column(column, justify="left" if column in ("unit", "kind") else "right")
    for unit in units:
        table.add_row(unit.name, unit.kind, f"{unit.numel:,}", f"{100 * unit.numel / total:.3f}")
    Console().print(table)
    return 0


def human_bytes(n: int) -> str:
    """Bytes in decimal units (1 MB = 10^6 bytes, as the published sizes use)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"
