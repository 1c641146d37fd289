"""What a fine-tune carries from one optimizer step to the next, and its checkpoint folder.

A checkpoint folder holds `trainable.safetensors` (the trainable parameters, and the EMA copies as
`__ema__.<i>`), `state.pt` (optimizer, LR schedule, fp16 GradScaler, torch generator) and
`state.json` (step, Python RNG, loss and probe history, mitigation counts, the epoch's remaining order).
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from capsearch.errors import UserError
from capsearch.faults import maybe_fail

if TYPE_CHECKING:
    from accelerate.scheduler import AcceleratedScheduler

EMA_PREFIX = "__ema__."


@dataclass
class TrainState:
    """A fine-tune's state besides model and optimizer: generators, EMA, epoch order and history."""

    gen: torch.Generator  # batch order, noise, timesteps and embedding noise
    rng: random.Random  # the caption mitigations' draws
    ema: list[torch.Tensor] | None = None  # EMA copies of the trainable parameters, in their order
    order: list[int] = field(default_factory=list)  # the rest of the current epoch's permutation
    losses: list[list] = field(default_factory=list)  # [step, loss] every 10 steps and at the end
    probes: list[dict] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # samples each mitigation touched

    @classmethod
    def begin(cls, seed: int, ema_of: list[torch.nn.Parameter] | None = None) -> TrainState:
        """The state before the first step: generators seeded with `seed`, EMA copies of `ema_of`."""
        ema = [p.detach().clone() for p in ema_of] if ema_of is not None else None
        return cls(gen=torch.Generator().manual_seed(seed), rng=random.Random(seed), ema=ema)

    def next_batch(self, batch_size: int, n_records: int) -> list[int]:
        """The next batch of record indices, shuffled epoch by epoch with the seeded generator."""
        while len(self.order) < batch_size:
            self.order += torch.randperm(n_records, generator=self.gen).tolist()
        batch, self.order = self.order[:batch_size], self.order[batch_size:]
        return batch

    def count(self, touched: dict[str, int]) -> None:
        """Add one micro-batch's per-mitigation sample counts to the running totals."""
        for name, n in touched.items():
            self.counts[name] = self.counts.get(name, 0) + n


def save_checkpoint(
    path: Path,
    step: int,
    unet: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: AcceleratedScheduler | None,
    state: TrainState,
) -> None:
    """Write the state after `step` steps to a temporary folder, then swap it in (atomic on one
    filesystem)."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_checkpoint(tmp, step, unet, optimizer, scheduler, state)
        maybe_fail(
            path.parent.name, "checkpoint"
        )  # tests only: an injected fault (capsearch.faults)
    except (
        BaseException
    ):  # a full disk part-way: no half a checkpoint left beside the last whole one
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(path.name + ".old")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def _write_checkpoint(
    tmp: Path,
    step: int,
    unet: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: AcceleratedScheduler | None,
    state: TrainState,
) -> None:
    named = {n: p.detach().contiguous() for n, p in unet.named_parameters() if p.requires_grad}
    if state.ema is not None:
        named.update({f"{EMA_PREFIX}{i}": e.contiguous() for i, e in enumerate(state.ema)})
    save_file(named, str(tmp / "trainable.safetensors"))
    scaler = getattr(optimizer, "scaler", None)  # fp16's GradScaler, held by accelerate's optimizer
    torch.save(
        {
            "opt": optimizer.state_dict() if optimizer else None,
            "lr": scheduler.state_dict() if scheduler else None,
            "scaler": scaler.state_dict() if scaler else None,
            "gen": state.gen.get_state(),
            # the global streams too: a VAE base's posterior draws take theirs (capsearch.training.encode_cache)
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
        tmp / "state.pt",
    )
    meta = {
        "step": step,
        "rng": _rng_to_json(state.rng.getstate()),
        "losses": state.losses,
        "probes": state.probes,
        "counts": state.counts,
        "order": state.order,
    }
    (tmp / "state.json").write_text(json.dumps(meta))


def load_checkpoint(
    path: Path,
    unet: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: AcceleratedScheduler | None,
    state: TrainState,
) -> int:
    """Restore a checkpoint into the UNet, optimizer, LR schedule and `state`; return its step."""
    tensors = load_file(str(path / "trainable.safetensors"))
    params = dict(unet.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            if name.startswith(EMA_PREFIX):
                if state.ema is not None:
                    state.ema[int(name.removeprefix(EMA_PREFIX))].copy_(value)
            elif name in params:
                params[name].copy_(value)
            else:
                raise UserError(
                    f"checkpoint {path} does not match this method spec (unknown tensor {name})"
                )
    saved = torch.load(path / "state.pt", weights_only=True)  # tensors and plain containers only
    if optimizer is not None and saved["opt"] is not None:
        optimizer.load_state_dict(saved["opt"])
        scheduler.load_state_dict(saved["lr"])
    scaler = getattr(optimizer, "scaler", None)
    if scaler is not None and saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])
    state.gen.set_state(saved["gen"])
    if "torch_rng" in saved:  # checkpoints written before the global streams were kept lack them
        torch.set_rng_state(saved["torch_rng"])
    if saved.get("cuda_rng") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
    meta = json.loads((path / "state.json").read_text())
    state.rng.setstate(_rng_from_json(meta["rng"]))
    state.losses, state.probes = meta["losses"], meta["probes"]
    state.counts, state.order = meta["counts"], meta["order"]
    return meta["step"]


def _rng_to_json(state: tuple) -> list:
    return [state[0], list(state[1]), state[2]]


def _rng_from_json(data: list) -> tuple:
    return (data[0], tuple(data[1]), data[2])
