"""The method registry and the helpers method files build on (re-exported by `capsearch.methods`).

Method files import from here, never from the package, so that the package may import them without a
cycle.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from capsearch.errors import UserError
from capsearch.units import Unit, list_units, select_units

if TYPE_CHECKING:
    import torch

# The package's logger: callers quiet it by that name (`capsearch methods`, experiments/method_sizes.py).
log = logging.getLogger("capsearch.methods")

# Keys of a method entry that are not the method's hyper-parameters: the entry's own learning rates,
# `lr` for its parameters and `lr_1d` for its second set (only methods that register one).
RATE_KEYS = ("lr", "lr_1d")

# The one mark apply_methods leaves on a UNet's __dict__, so that a second call is refused: in-place
# methods (bitfit, norm, attention, full, freeze) change only requires_grad, which the modules cannot
# tell from a base UNet's. merge removes it with the methods.
APPLIED_MARK = "_capsearch_methods_applied"


@dataclass
class MethodConfig:
    """Hyper-parameters of a method; each method subclasses it with its own fields and defaults."""


@dataclass(frozen=True)
class Method:
    """A registered method: its name, config class, apply function and test selection."""

    name: str
    config: type[MethodConfig]
    apply: Callable[..., list[str]]
    example_units: str | tuple[str, ...] = "*"
    fold: Callable[[Any], None] | None = field(default=None)
    # (unet, trainable parameter name) -> whether it belongs to the method's second set (`lr_1d`)
    secondary: Callable[[Any, str], bool] | None = field(default=None)


_REGISTRY: dict[str, Method] = {}


@dataclass(frozen=True)
class Applied:
    """What apply_methods did to a UNet: its trainable names, the entries in full, their own rates."""

    names: list[str]  # trainable parameter names, in the UNet's order (the paper's mask ω)
    entries: list[dict[str, Any]]  # every entry with every hyper-parameter filled in (spec.json)
    rates: dict[str, float]  # names whose entry gave them its own rate (the others: the run's)


def register_method(
    name: str,
    config: type[MethodConfig],
    *,
    example_units: str | Sequence[str] = "*",
    fold: Callable[[Any], None] | None = None,
    secondary: Callable[[Any, str], bool] | None = None,
) -> Callable[[Callable[..., list[str]]], Callable[..., list[str]]]:
    """Register `apply(unet, units, cfg) -> trainable names` under a method name.

    `example_units` is a selection that is non-empty on the tiny UNet (used by the registry-wide tests);
    `fold(unet)` folds what the method added into plain weights (for methods that add modules or hooks
    that torch parametrizations or peft do not already cover); `secondary(unet, name)` tells which of
    the method's trainable parameters form its second set, trained at an entry's `lr_1d`.
    """

    def decorate(apply: Callable[..., list[str]]) -> Callable[..., list[str]]:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is registered twice")
        units = example_units if isinstance(example_units, str) else tuple(example_units)
        _REGISTRY[name] = Method(name, config, apply, units, fold, secondary)
        return apply

    return decorate


def method_names() -> list[str]:
    """Names of all registered methods, in registration order."""
    return list(_REGISTRY)


def get_method(name: str) -> Method:
    """The registered method of that name (UserError listing the known ones otherwise)."""
    if name not in _REGISTRY:
        raise UserError(f"unknown method {name!r}; known methods: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def make_config(method: Method, params: Mapping[str, Any]) -> MethodConfig:
    """Build a method's config from a dict, rejecting unknown keys and values of the wrong type."""
    fields = {f.name: f for f in dataclasses.fields(method.config)}
    values = {}
    for key, value in params.items():
        if key not in fields:
            known = ", ".join(fields) or "none"
            raise UserError(
                f"unknown hyper-parameter {key!r} for method {method.name!r} (known: {known})"
            )
        values[key] = _coerce(method.name, key, value, _default(fields[key]))
    return method.config(**values)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _coerce(method: str, key: str, value: Any, default: Any) -> Any:
    """Check a hyper-parameter against the type of its default (ints are accepted for floats)."""
    where = f"{method}.{key}"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise UserError(f"{where} must be true or false, got {value!r}")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where} must be an integer, got {value!r}")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where} must be a number, got {value!r}")
        return float(value)
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise UserError(f"{where} must be a string, got {value!r}")
    elif isinstance(default, tuple):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise UserError(f"{where} must be a list of strings, got {value!r}")
        return tuple(value)
    return value


# How a method changes a module's weight. Two entries may touch the same module only in compatible ways:
# training a weight in place twice is idempotent; DiffFit's output scale γ composes with an in-place or
# reparametrised weight (it folds after them); a peft adapter wraps the whole module and a spectral
# shift reparametrises its weight, so each excludes any other change to that weight.
_CLASHES = {
    "wrap": {"wrap", "reparam", "train", "scale"},
    "reparam": {"wrap", "reparam", "train"},
    "train": {"wrap", "reparam"},
    "scale": {"wrap", "scale"},
}


# The claims of the apply_methods call under way: (its UNet, module name -> [(how, by)]).
_CLAIMS: ContextVar[tuple[Any, dict[str, list[tuple[str, str]]]] | None] = ContextVar(
    "capsearch_claims", default=None
)


@contextmanager
def _claims_of(unet: torch.nn.Module) -> Iterator[None]:
    """Collect the claims of one apply_methods call on `unet`, forgotten when it returns."""
    token = _CLAIMS.set((unet, {}))
    try:
        yield
    finally:
        _CLAIMS.reset(token)


def claim(unet: torch.nn.Module, module_name: str, how: str, by: str) -> None:
    """Record that method `by` changes `module_name`'s weight (`how`: wrap, reparam, train, scale)."""
    current = _CLAIMS.get()
    if current is None or current[0] is not unet:
        raise RuntimeError("claim is for method apply functions run by apply_methods on this UNet")
    claims = current[1]
    for other_how, other_by in claims.get(module_name, []):
        if other_how in _CLASHES[how]:
            raise UserError(
                f"methods {other_by!r} and {by!r} both change the weight of {module_name} "
                f"({other_how} vs {how}); give them disjoint units"
            )
    claims.setdefault(module_name, []).append((how, by))


def resolve_module(unet: torch.nn.Module, name: str) -> torch.nn.Module:
    """The module at `name`, looking through peft wrappers to the original layer."""
    module = unet.get_submodule(name) if name else unet
    while hasattr(module, "get_base_layer") and module.get_base_layer() is not module:
        module = module.get_base_layer()
    return module


def has_weight(module: torch.nn.Module) -> bool:
    """Whether the module holds a weight, plain or reparametrised (so claims see SV-DIFF's shifts)."""
    parametrizations = getattr(module, "parametrizations", {})
    return "weight" in module._parameters or "weight" in parametrizations


def mark_trainable(unet: torch.nn.Module, params: Iterable[torch.nn.Parameter]) -> list[str]:
    """Set requires_grad on the given parameters and return their names in the UNet."""
    wanted = {id(p) for p in params}
    for p in unet.parameters():
        if id(p) in wanted:
            p.requires_grad_(True)
    return [n for n, p in unet.named_parameters() if id(p) in wanted]


def trainable_names(unet: torch.nn.Module) -> list[str]:
    """Names of the parameters that currently require gradients."""
    return [n for n, p in unet.named_parameters() if p.requires_grad]


def count_trainable(unet: torch.nn.Module) -> int:
    """Number of trainable scalars in the UNet."""
    return sum(p.numel() for p in unet.parameters() if p.requires_grad)


def normalise_spec(spec: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """A method spec as a list of entry dicts (a single dict is one entry)."""
    if not isinstance(spec, (Mapping, list, tuple)):
        raise UserError(f"a method spec is a mapping or a list of mappings, got {spec!r}")
    entries = [spec] if isinstance(spec, Mapping) else list(spec)
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise UserError(
                f"method entry {i} must be a mapping with a 'method' key, got {entry!r}"
            )
        if "method" not in entry:
            raise UserError(f"method entry {i} has no 'method' key: {dict(entry)!r}")
    return [dict(e) for e in entries]


def apply_methods(
    unet: torch.nn.Module, spec: Mapping[str, Any] | Sequence[Mapping[str, Any]]
) -> Applied:
    """Freeze the UNet, apply each method entry to its units in order; what was applied.

    Methods, hyper-parameters and unit patterns are checked before the UNet is touched; a clash
    between two entries on one module is found while applying and leaves the UNet half-adapted.
    """
    if unet.__dict__.get(APPLIED_MARK):
        raise UserError("methods were already applied to this UNet; start again from the base UNet")
    entries = normalise_spec(spec)
    units = list_units(unet)
    resolved = []
    for entry in entries:
        params = dict(entry)
        method = get_method(params.pop("method"))
        selection = params.pop("units", "*")
        rates = entry_rates(method, params)
        cfg = make_config(method, params)
        resolved.append((method, selection, select_units(units, selection), cfg, rates))

    unet.requires_grad_(False)
    recorded: list[dict[str, Any]] = []
    own_rates: dict[str, float] = {}
    with _claims_of(unet):
        for method, selection, chosen, cfg, rates in resolved:
            names = method.apply(unet, chosen, cfg) if chosen else []
            _note_rates(unet, method, names, rates, own_rates)
            if chosen and not names and method.name != "freeze":
                log.warning("method %r trains nothing on units %r", method.name, selection)
            recorded.append(
                {"method": method.name, "units": selection, **dataclasses.asdict(cfg), **rates}
            )
    unet.__dict__[APPLIED_MARK] = True
    return Applied(names=trainable_names(unet), entries=recorded, rates=own_rates)


def _note_rates(
    unet: torch.nn.Module,
    method: Method,
    names: list[str],
    rates: dict[str, float],
    own_rates: dict[str, float],
) -> None:
    """Give an entry's trainable names its own rates in `own_rates` (the run's, if it has none)."""
    second = "lr_1d" in rates and method.secondary is not None
    for name in names:
        # A parameter two entries train takes the rate of the later entry (the run's, if none).
        rate = rates["lr_1d"] if second and method.secondary(unet, name) else rates.get("lr")
        if rate is None:
            own_rates.pop(name, None)
        else:
            own_rates[name] = rate


def entry_rates(method: Method, params: dict[str, Any]) -> dict[str, float]:
    """Pop and check an entry's own learning rates (`lr`, and `lr_1d` where the method has a second set)."""
    rates = {}
    for key in RATE_KEYS:
        if key in params:
            value = params.pop(key)
            if key == "lr_1d" and method.secondary is None:
                takers = ", ".join(m.name for m in _REGISTRY.values() if m.secondary) or "none"
                raise UserError(
                    f"{method.name}.lr_1d: {method.name} trains one parameter set, at lr; "
                    f"lr_1d is the rate of a method's second set (methods with one: {takers})"
                )
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise UserError(f"{method.name}.{key} must be a positive number, got {value!r}")
            rates[key] = float(value)
    return rates


def optimizer_groups(
    applied: Applied, unet: torch.nn.Module, lr: float, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """AdamW parameter groups over the trainable parameters, at the run's `lr` or their entry's own rate.

    A method entry with its own `lr` gives it to its parameters, and its `lr_1d` (methods with a second
    set only, e.g. SV-DIFF's norm-layer shifts) to that set. 1-D parameters (SV-DIFF's δ, DiffFit's γ,
    biases, norms) never get weight decay: decay would pull γ toward 0 rather than its identity value 1.
    Groups are named `matrices` / `vectors`, with `@RATE` appended for an entry's own rate. An empty
    list means nothing is trainable.
    """
    own = applied.rates
    groups: dict[tuple[str, float], dict[str, Any]] = {}
    for name, p in unet.named_parameters():
        if not p.requires_grad:
            continue
        kind = "matrices" if p.ndim >= 2 else "vectors"
        rate = own.get(name)
        label = kind if rate is None else f"{kind}@{rate:g}"
        rate = lr if rate is None else rate
        key = (label, rate)
        if key not in groups:
            decay = weight_decay if kind == "matrices" else 0.0
            groups[key] = {"name": label, "params": [], "lr": rate, "weight_decay": decay}
        groups[key]["params"].append(p)
    return list(groups.values())


def trained_units(
    unet: torch.nn.Module, spec: Mapping[str, Any] | Sequence[Mapping[str, Any]]
) -> list[Unit]:
    """The units of a base UNet in which `spec` trains something (applied to the UNet, which it adapts)."""
    units = list_units(unet)
    owner = {module: unit.name for unit in units for module in unit.modules}
    hit = set()
    for name in apply_methods(unet, spec).names:
        parts = name.split(".")
        # A trainable name starts with the module it changes (`X.weight`, `X.parametrizations...`,
        # `X.lora_A...`, `X.difffit_gamma`): the longest known module prefix is its owner.
        for cut in range(len(parts) - 1, 0, -1):
            unit = owner.get(".".join(parts[:cut]))
            if unit is not None:
                hit.add(unit)
                break
    return [u for u in units if u.name in hit]


def unit_modules(units: Sequence[Unit]) -> list[str]:
    """The parameter-holding module names of the units, in order, without repeats."""
    return list(dict.fromkeys(m for unit in units for m in unit.modules))
