"""The mitigation registry and the one parser of mitigation lists (re-exported by the package).

Mitigation files import from here, never from the package, so that the package may import them
without a cycle. Nothing here imports torch: the settings validate mitigation lists while the command
line starts.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from capsearch.errors import UserError

# The stage of a training step a mitigation acts on, in the order a step runs them.
CAPTION = "caption"  # the captions drawn for a batch (and, before training, fixed per record)
EMBEDDING = "embedding"  # the text encoder's states of those captions
LOSS = "loss"  # the batch's per-sample losses: samples filtered out of the mean
STAGES = (CAPTION, EMBEDDING, LOSS)


@dataclass(frozen=True)
class MitigationConfig:
    """Parameters of a mitigation; each mitigation subclasses it with its own fields and defaults."""

    name: ClassVar[str] = ""  # set by register_mitigation

    def check(self) -> None:
        """UserError naming the mitigation if a value is outside its range (types are checked)."""


@dataclass(frozen=True)
class Mitigation:
    """A registered mitigation: its name, config class, stage and the hooks that apply it."""

    name: str
    config: type[MitigationConfig]
    stage: str  # CAPTION, EMBEDDING or LOSS
    order: int  # its place among its stage's mitigations, whatever the order of the list
    apply: Callable[..., Any]  # the stage's hook (signatures: capsearch.training.mitigations.stack)
    prepare: Callable[..., dict[int, str]] | None = (
        None  # captions fixed per record before training
    )
    shorthand: str | None = None  # a TrainSettings field named after it sets this parameter
    vocabulary: bool = False  # needs the tokenizer's words (vocabulary_words)


_REGISTRY: dict[str, Mitigation] = {}


def register_mitigation(
    name: str,
    config: type[MitigationConfig],
    *,
    stage: str,
    order: int = 0,
    prepare: Callable[..., dict[int, str]] | None = None,
    shorthand: str | None = None,
    vocabulary: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a stage hook under a mitigation name.

    `prepare(cfg, captions, groups, seed, words)` returns the captions it fixes per training record
    before training; `shorthand`: a TrainSettings field of the mitigation's name is this parameter's
    value for every run (0 turns it off), applied before `train.mitigations` (caption dropout's `p`).
    """

    def decorate(apply: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY:
            raise ValueError(f"mitigation {name!r} is registered twice")
        if stage not in STAGES:
            raise ValueError(f"mitigation {name!r}: unknown stage {stage!r}")
        config.name = name
        _REGISTRY[name] = Mitigation(
            name, config, stage, order, apply, prepare, shorthand, vocabulary
        )
        return apply

    return decorate


def mitigation_names() -> list[str]:
    """Names of all registered mitigations, in registration order."""
    return list(_REGISTRY)


def get_mitigation(name: str) -> Mitigation:
    """The registered mitigation of that name (UserError listing the known ones otherwise)."""
    if name not in _REGISTRY:
        raise UserError(f"unknown mitigation {name!r}; choose from {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def mitigation_params(name: str) -> dict[str, type | tuple[str, ...]]:
    """Each parameter of a mitigation: the type it converts to, or the tuple of allowed strings."""
    hints = typing.get_type_hints(get_mitigation(name).config)
    out: dict[str, type | tuple[str, ...]] = {}
    for f in dataclasses.fields(get_mitigation(name).config):
        kind = hints[f.name]
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if typing.get_origin(kind) is typing.Literal:
            out[f.name] = tuple(typing.get_args(kind))
        else:
            out[f.name] = args[0] if args else kind  # `float | None`: a float, or left out
    return out


def _convert(name: str, key: str, value: object, kind: type | tuple[str, ...]) -> object:
    if isinstance(kind, tuple):
        if value not in kind:
            raise UserError(
                f"mitigation {name}: {key} must be one of {', '.join(kind)}, got {value!r}"
            )
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"mitigation {name}: {key} must be a number, got {value!r}")
    if kind is int and value != int(value):
        raise UserError(f"mitigation {name}: {key} must be an integer, got {value!r}")
    return kind(value)


def make_config(name: str, params: Mapping[str, Any]) -> MitigationConfig:
    """One mitigation's config from its parameters: unknown ones, wrong types and ranges are UserErrors."""
    registered = get_mitigation(name)
    kinds = mitigation_params(name)
    values = {}
    for key, value in params.items():
        if key not in kinds:
            raise UserError(
                f"mitigation {name}: unknown parameter {key!r} (allowed: {', '.join(kinds)})"
            )
        values[key] = _convert(name, key, value, kinds[key])
    try:
        config = registered.config(**values)
    except TypeError:
        missing = [
            f.name
            for f in dataclasses.fields(registered.config)
            if f.name not in values and f.default is dataclasses.MISSING
        ]
        raise UserError(f"mitigation {name}: missing parameter {', '.join(missing)}") from None
    config.check()
    return config


def parse_mitigations(items: Sequence[Mapping[str, Any]]) -> tuple[MitigationConfig, ...]:
    """Validate a mitigation list `[{"name": ..., **params}, ...]` into configs, in list order.

    An unknown name or parameter, a bad value, or a name twice is a UserError; `none` entries are
    skipped. A list is parsed once per process (the settings validate it; the training loop reads it).
    """
    # Keyed by content: a value JSON cannot hold is kept as its text, which the type check refuses.
    return _parse(json.dumps([dict(item) for item in items or []], default=repr))


@functools.lru_cache(maxsize=256)
def _parse(text: str) -> tuple[MitigationConfig, ...]:
    configs: list[MitigationConfig] = []
    for item in json.loads(text):
        name = item.pop("name", None)
        if name in (None, "none"):
            continue
        get_mitigation(name)
        if any(c.name == name for c in configs):
            raise UserError(f"mitigation {name} is listed twice; a run applies each one once")
        configs.append(make_config(name, item))
    return tuple(configs)


def shorthand_mitigations(settings: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The mitigations that training settings set through their shorthand fields (those above 0)."""
    out = []
    for m in _REGISTRY.values():
        value = settings.get(m.name) if m.shorthand else None
        if value:
            out.append({"name": m.name, m.shorthand: value})
    return out


def train_mitigations(train: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every mitigation of a `train` section or record: its shorthand fields first, then `mitigations`.

    A record written before a shorthand field existed lacks it, and holds that mitigation in its list.
    """
    return shorthand_mitigations(train) + [dict(m) for m in train.get("mitigations") or []]


def shorthand_fields() -> list[str]:
    """The TrainSettings fields that are a mitigation's shorthand (their names are the mitigations')."""
    return [m.name for m in _REGISTRY.values() if m.shorthand]
