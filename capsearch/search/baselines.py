"""The paper's baselines as fixed points of the search space: each method on every group allowing it.

Baseline `M` sets every group that allows `M` to `M` and every other group to `frozen`; its searched
hyper-parameters take the value's `default`, else the method's own default inside the range, else the
middle of the range (geometric middle for log ranges). capsearch.search.coverage checks that the groups allowing
`M` hold everything `M` trains on the whole UNet, so the baseline is what its name says.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from capsearch.errors import UserError
from capsearch.methods import get_method
from capsearch.search.space import (
    FROZEN,
    Baseline,
    Group,
    Param,
    SearchSpace,
    _is_number,
    params_to_method_spec,
    params_to_mitigations,
)
from capsearch.settings import Strict


class FixedTrial(Strict):
    """A configuration run by name like a baseline (`baselines.fixed`): a found one confirmed on other
    seeds or data, or a stopped trial run to its end. Its parameters are given, or read once from a
    trial folder's params.json (`trial`, kept as the parameters' source)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.+-]+$")
    params: dict[str, Any] | None = None
    trial: str | None = None

    @model_validator(mode="after")
    def _read_trial(self) -> FixedTrial:
        if self.params is None and self.trial is None:
            raise ValueError("give params, or trial (a trial folder) to read them from")
        if self.params is None:
            path = Path(self.trial) / "params.json"
            try:
                self.params = dict(json.loads(path.read_text())["params"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"cannot read the parameters of {path}: {exc}") from None
        return self


def fixed_points(
    space: SearchSpace, fixed: Sequence[FixedTrial], taken: set[str]
) -> list[Baseline]:
    """`baselines.fixed` as baselines: each checked against the space (one line naming it if not)."""
    points = []
    for i, entry in enumerate(fixed):
        where = f"baselines.fixed[{i}]"
        if entry.name in taken:
            raise UserError(f"{where}.name: {entry.name!r} is already a baseline's name")
        taken.add(entry.name)
        params = dict(entry.params or {})
        try:
            params_to_method_spec(params, space)
            params_to_mitigations(params, space, [])
        except UserError as exc:
            raise UserError(f"{where}.params: {exc}") from None
        points.append(Baseline(entry.name, "fixed", params.get("mitigation", "none"), params, {}))
    return points


def baseline_value(p: Param, method_default: Any = None) -> Any:
    """The value a baseline uses for a searched parameter: its default, the method's, or the middle."""
    if p.kind == "fixed":
        return p.value
    if p.default is not None:
        return p.default
    if p.kind == "categorical":
        return method_default if method_default in p.choices else p.choices[0]
    if _is_number(method_default) and p.low <= method_default <= p.high:
        return int(method_default) if p.kind == "int" else float(method_default)
    middle = math.sqrt(p.low * p.high) if p.log else (p.low + p.high) / 2
    return int(round(middle)) if p.kind == "int" else float(middle)


def _method_default(method: str, key: str) -> Any:
    for f in dataclasses.fields(get_method(method).config):
        if f.name == key and f.default is not dataclasses.MISSING:
            return f.default
    return None


def _frozen_choice(group: Group) -> str | None:
    return next((name for name in group.methods if name in FROZEN), None)


def baseline_points(
    space: SearchSpace,
    methods: Sequence[str],
    mitigations: Sequence[str],
    train: Mapping[str, Mapping[str, Any]],
    defaults: Mapping[str, Any],
) -> list[Baseline]:
    """Each baseline method × mitigation as a fixed point: the method on every group allowing it.

    `train` holds per-method overrides of lr / steps, `defaults` the spec's train values.
    Freeze trains nothing, so it runs once whatever the mitigations.
    """
    points = []
    for i, method in enumerate(methods):
        where = f"baselines.methods[{i}]"
        frozen = method in FROZEN
        params: dict[str, Any] = {}
        used = False
        for group in space.groups:
            if not frozen and method in group.methods:
                choice, used = method, True
            else:
                choice = _frozen_choice(group)
                if choice is None:
                    what = (
                        "does not allow frozen"
                        if frozen
                        else f"allows neither {method!r} nor frozen"
                    )
                    raise UserError(f"{where}: group {group.name!r} {what}")
            params[f"{group.name}.method"] = choice
            for key, p in group.methods[choice].params.items():
                if p.searched:
                    default = None if choice in FROZEN else _method_default(choice, key)
                    params[f"{group.name}.{choice}.{key}"] = baseline_value(p, default)
        if not frozen and not used:
            raise UserError(f"{where}: no group of space.groups allows {method!r}")
        overrides = dict(train.get(method, {}))
        settings = {k: overrides.get(k, defaults.get(k)) for k in ("lr", "steps")}
        for name, value in settings.items():
            p = getattr(space, name)
            if p is None or not p.searched:
                continue
            if value is None:
                value = baseline_value(p)
            inside = value in p.choices if p.kind == "categorical" else p.low <= value <= p.high
            if not inside:
                source = (
                    f"baselines.train.{method}.{name}" if name in overrides else f"train.{name}"
                )
                allowed = p.choices if p.kind == "categorical" else f"[{p.low}, {p.high}]"
                raise UserError(
                    f"{source}: {value} lies outside space.{name} {allowed}; "
                    "baselines are points of the searched space"
                )
            params[name] = value
        for mitigation in ["none"] if frozen else mitigations:
            if mitigation not in space.mitigations:
                raise UserError(
                    f"baselines.mitigations: {mitigation!r} is not among space.mitigations "
                    f"({', '.join(space.mitigations)})"
                )
            point = dict(params, mitigation=mitigation)
            for key, p in space.mitigations[mitigation].params.items():
                if p.searched:
                    point[f"mitigation.{mitigation}.{key}"] = baseline_value(p)
            name = method if mitigation == "none" else f"{method}+{mitigation}"
            points.append(Baseline(name, method, mitigation, point, overrides))
    names = [b.name for b in points]
    if len(set(names)) != len(names):
        raise UserError("baselines: a method or mitigation is listed twice")
    return points
