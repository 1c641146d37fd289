"""Named units of a diffusion UNet (block path × component kind) and the selection syntax over them.

A unit is what the search space switches on and off: `down_blocks.2.attentions.0:cross_attn` is the
cross-attention of the first transformer in down block 2. Names are diffusers module paths, so the same
scheme holds on Stable Diffusion v1.5 and on the tiny phantom UNet.

Selection patterns are `BLOCKGLOB[:KINDGLOB]`. BLOCKGLOB is matched part by part (dot-separated)
against the start of a unit's block path: a part is an fnmatch glob (`*`, `attn*`), a number, a
numeric range `N-M` (inclusive), or `**` (any number of parts). A prefix is enough, so `mid_block`
selects every unit under the mid block and `*` selects everything. KINDGLOB is an fnmatch glob over
the unit kind (`cross_attn`, `*_attn`); without it every kind matches. An empty BLOCKGLOB (`:ff`)
means every block.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

from capsearch.errors import UserError

if TYPE_CHECKING:
    import torch

# Kinds inside one diffusers block, keyed by the block's class name. Each rule maps the parameter path
# relative to the block to a kind; the first matching regex wins.
_TRANSFORMER_RULES: tuple[tuple[str, str], ...] = (
    (r"transformer_blocks\.\d+\.attn1\.", "self_attn"),
    (r"transformer_blocks\.\d+\.attn2\.", "cross_attn"),
    (r"transformer_blocks\.\d+\.ff\.", "ff"),
    (r"transformer_blocks\.\d+\.norm\d*\.", "attn_norm"),
    (r"norm\.", "attn_norm"),
    (r"proj_(in|out)\.", "proj"),
)
_RESNET_RULES: tuple[tuple[str, str], ...] = (
    (r"conv(1|2|_shortcut)\.", "conv"),
    (r"norm\d*\.", "norm"),
    (r"time_emb_proj\.", "time_emb_proj"),
)
_SAMPLER_RULES: tuple[tuple[str, str], ...] = (
    (r"norm\d*\.", "norm"),
    (r"conv\.", "conv"),
)
_BLOCK_RULES: dict[str, tuple[tuple[str, str], ...]] = {
    "Transformer2DModel": _TRANSFORMER_RULES,
    "ResnetBlock2D": _RESNET_RULES,
    "Downsample2D": _SAMPLER_RULES,
    "Upsample2D": _SAMPLER_RULES,
}
# Top-level modules outside the down/mid/up blocks: module name -> (unit name, kind).
_TOP_LEVEL: dict[str, tuple[str, str]] = {
    "conv_in": ("conv_in", "conv"),
    "time_embedding": ("time_embedding", "time_embedding"),
    "conv_norm_out": ("conv_out", "conv"),
    "conv_out": ("conv_out", "conv"),
}
_TOP_LEVEL_UNITS = frozenset(unit for unit, _ in _TOP_LEVEL.values())  # named without ":kind"
# Units are listed in the order data flows through the UNet.
_FLOW_ORDER = ("conv_in", "time_embedding", "down_blocks", "mid_block", "up_blocks", "conv_out")


@dataclass(frozen=True)
class Unit:
    """One named part of a UNet: a block path crossed with a component kind."""

    name: str
    block: str
    kind: str
    modules: tuple[str, ...]
    params: tuple[str, ...]
    numel: int


def list_units(unet: torch.nn.Module) -> list[Unit]:
    """Every unit of the UNet, in data-flow order; together they cover each parameter exactly once."""
    blocks = {
        name: _BLOCK_RULES[type(module).__name__]
        for name, module in unet.named_modules()
        if name and type(module).__name__ in _BLOCK_RULES
    }
    grouped: dict[str, tuple[str, str, list[str], list[str], int]] = {}
    for pname, param in unet.named_parameters():
        block, kind = _classify(pname, blocks)
        name = block if block in _TOP_LEVEL_UNITS else f"{block}:{kind}"
        if name not in grouped:
            grouped[name] = (block, kind, [], [], 0)
        b, k, modules, params, numel = grouped[name]
        owner = pname.rsplit(".", 1)[0] if "." in pname else ""
        if owner not in modules:
            modules.append(owner)
        params.append(pname)
        grouped[name] = (b, k, modules, params, numel + param.numel())
    units = [Unit(name, b, k, tuple(m), tuple(p), n) for name, (b, k, m, p, n) in grouped.items()]
    return sorted(units, key=lambda u: _flow_rank(u.block))  # stable: keeps module order within


def _classify(pname: str, blocks: dict[str, tuple[tuple[str, str], ...]]) -> tuple[str, str]:
    """(block path, kind) of one parameter name."""
    parts = pname.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in blocks:
            rel = ".".join(parts[cut:])
            for regex, kind in blocks[prefix]:
                if re.match(regex, rel):
                    return prefix, kind
            return prefix, "other"
    top = parts[0]
    if top in _TOP_LEVEL:
        unit, kind = _TOP_LEVEL[top]
        return unit, kind
    # A module this scheme does not know (class/add embeddings of other UNet variants).
    return top, "other"


def _flow_rank(block: str) -> int:
    top = block.split(".", 1)[0]
    return _FLOW_ORDER.index(top) if top in _FLOW_ORDER else len(_FLOW_ORDER)


def select_units(
    unet: torch.nn.Module | Sequence[Unit], selection: str | Iterable[str] | None
) -> list[Unit]:
    """The units matched by a pattern or list of patterns (UserError if a pattern matches nothing)."""
    units = list(unet) if isinstance(unet, (list, tuple)) else list_units(unet)
    patterns = normalise_selection(selection)
    chosen: set[str] = set()
    for pattern in patterns:
        matched = [u.name for u in units if unit_matches(u, pattern)]
        if not matched:
            raise UserError(_no_match_message(pattern, units))
        chosen.update(matched)
    return [u for u in units if u.name in chosen]


def normalise_selection(selection: str | Iterable[str] | None) -> list[str]:
    """A selection as a list of pattern strings (None or [] is the empty selection)."""
    if selection is None:
        return []
    if isinstance(selection, str):
        selection = [selection]
    patterns = []
    for pattern in selection:
        if not isinstance(pattern, str) or not pattern.strip():
            raise UserError(f"unit pattern {pattern!r} is not a non-empty string")
        patterns.append(pattern.strip())
    return patterns


def unit_matches(unit: Unit, pattern: str) -> bool:
    """Whether one `BLOCKGLOB[:KINDGLOB]` pattern selects the unit."""
    block_glob, _, kind_glob = pattern.partition(":")
    block_parts = (block_glob or "*").split(".")
    for part in block_parts:
        _check_part(part, pattern)
    if not fnmatchcase(unit.kind, kind_glob or "*"):
        return False
    return _match_prefix(block_parts, unit.block.split("."))


_RANGE = re.compile(r"^(\d+)-(\d+)$")


def _check_part(part: str, pattern: str) -> None:
    if not part:
        raise UserError(f"unit pattern {pattern!r} has an empty part between dots")
    found = _RANGE.match(part)
    if found and int(found.group(1)) > int(found.group(2)):
        raise UserError(f"unit pattern {pattern!r}: range {part} runs backwards")


def _match_part(pattern_part: str, path_part: str) -> bool:
    found = _RANGE.match(pattern_part)
    if found:
        lo, hi = int(found.group(1)), int(found.group(2))
        return path_part.isdigit() and lo <= int(path_part) <= hi
    return fnmatchcase(path_part, pattern_part)


def _match_prefix(pattern: list[str], path: list[str]) -> bool:
    """Whether the pattern parts match the start of the path parts (`**` spans any number)."""
    if not pattern:
        return True
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_match_prefix(rest, path[i:]) for i in range(len(path) + 1))
    return bool(path) and _match_part(head, path[0]) and _match_prefix(rest, path[1:])


def _no_match_message(pattern: str, units: Sequence[Unit]) -> str:
    prefixes = {
        ".".join(u.block.split(".")[:i]) for u in units for i in range(1, u.block.count(".") + 2)
    }
    names = sorted({u.name for u in units} | prefixes)
    close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.5)
    kinds = sorted({u.kind for u in units})
    hint = f"; close names: {', '.join(close)}" if close else ""
    return (
        f"unit pattern {pattern!r} matches no unit of this UNet{hint}; kinds are {', '.join(kinds)} "
        "(see `capsearch units`)"
    )
