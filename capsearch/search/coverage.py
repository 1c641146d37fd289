"""A spec's unit groups checked against its model: selections match, groups are disjoint, and every
baseline covers what its method trains on the whole UNet (otherwise "Full FT" would be a partial fine-tune).

The model's UNet is built on the meta device (shapes only): the tiny one from its config, SD v1.5's from
`SD15_UNET_CONFIG`, any other from its `unet/config.json`; nothing is downloaded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from capsearch.errors import UserError
from capsearch.methods import trained_units
from capsearch.models.load import SHIPPED
from capsearch.models.tiny import SD15_UNET_CONFIG, TINY_UNET_CONFIG
from capsearch.search.space import FROZEN
from capsearch.units import list_units, select_units

if TYPE_CHECKING:
    from capsearch.config import Spec


def unet_for_validation(model: str) -> tuple[Any, str]:
    """The model's UNet built on the meta device (shapes only) and a note on where its config came from."""
    # lazy: diffusers' heavy modules load only on this path
    from diffusers import UNet2DConditionModel

    config, note = None, ""
    if model in SHIPPED or model == "tiny:random":
        shipped = SHIPPED[model] / "unet" / "config.json" if model in SHIPPED else None
        config = json.loads(shipped.read_text()) if shipped and shipped.is_file() else None
        config = config or dict(TINY_UNET_CONFIG)
    else:
        local = Path(model).expanduser() / "unet" / "config.json"
        if local.is_file():
            config = json.loads(local.read_text())
        elif re.fullmatch(r"[\w.-]+/[\w.-]+", model):
            try:
                # lazy: the hub client loads only for a model named by hub id
                from huggingface_hub import try_to_load_from_cache

                cached = try_to_load_from_cache(model, "unet/config.json")
            except Exception:
                cached = None
            if isinstance(cached, str):
                config = json.loads(Path(cached).read_text())
        if config is None:
            config = dict(SD15_UNET_CONFIG)
            note = f"model {model!r} is not available here; units checked against SD v1.5's shapes"
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    return unet, note


def check_units(spec: Spec, source: str = "spec") -> dict[str, Any]:
    """Check every group's unit selection against the model; return coverage numbers for reports."""
    unet, note = unet_for_validation(spec.model)
    units = list_units(unet)
    owner: dict[str, str] = {}
    for i, group in enumerate(spec.search_space.groups):
        try:
            chosen = select_units(units, list(group.units))
        except UserError as exc:
            raise UserError(f"{source}: space.groups[{i}].units: {exc}") from None
        for unit in chosen:
            if unit.name in owner:
                raise UserError(
                    f"{source}: space.groups[{i}].units: unit {unit.name} is also in group "
                    f"{owner[unit.name]!r}; groups must not overlap"
                )
            owner[unit.name] = group.name
    _check_baselines_cover(spec, owner, source)
    total = sum(u.numel for u in units)
    covered = sum(u.numel for u in units if u.name in owner)
    return {
        "units": len(units),
        "grouped_units": len(owner),
        "parameters": total,
        "grouped_parameters": covered,
        "note": note,
    }


def _check_baselines_cover(spec: Spec, owner: dict[str, str], source: str) -> None:
    """A baseline must be its method on the whole UNet: every unit it trains there is in a group allowing it."""
    groups = {g.name: g for g in spec.search_space.groups}
    for i, method in enumerate(spec.baselines.methods):
        if method in FROZEN:
            continue
        unet, _ = unet_for_validation(spec.model)
        left = [
            u
            for u in trained_units(unet, {"method": method})
            if u.name not in owner or method not in groups[owner[u.name]].methods
        ]
        if left:
            raise UserError(
                f"{source}: baselines.methods[{i}]: baseline {method!r} would leave {len(left)} "
                f"unit(s) ({sum(u.numel for u in left):,} parameters) that {method} trains on the "
                f"whole UNet outside every group allowing {method}, e.g. {left[0].name}; add them "
                "to such a group or drop the baseline"
            )
