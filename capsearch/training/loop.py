"""The inner loop: fine-tune a UNet with a trial's method spec and mitigations (diffusers-style, unrolled).

Only the UNet changes (θ0 + ω ⊙ Δφ, Dutt et al. 2024 eq. 1); text encoder and VAE stay frozen.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler

from capsearch.atomic import atomic_write
from capsearch.datasets.folder import ImageCaptionDataset
from capsearch.errors import UserError
from capsearch.faults import maybe_fail
from capsearch.methods import Applied, apply_methods, optimizer_groups
from capsearch.metrics.denoising import threshold_scores
from capsearch.models.delta import save_delta
from capsearch.progress import loss_bar
from capsearch.settings import TrainSettings
from capsearch.training import precision
from capsearch.training.books import Bookkeeper
from capsearch.training.encode_cache import TrainingInputs, encode_latents, host_draw
from capsearch.training.mitigations import Mitigations
from capsearch.training.probe import Probe, diffusion_target
from capsearch.training.state import TrainState

# bound here under a private name (the checkpoint saver is capsearch.training.books._save_checkpoint)
from capsearch.training.state import load_checkpoint as _load_checkpoint

if TYPE_CHECKING:
    from accelerate import Accelerator
    from accelerate.scheduler import AcceleratedScheduler
    from torch.optim.lr_scheduler import LRScheduler

    from capsearch.models.load import Pipeline

Callback = Callable[[str, dict], None]


@dataclass
class TrainResult:
    """What a fine-tune did: status ok | nan | stopped, losses, probes and mitigation counts."""

    status: str
    steps: int
    final_loss: float
    trainable: int
    total: int
    seconds: float
    losses: list = field(default_factory=list)
    probes: list[dict] = field(default_factory=list)
    mitigation_counts: dict = field(default_factory=dict)
    skipped_images: int = 0
    message: str = ""
    mixed_precision: str = "no"  # the precision the fine-tune ran at (auto resolved)


def _load_training_images(data, size: int):
    ds = (
        data
        if isinstance(data, ImageCaptionDataset)
        else ImageCaptionDataset(data, split="train", size=size)
    )
    pixels, captions, groups = [], [], []
    for i in range(len(ds)):
        x = ds.load(i, warn=False)  # warned below: none readable is one error line instead
        if x is None:  # corrupt image: counted by the dataset, fatal only if every image is
            ds.skipped += 1
            continue
        pixels.append(x)
        captions.append(ds.captions[i])
        groups.append(ds.records[i].get("dup_group"))
    if not len(ds):
        raise UserError(f"{ds.root} has no training images (no record of split {ds.split!r})")
    if not pixels:
        name, why = next(iter(ds.bad_files.items()))
        raise UserError(
            f"no readable training images in {ds.root}: {len(ds.bad_files)} unreadable file(s), "
            f"e.g. {name} ({why})"
        )
    for name in ds.bad_files:
        warnings.warn(ds.unreadable(name), stacklevel=2)
    return ds, torch.stack(pixels), captions, groups


def _target(pipe, x0, noise, t):
    return diffusion_target(pipe, x0, noise, t)


def finetune(
    pipe,
    method_spec: list[dict] | dict,
    data,
    config: TrainSettings,
    callbacks: Sequence[Callback] = (),
    out_dir: Path | None = None,
    resume: bool = False,
    quiet: bool = False,
) -> TrainResult:
    """Fine-tune pipe.unet in place with a method spec on a dataset folder; return what happened."""
    mit = Mitigations(config.mitigation_stack(), pipe.tokenizer)  # parsed once, by the settings
    run = _set_up(pipe, method_spec, data, config, mit)
    state = TrainState.begin(config.seed, run.trainable if config.ema_decay else None)
    ckpt = Path(out_dir) / "checkpoint" if out_dir else None
    start = 0
    if resume and ckpt is not None and ckpt.exists():
        start = _load_checkpoint(ckpt, run.unet, run.optimizer, run.scheduler, state)
    bar = loss_bar(not quiet, "fine-tune", config.steps, start)
    out = _Outcome(steps=start, loss=state.losses[-1][1] if state.losses else float("nan"))
    books = Bookkeeper(run, callbacks, out_dir, ckpt, start, method_spec)
    for probe in state.probes if start else ():  # a resumed run's earlier probes, again for the
        books.report("probe", probe)  # callbacks (a scheduler decides as if it had not stopped)
    trial = Path(out_dir).name if out_dir else None  # a search trial's tNNN (capsearch.faults)
    try:
        for step in range(start, config.steps):
            summed = 0.0  # becomes a tensor on the loss's device: no sync to add to it
            for _ in range(config.grad_accum):
                loss, touched = _loss(run, state)  # add_noise → unet → mse_loss
                if maybe_fail(trial, "train_step") == "nan":  # tests only: an injected fault
                    loss = loss * float("nan")
                if run.optimizer is not None:
                    run.accelerator.backward(loss / config.grad_accum)
                summed = summed + loss.detach().float()
                state.count(touched)
            # The step's one host sync (on a GPU the others let it run ahead): a non-finite loss in
            # any micro-batch stops training before its optimizer step, so no weight takes it in.
            step_loss = float(summed) / config.grad_accum
            if not math.isfinite(step_loss):
                raise _NonFiniteLoss(
                    f"non-finite loss at step {step + 1}; training stopped, no model saved"
                )
            if run.optimizer is not None:
                _optimizer_step(run, state)
            out.loss = step_loss
            books.after_step(state, step + 1, step_loss)
            bar(step + 1, step_loss)
            out.steps = step + 1
    except _NonFiniteLoss as stop:
        out.status, out.message = "nan", str(stop)
    except KeyboardInterrupt:
        out.status, out.message = "stopped", f"interrupted at step {out.steps}"
    finally:
        bar(None, None)
        books.close()
        pipe.unet = run.unet = precision.plain_unet(run.accelerator, run.unet)
    return _wrap_up(run, state, out, books)


@dataclass
class _Run:
    """The fixed parts of one fine-tune, built by _set_up before the first step."""

    pipe: Pipeline
    config: TrainSettings
    mit: Mitigations
    accelerator: Accelerator
    precision: str  # resolved: no, fp16 or bf16
    unet: torch.nn.Module  # prepared by accelerate (autocast forward) until precision.plain_unet
    optimizer: torch.optim.Optimizer | None  # None when the method spec trains nothing
    scheduler: AcceleratedScheduler | None
    trainable: list[torch.nn.Parameter]
    applied: Applied  # what apply_methods did: trainable names, entries, their own rates
    dataset: ImageCaptionDataset
    images: torch.Tensor
    captions: list[str]
    inputs: TrainingInputs  # latents and text states by record, encoded once (cache_encodings)
    uncond: torch.Tensor | None = None  # the empty prompt's embedding, for the threshold mitigation
    probe: Probe | None = None  # with probe_every: the held-out loss and memorisation signals

    def latents_of(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] as the UNet's input: VAE latents, or the pixels of a pixel-space model."""
        return encode_latents(self.pipe, x)


class _NonFiniteLoss(Exception):
    pass


@dataclass
class _Outcome:
    """How far a fine-tune got: status ok | nan | stopped, steps done and the last step's loss."""

    steps: int
    loss: float
    status: str = "ok"
    message: str = ""
    started: float = field(default_factory=time.time)


def _set_up(
    pipe: Pipeline, method_spec: list[dict] | dict, data, config: TrainSettings, mit: Mitigations
) -> _Run:
    """Seed, load the images, apply the methods, prepare UNet, optimizer and LR schedule; probe base."""
    use_cuda = torch.cuda.is_available() and pipe.device.type == "cuda"
    autocast = precision.resolve_precision(config.mixed_precision, use_cuda)
    accelerator = precision.make_accelerator(autocast, use_cuda)
    torch.manual_seed(config.seed)
    ds, images, captions, groups = _load_training_images(data, config.size)
    mit.fix_captions(captions, groups, config.seed)  # fixed RWA: once per record, before training
    applied = apply_methods(pipe.unet, method_spec)
    unet, opt, lr_sched = pipe.unet, None, None
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    trainable = [p for p in unet.parameters() if p.requires_grad]
    if trainable:
        # Through accelerate, fp16 gradients are unscaled before clipping and overflow steps skipped
        # (GradScaler); the UNet's forward runs under autocast until precision.plain_unet undoes it.
        unet, opt, lr_sched = accelerator.prepare(unet, *_optimizer(applied, unet, config))
    unet.train()
    pipe.text_encoder.requires_grad_(False).eval()
    recurring = {*captions, *mit.fixed.values(), ""}  # the captions drawn again and again
    run = _Run(
        pipe=pipe,
        config=config,
        mit=mit,
        accelerator=accelerator,
        precision=autocast,
        unet=unet,
        optimizer=opt,
        scheduler=lr_sched,
        trainable=trainable,
        applied=applied,
        dataset=ds,
        images=images,
        captions=captions,
        inputs=TrainingInputs(pipe, images, config.batch_size, config.cache_encodings, recurring),
    )
    if mit.filters_batch:
        run.uncond = pipe.encode_prompts([""])  # frozen text encoder: once
    if config.probe_every:  # its base measurement comes before any training (or resumed state)
        run.probe = Probe(pipe, ds.root, images, captions, groups, config.size, config.seed + 7,
                          own_captions=config.probe_own_captions)  # fmt: skip
        run.probe.measure_base(pipe, run.latents_of)
    return run


def _optimizer(
    applied: Applied, unet: torch.nn.Module, config: TrainSettings
) -> tuple[torch.optim.Optimizer, LRScheduler]:
    """AdamW over the method entries' parameter groups (their own rates), and the LR schedule."""
    groups = optimizer_groups(applied, unet, config.lr, config.weight_decay)
    opt = torch.optim.AdamW(groups, lr=config.lr)
    schedule = get_scheduler(
        config.lr_schedule,
        opt,
        num_warmup_steps=config.warmup_steps,
        num_training_steps=config.steps,
    )
    return opt, schedule


def _loss(run: _Run, state: TrainState) -> tuple[torch.Tensor, dict[str, int]]:
    """One micro-batch's diffusion loss and how many of its samples each mitigation touched."""
    pipe, mit = run.pipe, run.mit
    idx = state.next_batch(run.config.batch_size, len(run.images))
    texts, dropped, touched = mit.captions(idx, run.captions, state.rng)
    with torch.no_grad():
        x0 = run.inputs.latents(idx)
        ehs, noised = mit.embeddings(run.inputs.states(texts), dropped, state.gen)
    touched.update(noised)
    noise = host_draw(torch.randn, x0.shape, generator=state.gen, to=(x0.device, x0.dtype))
    t = host_draw(torch.randint, 0, pipe.scheduler.config.num_train_timesteps, (len(idx),),
                  generator=state.gen, to=(x0.device,))  # fmt: skip
    noisy = pipe.scheduler.add_noise(x0, noise, t)
    pred = run.unet(noisy, t, encoder_hidden_states=ehs).sample  # autocast: prepare()
    target = _target(pipe, x0, noise, t)
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
    if mit.filters_batch:
        with torch.no_grad():  # the scores choose samples; no gradient through them
            scores = threshold_scores(run.unet, noisy, t, ehs, run.uncond, cond_pred=pred)
        keep = mit.keep_mask(scores)
        touched["threshold"] = int((~keep).sum())
        per_sample = per_sample[keep] if keep.any() else per_sample[:0]
    # all samples dropped: a zero that is still part of the graph, so backward and the step run
    return (per_sample.mean() if len(per_sample) else pred.sum() * 0.0), touched


def _optimizer_step(run: _Run, state: TrainState) -> None:
    """Clip, step and schedule on the accumulated gradients, then move the EMA towards the weights."""
    config, accelerator = run.config, run.accelerator
    if config.max_grad_norm:  # on unscaled gradients: accelerate unscales fp16's first
        accelerator.clip_grad_norm_(run.trainable, config.max_grad_norm)
    run.optimizer.step()  # skipped by the GradScaler when fp16 gradients overflowed
    if not accelerator.optimizer_step_was_skipped:
        run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if state.ema is not None:  # EMA_k = lerp(EMA_{k-1}, θ_k, 1 − decay), every optimizer step
        with torch.no_grad():
            weights = [p.detach() for p in run.trainable]
            torch._foreach_lerp_(state.ema, weights, 1 - config.ema_decay)


def _wrap_up(run: _Run, state: TrainState, out: _Outcome, books: Bookkeeper) -> TrainResult:
    """Keep the EMA weights, save the delta and train_result.json, report the end; the result."""
    if state.ema is not None and out.status == "ok":
        with torch.no_grad():
            for p, e in zip(run.trainable, state.ema):
                p.copy_(e)
    if books.out_dir and out.status != "nan":
        base_model = getattr(run.pipe, "spec", None)
        save_delta(run.unet, books.out_dir / "delta", applied=run.applied, base_model=base_model)
    result = TrainResult(
        status=out.status,
        steps=out.steps,
        final_loss=out.loss,
        trainable=sum(p.numel() for p in run.trainable),
        total=sum(p.numel() for p in run.unet.parameters()),
        seconds=round(time.time() - out.started, 2),
        losses=state.losses,
        probes=state.probes,
        mitigation_counts=state.counts,
        skipped_images=run.dataset.skipped,
        message=out.message,
        mixed_precision=run.precision,
    )
    books.report("end", asdict(result))
    if books.out_dir:
        atomic_write(
            books.out_dir / "train_result.json",
            json.dumps({**asdict(result), "trainable_names": len(run.applied.names)}, indent=2),
        )
    return result
