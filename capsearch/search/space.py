"""The search space of a spec: unit groups × methods × hyper-parameters, suggested define-by-run.

Each unit group chooses one allowed method (or `frozen`); only the chosen method's hyper-parameters are
suggested, so Optuna never samples a LoRA rank for a group that DiffFit trains. Parameter names are
`GROUP.method`, `GROUP.METHOD.KEY`, `lr`, `steps`, `mitigation` and `mitigation.NAME.KEY`.
A method may carry its own `lr` (`GROUP.METHOD.lr`): that group then trains at that rate instead of
the run's, so PEFT methods and full fine-tuning each get a rate that suits them. A method with a second
parameter set (SV-DIFF's norm-layer shifts) may also carry `lr_1d`, that set's rate.
The paper's baselines are fixed points of the same space (`baseline_points`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from capsearch.errors import UserError
from capsearch.methods import RATE_KEYS, entry_rates, get_method, make_config
from capsearch.search.params import (
    Param,
    _is_number,  # noqa: F401  (capsearch.search.baselines reads it from here)
    _positive_number,
    corner,
    param_values,
    parse_param,
    suggest_param,
)
from capsearch.training.mitigations import make_config as make_mitigation
from capsearch.training.mitigations import (
    mitigation_names,
    mitigation_params,
    shorthand_fields,
    train_mitigations,
)

FROZEN = ("frozen", "freeze")  # a group left untouched: no method entry at all
RESERVED_GROUP_NAMES = ("lr", "steps", "mitigation", "baseline")


@dataclass(frozen=True)
class Choice:
    """One allowed method (or mitigation) with its hyper-parameters."""

    name: str
    params: Mapping[str, Param] = field(default_factory=dict)


@dataclass(frozen=True)
class Group:
    """A named selection of units and the methods it may be trained with."""

    name: str
    units: tuple[str, ...]
    methods: Mapping[str, Choice]


@dataclass(frozen=True)
class SearchSpace:
    """Everything a trial's parameters are drawn from."""

    groups: tuple[Group, ...]
    mitigations: Mapping[str, Choice]
    lr: Param | None = None
    steps: Param | None = None


@dataclass(frozen=True)
class Baseline:
    """A paper baseline as a fixed point of the space: its name, parameters and training overrides."""

    name: str
    method: str
    mitigation: str
    params: Mapping[str, Any]
    train: Mapping[str, Any]


# --- parsing ---------------------------------------------------------------------------------------


def build_space(space_spec: Any) -> SearchSpace:
    """Parse a validated `space:` section (groups, methods, ranges, mitigations) into a SearchSpace."""
    groups = []
    names: set[str] = set()
    for i, group in enumerate(space_spec.groups):
        where = f"space.groups[{i}]"
        if group.name in names:
            raise UserError(f"{where}.name: {group.name!r} is used by another group")
        if group.name in RESERVED_GROUP_NAMES:
            raise UserError(f"{where}.name: {group.name!r} is reserved")
        names.add(group.name)
        methods = {}
        for method, raw in group.methods.items():
            methods[method] = _method_choice(method, raw, f"{where}.methods.{method}")
        groups.append(Group(group.name, tuple(group.units), methods))
    mitigations = {
        name: _mitigation_choice(name, raw, f"space.mitigations.{name}")
        for name, raw in space_spec.mitigations.items()
    }
    lr = steps = None
    if space_spec.lr is not None:
        lr = parse_param(space_spec.lr, "space.lr", log_default=True)
        for v in param_values(lr):
            if not _positive_number(v):
                raise UserError(f"space.lr: {v!r} is not a positive number")
    if space_spec.steps is not None:
        steps = parse_param(space_spec.steps, "space.steps")
        for v in param_values(steps):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserError(f"space.steps: {v!r} is not a positive integer")
    return SearchSpace(tuple(groups), mitigations, lr, steps)


def _method_choice(method: str, raw: Mapping[str, Any], where: str) -> Choice:
    if method in FROZEN:
        if raw:
            raise UserError(f"{where}: {method} takes no hyper-parameters")
        return Choice(method, {})
    try:
        registered = get_method(method)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    params = {}
    for key, value in raw.items():
        if key in RATE_KEYS:  # the method's own learning rate(s), searched on a log scale
            try:
                entry_rates(registered, {key: 1.0})  # lr_1d only where the method has a second set
            except UserError as exc:
                raise UserError(f"{where}: {exc}") from None
            p = parse_param(value, f"{where}.{key}", log_default=True)
            for v in param_values(p):
                if not _positive_number(v):
                    raise UserError(f"{where}.{key}: {v!r} is not a positive number")
            params[key] = p
            continue
        p = parse_param(value, f"{where}.{key}")
        for v in param_values(p):
            try:
                make_config(registered, {key: v})
            except UserError as exc:
                raise UserError(f"{where}.{key}: {exc}") from None
            except (TypeError, ValueError) as exc:
                raise UserError(f"{where}.{key}: {exc}") from None
        params[key] = p
    return Choice(method, params)


def _mitigation_choice(name: str, raw: Mapping[str, Any], where: str) -> Choice:
    if name == "none":
        if raw:
            raise UserError(f"{where}: none takes no parameters")
        return Choice(name, {})
    if name not in mitigation_names():
        known = ", ".join(mitigation_names())
        raise UserError(f"{where}: unknown mitigation; choose from none, {known}")
    kinds = mitigation_params(name)
    params = {}
    for key, value in raw.items():
        if key not in kinds:
            raise UserError(f"{where}.{key}: unknown parameter (allowed: {', '.join(kinds)})")
        p = parse_param(value, f"{where}.{key}")
        allowed = kinds[key]
        for v in param_values(p):
            if isinstance(allowed, tuple):  # a named choice, e.g. rwa's mode
                if v not in allowed:
                    choices = ", ".join(allowed)
                    raise UserError(f"{where}.{key}: must be one of {choices}, got {v!r}")
                continue
            integer = allowed is int
            ok = isinstance(v, int) if integer else isinstance(v, (int, float))
            if isinstance(v, bool) or not ok:
                kind = "an integer" if integer else "a number"
                raise UserError(f"{where}.{key}: must be {kind}, got {v!r}")
        params[key] = p
    for low_end in (True, False):  # the low ends, then the high ends, checked by the registry
        try:
            make_mitigation(name, {k: corner(p, low_end) for k, p in params.items()})
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
    return Choice(name, params)


# --- define-by-run ---------------------------------------------------------------------------------


# The keys define_space (and the driver, for a plan it could not build) adds to a Ray trial's config
# beside Optuna's parameters.
CONFIG_EXTRAS = ("_number", "baseline", "retry_of", "plan_error")


def define_space(trial: Any, space: SearchSpace) -> dict[str, Any]:
    """Optuna define-by-run space: a method per group, then only that method's hyper-parameters.

    Returns the constants Ray Tune adds to the trial config (CONFIG_EXTRAS): the Optuna trial number
    and, from the trial's user attributes, an enqueued baseline's name or the number of the interrupted
    trial that an enqueued retry runs again.
    """
    for group in space.groups:
        method = trial.suggest_categorical(f"{group.name}.method", list(group.methods))
        for key, p in group.methods[method].params.items():
            suggest_param(trial, f"{group.name}.{method}.{key}", p)
    for name in ("lr", "steps"):
        p = getattr(space, name)
        if p is not None and p.searched:
            suggest_param(trial, name, p)
    mitigation = trial.suggest_categorical("mitigation", list(space.mitigations))
    for key, p in space.mitigations[mitigation].params.items():
        suggest_param(trial, f"mitigation.{mitigation}.{key}", p)
    extra: dict[str, Any] = {"_number": trial.number}
    attrs = trial.user_attrs or {}
    if attrs.get("baseline"):
        extra["baseline"] = attrs["baseline"]
    if attrs.get("retry_of") is not None:
        extra["retry_of"] = int(attrs["retry_of"])
    return extra


def _value(params: Mapping[str, Any], name: str, p: Param) -> Any:
    if p.kind == "fixed":
        return list(p.value) if isinstance(p.value, tuple) else p.value
    if name not in params:
        raise UserError(f"trial parameters lack {name!r} (the spec changed since the trial ran?)")
    return params[name]


def params_to_method_spec(params: Mapping[str, Any], space: SearchSpace) -> list[dict[str, Any]]:
    """The apply_methods spec of a trial: one entry per unit group whose method is not frozen."""
    spec = []
    for group in space.groups:
        method = params.get(f"{group.name}.method")
        if method not in group.methods:
            raise UserError(f"trial parameter {group.name}.method={method!r} is not allowed")
        if method in FROZEN:
            continue
        entry: dict[str, Any] = {"method": method, "units": list(group.units)}
        for key, p in group.methods[method].params.items():
            entry[key] = _value(params, f"{group.name}.{method}.{key}", p)
        spec.append(entry)
    return spec


def params_to_mitigations(
    params: Mapping[str, Any], space: SearchSpace, base: Sequence[Mapping[str, Any]] = ()
) -> list[dict[str, Any]]:
    """A trial's training mitigations as capsearch.training.loop expects them: `base`, then the chosen one."""
    name = params.get("mitigation", "none")
    if name not in space.mitigations:
        raise UserError(f"trial parameter mitigation={name!r} is not allowed")
    stacked = [dict(m) for m in base]
    if name != "none":
        choice = space.mitigations[name]
        values = {k: _value(params, f"mitigation.{name}.{k}", p) for k, p in choice.params.items()}
        make_mitigation(name, values)  # a fixed trial's values may lie outside the space's ranges
        stacked.append({"name": name, **values})
    return stacked


def base_mitigations(
    caption_dropout: float, others: Sequence[Mapping[str, Any]] = ()
) -> list[dict[str, Any]]:
    """Caption dropout (when above 0), then others: a `train` record's mitigations (train_mitigations)."""
    # Kept for readers of records that still call it; capsearch.training.mitigations.train_mitigations
    # is the general form.
    return train_mitigations({"caption_dropout": caption_dropout, "mitigations": list(others)})


def check_base_mitigations(base: Sequence[Mapping[str, Any]], space: SearchSpace) -> None:
    """No mitigation every trial applies (`base`, parsed by the settings) may also be a choice of
    space.mitigations."""
    names = {m["name"] for m in base}
    for name in space.mitigations:
        if name in names:
            fields = ", ".join(f"train.{f}" for f in shorthand_fields())
            raise UserError(
                f"space.mitigations.{name}: train already applies {name} to every trial "
                f"({fields}, train.mitigations); remove it from one of them"
            )


def params_to_train(params: Mapping[str, Any], space: SearchSpace) -> dict[str, Any]:
    """Training settings the space decides (lr, steps), fixed or sampled."""
    out = {}
    for name in ("lr", "steps"):
        p = getattr(space, name)
        if p is not None:
            out[name] = _value(params, name, p)
    return out


def group_choices(params: Mapping[str, Any], space: SearchSpace) -> dict[str, str]:
    """Each group's chosen method as short text, e.g. {"attn_up": "lora(rank=4)", "mid": "frozen"}."""
    out = {}
    for group in space.groups:
        method = params.get(f"{group.name}.method", "?")
        choice = group.methods.get(method)
        hyper = []
        for key, p in choice.params.items() if choice else ():
            value = _value(params, f"{group.name}.{method}.{key}", p)
            value = f"{value:.3g}" if isinstance(value, float) else value
            hyper.append(f"{key}={'/'.join(value) if isinstance(value, list) else value}")
        out[group.name] = method + (f"({','.join(hyper)})" if hyper else "")
    return out
