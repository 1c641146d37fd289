"""Watching a fine-tune: TensorBoard scalars of every step and sample previews on their schedule.

A fine-tune with an output folder (a search trial's RUN/trials/tNNN/) keeps its event file beside its
train_log.jsonl: `tensorboard --logdir RUN/trials` then compares the trials by name (capsearch.training.tblog),
and `train.preview_every` adds preview grids (capsearch.training.previews). Without a folder it records nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from capsearch.training.previews import preview_due, preview_prompts, render_preview
from capsearch.training.tblog import TrainEvents, learning_rates

if TYPE_CHECKING:
    from capsearch.settings import TrainSettings


class TrainingWatch:
    """The TensorBoard events and previews of one fine-tune session that starts after step `start`."""

    def __init__(
        self,
        out_dir: Path | None,
        start: int,
        config: TrainSettings,
        captions: Sequence[str],
        optimizer: Any,
        method_spec: Any = None,
    ) -> None:
        self.out_dir, self.config = out_dir, config
        self.events = TrainEvents(Path(out_dir), start) if out_dir is not None else None
        if self.events is not None and start == 0 and method_spec is not None:
            self.events.text("method_spec", json.dumps(method_spec))
        # the rates the next step trains at: the schedule moves them after each optimizer step
        self.rates = learning_rates(optimizer)
        every = config.preview_every if self.events is not None else 0
        self.prompts = preview_prompts(config.preview_prompts, captions) if every else []

    def after_step(self, done: int, loss: float, optimizer: Any, pipe: Any, unet: Any) -> None:
        """Log step `done` (its loss, the rate of each parameter group during it); preview if due."""
        if self.events is None:
            return
        self.events.step(done, loss, self.rates)
        self.rates = learning_rates(optimizer)
        if self.prompts and preview_due(done, self.config.preview_every, self.config.steps):
            png = render_preview(pipe, unet, self.prompts, done, Path(self.out_dir))
            self.events.image(done, png)

    def probe(self, done: int, values: dict) -> None:
        """A held-out probe's numbers at step `done`."""
        if self.events is not None:
            self.events.probe(done, values)

    def flush(self) -> None:
        """Put what was logged on disk (before a checkpoint)."""
        if self.events is not None:
            self.events.flush()

    def close(self) -> None:
        """Close the event file."""
        if self.events is not None:
            self.events.close()
