"""What a search needs before its first trial: the base model, the data folder, the phantom scorer.

Each is checked (or made, for the phantom world) once, in the driver, before the run folder fills up:
a missing model or data folder is one line, never a failed trial per trial.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from capsearch.config import Spec, load_spec
from capsearch.datasets.folder import metadata_path
from capsearch.errors import UserError
from capsearch.metrics.features import resolve_extractor
from capsearch.metrics.scorer import SCORER_DIR, load_scorer, train_scorer
from capsearch.models import load as models
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


def check_inputs(spec: Spec) -> None:
    """Fail before the run folder is made if the base model or the data folder is not here."""
    if spec.model in models.TINY_MODELS:
        models.load_pipeline(spec.model)
    else:
        models.resolve_folder(spec.model)  # the resolution every trial's load_pipeline does
    if spec.data.path is not None:
        metadata_path(Path(spec.data.path).expanduser())
    for i, folder in enumerate(map(Path, spec.search.reuse)):
        if not (folder / "spec.yaml").is_file():
            raise UserError(
                f"search.reuse[{i}]: {folder} is not a capsearch run folder (no spec.yaml in it)"
            )

        try:
            load_spec(folder / "spec.yaml", check_model=False)
        except UserError as exc:
            raise UserError(f"search.reuse[{i}]: {folder}/spec.yaml: {exc}") from None
