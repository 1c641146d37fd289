"""Delta checkpoints (only what a trial trained, plus its method spec), merged export and LoRA export.

A delta folder holds `delta.safetensors` (the trainable tensors by their names in the adapted UNet)
and `spec.json` (the apply_methods spec with every hyper-parameter, the base model id if known and the
capsearch version). Loading applies the spec to a fresh base UNet and copies the tensors in, which
reproduces the fine-tuned UNet exactly. Only safetensors are read: never pickle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors
import safetensors.torch
import torch
from torch.nn.utils import parametrize

from capsearch import __version__
from capsearch.atomic import atomic_target, atomic_write
from capsearch.errors import UserError
from capsearch.faults import maybe_fail
from capsearch.methods import APPLIED_MARK, Applied, apply_methods, get_method, method_names
from capsearch.methods._peft import ADAPTER, merge_adapters

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

DELTA_FILE = "delta.safetensors"
# The delta's method entries, base model and format (named spec.json since the first deltas: kept).
METHODS_FILE = "spec.json"
LORA_FILE = "pytorch_lora_weights.safetensors"  # the name pipe.load_lora_weights looks for
FORMAT = "capsearch-delta"
# 2: `attention` is the paper's whole-transformer-block tuning (version 1's is now `attn_proj`), SV-DIFF
# shifts norm-layer weights too, and only a method with a second parameter set carries `lr_1d`.
FORMAT_VERSION = 2
# Config keys that fix every parameter shape; a delta only fits a base UNet that agrees on them.
_SHAPE_KEYS = (
    "in_channels",
    "out_channels",
    "block_out_channels",
    "layers_per_block",
    "cross_attention_dim",
    "down_block_types",
    "up_block_types",
    "transformer_layers_per_block",
    "attention_head_dim",
    "norm_num_groups",
)


def _shape_config(unet: torch.nn.Module) -> dict[str, Any]:
    config = getattr(unet, "config", {}) or {}
    return {k: _jsonable(config[k]) for k in _SHAPE_KEYS if k in config}


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def save_delta(
    unet: torch.nn.Module, path: str | Path, *, applied: Applied, base_model: str | None = None
) -> Path:
    """Write the trained tensors and the method entries `applied` to `unet` into the folder `path`."""
    tensors = {
        name: p.detach().to("cpu").contiguous()
        for name, p in unet.named_parameters()
        if p.requires_grad
    }
    if list(tensors) != applied.names:
        raise UserError(
            f"this UNet's {len(tensors)} trainable tensor(s) are not the {len(applied.names)} that "
            "`applied` names: save the UNet whose apply_methods call returned it"
        )
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    if base_model is None:
        base_model = (getattr(unet, "config", {}) or {}).get("_name_or_path") or None
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "capsearch_version": __version__,
        "base_model": base_model,
        "methods": applied.entries,
        "trainable_parameters": sum(t.numel() for t in tensors.values()),
        "unet_shape": _shape_config(unet),
    }
    # delta.safetensors, the file every reader looks for first, is written last: a save cut short (a
    # full disk, a kill) leaves no tensors, or an earlier save's, beside a spec they do not match.
    (folder / DELTA_FILE).unlink(missing_ok=True)
    atomic_write(folder / METHODS_FILE, json.dumps(meta, indent=2) + "\n")
    with atomic_target(folder / DELTA_FILE) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata={"format": "pt"})
        maybe_fail(folder.parent.name, "delta")  # tests only: an injected fault (capsearch.faults)
    return folder


def read_spec(path: str | Path) -> dict[str, Any]:
    """The parsed spec.json of a delta folder (UserError if missing or malformed)."""
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"delta folder {folder} does not exist")
    spec_path = folder / METHODS_FILE
    if not spec_path.is_file():
        raise UserError(f"{folder} is not a capsearch delta: {METHODS_FILE} is missing")
    try:
        meta = json.loads(spec_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {spec_path}: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "methods" not in meta:
        raise UserError(f"{spec_path} is not a capsearch delta spec")
    if meta.get("format_version", 1) < 2:
        meta["methods"] = [_from_version_1(entry) for entry in meta["methods"]]
    return meta


def _from_version_1(entry: Any) -> Any:
    """A method entry written by format version 1, as the methods of version 2 name the same thing."""
    if not isinstance(entry, dict):
        return entry
    entry = dict(entry)
    if entry.get("method") == "attention":
        entry["method"] = "attn_proj"  # version 1's attention trained q/k/v/out only
    if entry.get("method") == "svdiff":
        entry.setdefault("shift_norms", False)  # version 1 shifted Linear/Conv2d weights only
    else:
        # Version 1 let any entry carry lr_1d (a rate for its 1-D tensors); rates do not change what
        # a delta holds, so it is dropped where the method now has no second parameter set.
        entry.pop("lr_1d", None)
    return entry


def load_delta(base_unet: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Apply a delta folder's methods to a fresh base UNet and load its tensors; return the UNet."""
    folder = Path(path)
    meta = read_spec(folder)
    expected = meta.get("unet_shape") or {}
    actual = _shape_config(base_unet)
    for key, value in expected.items():
        if key in actual and actual[key] != value:
            raise UserError(
                f"delta {folder} was trained on a UNet with {key}={value}, this base has {actual[key]}"
            )
    tensor_path = folder / DELTA_FILE
    if not tensor_path.is_file():
        raise UserError(f"{folder} is not a capsearch delta: {DELTA_FILE} is missing")
    try:
        tensors = safetensors.torch.load_file(str(tensor_path), device="cpu")
    except (OSError, safetensors.SafetensorError) as exc:
        raise UserError(f"cannot read {tensor_path}: {exc}") from None

    apply_methods(base_unet, meta["methods"])
    params = {n: p for n, p in base_unet.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise UserError(
            f"delta {folder} does not match its spec on this base: "
            f"{len(missing)} missing tensor(s) {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}"
        )
    with torch.no_grad():
        for name, param in params.items():
            if tuple(tensors[name].shape) != tuple(param.shape):
                raise UserError(
                    f"delta tensor {name} has shape {tuple(tensors[name].shape)}, "
                    f"the UNet expects {tuple(param.shape)}"
                )
            param.copy_(tensors[name])
    return base_unet


def merge(unet: torch.nn.Module) -> UNet2DConditionModel:
    """Fold every applied method into plain weights, in place; return the vanilla UNet.

    The order matters where entries share a module: parametrizations (SV-DIFF) first, so that a
    method scaling a module's output (DiffFit's γ) folds into the already-shifted weight; peft
    adapters wrap whole modules and share them with nothing, so they merge last.
    """
    with torch.no_grad():
        for module in list(unet.modules()):
            if parametrize.is_parametrized(module):
                for tensor_name in list(module.parametrizations):
                    parametrize.remove_parametrizations(
                        module, tensor_name, leave_parametrized=True
                    )
        for name in method_names():
            fold = get_method(name).fold
            if fold is not None:
                fold(unet)
        merge_adapters(unet)
    unet.__dict__.pop(APPLIED_MARK, None)
    _check_vanilla(unet)
    return unet


def _check_vanilla(unet: torch.nn.Module) -> None:
    """Fail loudly if the merged UNet's parameters differ from a stock UNet of its config."""
    # lazy: diffusers' heavy modules load only on this path
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        stock = UNet2DConditionModel.from_config(unet.config)
    want = {k: tuple(v.shape) for k, v in stock.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    if want != have:
        extra, lost = sorted(set(have) - set(want)), sorted(set(want) - set(have))
        raise RuntimeError(f"merge left a non-standard UNet: extra {extra[:3]}, missing {lost[:3]}")


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's LoRA factors in diffusers/peft naming (`<module>.lora_A.weight`), scale folded into B.

    B is multiplied by α/r so that a loader assuming α = r (diffusers, when no alphas are stored)
    reproduces the same update.
    """
    # lazy: peft loads only when its methods are applied
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in unet.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            scale = module.scaling[ADAPTER]
            out[f"{name}.lora_A.weight"] = module.lora_A[ADAPTER].weight.detach().cpu().contiguous()
            out[f"{name}.lora_B.weight"] = (
                (module.lora_B[ADAPTER].weight.detach() * scale).cpu().contiguous()
            )
    return out


def export_lora(unet: torch.nn.Module, path: str | Path, *, applied: Applied) -> Path:
    """Write the UNet's LoRA as `pytorch_lora_weights.safetensors` for `pipe.load_lora_weights`."""
    # lazy: diffusers' heavy modules load only on this path
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    others = sorted({e["method"] for e in applied.entries} - {"lora", "freeze"})
    if others:
        raise UserError(
            f"only LoRA exports to the diffusers LoRA format; this UNet also uses {', '.join(others)} "
            "(use save_delta or the merged UNet instead)"
        )
    state = lora_state_dict(unet)
    if not state:
        raise UserError("this UNet has no LoRA layers to export")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        str(folder), unet_lora_layers=state, weight_name=LORA_FILE, safe_serialization=True
    )
    return folder
