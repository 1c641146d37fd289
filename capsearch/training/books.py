"""A fine-tune's bookkeeping: its log, TensorBoard events, previews, probes, checkpoints and kept deltas."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from capsearch.models.delta import save_delta
from capsearch.training.state import TrainState
from capsearch.training.state import save_checkpoint as _save_checkpoint
from capsearch.training.watch import TrainingWatch

if TYPE_CHECKING:
    from capsearch.training.loop import Callback, _Run

KEPT_DELTAS = "deltas"


def kept_delta_dir(out_dir: Path, step: int) -> Path:
    """The folder of the delta a fine-tune kept at `step` (train.keep_deltas_every)."""
    return Path(out_dir) / KEPT_DELTAS / f"step{step:06d}"


class Bookkeeper:
    """A fine-tune's records: callbacks, train_log.jsonl, TensorBoard events and previews
    (capsearch.training.watch), probes and checkpoints on their schedule."""

    def __init__(self, run: _Run, callbacks: Sequence[Callback], out_dir: Path | None,
                 ckpt: Path | None, start: int = 0, method_spec=None) -> None:  # fmt: skip

        self.run, self.callbacks, self.checkpoint = run, callbacks, ckpt
        self.out_dir = Path(out_dir) if out_dir else None
        self.log = None
        if self.out_dir:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.log = open(self.out_dir / "train_log.jsonl", "a")
        self.watch = TrainingWatch(self.out_dir, start, run.config, run.dataset.captions,
                                   run.optimizer, method_spec)  # fmt: skip

    def after_step(self, state: TrainState, done: int, loss: float) -> None:
        """Log every 10 steps and the last; probe and checkpoint every probe_every/checkpoint_every."""
        run, config = self.run, self.run.config
        self.watch.after_step(done, loss, run.optimizer, run.pipe, run.unet)  # a preview when due
        if done % 10 == 0 or done == config.steps:
            state.losses.append([done, round(loss, 6)])
            entry = {"step": done, "loss": loss, "mitigations": dict(state.counts),
                     "time": round(time.time(), 2)}  # fmt: skip
            self.report("step", entry, entry)
        if run.probe is not None and done % config.probe_every == 0:
            probe = {"step": done, **run.probe(run.pipe, run.latents_of)}
            state.probes.append(probe)
            self.report("probe", probe, {"probe": probe})
            self.watch.probe(done, probe)
        if self.out_dir and config.keep_deltas_every and done % config.keep_deltas_every == 0:
            if done < config.steps:  # the last step's delta is the run's own, delta/
                self.keep_delta(state, done)
        if self.checkpoint and config.checkpoint_every and done % config.checkpoint_every == 0:
            self.watch.flush()  # events up to here on disk: a resume logs only the later steps
            _save_checkpoint(self.checkpoint, done, run.unet, run.optimizer, run.scheduler, state)

    def keep_delta(self, state: TrainState, done: int) -> None:
        """Save the delta as it stands at step `done` (the EMA weights where there are any) in
        out_dir/deltas/stepNNNNNN/; the training weights are back in place afterwards."""
        run = self.run
        folder = kept_delta_dir(self.out_dir, done)
        base_model = getattr(run.pipe, "spec", None)
        if state.ema is None:
            save_delta(run.unet, folder, applied=run.applied, base_model=base_model)
            return
        with torch.no_grad():
            weights = [p.detach().clone() for p in run.trainable]
            for p, e in zip(run.trainable, state.ema):
                p.copy_(e)
            try:
                save_delta(run.unet, folder, applied=run.applied, base_model=base_model)
            finally:
                for p, w in zip(run.trainable, weights):
                    p.copy_(w)

    def report(self, event: str, payload: dict, line: dict | None = None) -> None:
        """With an out_dir, append `line` to train_log.jsonl; then send the event to every callback.

        The line is written first: a callback may not return (a scheduler that stops the trial at this
        probe ends its worker), and the probe that stopped a trial belongs in its log.
        """
        if self.log and line is not None:
            self.log.write(json.dumps(line) + "\n")
            self.log.flush()  # a killed trial keeps its log up to the kill, not up to a full buffer
        for cb in self.callbacks:
            cb(event, payload)

    def close(self) -> None:
        """Close train_log.jsonl and the event file."""
        if self.log:
            self.log.close()
        self.watch.close()
