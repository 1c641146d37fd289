"""Hyper-parameters of a search space: YAML values read as fixed, ranged or categorical, and suggested.

A value in a spec's space is a scalar (fixed), `[low, high]` or `{low, high, log, step, default}` (a
range), or `{choices: [...], default}` (categorical); `suggest_param` asks Optuna for one
(define-by-run, capsearch.search.space).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from capsearch.errors import UserError


@dataclass(frozen=True)
class Param:
    """A hyper-parameter: a fixed value, an int/float range, or a categorical choice."""

    kind: str  # "fixed" | "int" | "float" | "categorical"
    value: Any = None
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()
    default: Any = None

    @property
    def searched(self) -> bool:
        """Whether the sampler chooses this value."""
        return self.kind != "fixed"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_param(value: Any, where: str, log_default: bool = False) -> Param:
    """Read one YAML hyper-parameter: scalar (fixed), [low, high], {low, high, ...} or {choices: [...]}."""
    if isinstance(value, Mapping):
        keys = set(value)
        if "choices" in keys:
            extra = keys - {"choices", "default"}
            if extra:
                raise UserError(
                    f"{where}.{sorted(extra)[0]}: unknown key (allowed: choices, default)"
                )
            choices = value["choices"]
            if not isinstance(choices, list) or not choices:
                raise UserError(f"{where}.choices: must be a non-empty list")
            for c in choices:
                if c is not None and not isinstance(c, (bool, int, float, str)):
                    raise UserError(f"{where}.choices: {c!r} is not a number, string or boolean")
            if len(set(map(repr, choices))) != len(choices):
                raise UserError(f"{where}.choices: values repeat")
            default = value.get("default")
            if "default" in value and default not in choices:
                raise UserError(f"{where}.default: {default!r} is not one of the choices")
            return Param("categorical", choices=tuple(choices), default=default)
        extra = keys - {"low", "high", "log", "step", "default"}
        if extra or not {"low", "high"} <= keys:
            bad = sorted(extra)[0] if extra else None
            if bad:
                raise UserError(
                    f"{where}.{bad}: unknown key (allowed: low, high, log, step, default or choices)"
                )
            raise UserError(f"{where}: a range needs both low and high (or use choices: [...])")
        return _range(
            value["low"],
            value["high"],
            where,
            value.get("log", log_default),
            value.get("step"),
            value.get("default"),
        )
    if isinstance(value, list):
        if len(value) == 2 and all(_is_number(v) for v in value):
            return _range(value[0], value[1], where, log_default, None, None)
        if value and all(isinstance(v, str) for v in value):
            return Param("fixed", value=tuple(value))
        if not value:
            raise UserError(f"{where}: empty list")
        raise UserError(
            f"{where}: a list must be [low, high] (two numbers) or a list of names; "
            "write {choices: [...]} for a categorical choice"
        )
    if value is None or isinstance(value, (bool, int, float, str)):
        return Param("fixed", value=value)
    raise UserError(f"{where}: unsupported value {value!r}")


def _range(low: Any, high: Any, where: str, log: Any, step: Any, default: Any) -> Param:
    if not (_is_number(low) and _is_number(high)):
        raise UserError(f"{where}: low and high must be numbers, got {low!r} and {high!r}")
    if not isinstance(log, bool):
        raise UserError(f"{where}.log: must be true or false, got {log!r}")
    if step is not None and (not _is_number(step) or step <= 0):
        raise UserError(f"{where}.step: must be a positive number, got {step!r}")
    if not low < high:
        raise UserError(f"{where}: low ({low}) must be below high ({high})")
    if log and low <= 0:
        raise UserError(f"{where}: a log range needs low > 0, got {low}")
    if log and step is not None:
        raise UserError(f"{where}: a range cannot have both log and step")
    integer = (
        isinstance(low, int) and isinstance(high, int) and (step is None or isinstance(step, int))
    )
    if default is not None and not (_is_number(default) and low <= default <= high):
        raise UserError(f"{where}.default: {default!r} is not within [{low}, {high}]")
    return Param(
        "int" if integer else "float", low=low, high=high, log=log, step=step, default=default
    )


def param_values(p: Param) -> list[Any]:
    """Representative values of a parameter (for type checks): the value, the bounds or the choices."""
    if p.kind == "fixed":
        return [list(p.value) if isinstance(p.value, tuple) else p.value]
    if p.kind == "categorical":
        return list(p.choices)
    return [p.low, p.high] + ([p.default] if p.default is not None else [])


def _positive_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def corner(p: Param, low_end: bool) -> Any:
    """A parameter's low or high end (its value if fixed, its first or last choice if categorical)."""
    if p.kind == "fixed":
        return p.value
    if p.kind == "categorical":
        return p.choices[0 if low_end else -1]
    return p.low if low_end else p.high


def suggest_param(trial: Any, name: str, p: Param) -> Any:
    """Ask an Optuna trial for one parameter (fixed ones are returned without asking)."""
    if p.kind == "fixed":
        return p.value
    if p.kind == "categorical":
        return trial.suggest_categorical(name, list(p.choices))
    if p.kind == "int":
        return trial.suggest_int(name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
    return trial.suggest_float(name, float(p.low), float(p.high), step=p.step, log=p.log)
