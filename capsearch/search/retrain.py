"""A finished trial's delta trained again from its record, for a run resumed from its committed records.

Run records are committed without weights (experiments/keep_records.py), so a search resumed on another
machine from them has every finished trial's result but no delta. The final stage re-evaluates its
finalists from their deltas; a finalist without one is trained again here from what its record says:
the same base model, method spec and training settings (seed included), on the run's data, which the
resumed run regenerates from the spec. On the same machine and thread count this reproduces the
training bit for bit (capsearch's fine-tune is deterministic on CPU: tests/test_search.py checks it);
elsewhere the floating-point order may differ. Either way the retraining is recorded beside the final
result: its step count and last loss against the record's, and whether they are identical. A retraining
cut short (the final stage killed) goes on from its last checkpoint (`train.checkpoint_every`) when the
stage is resumed, bit for bit as a search trial does.
The final stage's `final.train_seeds` trains each finalist again here on other training seeds too.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from capsearch.errors import UserError
from capsearch.models.load import load_pipeline
from capsearch.search.records import TrialRecord
from capsearch.search.space import FROZEN
from capsearch.search.trial import save_frozen_delta
from capsearch.settings import TrainSettings
from capsearch.training.loop import finetune

RETRAIN_DIR = "retrained"  # trials/tNNN/retrained/: the retraining's own log and train_result.json
# in RETRAIN_DIR: what is being trained, so that a retraining cut short can go on
PLAN_FILE = "plan.json"


def _cut_short_with(scratch: Path, plan: dict[str, Any]) -> bool:
    """Whether `scratch` holds a checkpoint of a retraining of this very plan, cut short (a killed
    final stage): then it goes on from that checkpoint, as a search trial does, instead of step 0."""
    try:
        earlier = json.loads((scratch / PLAN_FILE).read_text())
    except (OSError, ValueError):
        return False
    return earlier == plan and (scratch / "checkpoint" / "state.json").is_file()


def _checkpoint_step(scratch: Path) -> int | None:
    """The step of the checkpoint a cut-short retraining goes on from."""
    try:
        return int(json.loads((scratch / "checkpoint" / "state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def trains_nothing(record: TrialRecord) -> bool:
    """Freeze: no method trains anything, so a training seed changes nothing."""
    return all(e["method"] in FROZEN for e in record.method_spec or [])


def retrain_delta(
    record: TrialRecord, data_root: Path, dest: Path | None = None, seed: int | None = None
) -> dict[str, Any]:
    """Train `record`'s trial again into `dest`/delta/ (its own folder's by default); what the
    retraining measured. With `seed`, on that training seed instead of the record's (the final
    stage's `final.train_seeds`): then it is another training, not compared with the record's."""
    folder = record.folder
    needed = {"model": record.model, "method_spec": record.method_spec, "train": record.train}
    missing = [k for k, v in needed.items() if v is None]
    if missing:
        raise UserError(
            f"trial {folder.name} has no delta, and its record lacks {', '.join(missing)} to train "
            "it again from"
        )
    dest = folder if dest is None else Path(dest)
    started = time.time()
    pipe = load_pipeline(record.model)
    if trains_nothing(record):  # Freeze: nothing to train
        save_frozen_delta(pipe, dest, record.model)
        return {"steps": 0, "identical": True, "seconds": round(time.time() - started, 1)}
    train = record.train if seed is None else {**record.train, "seed": seed}
    settings = TrainSettings.parse(train, f"{folder.name}: train")
    scratch = dest / RETRAIN_DIR
    plan = {"model": record.model, "method_spec": record.method_spec, "train": train}
    plan = json.loads(json.dumps(plan))  # as it reads back from PLAN_FILE
    resume = _cut_short_with(scratch, plan)
    went_on = _checkpoint_step(scratch) if resume else None
    if scratch.exists() and not resume:  # another training's leftovers, or none to go on from
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / PLAN_FILE).write_text(json.dumps(plan, sort_keys=True))
    result = finetune(pipe, record.method_spec, data_root, settings, out_dir=scratch,
                      resume=resume, quiet=True)  # fmt: skip
    if result.status != "ok":
        raise UserError(f"training trial {folder.name} again from its record ended {result.status}")
    shutil.move(str(scratch / "delta"), str(dest / "delta"))
    # `seconds`: this call's; after a cut-short retraining, from the checkpoint it went on from
    extra = {"seconds": round(time.time() - started, 1)}
    if went_on is not None:
        extra["went_on_from_step"] = went_on
    if seed is not None:
        return {"steps": result.steps, "seed": seed, "final_loss": result.final_loss, **extra}
    return {
        "steps": result.steps,
        "recorded_steps": record.steps,
        "final_loss": result.final_loss,
        "recorded_final_loss": record.final_loss,
        "identical": result.steps == record.steps and result.final_loss == record.final_loss,
        **extra,
    }
