"""Injecting peft adapters (LoRA, LoHa, LoKr, OFT) into chosen UNet modules, and merging them back."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence

import torch

from capsearch.methods.base import claim, resolve_module, unit_modules
from capsearch.units import Unit

# One adapter name for every entry: peft activates the newest adapter name on every layer it manages,
# so per-entry names would silently switch earlier entries' layers off.
ADAPTER = "capsearch"
ADAPTABLE = (torch.nn.Linear, torch.nn.Conv2d)


def inject(
    unet: torch.nn.Module,
    units: Sequence[Unit],
    make_config: Callable[[str], object],
    method: str,
    accepts: Callable[[torch.nn.Module], bool] = lambda module: True,
) -> list[str]:
    """Wrap the units' Linear/Conv2d modules with a peft adapter; return the new trainable names.

    `make_config(target_regex)` builds the peft config; `accepts(module)` filters modules the adapter
    cannot take. Requires_grad flags set by earlier entries survive (peft re-freezes the whole model).
    """
    # lazy: peft loads only when its methods are applied
    from peft import inject_adapter_in_model

    targets = []
    for name in unit_modules(units):
        module = resolve_module(unet, name)
        if isinstance(module, ADAPTABLE) and accepts(module):
            targets.append(name)
    if not targets:
        return []
    for name in targets:
        claim(unet, name, "wrap", method)
    before = {id(p): p.requires_grad for p in unet.parameters()}
    regex = "^(" + "|".join(re.escape(t) for t in targets) + ")$"
    with warnings.catch_warnings():
        # "Already found a peft_config attribute": expected when a trial mixes several adapter entries.
        warnings.filterwarnings("ignore", message=".*peft_config.*")
        inject_adapter_in_model(make_config(regex), unet, adapter_name=ADAPTER)
    new = []
    for name, p in unet.named_parameters():
        if id(p) in before:
            p.requires_grad_(before[id(p)])
        else:
            p.requires_grad_(True)
            new.append(name)
    return new


def is_adapter_layer(module: torch.nn.Module) -> bool:
    """Whether a module is a peft adapter layer wrapping a base layer."""
    # lazy: peft loads only when its methods are applied
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, BaseTunerLayer)


@torch.no_grad()
def merge_adapters(unet: torch.nn.Module) -> None:
    """Merge every peft adapter into its base weight and put the plain base layer back."""
    wrapped = [(name, m) for name, m in unet.named_modules() if is_adapter_layer(m)]
    for name, module in wrapped:
        module.merge(adapter_names=list(module.active_adapters))
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        setattr(parent, child, module.get_base_layer())
    unet.__dict__.pop("peft_config", None)
