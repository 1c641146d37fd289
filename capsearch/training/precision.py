"""A fine-tune's precision: which autocast it runs under, and the Accelerator that applies it."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from capsearch.errors import UserError
from capsearch.models.precision import resolve_on_cpu

PRECISIONS = ("auto", "no", "fp16", "bf16")


# What `auto` picks on a CPU with native bf16 (cpu_has_bf16): "no". The parity check of
# docs/benchmarks.md ("Precision on the CPU") did not pass (DiffFit's image-text score on seed 1 fell
# outside fp32's seed-to-seed range; experiments/results/precision/parity.md), so bf16 is opt-in.
CPU_AUTO = "no"


def resolve_precision(requested: str, cuda: bool) -> str:
    """A fine-tune's autocast precision: auto is bf16 on a GPU that has it, else fp16; on a CPU,
    CPU_AUTO where the CPU has native bf16, else no. bf16 on a CPU needs native bf16; fp16 a GPU."""
    if not cuda:
        if requested == "fp16":
            raise UserError(
                "train.mixed_precision=fp16 needs a GPU (resources.gpu); use bf16, auto or no on a CPU"
            )
        return resolve_on_cpu(requested, "train.mixed_precision", CPU_AUTO)
    if requested == "auto":
        # bf16 has fp32's exponent range: no loss scaling, no skipped steps (Ampere and later)
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return requested


def make_accelerator(precision: str, cuda: bool):
    """An Accelerator for one fine-tune on the UNet's own device (the pipeline placed it already)."""
    # accelerate keeps one process-wide state that refuses a second precision; one process may
    # fine-tune several times (tests, experiments), each at its own precision.
    AcceleratorState._reset_state()
    return Accelerator(mixed_precision=precision, cpu=not cuda, device_placement=False)


def plain_unet(accelerator, unet: torch.nn.Module) -> torch.nn.Module:
    """The UNet as it was before accelerator.prepare: its class's forward, no autocast wrapper."""
    if not getattr(unet, "_is_accelerate_prepared", False):
        return unet
    wrapped = "_original_forward" in unet.__dict__
    unet = accelerator.unwrap_model(unet, keep_fp32_wrapper=False)
    # unwrap_model leaves the original forward bound on the instance and the prepared flag set; drop
    # both so sampling and saving see the plain module and a later fine-tune prepares it afresh.
    if wrapped:
        unet.__dict__.pop("forward", None)
    unet.__dict__.pop("_is_accelerate_prepared", None)
    return unet
