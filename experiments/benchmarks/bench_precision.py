"""fp32 against bf16 autocast for a fine-tune on this CPU, side by side: `capsearch.training.loop.finetune`.

Usage: python experiments/benchmarks/bench_precision.py [--steps 40] [--rounds 3] [--threads 1,2]
For each thread count and round, Full FT and DiffFit of the tiny base (batch 16, 32 px) fine-tune for
`--steps` in fp32 (`train.mixed_precision: no`) and in bf16, the order alternating by round so that a
machine busy with other work slows both alike. The time per step is measured between the step-10 and the
last step's records (set-up and warm-up excluded). Prints each setting's median s/step and the ratio
fp32/bf16 (> 1: bf16 faster), and whether this CPU has native bf16 (without it, bf16 is refused).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
from pathlib import Path

import torch

from capsearch.models.load import load_pipeline
from capsearch.models.precision import cpu_has_bf16
from capsearch.settings import TrainSettings
from capsearch.training.loop import finetune
from capsearch.worlds.phantom import write_phantom_dataset

METHODS = {
    "full": [{"method": "full", "units": "*"}],
    "difffit": [{"method": "difffit", "units": "*"}],
}


def seconds_per_step(data: Path, spec: list[dict], mode: str, steps: int) -> float:
    """One fine-tune of the tiny base; its seconds per step from step 10 to the last."""
    times: dict[int, float] = {}

    def record(event: str, payload: dict) -> None:
        if event == "step":
            times[payload["step"]] = payload["time"]

    cfg = TrainSettings(steps=steps, batch_size=16, lr=1e-4, mixed_precision=mode, probe_every=0)
    finetune(load_pipeline("tiny"), spec, data, cfg, callbacks=(record,), quiet=True)
    return (times[steps] - times[10]) / (steps - 10)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", default="1,2")
    args = ap.parse_args()
    if args.steps <= 10 or args.steps % 10:
        ap.error("--steps must be a multiple of 10 above 10 (steps are recorded every 10)")
    native = cpu_has_bf16()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"native bf16: {native}")  # fmt: skip
    if not native:
        print(
            "bf16 autocast is refused on this CPU (train.mixed_precision: bf16 needs native bf16)"
        )
        return
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_phantom_dataset(data, patients=40, size=32, seed=0)
        for threads in map(int, args.threads.split(",")):
            torch.set_num_threads(threads)
            for name, spec in METHODS.items():
                runs: dict[str, list[float]] = {"no": [], "bf16": []}
                for r in range(args.rounds):
                    for mode in ("no", "bf16") if r % 2 == 0 else ("bf16", "no"):
                        runs[mode].append(seconds_per_step(data, spec, mode, args.steps))
                fp32, bf16 = statistics.median(runs["no"]), statistics.median(runs["bf16"])
                print(f"{name:8s} threads {threads}: fp32 {fp32:.3f} s/step, bf16 {bf16:.3f} s/step, "
                      f"fp32/bf16 {fp32 / bf16:.2f} (rounds: fp32 {[round(x, 3) for x in runs['no']]}, "
                      f"bf16 {[round(x, 3) for x in runs['bf16']]})", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
