"""Search specs: the YAML schema (unknown keys rejected), one class per section, and loading a spec.

Every error names its YAML path (`space.groups[1].methods.lora.rank: ...`) and becomes one line on
stderr with exit code 2. docs/search.md documents every key. Reading the file (`extends:` merging and
`--set` overrides) is capsearch.specfile's.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    PrivateAttr,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from capsearch.errors import UserError
from capsearch.methods import get_method
from capsearch.metrics.table import reward_metrics
from capsearch.models.precision import resolve_sampling_precision
from capsearch.search.baselines import FixedTrial, baseline_points, fixed_points
from capsearch.search.constraints import check_constraints
from capsearch.search.coverage import check_units
from capsearch.search.reward import OBJECTIVES
from capsearch.search.space import (
    FROZEN,
    Baseline,
    SearchSpace,
    build_space,
    check_base_mitigations,
)
from capsearch.settings import EvalSettings, Strict, TrainSettings, first_error
from capsearch.specfile import (  # noqa: F401  (read here by callers that load specs)
    apply_overrides,
    deep_merge,
    read_yaml,
    resolve_extends,
)
from capsearch.training.precision import resolve_precision
from capsearch.worlds.transfer import AvoidReports


def _none_to_empty(value: Any) -> Any:
    """`frozen:` with nothing after it reads as None: no hyper-parameters."""
    if isinstance(value, dict):
        return {k: ({} if v is None else v) for k, v in value.items()}
    return value


class PhantomData(Strict):
    """The phantom chest-X-ray world, generated into the run folder on first use."""

    patients: int = Field(200, ge=1)
    size: Literal[32, 64, 128] = 64
    seed: int = 0
    dup_fraction: float = Field(0.05, ge=0.0, le=1.0)
    dup_copies: int = Field(10, ge=1)
    # Images per held-out split (validate, test); None: evaluate.reference_ratio × the most samples an
    # evaluation generates, so that every FID reference is large enough (held-out phantoms cost nothing).
    held_out_images: int | None = Field(None, ge=0)
    # A transfer world: no report sentence of this other world's (capsearch.worlds.transfer).
    avoid_reports_of: AvoidReports | None = None
    # Reports and lungs only from the fine-tuning part: nothing the broad pretraining corpus draws
    # (capsearch.worlds.partition). Off: the world every earlier table was made with.
    disjoint_from_corpus: bool = False


class DataSpec(Strict):
    """Training data: generated phantoms, or an existing image folder with metadata."""

    phantom: PhantomData | None = None
    path: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        if (self.phantom is None) == (self.path is None):
            raise ValueError("give exactly one of phantom or path")
        return self


class FinalSpec(Strict):
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
    # Training seeds on which every finalist is also trained again and re-evaluated; the best trial is
    # then chosen on its final reward averaged over the seeds (capsearch.search.final, "over training seeds").
    train_seeds: list[int] = Field(default_factory=list)

    def settings(self, evaluate: EvalSettings) -> EvalSettings:
        """The evaluation settings of the final stage: the search's, with this stage's overrides."""
        out = evaluate.model_dump()
        for key, value in self.model_dump(exclude={"enabled", "top_k", "train_seeds"}).items():
            if value is not None:
                out[key] = value
        return EvalSettings.parse(out, "final")

    def samples(self, evaluate: EvalSettings) -> int:
        """Generated samples per re-evaluated trial."""
        return self.settings(evaluate).samples


# Weights of the scalar reward's terms: one field per metric with a reward term in the metric table
# (capsearch.metrics.table), its default the table's (fid, amd, alignment, extracted: 1.0 each).
RewardWeights = create_model(
    "RewardWeights",
    __base__=Strict,
    __doc__="Weights of the scalar reward's terms (see capsearch.search.reward).",
    **{m.reward: (float, Field(m.reward_default, ge=0)) for m in reward_metrics()},
)


class ObjectiveSpec(Strict):
    """A scalar reward, or a Pareto front over several metrics."""

    mode: Literal["reward", "pareto"] = "reward"
    weights: RewardWeights = Field(default_factory=RewardWeights)
    pareto: list[str] = Field(default_factory=lambda: ["fid", "amd"])
    # metric → bound on its better side (extracted: 0 is "extracted ≤ 0"): capsearch.search.constraints
    constraints: dict[str, float] = Field(default_factory=dict)

    @field_validator("constraints")
    @classmethod
    def _constrainable(cls, constraints: dict[str, float]) -> dict[str, float]:
        check_constraints(constraints)
        return constraints

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


class SchedulerSpec(Strict):
    """Trial scheduler: fifo (every trial runs to the end) or ASHA early stopping on probe losses."""

    name: Literal["fifo", "asha"] = "fifo"
    grace_period: int = Field(50, ge=1)
    reduction_factor: float = Field(3.0, gt=1)


class SearchSettings(Strict):
    """The outer loop: sampler, budget, parallelism and scheduler."""

    sampler: Literal["tpe", "nsga2", "gp", "random"] = "tpe"
    num_samples: int = Field(8, ge=0)
    concurrency: int = Field(1, ge=1)
    seed: int = Field(0, ge=0, le=2**32 - 1)  # Optuna's samplers take numpy seeds
    startup_trials: int = Field(10, ge=0)
    population_size: int = Field(20, ge=2)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    study_name: str = "capsearch"
    # Run folders whose finished trials stand in for this run's trials of identical training on the
    # same data (capsearch.search.trial.reusable_checkpoint): a baseline trained once serves many searches.
    reuse: list[str] = Field(default_factory=list)

    @field_validator("scheduler", mode="before")
    @classmethod
    def _name_only(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


class ResourcesSpec(Strict):
    """What one trial reserves on the Ray cluster."""

    cpu: int = Field(1, ge=1)
    gpu: float = Field(0.0, ge=0)


class BaselineTrain(Strict):
    """Training settings one baseline method uses instead of the spec's train values."""

    lr: float | None = Field(None, gt=0)
    steps: int | None = Field(None, ge=1)


class BaselinesSpec(Strict):
    """The paper's baselines, enqueued as fixed trials: methods × mitigations."""

    methods: list[str] = Field(default_factory=list)
    mitigations: list[str] = Field(default_factory=lambda: ["none"])
    train: dict[str, BaselineTrain] = Field(default_factory=dict)
    fixed: list[FixedTrial] = Field(
        default_factory=list
    )  # named configurations (capsearch.search.baselines)

    @field_validator("mitigations")
    @classmethod
    def _not_empty(cls, names: list[str]) -> list[str]:
        if not names:
            raise ValueError("empty choice: list at least one mitigation (none for none)")
        return names

    @field_validator("train", mode="before")
    @classmethod
    def _drop_nulls(cls, train: Any) -> Any:
        """`METHOD: null` drops what a spec it extends set for a method that does not run here."""
        return (
            {k: v for k, v in train.items() if v is not None} if isinstance(train, dict) else train
        )


class GroupSpec(Strict):
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


class SpaceSpec(Strict):
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


class Spec(Strict):
    """A whole search spec, validated; `search_space` and `baseline_points` are derived from it."""

    extends: str | None = None
    name: str | None = None  # the run folder's default name: one folder name (_safe_name)
    description: str = ""
    model: str = Field("tiny", min_length=1)
    data: DataSpec = Field(default_factory=lambda: DataSpec(phantom=PhantomData()))
    train: TrainSettings = Field(default_factory=TrainSettings)
    evaluate: EvalSettings = Field(default_factory=EvalSettings)
    final: FinalSpec = Field(default_factory=FinalSpec)
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec)
    search: SearchSettings = Field(default_factory=SearchSettings)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    baselines: BaselinesSpec = Field(default_factory=BaselinesSpec)
    space: SpaceSpec

    _search_space: SearchSpace | None = PrivateAttr(None)
    _baseline_points: list[Baseline] = PrivateAttr(default_factory=list)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str | None) -> str | None:
        """A run is written to runs/NAME: a name must be one folder name, never a path out of runs/."""
        if name is not None and (not name.strip() or name != name.strip() or name[0] in ".-"
                                 or len(name) > 100 or any(c in "/\\" or ord(c) < 32 for c in name)):  # fmt: skip
            raise ValueError(
                "must be one folder name: no '/' or '\\', not empty, not starting with '.' or '-', "
                f"no surrounding spaces, at most 100 characters; got {name!r}"
            )
        return name

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
        raise UserError(f"{source}: {first_error(exc, Spec)}") from None
    try:
        spec._search_space = build_space(spec.space)
        spec._baseline_points = _baselines(spec)
        _check_consistency(spec)
    except UserError as exc:
        raise UserError(f"{source}: {exc}") from None
    return spec


def _baselines(spec: Spec) -> list[Baseline]:
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
    points = baseline_points(spec.search_space, spec.baselines.methods, spec.baselines.mitigations,
                             overrides, spec.train.model_dump())  # fmt: skip
    return points + fixed_points(spec.search_space, spec.baselines.fixed, {b.name for b in points})


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
    seeds = spec.final.train_seeds
    if spec.train.seed in seeds or len(set(seeds)) < len(seeds):
        raise UserError(
            f"final.train_seeds: {seeds} must be distinct and differ from train.seed "
            f"({spec.train.seed}), on which every finalist is already trained"
        )
    if spec.resources.gpu == 0:  # fp16 needs a GPU, bf16 a GPU or a CPU with native bf16
        resolve_precision(spec.train.mixed_precision, cuda=False)
        resolve_sampling_precision(spec.evaluate.precision, cuda=False)
    check_base_mitigations(spec.train.all_mitigations(), spec.search_space)
