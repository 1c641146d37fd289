"""LoRA exports: diffusers' `pytorch_lora_weights.safetensors` and the kohya layout ComfyUI and A1111 load.

The kohya layout names each adapted module `lora_unet_<diffusers module path, dots as underscores>` and
stores three tensors per module:

    <name>.lora_down.weight   A: [r, in] (Linear) or [r, in, kh, kw] (Conv2d, the base layer's kernel)
    <name>.lora_up.weight     B: [out, r] (Linear) or [out, r, 1, 1] (Conv2d)
    <name>.alpha              a scalar; the loader scales B·A by alpha / r, r = lora_down's first dim

capsearch's LoRA (peft) scales by α/r as well, so A, B and α are written as trained: nothing is folded.
ComfyUI maps these names through its diffusers→LDM UNet table, A1111 through its diffusers-name
converter (conv_in, time_embedding, down/mid/up attentions and resnets, samplers, conv_out).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import safetensors.torch
import torch

from capsearch.errors import UserError
from capsearch.methods._peft import ADAPTER
from capsearch.models.delta import LORA_FILE, export_lora

if TYPE_CHECKING:
    import torch

    from capsearch.methods import Applied

KOHYA_FILE = "lora_kohya.safetensors"
KOHYA_PREFIX = "lora_unet_"
# Methods that export as merged weights only: diffusers has no loader for them.
MERGED_ONLY = ("loha", "lokr", "oft")


def kohya_name(module_name: str) -> str:
    """The kohya key stem of a diffusers UNet module path."""
    return KOHYA_PREFIX + module_name.replace(".", "_")


def kohya_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's LoRA factors in the kohya layout: lora_down (A), lora_up (B) and alpha per module."""
    # lazy: peft loads only when its methods are applied
    from peft.tuners.lora import LoraLayer

    out: dict[str, torch.Tensor] = {}
    for name, module in unet.named_modules():
        if not (isinstance(module, LoraLayer) and ADAPTER in module.lora_A):
            continue
        down = module.lora_A[ADAPTER].weight.detach().cpu().contiguous()
        up = module.lora_B[ADAPTER].weight.detach().cpu().contiguous()
        rank = down.shape[0]
        stem = kohya_name(name)
        out[f"{stem}.lora_down.weight"] = down
        out[f"{stem}.lora_up.weight"] = up
        # alpha / r must equal peft's scaling: α/r (or α/√r under rsLoRA, folded into alpha here)
        out[f"{stem}.alpha"] = torch.tensor(float(module.scaling[ADAPTER]) * rank)
    return out


def kohya_targets(unet: torch.nn.Module) -> dict[str, str]:
    """Every Linear/Conv2d of a plain UNet by its kohya stem (the inverse of kohya_name)."""
    targets = {}
    for name, module in unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            stem = kohya_name(name)
            if stem in targets:
                raise RuntimeError(
                    f"modules {targets[stem]} and {name} share the kohya name {stem}"
                )
            targets[stem] = name
    return targets


def kohya_delta(down: torch.Tensor, up: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The weight update (alpha/r)·B·A of one kohya module, in the base weight's layout."""
    rank = down.shape[0]
    update = up.flatten(1) @ down.flatten(1)  # [out, in·kh·kw]
    return (float(alpha) / rank) * update.reshape(up.shape[0], *down.shape[1:])


def apply_kohya(unet: torch.nn.Module, state: dict[str, torch.Tensor]) -> int:
    """Add a kohya-layout LoRA to a plain UNet's weights in place; return the modules changed.

    The inverse of kohya_state_dict: every stem must name a Linear/Conv2d of this UNet and carry its
    lora_up and alpha.
    """
    targets = kohya_targets(unet)
    stems = {k.rsplit(".", 2)[0] for k in state if k.endswith(".lora_down.weight")}
    known = {
        f"{s}.{part}" for s in stems for part in ("lora_down.weight", "lora_up.weight", "alpha")
    }
    if set(state) != known:
        raise UserError(f"not a kohya LoRA: keys {sorted(set(state) ^ known)[:3]} break its layout")
    with torch.no_grad():
        for stem in sorted(stems):
            if stem not in targets:
                raise UserError(f"kohya LoRA module {stem} names no Linear/Conv2d of this UNet")
            weight = unet.get_submodule(targets[stem]).weight
            update = kohya_delta(
                state[f"{stem}.lora_down.weight"],
                state[f"{stem}.lora_up.weight"],
                state[f"{stem}.alpha"],
            )
            weight.add_(update.to(weight.dtype))
    return len(stems)


def lora_only_error(entries: list[dict]) -> str | None:
    """Why a trial's methods cannot export as a LoRA file (None: LoRA only, so they can)."""
    methods = {e["method"] for e in entries} - {"freeze"}
    if "lora" not in methods:
        shown = ", ".join(sorted(methods)) or "nothing (frozen)"
        return f"--lora: this trial trains {shown}, not LoRA; use the merged pipeline folder"
    others = sorted(methods - {"lora"})
    if others:
        return (
            f"--lora: this trial trains {', '.join(others)} besides LoRA, which a LoRA file cannot "
            "hold; use the merged pipeline folder"
        )
    return None


def write_lora_files(
    unet: torch.nn.Module, out: Path, applied: Applied, kohya_file: str = KOHYA_FILE
) -> list[Path]:
    """Write diffusers' LoRA file and the kohya file of a LoRA-only UNet into `out`."""

    problem = lora_only_error(applied.entries)
    if problem:
        raise UserError(problem)
    export_lora(unet, out, applied=applied)
    state = kohya_state_dict(unet)
    ranks = sorted({int(v.shape[0]) for k, v in state.items() if k.endswith("lora_down.weight")})
    meta = {"format": "pt", "ss_network_module": "networks.lora"}
    if len(ranks) == 1:  # the rank trainers record (display only; loaders read each module's shape)
        meta["ss_network_dim"] = str(ranks[0])
    safetensors.torch.save_file(state, str(Path(out) / kohya_file), metadata=meta)
    return [Path(out) / LORA_FILE, Path(out) / kohya_file]
