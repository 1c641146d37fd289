"""The inner loop: fine-tune a UNet with a trial's method spec and mitigations (diffusers-style, unrolled).

Only the UNet changes (θ0 + ω ⊙ Δφ, Dutt et al. 2024 eq. 1); text encoder and VAE stay frozen.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from capsearch.errors import UserError
from capsearch.mitigations import Mitigations, vocabulary_words
from capsearch.progress import loss_bar

Callback = Callable[[str, dict], None]
PRECISIONS = ("auto", "no", "fp16", "bf16")


@dataclass
class TrainConfig:
    """Hyper-parameters of one fine-tune."""

    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-4  # method entries may carry their own (capsearch.methods.optimizer_groups)
    lr_schedule: str = "constant"  # any diffusers.optimization scheduler name
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_accum: int = 1
    mixed_precision: str = "auto"  # auto: bf16 or fp16 on a GPU, no on CPU (resolve_precision)
    gradient_checkpointing: bool = False
    ema_decay: float | None = None
    seed: int = 0
    size: int = 32
    max_grad_norm: float = 1.0
    checkpoint_every: int = 0
    probe_every: int = 0
    mitigations: list[dict] = field(default_factory=list)

    def check(self) -> None:
        """Reject impossible values with one line naming the field."""
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise UserError(f"train.{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise UserError(f"train.lr must be positive, got {self.lr}")
        if self.mixed_precision not in PRECISIONS:
            raise UserError(
                f"train.mixed_precision must be auto, no, fp16 or bf16, got {self.mixed_precision!r}"
            )
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise UserError("train.ema_decay must be in (0, 1)")


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
    from capsearch.data import ImageCaptionDataset

    ds = (
        data
        if isinstance(data, ImageCaptionDataset)
        else ImageCaptionDataset(data, split="train", size=size)
    )
    pixels, captions, groups = [], [], []
    for i in range(len(ds)):
        x = ds.load(i)
        if x is None:  # corrupt image: warned and counted by the dataset, never fatal
            ds.skipped += 1
            continue
        pixels.append(x)
        captions.append(ds.captions[i])
        groups.append(ds.records[i].get("dup_group"))
    if not pixels:
        raise UserError(f"no readable training images in {ds.root}")
    return ds, torch.stack(pixels), captions, groups


def _target(pipe, x0, noise, t):
    from capsearch.probe import diffusion_target

    return diffusion_target(pipe, x0, noise, t)


def finetune(
    pipe,
    method_spec: list[dict] | dict,
    data,
    config: TrainConfig,
    callbacks: Sequence[Callback] = (),
    out_dir: Path | None = None,
    resume: bool = False,
    quiet: bool = False,
) -> TrainResult:
    """Fine-tune pipe.unet in place with a method spec on a dataset folder; return what happened."""
    from diffusers.optimization import get_scheduler

    from capsearch.delta import save_delta
    from capsearch.methods import apply_methods, optimizer_groups

    config.check()
    mit = Mitigations.parse(config.mitigations)
    if mit.rwa:
        mit.words = vocabulary_words(pipe.tokenizer)
    use_cuda = torch.cuda.is_available() and pipe.device.type == "cuda"
    precision = resolve_precision(config.mixed_precision, use_cuda)
    accelerator = _accelerator(precision, use_cuda)
    torch.manual_seed(config.seed)
    ds, images, captions, groups = _load_training_images(data, config.size)
    mit.fix_captions(captions, groups, config.seed)  # fixed RWA: once per record, before training
    names = apply_methods(pipe.unet, method_spec)
    unet = pipe.unet
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    trainable = [p for p in unet.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    total = sum(p.numel() for p in unet.parameters())
    if trainable:
        groups_ = optimizer_groups(unet, config.lr, config.weight_decay)
        opt = torch.optim.AdamW(groups_, lr=config.lr)
        lr_sched = get_scheduler(
            config.lr_schedule,
            opt,
            num_warmup_steps=config.warmup_steps,
            num_training_steps=config.steps,
        )
        # Through accelerate, fp16 gradients are unscaled before clipping and overflow steps skipped
        # (GradScaler); the UNet's forward runs under autocast until _plain_unet undoes it.
        unet, opt, lr_sched = accelerator.prepare(unet, opt, lr_sched)
    else:
        opt = lr_sched = None
    unet.train()
    pipe.text_encoder.requires_grad_(False).eval()
    gen = torch.Generator().manual_seed(config.seed)
    rng = random.Random(config.seed)
    ema = [p.detach().clone() for p in trainable] if config.ema_decay else None
    start, losses, probes, counts, order = 0, [], [], {}, []
    vae = pipe.vae

    def latents_of(x):
        if vae is None:
            return x
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        return (
            vae.encode(x.to(vae.dtype)).latent_dist.sample(generator=None)
            * vae.config.scaling_factor
        )

    probe = None
    if config.probe_every:  # its base measurement comes before any training (or resumed state)
        from capsearch.probe import Probe

        probe = Probe(pipe, ds.root, images, captions, groups, config.size, config.seed + 7)
        probe.measure_base(pipe, latents_of)
    ckpt = Path(out_dir) / "checkpoint" if out_dir else None
    if resume and ckpt is not None and ckpt.exists():
        start, losses, probes, counts, order = _load_checkpoint(
            ckpt, unet, opt, lr_sched, gen, rng, ema
        )
    uncond = pipe.encode_prompts([""]) if mit.threshold else None  # frozen text encoder: once
    bar = loss_bar(not quiet, "fine-tune", config.steps, start)
    t0, status, message, step = time.time(), "ok", "", start
    loss_value = losses[-1][1] if losses else float("nan")
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    log_f = open(Path(out_dir) / "train_log.jsonl", "a") if out_dir else None
    try:
        for step in range(start, config.steps):
            step_loss = 0.0
            for _ in range(config.grad_accum):
                while (
                    len(order) < config.batch_size
                ):  # epoch-wise shuffling from the seeded generator
                    order += torch.randperm(len(images), generator=gen).tolist()
                idx, order = order[: config.batch_size], order[config.batch_size :]
                texts, dropped, touched = mit.captions(idx, captions, rng)
                with torch.no_grad():
                    x0 = latents_of(images[idx].to(pipe.device))
                    ehs = pipe.encode_prompts(texts)
                    ehs, t2 = mit.embeddings(ehs, dropped, gen)
                touched.update(t2)
                noise = torch.randn(x0.shape, generator=gen).to(x0)
                t = torch.randint(
                    0, pipe.scheduler.config.num_train_timesteps, (len(idx),), generator=gen
                ).to(x0.device)
                noisy = pipe.scheduler.add_noise(x0, noise, t)
                pred = unet(noisy, t, encoder_hidden_states=ehs).sample  # autocast: prepare()
                target = _target(pipe, x0, noise, t)
                per_sample = (
                    F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
                )
                if mit.threshold:
                    from capsearch.metrics.denoising import threshold_scores

                    with torch.no_grad():  # the scores choose samples; no gradient through them
                        scores = threshold_scores(unet, noisy, t, ehs, uncond, cond_pred=pred)
                    keep = mit.keep_mask(scores)
                    touched["threshold"] = int((~keep).sum())
                    per_sample = per_sample[keep] if keep.any() else per_sample[:0]
                loss = per_sample.mean() if len(per_sample) else pred.sum() * 0.0
                if not torch.isfinite(loss):
                    status, message = (
                        "nan",
                        f"non-finite loss at step {step + 1}; training stopped, no model saved",
                    )
                    raise _Stop
                if opt is not None:
                    accelerator.backward(loss / config.grad_accum)
                step_loss += loss.item() / config.grad_accum
                for k, v in touched.items():
                    counts[k] = counts.get(k, 0) + v
            if opt is not None:
                if config.max_grad_norm:  # on unscaled gradients: accelerate unscales fp16's first
                    accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
                opt.step()  # skipped by the GradScaler when fp16 gradients overflowed
                if not accelerator.optimizer_step_was_skipped:
                    lr_sched.step()
                opt.zero_grad(set_to_none=True)
                if ema is not None:
                    with torch.no_grad():
                        torch._foreach_lerp_(
                            ema, [p.detach() for p in trainable], 1 - config.ema_decay
                        )
            loss_value = step_loss
            done = step + 1
            if done % 10 == 0 or done == config.steps:
                losses.append([done, round(loss_value, 6)])
                _emit(
                    callbacks,
                    "step",
                    {"step": done, "loss": loss_value, "mitigations": dict(counts)},
                )
                if log_f:
                    log_f.write(
                        json.dumps({"step": done, "loss": loss_value, "mitigations": counts}) + "\n"
                    )
            if probe is not None and done % config.probe_every == 0:
                p = {"step": done, **probe(pipe, latents_of)}
                probes.append(p)
                _emit(callbacks, "probe", p)
                if log_f:
                    log_f.write(json.dumps({"probe": p}) + "\n")
            if ckpt is not None and config.checkpoint_every and done % config.checkpoint_every == 0:
                _save_checkpoint(
                    ckpt, done, unet, opt, lr_sched, gen, rng, ema, losses, probes, counts, order
                )
            bar(done, loss_value)
            step = done
    except _Stop:
        pass
    except KeyboardInterrupt:
        status, message = "stopped", f"interrupted at step {step}"
    finally:
        bar(None, None)
        if log_f:
            log_f.close()
        pipe.unet = unet = _plain_unet(accelerator, unet)
    if ema is not None and status == "ok":
        with torch.no_grad():
            for p, e in zip(trainable, ema):
                p.copy_(e)
    if out_dir and status != "nan":
        save_delta(unet, Path(out_dir) / "delta", base_model=getattr(pipe, "spec", None))
    result = TrainResult(
        status=status,
        steps=step,
        final_loss=loss_value,
        trainable=n_trainable,
        total=total,
        seconds=round(time.time() - t0, 2),
        losses=losses,
        probes=probes,
        mitigation_counts=counts,
        skipped_images=ds.skipped,
        message=message,
        mixed_precision=precision,
    )
    _emit(callbacks, "end", asdict(result))
    if out_dir:
        (Path(out_dir) / "train_result.json").write_text(
            json.dumps({**asdict(result), "trainable_names": len(names)}, indent=2)
        )
    return result


class _Stop(Exception):
    pass


def _emit(callbacks: Sequence[Callback], event: str, payload: dict) -> None:
    for cb in callbacks:
        cb(event, payload)


def _save_checkpoint(
    path: Path, step, unet, opt, lr_sched, gen, rng, ema, losses, probes, counts, order
) -> None:
    """Write the resumable state to a temporary folder, then swap it in (atomic on one filesystem)."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    named = {n: p.detach().contiguous() for n, p in unet.named_parameters() if p.requires_grad}
    if ema is not None:
        named.update({f"__ema__.{i}": e.contiguous() for i, e in enumerate(ema)})
    save_file(named, str(tmp / "trainable.safetensors"))
    scaler = getattr(opt, "scaler", None)  # fp16's GradScaler, held by accelerate's optimizer
    torch.save(
        {
            "opt": opt.state_dict() if opt else None,
            "lr": lr_sched.state_dict() if lr_sched else None,
            "scaler": scaler.state_dict() if scaler else None,
            "gen": gen.get_state(),
        },
        tmp / "state.pt",
    )
    meta = {
        "step": step,
        "rng": _rng_to_json(rng.getstate()),
        "losses": losses,
        "probes": probes,
        "counts": counts,
        "order": order,  # the rest of the current epoch's permutation
    }
    (tmp / "state.json").write_text(json.dumps(meta))
    old = path.with_name(path.name + ".old")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(path: Path, unet, opt, lr_sched, gen, rng, ema):
    from safetensors.torch import load_file

    tensors = load_file(str(path / "trainable.safetensors"))
    params = dict(unet.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            if name.startswith("__ema__."):
                if ema is not None:
                    ema[int(name.split(".")[1])].copy_(value)
            elif name in params:
                params[name].copy_(value)
            else:
                raise UserError(
                    f"checkpoint {path} does not match this method spec (unknown tensor {name})"
                )
    state = torch.load(path / "state.pt", weights_only=True)  # tensors and plain containers only
    if opt is not None and state["opt"] is not None:
        opt.load_state_dict(state["opt"])
        lr_sched.load_state_dict(state["lr"])
    scaler = getattr(opt, "scaler", None)
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    gen.set_state(state["gen"])
    meta = json.loads((path / "state.json").read_text())
    rng.setstate(_rng_from_json(meta["rng"]))
    return meta["step"], meta["losses"], meta["probes"], meta["counts"], meta["order"]


def resolve_precision(requested: str, cuda: bool) -> str:
    """A fine-tune's autocast precision: auto is bf16 on a GPU that has it, else fp16; no on CPU."""
    if requested == "auto":
        if not cuda:
            return "no"
        # bf16 has fp32's exponent range: no loss scaling, no skipped steps (Ampere and later)
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if requested != "no" and not cuda:
        raise UserError(f"train.mixed_precision={requested} needs a GPU; use auto or no on CPU")
    return requested


def _accelerator(precision: str, cuda: bool):
    """An Accelerator for one fine-tune on the UNet's own device (the pipeline placed it already)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # accelerate keeps one process-wide state that refuses a second precision; one process may
    # fine-tune several times (tests, experiments), each at its own precision.
    AcceleratorState._reset_state()
    return Accelerator(mixed_precision=precision, cpu=not cuda, device_placement=False)


def _plain_unet(accelerator, unet: torch.nn.Module) -> torch.nn.Module:
    """The UNet as it was before accelerator.prepare: its class's forward, no autocast wrapper."""
    if not getattr(unet, "_is_accelerate_prepared", False):
        return unet
    wrapped = "_original_forward" in unet.__dict__
    unet = accelerator.unwrap_model(unet, keep_fp32_wrapper=False)
    # unwrap_model leaves the original forward bound on the instance and the prepared flag set; drop
    # both so sampling and saving see the plain module and a later fine-tune prepares it afresh.
    if wrapped:
        unet.__dict__.pop("forward", None)
    unet.__dict__.pop("_is_accelerate_prepared", None)
    return unet


def _rng_to_json(state):
    return [state[0], list(state[1]), state[2]]


def _rng_from_json(data):
    return (data[0], tuple(data[1]), data[2])
