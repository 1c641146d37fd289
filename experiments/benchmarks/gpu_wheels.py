"""Gather the wheels a GPU machine without a package index needs for bench_gpu.py (run where pip works).

Usage: python experiments/benchmarks/gpu_wheels.py [--python 3.12] [--out wheels]
Then, on the GPU machine, from the checkout (which carries wheels/):
    pip install --no-index --find-links wheels diffusers optuna pydantic
Each package is pinned to the version installed here, where capsearch's tests pass (the newest when it
is not installed), and fetched without its dependencies: the list below names every dependency that
a machine holding torch, transformers, accelerate and peft may lack. `--python` must match the GPU
machine's `python3 --version`. Ray and faiss-gpu are left out: they do not fit a 64 MiB tree.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# What the benchmark path needs beyond torch/transformers/accelerate/peft, and what each pulls in.
WHEELS = {
    "diffusers": ("diffusers", "importlib_metadata", "lazy-importer", "zipp"),
    "pydantic": (
        "pydantic",
        "pydantic_core",
        "annotated-types",
        "typing-inspection",
        "typing_extensions",
    ),  # fmt: skip
    "optuna": ("optuna", "alembic", "sqlalchemy", "mako", "colorlog"),
}
# Wheel sizes in MiB, measured with `pip download --no-deps` for CPython 3.12, manylinux x86_64
# (--measure-big measures them again). Each faiss-gpu wheel also needs CUDA 12 runtime/cuBLAS wheels.
TOO_BIG = {"ray==2.60.0": 75.6, "faiss-gpu==1.15.1": 129.0, "faiss-gpu-cu12==1.14.1.post1": 46.2}
BUDGET_MIB = 64.0  # the whole working tree that travels to the GPU machine
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")  # fmt: skip


def pinned(name: str) -> str:
    """`name==version` as installed here, else `name` (the newest the index has)."""
    try:
        return f"{name}=={version(name)}"
    except PackageNotFoundError:
        return name


def download(requirements: list[str], out: Path, python: str) -> subprocess.CompletedProcess:
    """pip download, wheels only, no dependencies, for CPython `python` on manylinux x86_64."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--python-version", python, "--implementation", "cp", "-d", str(out)]  # fmt: skip
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    return subprocess.run(cmd + requirements, capture_output=True, text=True)


def mib(paths) -> float:
    """Total size of files in MiB."""
    return sum(p.stat().st_size for p in paths) / 2**20


def measure(requirement: str, python: str) -> float | None:
    """Download one wheel into a temporary folder and return its size in MiB (None if none fits)."""
    with tempfile.TemporaryDirectory() as tmp:
        if download([requirement], Path(tmp), python).returncode != 0:
            return None
        return mib(Path(tmp).glob("*.whl"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("wheels"))
    ap.add_argument("--python", default=f"{sys.version_info.major}.{sys.version_info.minor}",
                    help="the GPU machine's Python X.Y (default: this interpreter's)")  # fmt: skip
    ap.add_argument("--measure-big", action="store_true",
                    help="download Ray and faiss-gpu to a temporary folder to measure them again")  # fmt: skip
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    requirements = [pinned(n) for names in WHEELS.values() for n in names]
    result = download(requirements, args.out, args.python)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
        print(f"gpu_wheels: pip download failed: {last}", file=sys.stderr)
        return 1
    wheels = sorted(args.out.glob("*.whl"))
    for w in wheels:
        print(f"{w.stat().st_size / 2**20:8.2f} MiB  {w.name}")
    total = mib(wheels)
    print(f"{total:8.2f} MiB  total in {args.out}/ ({len(wheels)} wheels, CPython {args.python})")
    print(
        f"install there: pip install --no-index --find-links {args.out} diffusers optuna pydantic"
    )
    sizes = {r: measure(r, args.python) for r in TOO_BIG} if args.measure_big else TOO_BIG
    for requirement, size in sizes.items():
        shown = "no wheel for this Python" if size is None else f"{size:.1f} MiB"
        print(
            f"left out: {requirement} ({shown}): with the rest of the tree it exceeds {BUDGET_MIB:.0f} MiB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
