"""An SD-v1.5-shaped model with random weights, its synthetic data, and the two training loops compared.

The shapes are Stable Diffusion v1.5's (UNet, CLIP text encoder, VAE), written out here; `--tiny`
keeps the same block types at toy widths so that the same code runs on a CPU in seconds.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from gpu_common import peak_gib, reset_peak, step_timer, steps_per_s, sync

_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": _DOWN,
    "up_block_types": _UP,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
TINY_UNET = {
    **SD15_UNET,
    "sample_size": 8,
    "block_out_channels": (32, 64, 64, 64),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "cross_attention_dim": 32,
}
SD15_TEXT = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
TINY_TEXT = {**SD15_TEXT, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "projection_dim": 32}  # fmt: skip
SD15_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
TINY_VAE = {**SD15_VAE, "down_block_types": ("DownEncoderBlock2D",) * 2,
            "up_block_types": ("UpDecoderBlock2D",) * 2, "block_out_channels": (8, 16),
            "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 16}  # fmt: skip
SD15_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "prediction_type": "epsilon",
    "steps_offset": 1,
}

# The methods compared, on the whole UNet (LoRA on the attention projections, as diffusers' LoRA example).
METHODS = {
    "full": {"method": "full", "units": "*"},
    "difffit": {"method": "difffit", "units": "*"},
    "svdiff": {"method": "svdiff", "units": "*"},
    "lora": {"method": "lora", "units": "*:*_attn", "rank": 4},
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}


@dataclass
class Shapes:
    """Model configs and run lengths of one benchmark size (SD v1.5, or toy for --tiny)."""

    tiny: bool
    batch: int
    unet: dict = field(init=False)
    text: dict = field(init=False)
    vae: dict = field(init=False)
    records: int = field(init=False)  # training records of the synthetic data set
    warmup: int = field(init=False)  # steps left out of every timing
    timed: int = field(init=False)
    numerics: int = field(init=False)  # steps of the fp32 reference runs

    def __post_init__(self) -> None:
        self.unet = TINY_UNET if self.tiny else SD15_UNET
        self.text = TINY_TEXT if self.tiny else SD15_TEXT
        self.vae = TINY_VAE if self.tiny else SD15_VAE
        self.records = max(4 * self.batch, 16)
        self.warmup, self.timed, self.numerics = (1, 3, 3) if self.tiny else (10, 20, 10)

    @property
    def latent(self) -> tuple[int, int, int]:
        """Shape (C, H, W) of one latent."""
        return (self.unet["in_channels"], self.unet["sample_size"], self.unet["sample_size"])

    @property
    def pixels(self) -> int:
        """Image side the VAE turns into one latent."""
        return self.vae["sample_size"]


def captions(n: int) -> list[str]:
    """n distinct radiology-style captions."""
    sides, findings = (
        ("left", "right", "bilateral"),
        ("effusion", "opacity", "nodule", "atelectasis"),
    )
    return [
        f"chest x-ray {i}: {findings[i % 4]} in the {sides[i % 3]} lower lobe, heart size normal"
        for i in range(n)
    ]


def write_records(root: Path, texts: list[str], pixels: int | None = None, seed: int = 0) -> Path:
    """A dataset folder with metadata.jsonl (and random grayscale PNGs of side `pixels`, if given)."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with open(root / "metadata.jsonl", "w") as f:
        for i, text in enumerate(texts):
            name = f"{i:04d}.png"
            f.write(json.dumps({"file_name": name, "text": text, "split": "train"}) + "\n")
            if pixels:
                image = rng.integers(0, 256, (pixels, pixels), dtype=np.uint8)
                Image.fromarray(image).save(root / name)
    return root


def latent_records(root: Path, latents: torch.Tensor):
    """The records of `root` with precomputed latents for images (with no VAE, finetune trains on them)."""
    from capsearch.datasets.folder import ImageCaptionDataset

    class LatentRecords(ImageCaptionDataset):
        def load(self, index: int, warn: bool = True) -> torch.Tensor:
            return latents[index]

    return LatentRecords(root, split="train", size=8)


class StateTable(torch.nn.Module):
    """A text encoder that looks cached hidden states up by token ids (a frozen encoder, run once)."""

    def __init__(self, ids: torch.Tensor, states: torch.Tensor) -> None:
        super().__init__()
        self.rows = {tuple(row.tolist()): k for k, row in enumerate(ids)}
        self.register_buffer("states", states)

    @property
    def device(self) -> torch.device:
        """Where token ids go: the CPU, since the lookup is by their values."""
        return torch.device("cpu")

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor]:
        index = torch.tensor([self.rows[tuple(row.tolist())] for row in ids])
        return (self.states[index.to(self.states.device)],)


def build_unet(shapes: Shapes, device: torch.device, seed: int = 0):
    """The UNet, random weights from `seed`, built directly on the device (identical per seed)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    with torch.device(device):
        return UNet2DConditionModel(**shapes.unet)


def build_text_encoder(shapes: Shapes, tokenizer, device: torch.device):
    """A CLIP text encoder of SD v1.5's shape over capsearch's tokenizer, random weights, frozen."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         **shapes.text)  # fmt: skip
    torch.manual_seed(1)
    with torch.device(device):
        return CLIPTextModel(cfg).requires_grad_(False).eval()


def build_vae(shapes: Shapes, device: torch.device):
    """An AutoencoderKL of SD v1.5's shape, random weights, frozen."""
    from diffusers import AutoencoderKL

    torch.manual_seed(2)
    with torch.device(device):
        return AutoencoderKL(**shapes.vae).requires_grad_(False).eval()


@functools.cache
def tokenizer():
    """capsearch's shipped CLIP tokenizer (77 tokens), loaded once."""
    from capsearch.models.load import TOKENIZER_DIR
    from capsearch.models.tokenizer import load_clip_tokenizer

    return load_clip_tokenizer(TOKENIZER_DIR)


def pipeline(shapes: Shapes, device: torch.device, texts: list[str], encoding: bool = False):
    """A capsearch Pipeline: cached text states and no VAE, or (`encoding`) a real CLIP and VAE."""
    from diffusers import DDPMScheduler

    from capsearch.models.load import Pipeline

    tok = tokenizer()
    if encoding:
        text, vae = build_text_encoder(shapes, tok, device), build_vae(shapes, device)
    else:
        ids = tok(texts + [""], padding="max_length", max_length=77, truncation=True,
                  return_tensors="pt").input_ids  # fmt: skip
        g = torch.Generator().manual_seed(3)
        states = torch.randn(len(ids), 77, shapes.unet["cross_attention_dim"], generator=g)
        text, vae = StateTable(ids, states.to(device)), None
    unet = build_unet(shapes, device)
    return Pipeline(tok, text, unet, DDPMScheduler(**SD15_SCHEDULER), vae, spec="sd15-shaped")


def capsearch_train(pipe, spec: dict, data, shapes: Shapes, device: torch.device, precision: str,
                    steps: int, checkpointing: bool = False, cache: bool = True) -> dict:  # fmt: skip
    """capsearch.training.loop.finetune on `pipe` (adapted in place); its steady steps/s, memory and losses."""
    from capsearch.settings import TrainSettings
    from capsearch.training.loop import finetune

    cfg = TrainSettings(steps=steps, batch_size=shapes.batch, lr=1e-4, mixed_precision=precision,
                        size=shapes.pixels, gradient_checkpointing=checkpointing, seed=0,
                        cache_encodings=cache)  # fmt: skip
    losses: dict[int, float] = {}

    def on_event(event: str, payload: dict) -> None:
        if event == "step":
            losses[payload["step"]] = payload["loss"]

    times, handle = step_timer(pipe.unet, device)
    reset_peak(device)
    t0 = time.perf_counter()
    try:
        res = finetune(pipe, [spec], data, cfg, callbacks=[on_event], quiet=True)
    finally:
        handle.remove()
    sps = steps_per_s(times, min(shapes.warmup, steps - 2))
    return {
        "loop": "finetune", "precision": precision, "status": res.status, "steps": res.steps,
        "steps_per_s": sps, "images_per_s": sps * shapes.batch if sps else None,
        "peak_gib": peak_gib(device), "setup_s": round(times[0] - t0, 2) if times else None,
        "losses": losses, "trainable": res.trainable, "total": res.total,
    }  # fmt: skip


def plain_train(unet, latents: torch.Tensor, states: torch.Tensor, scheduler, shapes: Shapes,
                device: torch.device, precision: str, steps: int,
                channels_last: bool = False) -> dict:  # fmt: skip
    """A diffusers-example-style loop on the UNet's trainable parameters: noise, add_noise, UNet,
    MSE, backward, clipping, AdamW (a GradScaler under fp16), the loss read every step."""
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    dtype = DTYPES[precision]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    g = torch.Generator(device=device).manual_seed(0)
    unet.train()
    times, losses = [], []
    reset_peak(device)
    for _ in range(steps):
        sync(device)
        times.append(time.perf_counter())
        idx = torch.randint(0, len(latents), (shapes.batch,), device=device, generator=g)
        x0, ehs = latents[idx].contiguous(memory_format=fmt), states[idx]
        noise = torch.randn(x0.shape, device=device, generator=g).contiguous(memory_format=fmt)
        t = torch.randint(0, 1000, (shapes.batch,), device=device, generator=g)
        noisy = scheduler.add_noise(x0, noise, t)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            pred = unet(noisy, t, encoder_hidden_states=ehs).sample
        loss = F.mse_loss(pred.float(), noise.float())
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    sps = steps_per_s(times, min(shapes.warmup, steps - 2))
    return {
        "loop": "plain", "precision": precision, "steps": steps, "steps_per_s": sps,
        "images_per_s": sps * shapes.batch if sps else None, "peak_gib": peak_gib(device),
        "losses": {i + 1: v for i, v in enumerate(losses)},
    }  # fmt: skip


def step_flops(unet, latents: torch.Tensor, states: torch.Tensor, scheduler, shapes: Shapes,
               device: torch.device, precision: str) -> dict:  # fmt: skip
    """FLOPs of one training step's forward and backward (torch.utils.flop_counter), gradients dropped."""
    from torch.utils.flop_counter import FlopCounterMode

    x0, ehs = latents[: shapes.batch], states[: shapes.batch]
    noise = torch.randn_like(x0)
    t = torch.full((len(x0),), 500, device=device, dtype=torch.long)
    dtype = DTYPES[precision]
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            pred = unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=ehs).sample
        forward = counter.get_total_flops()
        F.mse_loss(pred.float(), noise).backward()
    unet.zero_grad(set_to_none=True)
    return {"forward": forward, "step": counter.get_total_flops()}


class Snapshot:
    """The UNet's trainable parameters at one moment, put back before each plain run."""

    def __init__(self, unet) -> None:
        self.pairs = [(p, p.detach().clone()) for p in unet.parameters() if p.requires_grad]

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the saved values back."""
        for p, saved in self.pairs:
            p.copy_(saved)
