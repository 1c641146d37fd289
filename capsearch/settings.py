"""Typed settings: the strict pydantic base every settings class uses, and its one-line error messages.

Each stage has one settings class: `TrainSettings` (a fine-tune, capsearch.training.loop) and `EvalSettings`
(an evaluation, capsearch.metrics.evaluate) here, the whole search `Spec` in capsearch.config. A YAML spec, a
command line (`add_flags`) and a library caller all build the same class, and every error names the
path of the offending key. This module imports no torch, so the command line stays quick to start.
"""

from __future__ import annotations

import argparse
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from capsearch.errors import UserError
from capsearch.training.mitigations import (
    MitigationConfig,
    parse_mitigations,
    shorthand_fields,
    train_mitigations,
)

T = TypeVar("T", bound="Strict")


class Strict(BaseModel):
    """A settings model: unknown keys rejected, values not coerced across types, numbers finite."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @classmethod
    def parse(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
        """Validate plain data; a bad value is one UserError line naming its path under `where`."""
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            message = first_error(exc, cls)
            raise UserError(f"{where}.{message}" if where else message) from None


# --- the settings of each stage ---------------------------------------------------------------


class TrainSettings(Strict):
    """Hyper-parameters of one fine-tune: a spec's `train:` section, `capsearch train`'s flags, a trial's plan."""

    steps: int = Field(300, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-4, gt=0)  # method entries may carry their own (methods.optimizer_groups)
    lr_schedule: str = "constant"  # any diffusers.optimization scheduler name
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_accum: int = Field(1, ge=1)
    # auto: bf16 or fp16 on a GPU; on a CPU, capsearch.training.precision.CPU_AUTO (resolve_precision)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    gradient_checkpointing: bool = False
    # Encode the frozen parts once per fine-tune: text states per caption, VAE posteriors per image
    # (capsearch.training.encode_cache); off encodes every batch afresh. Same losses up to rounding.
    cache_encodings: bool = True
    ema_decay: float | None = Field(None, gt=0, lt=1)
    seed: int = 0
    size: int = Field(32, ge=8)
    max_grad_norm: float = Field(1.0, ge=0)
    checkpoint_every: int = Field(0, ge=0)
    probe_every: int = Field(0, ge=0)
    # With N > 0 each probe also samples N of the data's memorised captions (fixed for the run) and
    # records `own_share`, the share of samples nearest their own training image; the probe score
    # then grows with its excess over chance (capsearch.training.probe). 0: not sampled, the score as
    # without it.
    probe_own_captions: int = Field(0, ge=0)
    # Keep the delta (the EMA weights where ema_decay is set) every N steps before the last, in
    # out_dir/deltas/stepNNNNNN/, so that memorisation can be attacked at points of one run after it
    # trained (memorisation at matched quality, docs/results.md). 0: only the final delta.
    keep_deltas_every: int = Field(0, ge=0)
    # Sample-preview grids every N steps (0: off) in out_dir/previews and TensorBoard; prompts: these,
    # or the first training captions (capsearch.training.previews). Previews never touch the training RNG.
    preview_every: int = Field(0, ge=0)
    preview_prompts: list[str] = Field(default_factory=list)
    # Every fine-tune trains with caption dropout first (Dutt et al.'s code and Stable Diffusion use
    # 0.1; it also trains the unconditional branch guidance samples with): the shorthand field of
    # that mitigation (capsearch.training.mitigations), then `mitigations` stacked.
    caption_dropout: float = Field(0.1, ge=0, le=1)
    mitigations: list[dict[str, Any]] = Field(default_factory=list)

    @field_validator("lr_schedule")
    @classmethod
    def _known_schedule(cls, name: str) -> str:
        """A schedule diffusers' get_scheduler knows, named here and not a minute into a trial."""
        # lazy: diffusers loads only where a schedule name is checked (not for `capsearch --help`)
        from diffusers.optimization import SchedulerType

        known = [kind.value for kind in SchedulerType]
        if name not in known:
            raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(known)}")
        return name

    @field_validator("warmup_steps")
    @classmethod
    def _warmup_within_run(cls, warmup: int, info: ValidationInfo) -> int:
        steps = info.data.get("steps")
        if steps is not None and warmup > steps:
            raise ValueError(f"{warmup} warm-up steps are longer than the run ({steps} steps)")
        return warmup

    @field_validator("mitigations")
    @classmethod
    def _parsed(cls, items: list[dict[str, Any]], info: ValidationInfo) -> list[dict[str, Any]]:
        # The shorthand fields come first in the class, so they are validated (info.data) by now.
        shorthands = {name: info.data.get(name) for name in shorthand_fields()}
        try:
            parse_mitigations(train_mitigations({**shorthands, "mitigations": items}))
        except UserError as exc:
            twice = [f for f in shorthands if f"{f} is listed twice" in str(exc)]
            hint = f" (train.{twice[0]} counts)" if twice else ""
            raise ValueError(f"{exc}{hint}") from None
        return items

    def all_mitigations(self) -> list[dict[str, Any]]:
        """The shorthand fields' mitigations (caption dropout, if above 0), then `mitigations`."""
        return train_mitigations(self.model_dump(include={*shorthand_fields(), "mitigations"}))

    def mitigation_stack(self) -> tuple[MitigationConfig, ...]:
        """Every mitigation of the run, parsed (once: the validation above parsed the same list)."""
        return parse_mitigations(self.all_mitigations())


# TrainSettings fields that change what a fine-tune records or how fast it runs, not what it trains
# (cache_encodings: bit-identical losses and weights either way, tests/test_encode_cache.py).
RECORD_ONLY = frozenset({"preview_every", "preview_prompts", "cache_encodings"})


def same_training(recorded: Mapping[str, Any], planned: Mapping[str, Any]) -> bool:
    """Whether two `train` records (plain data) train identically: defaults filled in (a record
    written before a field existed has the field's default), the record-only fields set aside."""
    try:
        a, b = (TrainSettings.parse(x).model_dump(exclude=RECORD_ONLY) for x in (recorded, planned))
    except UserError:
        return False
    return a == b


class EvalSettings(Strict):
    """Sample counts and sampler settings of one evaluation (a spec's `evaluate:`, recorded in metrics.json)."""

    n_prompts: int = Field(24, ge=2)  # held-out prompts for FID / KID / AMD / image-text score
    n_per_prompt: int = Field(4, ge=1)
    steps: int = Field(20, ge=1)
    guidance: float = 3.0
    seed: int = 0
    # The attack's prompts: every memorised caption always, then other training captions until there
    # are this many in all (none of the others when the memorised captions alone reach it).
    extraction_prompts: int = Field(8, ge=0)
    extraction_n: int = Field(16, ge=1)
    extraction_threshold: float | None = None  # None: the world's default (docs/metrics.md)
    # Guidance of the attack's samples (None: `guidance`). A model fine-tuned without caption dropout
    # keeps its base's unconditional prediction, and guidance then buries its copies under texture:
    # docs/metrics.md measured 9 of 9 memorised images extracted at guidance 1, 2 at 3, 0 at 7.5.
    extraction_guidance: float | None = None
    min_clique: int = Field(3, ge=2)
    strength_prompts: int = Field(8, ge=1)
    strength_n: int = Field(2, ge=1)
    # auto: phantom scorer in pixel space (tiny), torchxrayvision DenseNet for latent SD
    extractor: Literal["auto", "phantom", "xrv"] = "auto"
    # Held-out split for the prompts and the FID/KID reference: validate while searching, test in the
    # final re-evaluation (select on one split, report on another); never train, whose copies lower FID.
    split: Literal["validate", "test"] = "validate"
    reference_ratio: float = Field(4.0, ge=1)  # reference images per generated sample, at least
    bootstrap: int = Field(1000, ge=100)  # prompt resamplings per bootstrap interval
    noise_floor_repeats: int = Field(20, ge=2)
    batch_size: int = Field(64, ge=1)
    # The UNet's calls while sampling: bf16 autocast or the model's own dtype (no); auto: the model's
    # own on a GPU, on a CPU capsearch.models.precision.CPU_SAMPLING_AUTO where it has native bf16.
    precision: Literal["auto", "no", "bf16"] = "auto"
    cache_dir: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _removed_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in ("fid_reference", "prompt_split"):
                if key in data:
                    raise ValueError(
                        f"{key} was removed: prompts and the FID reference both come from the "
                        "held-out evaluate.split (validate while searching, test in the final stage)"
                    )
        return data

    @model_validator(mode="after")
    def _clique_fits(self) -> EvalSettings:
        if self.extraction_n < self.min_clique:
            raise ValueError("extraction_n must be at least min_clique")
        return self

    @property
    def samples(self) -> int:
        """Generated samples compared with the reference."""
        return self.n_prompts * self.n_per_prompt


# --- errors and flags --------------------------------------------------------------------------


def first_error(exc: ValidationError, root: type[BaseModel]) -> str:
    """The first validation error as `path: what is wrong` (unknown keys list the allowed ones)."""
    err = exc.errors()[0]
    loc = tuple(err["loc"])
    path = format_loc(loc)
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(root, loc[:-1])
        hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
        return f"{path}: unknown key{hint}"
    if err["type"] == "missing":
        return f"{path}: missing (required)"
    msg = re.sub(r"^(Value|Assertion) error, ", "", err["msg"])
    if err["type"] not in ("value_error",) and "input" in err:
        shown = repr(err["input"])
        msg += f", got {shown if len(shown) <= 60 else shown[:57] + '...'}"
    return f"{path}: {msg}" if path else msg


def format_loc(loc: tuple) -> str:
    """A pydantic error location as a YAML path: `space.groups[1].methods`."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _allowed_keys(root: type[BaseModel], loc: tuple) -> list[str]:
    cls: Any = root
    skip = 0
    for part in loc:
        if skip:
            skip -= 1
            continue
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return []
        cls, skip = _descend(field.annotation)
        if cls is None:
            return []
    return list(cls.model_fields)


def _descend(annotation: Any) -> tuple[Any, int]:
    """(model class inside an annotation, how many list indices / dict keys come before its fields)."""
    origin = typing.get_origin(annotation)
    if origin in (list, dict):
        model, skip = _descend(typing.get_args(annotation)[-1])
        return model, skip + 1
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if arg is not type(None):
                return _descend(arg)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, 0
    return None, 0


def add_flags(parser: Any, cls: type[BaseModel], skip: tuple[str, ...] = ()) -> None:
    """One `--field-name` flag per field of a settings class (default: the class's own default)."""
    for name, field in cls.model_fields.items():
        if name in skip:
            continue
        flag = f"--{name.replace('_', '-')}"
        annotation = field.annotation
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        kind = (
            args[0]
            if typing.get_origin(annotation) in (typing.Union, types.UnionType)
            else annotation
        )
        default = field.default if field.default_factory is None else field.default_factory()
        help_text = f"default {default}"
        if kind is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif typing.get_origin(kind) is typing.Literal:
            parser.add_argument(
                flag, choices=list(typing.get_args(kind)), default=None, help=help_text
            )
        elif kind in (int, float, str):
            parser.add_argument(flag, type=kind, default=None, help=help_text)


def flag_values(args: Any, cls: type[BaseModel]) -> dict[str, Any]:
    """The settings fields given on the command line (the ones add_flags made and the user set)."""
    return {
        name: getattr(args, name)
        for name in cls.model_fields
        if getattr(args, name, None) is not None
    }
