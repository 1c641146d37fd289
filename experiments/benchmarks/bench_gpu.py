"""capsearch on one GPU, side by side with plain loops, in one command (about 5 minutes on an H100/H200).

Usage: python experiments/benchmarks/bench_gpu.py --out experiments/results/gpu
       python experiments/benchmarks/bench_gpu.py --device cpu --tiny --out /tmp/gpu   (a CPU check)
Parts (each with its own time budget, each written to OUT/<part>.json as its results come in):
  finetune  SD-v1.5-shaped UNet: capsearch.training.loop.finetune against a plain diffusers-style loop for full,
            DiffFit, SV-DIFF and LoRA at bf16/fp16 (fp32 for numerics); MFU; attention, layout,
            checkpointing and latent-caching variants
  sampling  50-step guided DDIM: capsearch.models.sampling.generate against a plain loop; the extraction attack
  nearest   AMD's nearest neighbour, 110,000 x 1,024 training features, on the GPU by chunked matmul
  sharing   N tiny-model trials as processes sharing the GPU against one alone
  tiny      the tiny model's finetune (batch 16) and pretraining loop (batch 256): rate and profile
A part whose modules are missing is skipped with the reason recorded. docs/benchmarks.md has the rest.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from gpu_common import OPTIONAL, ROOT, Record, free_memory, missing, sync

PARTS = ("finetune", "sampling", "nearest", "sharing", "tiny")
BUDGETS = {"finetune": 140.0, "sampling": 30.0, "nearest": 15.0, "sharing": 45.0, "tiny": 35.0}
TINY_BUDGET = 120.0  # --tiny: enough for every measurement of the toy sizes on a CPU
WATCHED = ("ray", "optuna", "pydantic", "faiss")
IMPORT_CHECK = ("capsearch.models.load", "capsearch.methods", "capsearch.models.sampling", "capsearch.training.loop",
                "capsearch.metrics.amd")  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "gpu")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="toy shapes and a few steps (CPU check)")
    ap.add_argument("--budget-s", action="append", default=[], metavar="S|PART=S",
                    help="seconds for every part, or for one part (repeatable)")  # fmt: skip
    ap.add_argument(
        "--parts", default=",".join(PARTS), help="comma-separated subset of " + ", ".join(PARTS)
    )
    ap.add_argument("--methods", default="full,difffit,svdiff,lora")
    ap.add_argument("--batch", type=int, default=None, help="SD batch (default 8; --tiny 2)")
    ap.add_argument("--share-procs", type=int, default=None, help="trials at once (4; --tiny 2)")
    ap.add_argument("--compile", action="store_true", help="also try torch.compile (minutes)")
    ap.add_argument("--no-import-check", action="store_true",
                    help="skip checking what capsearch's modules import (a fresh interpreter)")  # fmt: skip
    # a sharing trial process (part 4 starts these itself)
    for flag in ("--worker", "--data", "--barrier", "--result"):
        ap.add_argument(flag, help=argparse.SUPPRESS)
    for flag in ("--rank", "--procs", "--warmup", "--steps"):
        ap.add_argument(flag, type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        ap.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    args.budgets = budgets(ap, args.budget_s, args.tiny)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    from gpu_sd import METHODS

    if not args.methods or set(args.methods) - set(METHODS):
        ap.error(f"--methods takes a comma-separated subset of {', '.join(METHODS)}")
    args.batch = (2 if args.tiny else 8) if args.batch is None else args.batch
    args.share_procs = (2 if args.tiny else 4) if args.share_procs is None else args.share_procs
    if args.batch < 1 or args.share_procs < 1:
        ap.error("--batch and --share-procs must be at least 1")
    return args


def budgets(ap: argparse.ArgumentParser, items: list[str], tiny: bool) -> dict[str, float]:
    """Each part's seconds: the defaults, then `S` for all parts or `PART=S` for one, in order."""
    out = {p: TINY_BUDGET for p in PARTS} if tiny else dict(BUDGETS)
    for item in items:
        part, _, value = item.rpartition("=")
        try:
            seconds = float(value)
        except ValueError:
            ap.error(f"--budget-s {item!r}: expected seconds or PART=seconds")
        if part and part not in PARTS:
            ap.error(f"--budget-s {item!r}: unknown part {part!r}")
        for p in [part] if part else PARTS:
            out[p] = seconds
    return out


def environment(device: torch.device) -> dict:
    """Versions, the device, and which optional modules are installed (found, not imported: Ray alone
    takes seconds to import)."""
    from importlib.metadata import PackageNotFoundError, version
    from importlib.util import find_spec

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["gpu_memory_gib"] = round(
            torch.cuda.get_device_properties(device).total_memory / 2**30, 1
        )
    env["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    dists = {"faiss": ("faiss-gpu", "faiss-cpu", "faiss-gpu-cu12", "faiss-gpu-cu11")}
    for name in OPTIONAL:
        if find_spec(name) is None:
            env[name] = f"missing: no module named {name!r}"
            continue
        env[name] = "installed"
        for dist in dists.get(name, (name,)):
            try:
                env[name] = version(dist)
                break
            except PackageNotFoundError:
                continue
    return env


def preload() -> None:
    """Import what the parts use, then freeze the collector's view of it: each later gc.collect
    (between runs, to free GPU memory held in reference cycles) then skips those objects."""
    import gc

    for name in ("diffusers", "transformers", "accelerate", "peft", "capsearch.models.load",
                 "capsearch.methods", "capsearch.models.sampling", "capsearch.training.loop"):  # fmt: skip
        missing(name)  # a module that is missing is reported by the part that needs it
    if sys.modules.get("diffusers") is not None:
        sys.modules["diffusers"].utils.logging.set_verbosity_error()  # no dtype-cast notices
    gc.collect()
    gc.freeze()


def start_import_check() -> subprocess.Popen:
    """A fresh interpreter importing capsearch's benchmark-path modules in turn; each reports what
    of ray, optuna, pydantic and faiss it pulled in (fresh, so nothing was imported before)."""
    code = (
        "import importlib, json, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\nout = {{}}\n"
        f"for mod in {IMPORT_CHECK!r}:\n"
        f"    before = {{w for w in {WATCHED!r} if w in sys.modules}}\n"
        "    try:\n        importlib.import_module(mod); status = 'ok'\n"
        "    except Exception as exc:\n        status = f'failed: {type(exc).__name__}: {exc}'\n"
        f"    after = {{w for w in {WATCHED!r} if w in sys.modules}}\n"
        "    out[mod] = {'import': status, 'pulls_in': sorted(after - before)}\n"
        "print(json.dumps(out))\n"
    )
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def top1(query: torch.Tensor, train: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, ...]:
    """Each query's most cosine-similar training row: (similarity, index), chunked over queries."""
    t = F.normalize(train, dim=1)
    sims, idx = [], []
    for q0 in range(0, len(query), chunk):
        v, i = (F.normalize(query[q0 : q0 + chunk], dim=1) @ t.T).max(dim=1)
        sims.append(v)
        idx.append(i)
    return torch.cat(sims), torch.cat(idx)


def part_nearest(rec: Record, device: torch.device, tiny: bool) -> None:
    """Part 3: top-1 by chunked matmul on the device, checked on the first n_ref queries against faiss
    (capsearch's AMD) or torch on the CPU; planted near-copies must find their source."""
    n_train, dim, n_query, n_ref = (2000, 64, 256, 256) if tiny else (110_000, 1024, 10_000, 1_000)
    g = torch.Generator(device=device).manual_seed(0)
    train = torch.randn(n_train, dim, device=device, generator=g)
    query = torch.randn(n_query, dim, device=device, generator=g)
    planted = n_query // 10
    source = torch.randint(0, n_train, (planted,), device=device, generator=g)
    query[:planted] = train[source] + 0.05 * torch.randn(planted, dim, device=device, generator=g)
    top1(query[:64], train)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    sim, idx = top1(query, train)
    sync(device)
    seconds = time.perf_counter() - t0
    found = float((idx[:planted] == source).float().mean())
    rec.add("device_matmul", {"train": n_train, "dim": dim, "queries": n_query, "seconds": seconds,
                              "queries_per_s": n_query / seconds, "planted_found": found,
                              "amd": float((1 - sim).mean())})  # fmt: skip
    q_cpu, t_cpu = query.cpu(), train.cpu()
    if missing("faiss") is None:
        from capsearch.metrics.amd import nearest_train

        name = "capsearch_faiss_cpu"
        t0 = time.perf_counter()
        dist, ref_idx = nearest_train(q_cpu[:n_ref], t_cpu, k=1)
        ref_sim, ref_idx = 1 - dist[:, 0], ref_idx[:, 0]
    else:
        rec.skip("capsearch_faiss_cpu", missing("faiss"))
        name = "torch_cpu_subset"
        t0 = time.perf_counter()
        ref_sim, ref_idx = top1(q_cpu[:n_ref], t_cpu)
    ref_seconds = time.perf_counter() - t0
    got = idx[:n_ref].cpu()
    agree = got == ref_idx
    # a disagreement is a tie when both rows are equally similar to the query within fp32 rounding
    tn = F.normalize(t_cpu, dim=1)
    q = F.normalize(q_cpu[:n_ref], dim=1)
    gap = ((q * tn[ref_idx]).sum(1) - (q * tn[got]).sum(1)).abs()
    rec.add(name, {"queries": n_ref, "seconds": ref_seconds, "queries_per_s": n_ref / ref_seconds,
                   "top1_agree": float(agree.float().mean()),
                   "disagreements": int((~agree).sum()),
                   "ties_within_1e-6": int(((~agree) & (gap < 1e-6)).sum()),
                   "max_sim_diff": float((sim[:n_ref].cpu() - ref_sim).abs().max()),
                   "device_speedup_per_query": (ref_seconds / n_ref) / (seconds / n_query)})  # fmt: skip


def run_part(part: str, args: argparse.Namespace, device: torch.device, work: Path) -> dict:
    """Run one part under its budget; an unexpected error ends that part only, recorded."""
    rec = Record(args.out, part, args.budgets[part], {"device": str(device), "tiny": args.tiny})
    try:
        if part == "finetune":
            import gpu_finetune

            gpu_finetune.run(rec, device, args.tiny, args.batch, args.methods)
        elif part == "sampling":
            import gpu_sample

            gpu_sample.run(rec, device, args.tiny, args.batch)
        elif part == "nearest":
            part_nearest(rec, device, args.tiny)
        elif part == "sharing":
            import gpu_tiny

            gpu_tiny.run_sharing(rec, device, args.tiny, args.share_procs, work / "sharing")
        else:
            import gpu_tiny

            gpu_tiny.run_tiny(rec, device, args.tiny, work / "tiny", args.compile)
    except Exception as exc:
        rec.data["traceback"] = traceback.format_exc().splitlines()[-12:]
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        return rec.finish(f"failed: {type(exc).__name__}: {first}")
    finally:
        free_memory(device)  # the part's models are unreachable now
    return rec.finish()


def _get(d: dict, *path, fmt: str = "{:.3g}") -> str:
    for key in path:
        d = d.get(key) if isinstance(d, dict) else None
    if isinstance(d, bool):
        return "yes" if d else "no"
    if isinstance(d, (int, float)):
        return fmt.format(d)
    return "-" if d is None else str(d)


def table(records: dict[str, dict]) -> str:
    """The headline numbers of every part as aligned text rows (measurement, value, target)."""
    rows: list[tuple[str, str, str]] = []
    ft = records.get("finetune", {}).get("results", {})
    if ft:
        rows.append(("matmul rate (TFLOP/s)", _get(ft, "matmul_rate", "tflops"), "~790 bf16 H200"))
        summary = ft.get("summary", {})
        for key, row in summary.items():
            if not isinstance(row, dict) or "/" not in key:
                continue
            rows.append((f"{key} steps/s plain | finetune",
                         f"{_get(row, 'plain_steps_per_s')} | {_get(row, 'finetune_steps_per_s')}", ""))  # fmt: skip
            rows.append((f"{key} finetune/plain", _get(row, "ratio"), ">= 0.95"))
            if row.get("mfu_finetune") is not None:
                rows.append((f"{key} MFU finetune", _get(row, "mfu_finetune", fmt="{:.1%}"),
                             ">= 40%" if key == "full/bf16" else ""))  # fmt: skip
            if row.get("plain_loss_rel_diff_vs_fp32") is not None:
                rows.append((f"{key} loss rel. diff vs fp32 (plain | finetune)",
                             f"{_get(row, 'plain_loss_rel_diff_vs_fp32')} | "
                             f"{_get(row, 'finetune_loss_rel_diff_vs_fp32')}", "small"))  # fmt: skip
        for key in ("sdpa_over_math", "channels_last_over_default", "checkpointing_over_default",
                    "checkpointing_memory_over_default", "full_caching_speedup",
                    "lora_caching_speedup"):  # fmt: skip
            if key in summary:
                rows.append((key.replace("_", " "), _get(summary, key), ""))
    sa = records.get("sampling", {}).get("results", {})
    if sa:
        rows.append(("sampling images/s generate | plain",
                     f"{_get(sa, 'generate', 'images_per_s')} | {_get(sa, 'plain', 'images_per_s')}", ""))  # fmt: skip
        rows.append(
            ("sampling generate/plain", _get(sa, "ratio", "generate_over_plain"), ">= 0.95")
        )
        rows.append(("extraction attack images/s", _get(sa, "extraction", "images_per_s"), ""))
    nn = records.get("nearest", {}).get("results", {})
    if nn:
        ref = nn.get("capsearch_faiss_cpu") or nn.get("torch_cpu_subset") or {}
        rows.append(("nearest: device s | reference s",
                     f"{_get(nn, 'device_matmul', 'seconds')} | {_get(ref, 'seconds')}", ""))  # fmt: skip
        rows.append(("nearest: top-1 agreement", _get(ref, "top1_agree"), "1.0"))
    sh = records.get("sharing", {}).get("results", {})
    if sh:
        rows.append(("sharing: speed-up of N trials", _get(sh, "speedup", "speedup"), "> 1"))
    ti = records.get("tiny", {}).get("results", {})
    if ti:
        rows.append(("tiny finetune steps/s", _get(ti, "finetune", "steps_per_s"), ""))
        for key in sorted(k for k in ti if k.startswith("pretrain/")):
            rows.append((f"tiny {key} steps/s", _get(ti, key, "steps_per_s"), "6.6 before (b256)"))
        rows.append(("tiny profile: GPU busy fraction", _get(ti, "profile", "gpu_busy_fraction"),
                     _get(ti, "profile", "bound")))  # fmt: skip
        rows.append(
            ("tiny pretrain as a CUDA graph steps/s", _get(ti, "cuda_graph", "steps_per_s"), "")
        )
    for part, rec in records.items():
        for key, why in rec.get("skipped", {}).items():
            rows.append((f"{part}: {key}", why[:70], ""))
    width = max((len(r[0]) for r in rows), default=10)
    return "\n".join(f"{a:<{width}}  {b:<24} {c}" for a, b, c in rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker == "share":
        import gpu_tiny

        gpu_tiny.share_worker(args)
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "bench_gpu: --device cuda, but torch sees no CUDA device; use --device cpu --tiny",
            file=sys.stderr,
        )
        return 2
    if device.type == "cpu" and not args.tiny:
        print("bench_gpu: SD-v1.5 shapes on a CPU take hours; add --tiny", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    checker = None if args.no_import_check else start_import_check()
    env = environment(device)
    env_rec = Record(args.out, "env", 0, env)
    records = {}
    preload()
    try:
        with tempfile.TemporaryDirectory() as work:
            for part in args.parts:
                print(f"[bench_gpu] {part} (budget {args.budgets[part]:.0f} s) ...", flush=True)
                records[part] = run_part(part, args, device, Path(work))
                status, seconds = records[part]["status"], records[part]["seconds"]
                print(f"[bench_gpu] {part}: {status} in {seconds} s", flush=True)
    finally:
        import gc

        gc.unfreeze()  # main() may run inside a longer process (the tests)
    if checker is not None:
        try:
            out, _ = checker.communicate(timeout=120)
            env_rec.add("capsearch_imports", json.loads(out))
        except (subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
            checker.kill()
            env_rec.skip("capsearch_imports", f"failed: {type(exc).__name__}")
    env_rec.finish()
    text = table(records)
    (args.out / "summary.txt").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
