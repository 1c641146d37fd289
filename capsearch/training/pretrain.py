"""Pretrain the tiny base (UNet + text encoder) on the procedural shapes world or the broad corpus.

The tiny base plays Stable Diffusion's role: a general text-to-image model for which chest X-rays are a
domain shift. It is trained once, ships in `capsearch/assets/tiny_base`, and can be reproduced with the
command recorded in its `capsearch.json`. The broad corpus (capsearch.worlds.corpus) builds a second base.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from capsearch.errors import UserError
from capsearch.models.load import tiny_random
from capsearch.progress import loss_bar
from capsearch.worlds.corpus import CHUNK, corpus_chunk
from capsearch.worlds.shapes import make_shapes

CORPORA = ("shapes", "broad")


def _pool_chunk(args: tuple[str, int, int, int, int]) -> tuple[np.ndarray, list[str]]:
    """One chunk of a pool: shapes seeded seed·10⁶+k (as the shipped base was), broad corpus chunk k."""
    corpus, n, size, seed, k = args
    if corpus == "shapes":
        return make_shapes(n, size=size, seed=seed * 1_000_000 + k)
    return corpus_chunk(n, size, seed, k)


def corpus_pool(
    corpus: str, n: int, size: int, seed: int, workers: int = 1
) -> tuple[torch.Tensor, list[str]]:
    """Render n images of a corpus ('shapes' or 'broad') in chunks of 1,000, optionally in parallel."""
    if corpus not in CORPORA:
        raise UserError(f"unknown corpus {corpus!r}; known: {', '.join(CORPORA)}")
    jobs = [(corpus, min(CHUNK, n - s), size, seed, k) for k, s in enumerate(range(0, n, CHUNK))]
    if workers > 1:
        with get_context("spawn").Pool(workers) as pool:
            parts = pool.map(_pool_chunk, jobs)
    else:
        parts = [_pool_chunk(j) for j in jobs]
    images = torch.from_numpy(np.concatenate([p[0] for p in parts]))[:, None]
    return images, [c for p in parts for c in p[1]]


def shapes_pool(n: int, size: int, seed: int, workers: int = 1) -> tuple[torch.Tensor, list[str]]:
    """Render n shape scenes in chunks of 1,000 (chunk k seeded seed·10⁶+k), optionally in parallel."""
    return corpus_pool("shapes", n, size, seed, workers)


def _lr_at(step: int, total: int, warmup: int, lr: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))  # cosine decay to 10%


def pretrain_shapes(
    out: Path,
    steps: int = 20000,
    batch_size: int = 64,
    lr: float = 5e-4,
    pool_size: int = 50000,
    device: str = "cpu",
    seed: int = 0,
    ema_decay: float = 0.999,
    caption_dropout: float = 0.1,
    workers: int = 1,
    checkpoint_every: int = 1000,
    time_limit: float | None = None,
    time_budget: float | None = None,
    progress: bool = True,
    corpus: str = "shapes",
) -> dict:
    """Train the tiny UNet and text encoder from scratch; write the EMA weights as a pipeline folder."""
    if corpus not in CORPORA:
        raise UserError(f"unknown corpus {corpus!r}; known: {', '.join(CORPORA)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    pipe = tiny_random(seed)
    unet, text_encoder = pipe.unet.to(device).train(), pipe.text_encoder.to(device).train()
    text_encoder.requires_grad_(True)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    start_step, history = 0, []
    ckpt = out / "checkpoint.pt"
    if ckpt.exists():  # resume (weights-only load: tensors and plain containers, no pickle of code)
        state = torch.load(ckpt, map_location=device, weights_only=True)
        made_on = state.get("corpus", "shapes")  # checkpoints before the broad corpus: shapes
        if made_on != corpus:
            raise UserError(
                f"{ckpt} was trained on the {made_on} corpus, not {corpus}: resume with "
                f"--corpus {made_on}, or choose a new --out"
            )
        for p, v in zip(params, state["params"]):
            p.data.copy_(v)
        for e, v in zip(ema, state["ema"]):
            e.copy_(v)
        opt.load_state_dict(state["opt"])
        start_step, history = int(state["step"]), list(state["history"])
    t0 = time.time()
    images, captions = corpus_pool(corpus, pool_size, pipe.unet.config.sample_size, seed, workers)
    ids = pipe.tokenize(captions)
    empty_ids = pipe.tokenize([""])[0]
    images, ids, empty_ids = images.to(device), ids.to(device), empty_ids.to(device)
    pool_seconds = time.time() - t0
    sched = pipe.scheduler
    alphas = sched.alphas_cumprod.to(device)
    gen = torch.Generator(device=device).manual_seed(seed + start_step)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.startswith("cuda")
        else torch.autocast("cpu", enabled=False)
    )
    bar = loss_bar(progress, "pretrain", steps, start_step)
    t_train, running, step = time.time(), None, start_step
    calibrate_at = start_step + 50 if time_budget else None
    step = start_step
    while step < steps:
        if (
            step == calibrate_at
        ):  # fit the schedule's length to the time budget (measured step time)
            per_step = (time.time() - t_train) / 50
            steps = max(step + 1, int(step + (time_budget - (time.time() - t_train)) / per_step))
            bar(None, None)
            bar = loss_bar(progress, "pretrain", steps, step)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, min(1000, steps // 10 + 1), lr)
        idx = torch.randint(0, len(images), (batch_size,), device=device, generator=gen)
        x0 = images[idx]
        tok = ids[idx]
        drop = torch.rand(batch_size, device=device, generator=gen) < caption_dropout
        tok = torch.where(
            drop[:, None], empty_ids[None], tok
        )  # caption dropout for classifier-free guidance
        noise = torch.randn(x0.shape, device=device, generator=gen)
        t = torch.randint(
            0, sched.config.num_train_timesteps, (batch_size,), device=device, generator=gen
        )
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise  # q(x_t | x_0), Ho et al. 2020 eq. 4
        with autocast:
            ehs = text_encoder(tok)[0]
            pred = unet(noisy, t, encoder_hidden_states=ehs).sample
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % 100 == 0:
            history.append([step + 1, round(running, 5)])
        bar(step + 1, running)
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            _save_checkpoint(ckpt, params, ema, opt, step + 1, history, corpus)
        step += 1
        if time_limit and time.time() - t_train > time_limit:
            _save_checkpoint(ckpt, params, ema, opt, step, history, corpus)
            break
    steps_done = step
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.data.copy_(e)
    pipe.unet, pipe.text_encoder = unet.cpu().eval(), text_encoder.cpu().eval()
    pipe.text_encoder.requires_grad_(False)
    pipe.unet.requires_grad_(False)
    pipe.save(out, half=True)  # fp16 on disk keeps the shipped base small; loaded back as fp32
    meta = {
        "world": corpus,  # as before the broad corpus existed: the corpus pretrained on
        "corpus": corpus,  # shapes (capsearch.worlds.shapes) or broad (capsearch.worlds.corpus)
        "steps": steps_done,
        "batch_size": batch_size,
        "lr": lr,
        "pool_size": pool_size,
        "seed": seed,
        "ema_decay": ema_decay,
        "caption_dropout": caption_dropout,
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "train_seconds": round(time.time() - t_train, 1),
        "pool_seconds": round(pool_seconds, 1),
        "final_loss_ema": round(running, 5) if running is not None else None,
        "loss_history": history,
        "command": "capsearch " + " ".join(sys.argv[1:])
        if sys.argv and "capsearch" in sys.argv[0]
        else None,
        "unet_parameters": sum(p.numel() for p in pipe.unet.parameters()),
        "text_encoder_parameters": sum(p.numel() for p in pipe.text_encoder.parameters()),
    }
    meta["sha256"] = folder_sha256(out)
    (out / "capsearch.json").write_text(json.dumps(meta, indent=2))
    return meta


def folder_sha256(folder: Path) -> dict[str, str]:
    """sha256 of every safetensors/json/txt file of a model folder (checkpoints and metadata excluded)."""
    folder = Path(folder)
    sums = {}
    for f in sorted(folder.rglob("*")):
        if (
            f.is_file()
            and f.suffix in {".safetensors", ".txt"}
            or (f.suffix == ".json" and f.name != "capsearch.json")
        ):
            sums[str(f.relative_to(folder))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return sums


def _save_checkpoint(
    path: Path, params, ema, opt, step: int, history, corpus: str = "shapes"
) -> None:
    tmp = path.with_suffix(".tmp")
    state = {
        "corpus": corpus,
        "params": [p.detach().cpu() for p in params],
        "ema": [e.cpu() for e in ema],
        "opt": opt.state_dict(),
        "step": step,
        "history": history,
    }
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: a crash never leaves a half-written checkpoint
