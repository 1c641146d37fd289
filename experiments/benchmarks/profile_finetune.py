"""Where a fine-tune step's host time goes: capsearch's `finetune` against the plain loop, alternated.

Usage: python experiments/benchmarks/profile_finetune.py --out DIR [--method difffit] [--rounds 2]
       python experiments/benchmarks/profile_finetune.py --device cpu --tiny --out /tmp/prof   (a CPU check)

bench_gpu.py's finetune part always runs `finetune` first and the plain loop second on each method, so
its ratio carries any order effect. Here the two loops alternate (finetune, plain, finetune, plain, ...;
each finetune on a fresh SD-v1.5-shaped pipeline, each plain loop on the UNet the finetune before it
adapted), each round's steps/s is recorded, and the last round of each loop runs under cProfile: the
functions with the most own time (`tottime`), the device waits included (a loss read-back waits for
the step's kernels), so that a per-step cost in capsearch's loop shows by name; then capsearch's own
functions by cumulative time. Writes DIR/profile.json
(steps/s per round, the ratio of the medians) and DIR/finetune.txt, DIR/plain.txt (the profiles).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import tempfile
from pathlib import Path

import torch
from gpu_common import free_memory
from gpu_finetune import _Setting
from gpu_sd import METHODS, Shapes, capsearch_train, plain_train


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="toy shapes (a CPU check)")
    ap.add_argument("--method", default="difffit", choices=sorted(METHODS))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=None, help="SD batch (8; --tiny 2)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    precision = "bf16" if device.type == "cuda" else "no"
    shapes = Shapes(tiny=args.tiny, batch=args.batch or (2 if args.tiny else 8))
    steps = shapes.warmup + shapes.timed
    args.out.mkdir(parents=True, exist_ok=True)
    rates: dict[str, list[float]] = {"finetune": [], "plain": []}
    with tempfile.TemporaryDirectory() as tmp:
        s = _Setting(None, shapes, device, Path(tmp))  # bench_gpu's data; its records are not used
        for r in range(args.rounds):
            last = r == args.rounds - 1
            pipe = s.pipe()
            out = _run(last, args.out / "finetune.txt", capsearch_train, pipe,
                       METHODS[args.method], s.data, shapes, device, precision, steps)  # fmt: skip
            rates["finetune"].append(out["steps_per_s"])
            latents, states = s.plain_inputs(pipe)
            out = _run(last, args.out / "plain.txt", plain_train, pipe.unet, latents, states,
                       pipe.scheduler, shapes, device, precision, steps)  # fmt: skip
            rates["plain"].append(out["steps_per_s"])
            del pipe, latents, states
            free_memory(device)
            print(f"round {r + 1}: finetune {rates['finetune'][-1]:.3g} steps/s, "
                  f"plain {rates['plain'][-1]:.3g}", flush=True)  # fmt: skip
    med = {k: statistics.median(v) for k, v in rates.items()}
    result = {"device": str(device), "precision": precision, "method": args.method,
              "batch": shapes.batch, "steps": steps, "warmup": shapes.warmup, "rounds": rates,
              "median": med, "finetune_over_plain": med["finetune"] / med["plain"],
              "profiled": "the last round of each loop (its steps/s is lower for it)"}  # fmt: skip
    (args.out / "profile.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("median", "finetune_over_plain")}))


def _run(profiled: bool, dest: Path, fn, *fn_args) -> dict:
    """fn(*fn_args), under cProfile when `profiled` (its top functions by own time written to dest)."""
    if not profiled:
        return fn(*fn_args)
    prof = cProfile.Profile()
    out = prof.runcall(fn, *fn_args)
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("tottime").print_stats(40)
    # The two loops' own functions (capsearch's finetune, gpu_sd's plain_train), matched by module
    # path rather than by the checkout's folder name, which need not contain "capsearch".
    stats.sort_stats("cumulative").print_stats(r"capsearch/|benchmarks/gpu_sd", 25)
    dest.write_text(text.getvalue())
    return out


if __name__ == "__main__":
    main()
