"""The run folder's records as typed, frozen models: what a trial did, its final re-evaluations, and the
mean over training seeds that a finalist is ranked on.

    trials/tNNN/params.json               TrialRecord, status "running": the trial's plan as it starts
    trials/tNNN/result.json               TrialRecord: the trial's outcome
    trials/tNNN/final/result.json         FinalResult: its final re-evaluation
    trials/tNNN/final_seedS/result.json   SeedResult: the same, trained again on training seed S
    (computed, never written)             SeedMean: the mean over a finalist's training seeds

Known fields are typed and checked strictly (a "3" is no number); any other key is kept as it was read,
since records written by older capsearch carry keys it no longer writes, and a record read and written
back (`to_dict`) has the keys and values it was read with. A JSON object that fails its model is a
corrupt record, as a file that does not parse is (capsearch.search.runs reads and writes the files).

Format versions. A trial record's `version`: 1 (records without the key) holds the plan's
method_spec, `train` with caption dropout among its mitigations and `groups` at the top; 2 holds every
field of the trial plan (capsearch.search.trial.TrialPlan) at the top and `train.caption_dropout`. Final
re-evaluations have carried no version key so far: they read as `FINAL_VERSION` 1. A record of a newer
version than this capsearch reads is refused as corrupt rather than misread.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

RECORD_VERSION = 2  # the trial record format capsearch writes
FINAL_VERSION = 1  # the final re-evaluation format (no version key in the file)
# Set by the reader, never written: a record file that does not parse or fails its model.
CORRUPT = "corrupt"
Status = Literal["running", "ok", "error", "nan", "stopped", "interrupted", "corrupt"]
# "interrupted" and "running" trials do not count as finished
FINISHED = ("ok", "error", "nan", "stopped", CORRUPT)

Metrics = dict[str, float | int | None]  # metric name → value, as the evaluation returned it
Intervals = dict[str, list[float] | None]  # metric name → its 95% interval [low, high]


def finite(value: Any) -> float | None:
    """A number as a finite float, else None (missing, NaN, infinite, or not a number)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


class Scored(BaseModel):
    """Anything a trial is ranked on: metrics and a reward."""

    # extra="allow": keys an older capsearch wrote still load, and are written back unchanged.
    model_config = ConfigDict(extra="allow", frozen=True, strict=True)

    metrics: Metrics = {}
    reward: float | None = None

    def value(self, key: str) -> float | None:
        """A metric's finite value, or a top-level number such as the reward; None if it has none."""
        if key in self.metrics:
            return finite(self.metrics[key])
        if key in type(self).model_fields:
            return finite(getattr(self, key))
        return finite((self.model_extra or {}).get(key))

    def to_dict(self) -> dict[str, Any]:
        """The record as the JSON object it was read from (the fields it was given, extras included)."""
        return self.model_dump(exclude_unset=True)


class Evaluation(Scored):
    """One evaluation of a trial: metrics with their 95% intervals, the noise floor, reward, time."""

    intervals: Intervals = {}
    noise_floor: dict[str, Any] | None = None  # real against real held-out images
    seconds: float | None = None
    error: str | None = None


class Retraining(BaseModel):
    """A finalist trained again for the final stage (capsearch.search.retrain): what it measured."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=True)

    steps: int
    seconds: float | None = None
    seed: int | None = None  # final.train_seeds: trained on another training seed
    identical: bool | None = None  # its delta was gone: the same steps and last loss as recorded?
    final_loss: float | None = None
    recorded_steps: int | None = None
    recorded_final_loss: float | None = None
    went_on_from_step: int | None = None  # a retraining cut short went on from its checkpoint


class Reevaluation(Evaluation):
    """A finalist evaluated again by the final stage on another split and sampling seed."""

    version: int = FINAL_VERSION
    trial: str | None = None
    split: str
    seed: int  # the final stage's sampling seed
    train_seed: int | None = None
    retrained: Retraining | None = None

    @model_validator(mode="after")
    def _known_version(self) -> Reevaluation:
        if not 1 <= self.version <= FINAL_VERSION:
            raise ValueError(f"version {self.version}: this capsearch reads 1 to {FINAL_VERSION}")
        return self


class SeedResult(Reevaluation):
    """final_seedS/result.json: the final re-evaluation of a finalist trained again on seed S."""

    train_seed: int


class FinalResult(Reevaluation):
    """final/result.json, with the re-evaluations trained on other seeds under `seeds` (by seed)."""

    seeds: list[SeedResult] = []  # read from final_seedS/, never written in final/result.json


class SeedMean(Scored):
    """A finalist's final re-evaluations averaged over its training seeds (capsearch.search.runs.
    final_choice): mean metrics and reward (None where any seed lacks it); computed, never written."""

    metrics: dict[str, float] = {}
    n_seeds: int


class TrialRecord(Evaluation):
    """One trial: its plan (params.json as it starts) and what it did (result.json as it ends).

    `dir` (its folder) and `final` (its final re-evaluation) are set by the reader
    (capsearch.search.runs.load_trials).
    """

    version: int = 1  # see the module's docstring; records without the key are version 1
    trial: str  # the folder's name, tNNN
    number: int  # the Optuna trial number
    status: Status = "running"
    baseline: str | None = None
    params: dict[str, Any] = {}  # Optuna's parameters, as proposed
    # the trial plan (capsearch.search.trial.TrialPlan) as JSON; absent where it could not be built
    model: str | None = None
    method_spec: list[dict[str, Any]] | None = None
    groups: dict[str, str] | None = None  # each unit group's method as text (absent before groups)
    train: dict[str, Any] | None = None  # TrainSettings as JSON (version 1: its older shape)
    evaluate: dict[str, Any] | None = None
    cpu: int | None = None
    gpu: float | None = None
    reward_weights: dict[str, float] | None = None
    report_probes: bool | None = None
    resume_from: str | None = None
    retry_of: int | None = None
    reuse_from: str | None = None
    # an early record shape kept its mitigations at the top; the report's YAML falls back on them
    mitigations: list[dict[str, Any]] | None = None
    started: float | None = None
    node: str | None = None  # the Ray node it ran on
    # what it trained and measured
    total: int | None = None  # UNet parameters
    trainable: int | None = None
    trainable_pct: float | None = None
    steps: int | None = None
    train_seconds: float | None = None
    final_loss: float | None = None
    mitigation_counts: dict[str, int] | None = None
    eval_seconds: float | None = None
    # set by the reader
    dir: str = ""
    final: FinalResult | None = None

    @model_validator(mode="after")
    def _consistent(self) -> TrialRecord:
        if not 1 <= self.version <= RECORD_VERSION:
            raise ValueError(f"version {self.version}: this capsearch reads 1 to {RECORD_VERSION}")
        if self.status == CORRUPT and not self.error:
            raise ValueError("a corrupt record names what is wrong in `error`")
        return self

    @property
    def folder(self) -> Path:
        """The trial's folder (RUN/trials/tNNN)."""
        return Path(self.dir)


class CorruptRecord(ValueError):
    """A record file that does not parse, or parses but fails its model; the message says why."""


R = TypeVar("R", bound=BaseModel)


def parse(model: type[R], data: Any) -> R:
    """A record's JSON object as `model` (CorruptRecord saying why, in one line, if it is not one)."""
    if not isinstance(data, dict):
        raise CorruptRecord("not a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise CorruptRecord(
            f"not a valid {_WHAT.get(model, model.__name__)}: {_first(exc)}"
        ) from None


_WHAT: dict[type, str] = {
    TrialRecord: "trial record",
    FinalResult: "final re-evaluation",
    SeedResult: "final re-evaluation",
}


def _first(exc: ValidationError) -> str:
    """The first validation error as `where: what` (without the input, which may be long)."""
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0]
    # a model validator's own ValueError: its message, without pydantic's "Value error, " prefix
    what = str(first["ctx"]["error"]) if first["type"] == "value_error" else first["msg"]
    where = ".".join(str(part) for part in first["loc"])
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {what}{more}" if where else f"{what}{more}"
