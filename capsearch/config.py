"""Search specs: the YAML schema (unknown keys rejected), `extends:` merging and `--set` overrides.

Every error names its YAML path (`space.groups[1].methods.lora.rank: ...`) and becomes one line on
stderr with exit code 2. docs/search.md documents every key.
"""

from __future__ import annotations

import copy
import re
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from capsearch.errors import UserError
from capsearch.reward import OBJECTIVES
from capsearch.space import (
    Baseline,
    SearchSpace,
    base_mitigations,
    build_space,
    check_base_mitigations,
)


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` as a string; learning rates are written that way, so read it as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)(?:\.\d*)?[eE][-+]?\d+$"),
    list("-+0123456789"),
)


def _none_to_empty(value: Any) -> Any:
    """`frozen:` with nothing after it reads as None: no hyper-parameters."""
    if isinstance(value, dict):
        return {k: ({} if v is None else v) for k, v in value.items()}
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class PhantomData(_Strict):
    """The phantom chest-X-ray world, generated into the run folder on first use."""

    patients: int = Field(200, ge=1)
    size: Literal[32, 64, 128] = 64
    seed: int = 0
    dup_fraction: float = Field(0.05, ge=0.0, le=1.0)
    dup_copies: int = Field(10, ge=1)
    # Images per held-out split (validate, test); None: evaluate.reference_ratio × the most samples an
    # evaluation generates, so that every FID reference is large enough (held-out phantoms cost nothing).
    held_out_images: int | None = Field(None, ge=0)


class DataSpec(_Strict):
    """Training data: generated phantoms, or an existing image folder with metadata."""

    phantom: PhantomData | None = None
    path: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        if (self.phantom is None) == (self.path is None):
            raise ValueError("give exactly one of phantom or path")
        return self


class TrainSpec(_Strict):
    """Training defaults of every trial (capsearch.train.TrainConfig; its mitigations: below)."""

    steps: int = Field(300, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-4, gt=0)
    lr_schedule: str = "constant"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_accum: int = Field(1, ge=1)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    gradient_checkpointing: bool = False
    ema_decay: float | None = Field(None, gt=0, lt=1)
    seed: int = 0
    size: int = Field(32, ge=8)
    max_grad_norm: float = Field(1.0, ge=0)
    checkpoint_every: int = Field(0, ge=0)
    probe_every: int = Field(0, ge=0)
    # Every trial, baselines included, trains with these mitigations stacked under the one it chooses:
    # caption dropout (Dutt et al.'s code and Stable Diffusion train with 0.1), then `mitigations`.
    caption_dropout: float = Field(0.1, ge=0, le=1)
    mitigations: list[dict[str, Any]] = Field(default_factory=list)


class EvalSpec(_Strict):
    """Evaluation settings of every searched trial (capsearch.evaluate.EvalConfig)."""

    n_prompts: int = Field(24, ge=2)
    n_per_prompt: int = Field(4, ge=1)
    steps: int = Field(20, ge=1)
    guidance: float = 3.0
    seed: int = 0
    extraction_prompts: int = Field(8, ge=0)
    extraction_n: int = Field(16, ge=1)
    extraction_threshold: float | None = None
    extraction_guidance: float | None = None
    min_clique: int = Field(3, ge=2)
    strength_prompts: int = Field(8, ge=1)
    strength_n: int = Field(2, ge=1)
    extractor: Literal["auto", "phantom", "xrv"] = "auto"
    split: Literal["validate", "test"] = "validate"
    reference_ratio: float = Field(4.0, ge=1)
    bootstrap: int = Field(1000, ge=100)
    noise_floor_repeats: int = Field(20, ge=2)
    batch_size: int = Field(64, ge=1)
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

    @property
    def samples(self) -> int:
        """Generated samples compared with the FID reference."""
        return self.n_prompts * self.n_per_prompt


class FinalSpec(_Strict):
    """The final stage: baselines and the top searched trials re-evaluated on fresh sampling seeds.

    Unset counts take the search's evaluation values. The report's best trial and `export --trial best`
    use this re-evaluation, on a split the search never saw.
    """

    enabled: bool = True
    top_k: int = Field(2, ge=0)
    split: Literal["validate", "test"] = "test"
    seed: int = 1000
    n_prompts: int | None = Field(None, ge=2)
    n_per_prompt: int | None = Field(None, ge=1)
    extraction_prompts: int | None = Field(None, ge=0)
    extraction_n: int | None = Field(None, ge=1)
    strength_prompts: int | None = Field(None, ge=1)
    strength_n: int | None = Field(None, ge=1)

    def settings(self, evaluate: EvalSpec) -> dict[str, Any]:
        """The evaluation settings of the final stage: the search's, with this stage's overrides."""
        out = evaluate.model_dump()
        for key, value in self.model_dump(exclude={"enabled", "top_k"}).items():
            if value is not None:
                out[key] = value
        return out

    def samples(self, evaluate: EvalSpec) -> int:
        """Generated samples per re-evaluated trial."""
        s = self.settings(evaluate)
        return s["n_prompts"] * s["n_per_prompt"]


class RewardWeights(_Strict):
    """Weights of the scalar reward's terms (see capsearch.reward)."""

    fid: float = Field(1.0, ge=0)
    alignment: float = Field(1.0, ge=0)
    amd: float = Field(1.0, ge=0)
    extracted: float = Field(1.0, ge=0)


class ObjectiveSpec(_Strict):
    """A scalar reward, or a Pareto front over several metrics."""

    mode: Literal["reward", "pareto"] = "reward"
    weights: RewardWeights = Field(default_factory=RewardWeights)
    pareto: list[str] = Field(default_factory=lambda: ["fid", "amd"])

    @field_validator("pareto")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        for name in names:
            if name not in OBJECTIVES:
                raise ValueError(f"unknown objective {name!r}; choose from {', '.join(OBJECTIVES)}")
        if len(set(names)) != len(names):
            raise ValueError("an objective is listed twice")
        if len(names) < 2:
            raise ValueError("a Pareto front needs at least two objectives")
        return names


class SchedulerSpec(_Strict):
    """Trial scheduler: fifo (every trial runs to the end) or ASHA early stopping on probe losses."""

    name: Literal["fifo", "asha"] = "fifo"
    grace_period: int = Field(50, ge=1)
    reduction_factor: float = Field(3.0, gt=1)


class SearchSettings(_Strict):
    """The outer loop: sampler, budget, parallelism and scheduler."""

    sampler: Literal["tpe", "nsga2", "random"] = "tpe"
    num_samples: int = Field(8, ge=0)
    concurrency: int = Field(1, ge=1)
    seed: int = 0
    startup_trials: int = Field(10, ge=0)
    population_size: int = Field(20, ge=2)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    study_name: str = "capsearch"

    @field_validator("scheduler", mode="before")
    @classmethod
    def _name_only(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


class ResourcesSpec(_Strict):
    """What one trial reserves on the Ray cluster."""

    cpu: int = Field(1, ge=1)
    gpu: float = Field(0.0, ge=0)


class BaselineTrain(_Strict):
    """Training settings one baseline method uses instead of the spec's train values."""

    lr: float | None = Field(None, gt=0)
    steps: int | None = Field(None, ge=1)


class BaselinesSpec(_Strict):
    """The paper's baselines, enqueued as fixed trials: methods × mitigations."""

    methods: list[str] = Field(default_factory=list)
    mitigations: list[str] = Field(default_factory=lambda: ["none"])
    train: dict[str, BaselineTrain] = Field(default_factory=dict)

    @field_validator("mitigations")
    @classmethod
    def _not_empty(cls, names: list[str]) -> list[str]:
        if not names:
            raise ValueError("empty choice: list at least one mitigation (none for none)")
        return names


class GroupSpec(_Strict):
    """A named selection of units and the methods (with hyper-parameters) it may be trained with."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    units: list[str]
    methods: dict[str, dict[str, Any]]

    @field_validator("units", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("methods", mode="before")
    @classmethod
    def _no_params(cls, value: Any) -> Any:
        return _none_to_empty(value)

    @field_validator("units", "methods")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        if not value:
            raise ValueError("empty choice: list at least one")
        return value


class SpaceSpec(_Strict):
    """The searched space: unit groups, learning rates, steps and mitigations."""

    groups: list[GroupSpec]
    lr: Any = None
    steps: Any = None
    mitigations: dict[str, dict[str, Any]] = Field(default_factory=lambda: {"none": {}})

    @field_validator("mitigations", mode="before")
    @classmethod
    def _no_params(cls, value: Any) -> Any:
        return _none_to_empty(value)

    @field_validator("groups", "mitigations")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        if not value:
            raise ValueError("empty choice: list at least one")
        return value


class Spec(_Strict):
    """A whole search spec, validated; `search_space` and `baseline_points` are derived from it."""

    extends: str | None = None
    name: str | None = None
    description: str = ""
    model: str = "tiny"
    data: DataSpec = Field(default_factory=lambda: DataSpec(phantom=PhantomData()))
    train: TrainSpec = Field(default_factory=TrainSpec)
    evaluate: EvalSpec = Field(default_factory=EvalSpec)
    final: FinalSpec = Field(default_factory=FinalSpec)
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec)
    search: SearchSettings = Field(default_factory=SearchSettings)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    baselines: BaselinesSpec = Field(default_factory=BaselinesSpec)
    space: SpaceSpec

    _search_space: SearchSpace | None = PrivateAttr(None)
    _baseline_points: list[Baseline] = PrivateAttr(default_factory=list)

    @property
    def search_space(self) -> SearchSpace:
        """The parsed search space."""
        assert self._search_space is not None
        return self._search_space

    @property
    def baseline_points(self) -> list[Baseline]:
        """The baselines as fixed points of the space, in spec order."""
        return self._baseline_points

    def baseline(self, name: str) -> Baseline:
        """The baseline of that name."""
        for b in self._baseline_points:
            if b.name == name:
                return b
        raise UserError(f"the spec has no baseline named {name!r}")

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain YAML-able data (what the run folder's spec.yaml holds)."""
        return self.model_dump(mode="json", exclude={"extends"})


# --- loading ----------------------------------------------------------------------------------------


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML file's top-level mapping (UserError if missing, unreadable or not a mapping)."""
    if not path.is_file():
        raise UserError(f"spec file {path} does not exist")
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path}:{where}: invalid YAML: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of keys")
    return data


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Override merged into base: mappings merge key by key, anything else (lists too) replaces."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def resolve_extends(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A spec file with its `extends:` chain merged in (paths relative to the file that names them)."""
    path = path.resolve()
    if path in _seen:
        raise UserError(f"{path}: extends loops back to itself")
    data = read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise UserError(f"{path}: extends: must be a path, got {parent!r}")
    base = resolve_extends((path.parent / parent), (*_seen, path))
    return deep_merge(base, data)


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply `a.b.c=VALUE` overrides (VALUE read as YAML; `groups[0]` indexes a list)."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. search.num_samples=4")
        try:
            value = yaml.load(text, Loader=_Loader)
        except yaml.YAMLError:
            raise UserError(f"--set {item!r}: the value is not valid YAML") from None
        parts = [int(p) if p.isdigit() else p for p in re.split(r"\.|\[(\d+)\]", key) if p]
        node: Any = data
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(node, dict) and isinstance(part, str):
                if not last and not isinstance(node.get(part), (dict, list)):
                    node[part] = {}
            elif not (isinstance(node, list) and isinstance(part, int) and part < len(node)):
                raise UserError(f"--set {key}: there is no {part!r} at that place in the spec")
            if last:
                node[part] = value
            else:
                node = node[part]
    return data


def load_spec(path: str | Path, overrides: Iterable[str] = (), check_model: bool = True) -> Spec:
    """Read, merge, override and validate a spec file; check unit selections against the model."""
    path = Path(path)
    data = apply_overrides(resolve_extends(path), overrides)
    data.setdefault("name", path.stem)
    spec = spec_from_dict(data, source=str(path))
    if check_model:
        check_units(spec, source=str(path))
    return spec


def spec_from_dict(data: dict[str, Any], source: str = "spec") -> Spec:
    """Validate plain data as a spec (errors name `source` and the YAML path)."""
    try:
        spec = Spec.model_validate(data)
    except ValidationError as exc:
        raise UserError(f"{source}: {_first_error(exc)}") from None
    try:
        spec._search_space = build_space(spec.space)
        spec._baseline_points = _baselines(spec)
        _check_consistency(spec)
    except UserError as exc:
        raise UserError(f"{source}: {exc}") from None
    return spec


def _baselines(spec: Spec) -> list[Baseline]:
    from capsearch.methods import get_method
    from capsearch.space import FROZEN, baseline_points

    for i, method in enumerate(spec.baselines.methods):
        if method not in FROZEN:
            try:
                get_method(method)
            except UserError as exc:
                raise UserError(f"baselines.methods[{i}]: {exc}") from None
    for method in spec.baselines.train:
        if method not in spec.baselines.methods:
            raise UserError(f"baselines.train.{method}: {method!r} is not in baselines.methods")
    overrides = {k: v.model_dump(exclude_none=True) for k, v in spec.baselines.train.items()}
    return baseline_points(
        spec.search_space,
        spec.baselines.methods,
        spec.baselines.mitigations,
        overrides,
        spec.train.model_dump(),
    )


def _check_consistency(spec: Spec) -> None:
    if spec.search.scheduler.name == "asha":
        if spec.objective.mode != "reward":
            raise UserError(
                "search.scheduler: asha stops trials on one metric; use objective.mode reward "
                "(a Pareto search runs every trial to the end)"
            )
        if spec.train.probe_every < 1:
            raise UserError("train.probe_every: asha needs held-out probes; set it above 0")
    if spec.final.enabled and spec.final.seed == spec.evaluate.seed:
        raise UserError(
            "final.seed: must differ from evaluate.seed (the final stage samples on fresh seeds)"
        )
    if spec.resources.gpu == 0 and spec.train.mixed_precision not in ("auto", "no"):
        raise UserError("train.mixed_precision: needs a GPU; set resources.gpu or use auto or no")
    base = base_mitigations(spec.train.caption_dropout, spec.train.mitigations)
    check_base_mitigations(base, spec.search_space)


# --- model checks -----------------------------------------------------------------------------------


def unet_for_validation(model: str) -> tuple[Any, str]:
    """The model's UNet built on the meta device (shapes only) and a note on where its config came from."""
    import json

    import torch
    from diffusers import UNet2DConditionModel

    from capsearch.models import TINY_BASE
    from capsearch.models_config import SD15_UNET_CONFIG, TINY_UNET_CONFIG

    config, note = None, ""
    if model in ("tiny", "tiny:random"):
        shipped = TINY_BASE / "unet" / "config.json"
        config = json.loads(shipped.read_text()) if model == "tiny" and shipped.is_file() else None
        config = config or dict(TINY_UNET_CONFIG)
    else:
        local = Path(model).expanduser() / "unet" / "config.json"
        if local.is_file():
            config = json.loads(local.read_text())
        elif re.fullmatch(r"[\w.-]+/[\w.-]+", model):
            try:
                from huggingface_hub import try_to_load_from_cache

                cached = try_to_load_from_cache(model, "unet/config.json")
            except Exception:
                cached = None
            if isinstance(cached, str):
                config = json.loads(Path(cached).read_text())
        if config is None:
            config = dict(SD15_UNET_CONFIG)
            note = f"model {model!r} is not available here; units checked against SD v1.5's shapes"
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    return unet, note


def check_units(spec: Spec, source: str = "spec") -> dict[str, Any]:
    """Check every group's unit selection against the model; return coverage numbers for reports."""
    from capsearch.units import list_units, select_units

    unet, note = unet_for_validation(spec.model)
    units = list_units(unet)
    owner: dict[str, str] = {}
    for i, group in enumerate(spec.search_space.groups):
        try:
            chosen = select_units(units, list(group.units))
        except UserError as exc:
            raise UserError(f"{source}: space.groups[{i}].units: {exc}") from None
        for unit in chosen:
            if unit.name in owner:
                raise UserError(
                    f"{source}: space.groups[{i}].units: unit {unit.name} is also in group "
                    f"{owner[unit.name]!r}; groups must not overlap"
                )
            owner[unit.name] = group.name
    _check_baselines_cover(spec, owner, source)
    total = sum(u.numel for u in units)
    covered = sum(u.numel for u in units if u.name in owner)
    return {
        "units": len(units),
        "grouped_units": len(owner),
        "parameters": total,
        "grouped_parameters": covered,
        "note": note,
    }


def _check_baselines_cover(spec: Spec, owner: dict[str, str], source: str) -> None:
    """A baseline must be its method on the whole UNet: every unit it trains there is in a group allowing it."""
    from capsearch.methods import trained_units
    from capsearch.space import FROZEN

    groups = {g.name: g for g in spec.search_space.groups}
    for i, method in enumerate(spec.baselines.methods):
        if method in FROZEN:
            continue
        unet, _ = unet_for_validation(spec.model)
        left = [
            u
            for u in trained_units(unet, {"method": method})
            if u.name not in owner or method not in groups[owner[u.name]].methods
        ]
        if left:
            raise UserError(
                f"{source}: baselines.methods[{i}]: baseline {method!r} would leave {len(left)} "
                f"unit(s) ({sum(u.numel for u in left):,} parameters) that {method} trains on the "
                f"whole UNet outside every group allowing {method}, e.g. {left[0].name}; add them "
                "to such a group or drop the baseline"
            )


# --- error messages ---------------------------------------------------------------------------------


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = tuple(err["loc"])
    path = _format_loc(loc)
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
        return f"{path}: unknown key{hint}"
    if err["type"] == "missing":
        return f"{path}: missing (required)"
    msg = re.sub(r"^(Value|Assertion) error, ", "", err["msg"])
    if err["type"] not in ("value_error",) and "input" in err:
        shown = repr(err["input"])
        msg += f", got {shown if len(shown) <= 60 else shown[:57] + '...'}"
    return f"{path}: {msg}" if path else msg


def _format_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _allowed_keys(loc: tuple) -> list[str]:
    cls: Any = Spec
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
