"""Part 1 of bench_gpu.py: fine-tuning an SD-v1.5-shaped UNet, capsearch's loop against a plain one.

Per method (full, DiffFit, SV-DIFF, LoRA): `capsearch.training.loop.finetune` at bf16, then the plain loop on the
UNet it adapted at bf16, fp16 and fp32 (the numerics reference), and the step's FLOPs. Then the
variants (classic attention instead of SDPA, channels-last, gradient checkpointing, encoding every step
instead of cached latents and text states), then finetune at fp16 and at fp32.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import torch
from gpu_common import Record, free_memory, matmul_rate, missing, sync
from gpu_sd import (
    METHODS,
    Shapes,
    Snapshot,
    capsearch_train,
    captions,
    latent_records,
    pipeline,
    plain_train,
    step_flops,
    write_records,
)

TARGET_RATIO, TARGET_MFU = 0.95, 0.40


class _Setting:
    """What every run of the part shares: shapes, device, data, the capsearch-side availability."""

    def __init__(self, rec: Record, shapes: Shapes, device: torch.device, tmp: Path) -> None:
        self.rec, self.shapes, self.device = rec, shapes, device
        self.texts = captions(shapes.records)
        g = torch.Generator().manual_seed(4)
        self.latents = torch.randn(shapes.records, *shapes.latent, generator=g)
        self.data = latent_records(write_records(tmp / "latents", self.texts), self.latents)
        self.pixel_data = tmp / "pixels"  # written on first use (the encoding variant)
        self.precisions = ["bf16", "fp16"] if device.type == "cuda" else ["no"]
        self.capsearch_missing = missing("pydantic")  # capsearch.training.loop → capsearch.settings

    def pipe(self, encoding: bool = False):
        """A fresh pipeline (same UNet weights every time)."""
        return pipeline(self.shapes, self.device, self.texts, encoding=encoding)

    def plain_inputs(self, pipe) -> tuple[torch.Tensor, torch.Tensor]:
        """The same latents and the text states finetune looks up, on the device."""
        states = pipe.encode_prompts(self.texts).float()
        return self.latents.to(self.device), states

    def finetune(self, key: str, pipe, method: str, precision: str, steps: int, **kw) -> bool:
        """Run capsearch's loop and record it under `key`; False when it could not run."""
        if self.capsearch_missing:
            self.rec.skip(key, self.capsearch_missing)
            return False
        data = kw.pop("data", self.data)
        try:
            out = capsearch_train(pipe, METHODS[method], data, self.shapes, self.device, precision,
                                  steps, **kw)  # fmt: skip
        except Exception as exc:  # recorded, and the rest of the part goes on
            self.rec.skip(key, f"failed: {type(exc).__name__}: {_first_line(exc)}")
            return False
        self.rec.add(key, {"method": method, **out})
        return out["status"] == "ok"

    def plain(self, key: str, pipe, method: str, precision: str, steps: int, **kw) -> None:
        """Run the plain loop on pipe.unet and record it under `key`."""
        latents, states = self.plain_inputs(pipe)
        try:
            out = plain_train(pipe.unet, latents, states, pipe.scheduler, self.shapes,
                              self.device, precision, steps, **kw)  # fmt: skip
        except Exception as exc:
            self.rec.skip(key, f"failed: {type(exc).__name__}: {_first_line(exc)}")
            return
        self.rec.add(key, {"method": method, **out})


def _guarded(rec: Record, key: str, fn, *args) -> None:
    """Run one block of the part; an error (a model that does not build, out of memory) is recorded
    under `key` and the part goes on with the next block."""
    try:
        fn(*args)
    except Exception as exc:
        rec.skip(key, f"failed: {type(exc).__name__}: {_first_line(exc)}")
    finally:
        free_memory(torch.device(rec.data["device"]))


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


def run(rec: Record, device: torch.device, tiny: bool, batch: int, methods: list[str]) -> None:
    """Measure part 1 into `rec` (see the module docstring)."""
    why = missing("diffusers", "transformers", "accelerate", "peft")
    if why:
        rec.skip("all", why)
        return
    shapes = Shapes(tiny=tiny, batch=batch)
    rec.add("matmul_rate", matmul_rate(device, tiny))
    rec.add("shapes", {"unet": shapes.unet, "batch": shapes.batch, "latent": shapes.latent,
                       "pixels": shapes.pixels, "warmup": shapes.warmup, "timed": shapes.timed,
                       "numerics_steps": shapes.numerics})  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        s = _Setting(rec, shapes, device, Path(tmp))
        steps = shapes.warmup + shapes.timed
        first = s.precisions[0]
        last_block = 0.0  # the previous method's block: the estimate for the next one
        for method in methods:
            if rec.has_time(f"{method}/*", last_block):
                t0 = time.perf_counter()
                _guarded(rec, f"{method}/*", _method_block, s, method, first, steps)
                last_block = time.perf_counter() - t0
            rec.add("summary", summarise(rec.data["results"]))
        _guarded(rec, "variant/*", _variants, s, steps, first)
        rec.add("summary", summarise(rec.data["results"]))
        for precision in s.precisions[1:] + (["no"] if device.type == "cuda" else []):
            n = steps if precision != "no" else shapes.numerics
            for method in methods:
                key = f"{method}/{precision}/finetune"
                if rec.has_time(key, _estimate(rec, method)):
                    _guarded(rec, key, _fresh_finetune, s, key, method, precision, n)
                rec.add("summary", summarise(rec.data["results"]))


def _fresh_finetune(s: _Setting, key: str, method: str, precision: str, steps: int) -> None:
    s.finetune(key, s.pipe(), method, precision, steps)


def _estimate(rec: Record, method: str) -> float:
    """Seconds a finetune of `method` took before (0 when none ran)."""
    run_ = rec.data["results"].get(f"{method}/bf16/finetune") or {}
    return float(run_.get("setup_s") or 0.0)


def _method_block(s: _Setting, method: str, first: str, steps: int) -> None:
    """finetune at the first precision; then the plain loop on its UNet at every precision and fp32."""
    rec, device = s.rec, s.device
    pipe = s.pipe()
    if not s.finetune(f"{method}/{first}/finetune", pipe, method, first, steps):
        from capsearch.methods import APPLIED_MARK, apply_methods

        if not pipe.unet.__dict__.get(APPLIED_MARK):  # the plain loop still gets its parameters
            apply_methods(pipe.unet, [METHODS[method]])
    free_memory(device)
    snap = Snapshot(pipe.unet)
    latents, states = s.plain_inputs(pipe)
    flops = step_flops(pipe.unet, latents, states, pipe.scheduler, s.shapes, device, first)
    rec.add(f"{method}/flops", flops)
    plain_runs = [(p, steps) for p in s.precisions]
    if device.type == "cuda":
        plain_runs.append(("no", s.shapes.numerics))
    for precision, n in plain_runs:
        key = f"{method}/{precision}/plain"
        if rec.has_time(key):
            snap.restore()
            s.plain(key, pipe, method, precision, n)
            free_memory(device)
    del pipe, snap
    free_memory(device)


def _variants(s: _Setting, steps: int, first: str) -> None:
    """Full fine-tuning with classic attention, channels-last, checkpointing, and encoding every step."""
    from diffusers.models.attention_processor import AttnProcessor

    rec, device = s.rec, s.device
    if rec.has_time("variant/math_attention"):
        pipe = s.pipe()
        pipe.unet.requires_grad_(True)
        pipe.unet.set_attn_processor(AttnProcessor())  # softmax(QKᵀ)V in plain ops, no SDPA
        s.plain("variant/math_attention", pipe, "full", first, steps)
        del pipe
        free_memory(device)
    if rec.has_time("variant/channels_last"):
        pipe = s.pipe()
        pipe.unet.requires_grad_(True).to(memory_format=torch.channels_last)
        s.plain("variant/channels_last", pipe, "full", first, steps, channels_last=True)
        del pipe
        free_memory(device)
    if rec.has_time("variant/checkpointing"):
        s.finetune("variant/checkpointing", s.pipe(), "full", first, steps, checkpointing=True)
        free_memory(device)
    for method in ("full", "lora"):
        key = f"variant/encoding/{method}"
        if not rec.has_time(key):
            continue
        if not (s.pixel_data / "metadata.jsonl").exists():
            write_records(s.pixel_data, s.texts, pixels=s.shapes.pixels)
        pipe = s.pipe(encoding=True)
        if method == "full":
            rec.add("variant/encode_cost", encode_cost(pipe, s.texts, s.shapes, device))
        # capsearch's VAE base with its encodings cached once (the default), then encoding every step
        s.finetune(f"variant/encoding_cached/{method}", pipe, method, first, steps,
                   data=str(s.pixel_data))  # fmt: skip
        del pipe
        free_memory(device)
        s.finetune(key, s.pipe(encoding=True), method, first, steps, data=str(s.pixel_data),
                   cache=False)  # fmt: skip
        free_memory(device)


@torch.no_grad()
def encode_cost(pipe, texts: list[str], shapes: Shapes, device: torch.device) -> dict:
    """Seconds to encode one batch as finetune does every step: VAE latents and text states (fp32)."""
    x = torch.rand(shapes.batch, 3, shapes.pixels, shapes.pixels, device=device) * 2 - 1
    prompts = texts[: shapes.batch]
    out = {}
    for name, fn in (
        ("vae_s", lambda: pipe.vae.encode(x).latent_dist.sample()),
        ("text_s", lambda: pipe.encode_prompts(prompts)),
    ):
        fn()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(3):
            fn()
        sync(device)
        out[name] = (time.perf_counter() - t0) / 3
    return out


def _sps(results: dict, key: str) -> float | None:
    value = (results.get(key) or {}).get("steps_per_s")
    return value if value and math.isfinite(value) else None


def _rel(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not math.isfinite(a) or not math.isfinite(b) or b == 0:
        return None
    return abs(a - b) / abs(b)


def _loss_at(results: dict, key: str, step: int) -> float | None:
    losses = (results.get(key) or {}).get("losses") or {}
    value = losses.get(step, losses.get(str(step)))
    return float(value) if value is not None else None


def summarise(results: dict) -> dict:
    """Ratios, MFU, numerics and variant gains from the raw runs recorded so far."""
    peak = (results.get("matmul_rate") or {}).get("tflops")
    numerics = (results.get("shapes") or {}).get("numerics_steps", 10)
    out: dict = {"targets": {"finetune_over_plain": TARGET_RATIO, "full_mfu": TARGET_MFU}}
    for method in METHODS:
        flops = (results.get(f"{method}/flops") or {}).get("step")
        for precision in ("bf16", "fp16", "no"):
            plain = _sps(results, f"{method}/{precision}/plain")
            fine = _sps(results, f"{method}/{precision}/finetune")
            if plain is None and fine is None:
                continue
            row: dict = {"plain_steps_per_s": plain, "finetune_steps_per_s": fine}
            if plain and fine:
                row["ratio"] = fine / plain
                row["meets_ratio"] = row["ratio"] >= TARGET_RATIO
            if flops and peak:
                row["mfu_plain"] = flops * plain / (peak * 1e12) if plain else None
                row["mfu_finetune"] = flops * fine / (peak * 1e12) if fine else None
            if (
                precision != "no"
            ):  # loss after `numerics` steps against the fp32 run from the same start
                for loop in ("plain", "finetune"):
                    row[f"{loop}_loss_rel_diff_vs_fp32"] = _rel(
                        _loss_at(results, f"{method}/{precision}/{loop}", numerics),
                        _loss_at(results, f"{method}/no/{loop}", numerics),
                    )
            out[f"{method}/{precision}"] = row
    full = out.get("full/bf16", {}).get("mfu_finetune")
    if full is not None:
        out["full_mfu_meets"] = full >= TARGET_MFU
    for variant in ("math_attention", "channels_last", "checkpointing"):
        run_ = results.get(f"variant/{variant}") or {}
        loop = "finetune" if variant == "checkpointing" else "plain"
        base = _sps(results, f"full/{run_.get('precision')}/{loop}")
        value = _sps(results, f"variant/{variant}")
        if value and base:
            out[f"{variant}_over_default"] = value / base
            mem, base_mem = (
                run_.get("peak_gib"),
                results[f"full/{run_['precision']}/{loop}"]["peak_gib"],
            )
            if mem and base_mem:
                out[f"{variant}_memory_over_default"] = mem / base_mem
    if "math_attention_over_default" in out:  # the default processor is SDPA
        out["sdpa_over_math"] = 1 / out["math_attention_over_default"]
    for method in ("full", "lora"):
        run_ = results.get(f"variant/encoding/{method}") or {}
        latent_fed = _sps(results, f"{method}/{run_.get('precision')}/finetune")
        encoding = _sps(results, f"variant/encoding/{method}")
        cached = _sps(results, f"variant/encoding_cached/{method}")
        if latent_fed and encoding:  # precomputed latents and states against encoding every step
            out[f"{method}_latents_fed_over_encoding"] = latent_fed / encoding
        if cached and encoding:
            out[f"{method}_step_s_encoding"] = 1 / encoding
            out[f"{method}_step_s_cached"] = 1 / cached
            out[f"{method}_caching_speedup"] = cached / encoding
    return out
