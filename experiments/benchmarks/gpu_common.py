"""What the parts of bench_gpu.py share: one JSON record per part, time budgets, timers, optional modules."""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if (
    str(ROOT) not in sys.path
):  # run from a checkout where capsearch is not installed (a GPU machine)
    sys.path.insert(0, str(ROOT))

# Modules a part may need that a machine may lack; the wheels that bring them: gpu_wheels.py.
OPTIONAL = ("diffusers", "pydantic", "optuna", "faiss", "ray", "peft", "accelerate", "transformers")
WHEELED = ("diffusers", "pydantic", "optuna")  # what experiments/benchmarks/gpu_wheels.py gathers


def missing(*modules: str) -> str | None:
    """None when every module imports, else a one-line reason naming the first that does not."""
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # an ImportError, or a broken install failing while it imports
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            hint = (
                "; install the wheels (docs/benchmarks.md, GPU section)" if name in WHEELED else ""
            )
            return f"skipped: {name} is not importable ({first}){hint}"
    return None


def finite(x: float | None) -> float | None:
    """A float for JSON: rounded to 6 significant digits, None for NaN or infinity."""
    if x is None or not math.isfinite(x):
        return None
    return float(f"{x:.6g}")


class Record:
    """One part's results: written to OUT/<part>.json after every `add`, so a kill keeps what finished."""

    def __init__(self, out: Path, part: str, budget_s: float, meta: dict) -> None:
        self.path = Path(out) / f"{part}.json"
        self.started = time.perf_counter()
        self.deadline = self.started + budget_s
        self.data: dict = {"part": part, "budget_s": budget_s, "status": "running", **meta}
        self.data.update(results={}, skipped={})
        self.write()

    def left(self) -> float:
        """Seconds left in this part's budget."""
        return self.deadline - time.perf_counter()

    def has_time(self, key: str, estimate_s: float = 0.0) -> bool:
        """Whether `estimate_s` more seconds fit the budget; if not, record `key` as skipped."""
        if self.left() > estimate_s:
            return True
        self.skip(key, f"skipped: time budget ({self.data['budget_s']:.0f} s) spent")
        return False

    def add(self, key: str, value: dict) -> None:
        """Keep one result under `key` and write the file."""
        self.data["results"][key] = value
        self.data.setdefault("done_at_s", {})[key] = round(time.perf_counter() - self.started, 2)
        self.write()

    def skip(self, key: str, reason: str) -> None:
        """Keep why `key` was not measured and write the file."""
        self.data["skipped"][key] = reason
        self.write()

    def finish(self, status: str = "done") -> dict:
        """Mark the part finished (or why it stopped) with its wall time; the record."""
        self.data["status"] = status
        self.data["seconds"] = round(time.perf_counter() - self.started, 2)
        self.write()
        return self.data

    def write(self) -> None:
        """Write the record atomically (a temporary file renamed over it)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.path)


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on CPU), so that wall-clock times are true."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: torch.device | str) -> None:
    """Start a new peak-memory window on a CUDA device."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device | str) -> float | None:
    """Peak allocated GPU memory since reset_peak, in GiB (None on CPU)."""
    if torch.device(device).type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 3)


def free_memory(device: torch.device | str) -> None:
    """Collect garbage and hand cached blocks back, so that the next run's peak is its own."""
    import gc

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def matmul_rate(device: torch.device | str, tiny: bool) -> dict:
    """Measured dense matmul rate in TFLOP/s: bf16 8192³ on CUDA (the MFU denominator), fp32 on CPU."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    n, dtype = (8192, torch.bfloat16) if cuda else ((256 if tiny else 1024), torch.float32)
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(dev)
    reps = 10
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(dev)
    seconds = (time.perf_counter() - t0) / reps
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "tflops": 2 * n**3 / seconds / 1e12}


def step_timer(
    module: torch.nn.Module, device: torch.device | str, before=None
) -> tuple[list[float], object]:
    """Wall-clock times at the start of each forward of `module` (device synced first); the hook handle.

    finetune runs one UNet forward per step (no grad accumulation, no threshold mitigation), so the
    gaps between these times are whole training steps, set-up excluded. `before(n)`, if given, runs
    before step n's time is taken (a barrier between processes, say).
    """
    times: list[float] = []

    def hook(_module, _inputs):
        if before is not None:
            before(len(times))
        sync(device)
        times.append(time.perf_counter())

    return times, module.register_forward_pre_hook(hook)


def steps_per_s(times: list[float], warmup: int) -> float | None:
    """Steady-state steps per second from per-step start times, the first `warmup` steps left out."""
    span = times[warmup:]
    if len(span) < 2 or span[-1] <= span[0]:
        return None
    return (len(span) - 1) / (span[-1] - span[0])
