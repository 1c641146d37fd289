"""Whether this CPU computes bf16 natively, and the precision of the UNet's calls while sampling.

Training's precision (autocast through accelerate) is capsearch.training.precision; an evaluation's
sampling precision (`evaluate.precision`) is resolved here, below the metrics that sample.
"""

from __future__ import annotations

import torch

from capsearch.errors import UserError

# What `evaluate.precision: auto` picks on a CPU with native bf16: bf16. Its check
# (experiments/benchmarks/bench_eval_precision.py, docs/benchmarks.md "Evaluation in bf16") passed on
# a model that memorises and one that does not: every metric within fp32's sampling-seed spread on every
# seed (FID within 0.31 against spreads of 13 and 30; the same extracted counts), 1.8-2.7x faster.
CPU_SAMPLING_AUTO = "bf16"


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), where bf16 autocast can pay."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes: take the CPU as one without bf16
        return False


def resolve_on_cpu(requested: str, key: str, cpu_auto: str) -> str:
    """A precision on a CPU: auto is cpu_auto where the CPU has native bf16, else no; bf16 needs native
    bf16 (a clear error naming the spec key otherwise); anything else as requested."""
    if requested == "auto":
        return cpu_auto if cpu_auto == "no" or cpu_has_bf16() else "no"
    if requested == "bf16" and not cpu_has_bf16():
        raise UserError(
            f"{key}=bf16 on a CPU needs native bf16 (AVX512-BF16 or AMX; "
            "`lscpu` lists avx512_bf16 or amx_bf16), which this CPU lacks; use auto or no"
        )
    return requested


def resolve_sampling_precision(requested: str, cuda: bool) -> str:
    """`no` (the UNet's own dtype) or `bf16` (its calls under bf16 autocast) for an evaluation's samples.

    auto: on a GPU the pipeline's own dtype (SD pipelines load in half precision there); on a CPU,
    CPU_SAMPLING_AUTO where the CPU has native bf16, else no. bf16 needs native bf16 on a CPU.
    """
    if cuda:
        return "no" if requested == "auto" else requested
    return resolve_on_cpu(requested, "evaluate.precision", CPU_SAMPLING_AUTO)
