"""Part 2 of bench_gpu.py: guided DDIM sampling, `capsearch.models.sampling.generate` against a plain loop.

Both sample the same SD-v1.5-shaped UNet (fp16 on a GPU) with classifier-free guidance, text encoded
once per batch; images are the latents (no VAE decode on either side). Rounds alternate the two.
"""

from __future__ import annotations

import time

import torch
from gpu_common import Record, missing, sync
from gpu_sd import SD15_SCHEDULER, Shapes, build_text_encoder, build_unet, captions, tokenizer

GUIDANCE = 7.5


@torch.no_grad()
def plain_sample(pipe, prompts: list[str], steps: int, seed: int) -> torch.Tensor:
    """The denoising loop as diffusers' text-to-image pipeline writes it: DDIM, guided, batched."""
    from diffusers import DDIMScheduler

    device, dtype = pipe.device, pipe.dtype
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps, device=device)
    states = pipe.encode_prompts(prompts + [""])
    cond, uncond = states[:-1], states[-1:].expand(len(prompts), -1, -1)
    ehs = torch.cat([uncond, cond])
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (len(prompts), *pipe.latent_shape)
    latents = torch.randn(shape, generator=g, device=device, dtype=dtype) * sched.init_noise_sigma
    for t in sched.timesteps:
        inp = sched.scale_model_input(torch.cat([latents, latents]), t)
        eps_u, eps_c = pipe.unet(inp, t, encoder_hidden_states=ehs).sample.chunk(2)
        latents = sched.step(eps_u + GUIDANCE * (eps_c - eps_u), t, latents).prev_sample
    return latents.clamp(-1, 1).float().cpu()


def _timed(fn, device: torch.device) -> tuple[float, torch.Tensor]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def run(rec: Record, device: torch.device, tiny: bool, batch: int, rounds: int = 2) -> None:
    """Measure part 2 into `rec`: images/s of both samplers, their ratio, the extraction attack's rate."""
    why = missing("diffusers", "transformers")
    if why:
        rec.skip("all", why)
        return
    from diffusers import DDPMScheduler

    from capsearch.models.load import Pipeline
    from capsearch.models.sampling import generate

    shapes = Shapes(tiny=tiny, batch=batch)
    steps = 3 if tiny else 50
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    tok = tokenizer()
    text = build_text_encoder(shapes, tok, device).to(dtype)
    unet = build_unet(shapes, device).to(dtype).eval().requires_grad_(False)
    pipe = Pipeline(tok, text, unet, DDPMScheduler(**SD15_SCHEDULER), None, spec="sd15-shaped")
    prompts = captions(batch)
    rec.add("setting", {"steps": steps, "guidance": GUIDANCE, "batch": batch,
                        "dtype": str(dtype).removeprefix("torch."), "latent": pipe.latent_shape})  # fmt: skip

    def ours() -> torch.Tensor:
        return generate(pipe, prompts, steps=steps, guidance=GUIDANCE, seed=0, batch_size=batch)

    def plain() -> torch.Tensor:
        return plain_sample(pipe, prompts, steps, seed=0)

    generate(pipe, prompts[:2], steps=2, guidance=GUIDANCE, batch_size=batch)  # warm-up
    plain_sample(pipe, prompts[:2], 2, seed=0)
    times: dict[str, list[float]] = {"generate": [], "plain": []}
    for r in range(rounds):
        for name, fn in (("generate", ours), ("plain", plain))[:: 1 if r % 2 == 0 else -1]:
            if not rec.has_time(f"{name}/round{r}"):
                continue
            seconds, images = _timed(fn, device)
            if not torch.isfinite(images).all():
                rec.skip(f"{name}/round{r}", "failed: non-finite samples")
                continue
            times[name].append(seconds)
            rec.add(name, {"seconds": times[name], "images": len(images),
                           "images_per_s": len(images) / min(times[name])})  # fmt: skip
    if times["generate"] and times["plain"]:
        rec.add("ratio", {"generate_over_plain": min(times["plain"]) / min(times["generate"]),
                          "target": 0.95})  # fmt: skip
    if rec.has_time("extraction", 2 * min(times["generate"] or [0.0])):
        _extraction(rec, pipe, shapes, steps, batch)


def _extraction(rec: Record, pipe, shapes: Shapes, steps: int, batch: int) -> None:
    """The extraction attack on two prompts × `batch` generations (generation plus cliques and matching)."""
    from capsearch.metrics.extraction import extraction_attack

    train = torch.randn(4 * batch, *shapes.latent, generator=torch.Generator().manual_seed(5))
    prompts = captions(2)
    n = max(batch, 3)
    t0 = time.perf_counter()
    result = extraction_attack(pipe, prompts, train.clamp(-1, 1), n_per_prompt=n, min_clique=3,
                               steps=steps, guidance=GUIDANCE, batch_size=n)  # fmt: skip
    seconds = time.perf_counter() - t0
    generated = len(prompts) * n
    rec.add("extraction", {"images": generated, "seconds": seconds, "images_per_s": generated / seconds,
                           "extracted": result.count})  # fmt: skip
