"""Parts 4 and 5 of bench_gpu.py: the tiny model's trials sharing one GPU, and its training throughput.

Part 4 runs short `capsearch.training.loop.finetune` trials of `capsearch.models.load.tiny_random` as N separate
processes: the first alone while the others wait, warm, then all N at once, their timed windows lined
up by a barrier.
Part 5 times finetune at batch 16 and a loop written like capsearch/training/pretrain.py's at batch 256, profiles
the latter, and tries it as one CUDA graph.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from gpu_common import Record, missing, peak_gib, reset_peak, step_timer, steps_per_s, sync

FULL = [{"method": "full", "units": "*"}]
PRETRAIN_REFERENCE = 6.6  # steps/s at batch 256 measured before on one H200 (capsearch pretrain)


def write_tiny_data(root: Path, n: int = 64) -> Path:
    """A dataset folder of n random 32-px grayscale PNGs with captions (the tiny model's size)."""
    from gpu_sd import captions, write_records

    return write_records(root, captions(n), pixels=32)


def _finetune_tiny(
    device: torch.device, data: Path, batch: int, warmup: int, timed: int, before=None
) -> dict:
    """A full fine-tune of the random tiny model; steady steps/s and the timed window (wall clock).

    `before(n)` runs before step n is timed (part 4's barrier at the first timed step)."""
    from capsearch.models.load import tiny_random
    from capsearch.settings import TrainSettings
    from capsearch.training.loop import finetune

    pipe = tiny_random().to(device)
    times, handle = step_timer(pipe.unet, device, before)
    offset = time.time() - time.perf_counter()
    cfg = TrainSettings(steps=warmup + timed, batch_size=batch, lr=1e-4, seed=0)
    reset_peak(device)
    res = finetune(pipe, FULL, str(data), cfg, quiet=True)
    handle.remove()
    sps = steps_per_s(times, warmup)
    window = [times[warmup] + offset, times[-1] + offset] if len(times) > warmup else None
    return {"status": res.status, "steps_per_s": sps, "images_per_s": sps * batch if sps else None,
            "window": window, "timed_steps": len(times) - 1 - warmup, "peak_gib": peak_gib(device),
            "precision": res.mixed_precision}  # fmt: skip


def _wait_for(path: Path, pattern: str, count: int, timeout: float = 300.0) -> None:
    deadline = time.time() + timeout
    while len(list(path.glob(pattern))) < count and time.time() < deadline:
        time.sleep(0.05)


def share_worker(args) -> None:
    """One trial process of part 4. All start together and wait at a barrier; rank 0 then trains
    alone while the others wait, warm; then all train at once. Each writes its result file."""
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    from capsearch.models.load import tiny_random

    tiny_random().to(device)  # imports, CUDA context and allocator warm before the barrier
    barrier, data = Path(args.barrier), Path(args.data)
    (barrier / f"{args.rank}.ready").touch()
    _wait_for(barrier, "*.ready", args.procs)
    out = {}
    if args.rank == 0:
        out["alone"] = _finetune_tiny(device, data, args.batch, args.warmup, args.steps)
        (barrier / "alone.done").touch()
    _wait_for(barrier, "alone.done", 1)

    def line_up(step: int) -> None:  # the timed windows start together, set-up skew left out
        if step == args.warmup:
            (barrier / f"{args.rank}.timed").touch()
            _wait_for(barrier, "*.timed", args.procs)

    out["together"] = _finetune_tiny(device, data, args.batch, args.warmup, args.steps, line_up)
    Path(args.result).write_text(json.dumps(out))


def _launch(n: int, device: torch.device, data: Path, work: Path, batch: int, warmup: int,
            steps: int, timeout: float) -> list[dict]:  # fmt: skip
    """Run the n worker processes; their results (a failure recorded as its last stderr line)."""
    barrier = work / "barrier"
    barrier.mkdir(parents=True)
    script = Path(__file__).with_name("bench_gpu.py")
    procs = []
    for rank in range(n):
        result = work / f"rank{rank}.json"
        cmd = [sys.executable, str(script), "--worker", "share", "--device", str(device),
               "--data", str(data), "--barrier", str(barrier), "--rank", str(rank),
               "--procs", str(n), "--batch", str(batch), "--warmup", str(warmup),
               "--steps", str(steps), "--result", str(result)]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs.append((result, subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)))
    outs, deadline = [], time.monotonic() + timeout
    for result, proc in procs:
        try:
            _, err = proc.communicate(timeout=max(deadline - time.monotonic(), 1.0))
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if result.exists():
            outs.append(json.loads(result.read_text()))
        else:
            last = (err or "").strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
            outs.append({"status": f"failed: {last[0][:300]}"})
    return outs


def run_sharing(rec: Record, device: torch.device, tiny: bool, procs: int, work: Path) -> None:
    """Part 4: aggregate steps/s of `procs` trials at once over one trial alone."""
    why = missing("diffusers", "transformers", "accelerate", "pydantic")
    if why:
        rec.skip("all", why)
        return
    batch, warmup, steps = (4, 1, 3) if tiny else (16, 10, 60)
    data = write_tiny_data(work / "data")
    rec.add("setting", {"procs": procs, "batch": batch, "warmup": warmup, "timed": steps})
    outs = _launch(procs, device, data, work, batch, warmup, steps, rec.left())
    alone = outs[0].get("alone") or outs[0]
    together = [o.get("together") or o for o in outs]
    rec.add("alone", alone)
    rec.add("together", {"workers": together})
    windows = [w["window"] for w in together if w.get("window")]
    if len(windows) == procs and alone.get("steps_per_s"):
        span = max(w[1] for w in windows) - min(w[0] for w in windows)
        overlap = min(w[1] for w in windows) - max(w[0] for w in windows)
        total = sum(w["timed_steps"] for w in together)
        aggregate = total / span
        rec.add("speedup", {"aggregate_steps_per_s": aggregate,
                            "alone_steps_per_s": alone["steps_per_s"],
                            "sum_of_rates": sum(w["steps_per_s"] for w in together),
                            "speedup": aggregate / alone["steps_per_s"],
                            "overlap_fraction": max(0.0, overlap) / span})  # fmt: skip


class PretrainLoop:
    """One step as capsearch/training/pretrain.py takes it: UNet and text encoder trained, bf16 autocast on a
    GPU, caption dropout, AdamW, clipping, an EMA of every parameter; data already on the device."""

    def __init__(self, device: torch.device, batch: int, capturable: bool = False) -> None:
        from capsearch.models.load import tiny_random

        pipe = tiny_random().to(device)
        self.unet, self.text = pipe.unet.train(), pipe.text_encoder.train().requires_grad_(True)
        self.params = list(self.unet.parameters()) + list(self.text.parameters())
        self.ema = [p.detach().clone() for p in self.params]
        self.opt = torch.optim.AdamW(self.params, lr=5e-4, weight_decay=0.01, capturable=capturable)
        g = torch.Generator(device=device).manual_seed(0)
        self.images = torch.rand(4096, 1, 32, 32, device=device, generator=g) * 2 - 1
        self.ids = pipe.tokenize([f"a {c} circle at the top left" for c in range(64)]).to(device)
        self.empty = pipe.tokenize([""])[0].to(device)
        self.alphas = pipe.scheduler.alphas_cumprod.to(device)
        self.device, self.batch, self.steps = device, batch, 0
        self.gen = None if capturable else g  # CUDA graphs draw from the default generator
        cuda = device.type == "cuda"
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)

    def step(self) -> torch.Tensor:
        """One optimizer step; the loss, not read back (the caller reads it, as pretrain does)."""
        b, dev, gen = self.batch, self.device, self.gen
        x0 = self.images[torch.randint(0, len(self.images), (b,), device=dev, generator=gen)]
        tok = self.ids[torch.randint(0, len(self.ids), (b,), device=dev, generator=gen)]
        drop = torch.rand(b, device=dev, generator=gen) < 0.1
        tok = torch.where(drop[:, None], self.empty[None], tok)
        noise = torch.randn(x0.shape, device=dev, generator=gen)
        t = torch.randint(0, 1000, (b,), device=dev, generator=gen)
        a = self.alphas[t].view(-1, 1, 1, 1)
        with self.autocast:
            ehs = self.text(tok)[0]
            pred = self.unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, encoder_hidden_states=ehs)
        loss = F.mse_loss(pred.sample.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1 - 0.999)
        return loss

    def eager(self) -> float:
        """One eager step with the loss read back."""
        self.opt.zero_grad(set_to_none=True)
        return self.step().item()


def _rate(fn, device: torch.device, warmup: int, timed: int) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(timed):
        fn()
    sync(device)
    return timed / (time.perf_counter() - t0)


def run_tiny(rec: Record, device: torch.device, tiny: bool, work: Path, compile_: bool) -> None:
    """Part 5: finetune at batch 16, the pretraining loop at 256 (and 1,024), its profile and graph."""
    why = missing("diffusers", "transformers")
    if why:
        rec.skip("all", why)
        return
    cuda = device.type == "cuda"
    fb, pb, warmup, timed = (4, 2, 1, 2) if tiny else (16, 256, 10, 40)
    if rec.has_time("finetune"):
        why = missing("accelerate", "pydantic")
        if why:
            rec.skip("finetune", why)
        else:
            out = _finetune_tiny(device, write_tiny_data(work / "data"), fb, warmup, timed)
            rec.add("finetune", {**out, "batch": fb})
    for batch in (pb, 4 * pb):
        key = f"pretrain/b{batch}"
        if rec.has_time(key):
            loop = PretrainLoop(device, batch)
            reset_peak(device)
            sps = _rate(loop.eager, device, warmup, timed)
            rec.add(key, {"batch": batch, "steps_per_s": sps, "images_per_s": sps * batch,
                          "reference_steps_per_s": PRETRAIN_REFERENCE if batch == 256 else None,
                          "peak_gib": peak_gib(device)})  # fmt: skip
            if batch == pb and rec.has_time("profile"):
                rec.add("profile", profile_steps(loop, device, 1 if tiny else 2, 1 / sps))
            del loop
    if not cuda:
        rec.skip("cuda_graph", "skipped: no CUDA")
    elif rec.has_time("cuda_graph", 10.0):
        rec.add("cuda_graph", _graphed(device, pb, warmup, timed))
    if not compile_:
        rec.skip("compile", "skipped: pass --compile (compiling takes minutes)")
    elif rec.has_time("compile"):
        try:
            loop = PretrainLoop(device, pb)
            loop.unet.forward = torch.compile(loop.unet.forward)
            t0 = time.perf_counter()
            loop.eager()
            rec.add("compile", {"compile_s": time.perf_counter() - t0,
                                "steps_per_s": _rate(loop.eager, device, 2, timed)})  # fmt: skip
        except Exception as exc:
            rec.skip("compile", f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")


def profile_steps(loop: PretrainLoop, device: torch.device, steps: int, step_s: float) -> dict:
    """Summed kernel time per step against `step_s`, the step's time measured without the profiler
    (launch-bound when kernels fill under half of it), and the top ops."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            loop.eager()
        sync(device)
        profiled = (time.perf_counter() - t0) / steps
    events = prof.key_averages()

    def dev_us(e) -> float:
        return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))

    kernels = []
    if cuda:
        from torch.autograd import DeviceType

        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    kernel_s = sum(e.time_range.elapsed_us() for e in kernels) / 1e6 / steps
    key = dev_us if cuda else (lambda e: float(e.self_cpu_time_total))
    top = sorted(events, key=key, reverse=True)[:12]
    out = {
        "wall_s_per_step": step_s,
        "profiled_s_per_step": profiled,
        "profiler_events_per_step": sum(e.count for e in events) / steps,
        "top_ops": [
            {
                "op": e.key,
                "calls": e.count,
                "self_device_ms": dev_us(e) / 1e3 / steps,
                "self_cpu_ms": e.self_cpu_time_total / 1e3 / steps,
            }
            for e in top
        ],  # fmt: skip
    }
    if cuda:
        busy = kernel_s / step_s
        out.update(kernels_per_step=len(kernels) / steps, kernel_s_per_step=kernel_s,
                   gpu_busy_fraction=busy,
                   bound="launch/CPU-bound" if busy < 0.5 else "GPU-bound")  # fmt: skip
    return out


def _graphed(device: torch.device, batch: int, warmup: int, timed: int) -> dict:
    """The pretraining step captured as one CUDA graph and replayed (constant lr and EMA decay)."""
    try:
        loop = PretrainLoop(device, batch, capturable=True)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                loop.opt.zero_grad(set_to_none=True)
                loop.step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        loop.opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            loss = loop.step()

        def replay() -> float:
            graph.replay()
            return loss.item()

        sps = _rate(replay, device, warmup, timed)
        return {"batch": batch, "steps_per_s": sps, "images_per_s": sps * batch}
    except Exception as exc:  # capture is fragile (a host sync anywhere in the step breaks it)
        return {"status": f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
