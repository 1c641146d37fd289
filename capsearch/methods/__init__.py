"""PEFT methods: how a chosen unit of the UNet may change. One file per method, registered by a decorator.

A trial's method spec is a list of entries `{"method": "difffit", "units": "down_blocks.*", **hyper}`;
`apply_methods` freezes the whole UNet, applies each entry to its units in order and returns what it
applied (`Applied`): the trainable parameter names (the mask ω of the paper's `θ0 + ω ⊙ Δφ`), the
entries in full and each parameter's own rate. An entry may also carry its own learning rate `lr`,
which `optimizer_groups` uses instead of the run's: PEFT methods want rates ~30x full fine-tuning's
(docs/models.md). A method with a second parameter set that trains at another rate (SV-DIFF's
norm-layer shifts, Han et al. 2023) declares it at registration; its entries may carry `lr_1d` for
that set, and any other method's entry is refused one.
"""

from capsearch.methods.base import (
    APPLIED_MARK,
    RATE_KEYS,
    Applied,
    Method,
    MethodConfig,
    apply_methods,
    claim,
    count_trainable,
    entry_rates,
    get_method,
    has_weight,
    make_config,
    mark_trainable,
    method_names,
    normalise_spec,
    optimizer_groups,
    register_method,
    resolve_module,
    trainable_names,
    trained_units,
    unit_modules,
)

__all__ = [
    "APPLIED_MARK",
    "RATE_KEYS",
    "Applied",
    "Method",
    "MethodConfig",
    "apply_methods",
    "claim",
    "count_trainable",
    "entry_rates",
    "get_method",
    "has_weight",
    "make_config",
    "mark_trainable",
    "method_names",
    "normalise_spec",
    "optimizer_groups",
    "register_method",
    "resolve_module",
    "trainable_names",
    "trained_units",
    "unit_modules",
]

# One import line per method file: registration happens on import, in this order (baselines first).
# isort: off
from capsearch.methods import freeze as _freeze  # noqa: F401
from capsearch.methods import full as _full  # noqa: F401
from capsearch.methods import attention as _attention  # noqa: F401
from capsearch.methods import attn_proj as _attn_proj  # noqa: F401
from capsearch.methods import bitfit as _bitfit  # noqa: F401
from capsearch.methods import norm as _norm  # noqa: F401
from capsearch.methods import difffit as _difffit  # noqa: F401
from capsearch.methods import svdiff as _svdiff  # noqa: F401
from capsearch.methods import lora as _lora  # noqa: F401
from capsearch.methods import loha as _loha  # noqa: F401
from capsearch.methods import lokr as _lokr  # noqa: F401
from capsearch.methods import oft as _oft  # noqa: F401
# isort: on
