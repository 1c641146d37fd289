"""What a search needs before its first trial: the base model, the data folder, the phantom scorer.

Each is checked (or made, for the phantom world) once, in the driver, before the run folder is written:
a missing model, a data folder its trials could not train or evaluate on, a baseline whose plan does
not validate is one line, never a failed trial per trial. `capsearch validate` runs the same checks
(`check_inputs(spec, here=False)`), with a model, data or reuse folder that is not on this machine a
note instead of an error.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from capsearch.config import Spec, load_spec
from capsearch.datasets.folder import in_split, metadata_path, read_metadata
from capsearch.errors import UserError
from capsearch.metrics.features import resolve_extractor
from capsearch.metrics.scorer import SCORER_DIR, load_scorer, train_scorer
from capsearch.metrics.stages import heldout_prompts
from capsearch.models import load as models
from capsearch.search.params import param_values
from capsearch.search.trial import build_plan
from capsearch.settings import TrainSettings
from capsearch.worlds.phantom import phantom_complete, write_phantom_dataset


def prepare_data(spec: Spec, run_dir: Path, console: Any = None) -> Path:
    """The training data folder: an existing one, or phantoms generated into the run folder once."""
    if spec.data.path is not None:
        root = Path(spec.data.path).expanduser().resolve()
        metadata_path(root)
        return root
    root = run_dir / "data"

    settings = spec.data.phantom.model_dump()
    if settings["held_out_images"] is None:
        settings["held_out_images"] = held_out_images_needed(spec)
    # Never made, cut short (a kill during generation) or made with other report avoidance: make it.
    if not phantom_complete(root, settings):
        if console is not None:
            again = " again (cut short, or made otherwise)" if root.exists() else " (once)"
            console.print(f"generating the phantom data set in {root}{again}")
        write_phantom_dataset(root, **settings, progress=console is not None)
    return root


def held_out_images_needed(spec: Spec) -> int:
    """Images each held-out split needs: reference_ratio × the most samples any evaluation compares."""
    samples = [spec.evaluate.samples] + (
        [spec.final.samples(spec.evaluate)] if spec.final.enabled else []
    )
    return math.ceil(spec.evaluate.reference_ratio * max(samples))


def uses_phantom_scorer(spec: Spec) -> bool:
    """Whether evaluation scores with the phantom scorer (pixel-space models under extractor auto)."""
    return resolve_extractor(spec.evaluate.extractor, spec.model) == "phantom"


def ensure_scorer(spec: Spec, data_root: Path, console: Any = None) -> None:
    """Train the phantom scorer once if evaluation needs it and it is not installed."""
    if not uses_phantom_scorer(spec):
        return

    try:
        load_scorer()
    except UserError:
        if spec.data.phantom is None:
            raise
        if console is not None:
            console.print(f"training the phantom scorer into {SCORER_DIR} (once)")
        train_scorer(data_root, SCORER_DIR, epochs=10, size=32, progress=console is not None)


def check_inputs(spec: Spec, here: bool = True) -> list[str]:
    """Fail before the run folder is made if the base model, the data folder, a search.reuse run or
    the scorer is not usable here, or a trial's plan would not validate; return notes.

    `here=False` (`capsearch validate`): a model, data or reuse folder that is not on this machine is a
    note (a spec is often written for another machine); whatever is here is checked as `run` checks it.
    """
    notes: list[str] = []
    if spec.model in models.TINY_MODELS:
        if here:  # shipped with capsearch: validate has nothing to check
            models.load_pipeline(spec.model)
    elif here or Path(spec.model).expanduser().exists():
        models.resolve_folder(spec.model)  # the resolution every trial's load_pipeline does
    if spec.data.path is not None:
        root = Path(spec.data.path).expanduser()
        if here or root.exists():
            check_data_folder(spec, root)
        else:
            notes.append(f"data folder {root} is not here; `run` checks it where it runs")
    for i, folder in enumerate(map(Path, spec.search.reuse)):
        if not here and not folder.exists():
            notes.append(f"search.reuse[{i}]: {folder} is not here; `run` checks it where it runs")
            continue
        if not (folder / "spec.yaml").is_file():
            raise UserError(
                f"search.reuse[{i}]: {folder} is not a capsearch run folder (no spec.yaml in it)"
            )
        try:
            load_spec(folder / "spec.yaml", check_model=False)
        except UserError as exc:
            raise UserError(f"search.reuse[{i}]: {folder}/spec.yaml: {exc}") from None
    if spec.data.phantom is None and uses_phantom_scorer(spec):
        load_scorer()  # a phantom world trains it when missing; a data folder cannot
    check_plans(spec)
    return notes


def check_data_folder(spec: Spec, root: Path) -> None:
    """The data folder's metadata as every trial reads it: records, a train split, and held-out
    splits that can serve the search's evaluation and the final stage (images are not opened:
    `capsearch data check` does that)."""
    records = read_metadata(root)
    if not any(in_split(r, "train") for r in records):
        raise UserError(f"{root} has no training images (no record of split 'train')")
    heldout_prompts(records, root, spec.evaluate)
    if spec.final.enabled:
        heldout_prompts(records, root, spec.final.settings(spec.evaluate))


def check_plans(spec: Spec) -> None:
    """Every baseline's trial plan, and the searched trials' shortest training, validate: what the
    search would otherwise find trial by trial (each recorded as an error)."""
    for point in spec.baseline_points:
        try:
            build_plan(spec, dict(point.params), point.name, 0, Path("."))
        except UserError as exc:
            raise UserError(
                f"baselines: the trial of baseline {point.name!r} fails: {exc}"
            ) from None
    steps = spec.search_space.steps
    if steps is not None:
        shortest = min(param_values(steps))
        try:
            TrainSettings.parse({**spec.train.model_dump(), "steps": shortest}, "train")
        except UserError as exc:
            raise UserError(f"space.steps: a trial of {shortest} steps fails: {exc}") from None
