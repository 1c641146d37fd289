"""Where one trial's evaluation spends its time: `capsearch.metrics.evaluate` under cProfile.

Usage: python experiments/benchmarks/profile_evaluate.py [--spec search_spaces/tiny.yaml] [--final]
       [--threads 1] [--out DIR]
Evaluates the shipped tiny base (Freeze: no training, the same sampling work as any trial) on the spec's
phantom data with the spec's evaluation settings (`--final`: the final stage's, on the test split), once,
under cProfile. Prints the seconds of the whole evaluation and the cumulative seconds of the functions
that carry it: sampling (the UNet's forward passes), the text encoder, the feature extractor, FID/KID,
AMD's nearest neighbours, the attack's clique search, the denoising strength pass. Writes the full
profile (DIR/evaluate.prof, for snakeviz or pstats) and the table (DIR/evaluate.txt).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import tempfile
import time
from pathlib import Path

import torch

from capsearch.config import load_spec
from capsearch.metrics.evaluate import evaluate
from capsearch.models.load import load_pipeline
from capsearch.search.final import FinalJob
from capsearch.search.inputs import ensure_scorer, prepare_data
from capsearch.search.trial import build_plan

# What to look for in the profile: a function name (as pstats prints it) → what it stands for.
WATCHED = {
    "evaluate.py:": "evaluate (all of it)",
    "unet_2d_condition.py:": "UNet forward (sampling, strength)",
    "modeling_clip.py:": "text encoder",
    "features.py:": "feature extractor",
    "fid.py:": "FID",
    "kid.py:": "KID",
    "amd.py:": "AMD nearest neighbours",
    "extraction.py:": "extraction attack",
    "denoising.py:": "denoising strength",
    "alignment.py:": "image-text score",
    "sampling.py:": "capsearch sampling loop",
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", type=Path, default=Path("search_spaces/tiny.yaml"))
    ap.add_argument("--final", action="store_true", help="the final stage's settings (test split)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = load_spec(args.spec)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        data = prepare_data(spec, run_dir, None)
        ensure_scorer(spec, data, None)
        freeze = next(b for b in spec.baseline_points if b.method == "freeze")
        plan = build_plan(spec, dict(freeze.params), freeze.name, 0, run_dir)
        # the search stage's settings as a trial gets them, or the final stage's as a finalist does
        settings = FinalJob.of(spec, run_dir).settings if args.final else plan.evaluate
        pipe = load_pipeline(plan.model)
        profile = cProfile.Profile()
        started = time.perf_counter()
        profile.enable()
        evaluate(pipe, data, settings, out_dir=Path(tmp) / "eval")
        profile.disable()
        seconds = time.perf_counter() - started
    stats = pstats.Stats(profile)
    rows = {}
    for (path, _line, name), (_cc, _nc, _tt, ct, _callers) in stats.stats.items():
        for key, label in WATCHED.items():
            if path.endswith(key.rstrip(":")) and ct > rows.get(label, (0.0, ""))[0]:
                rows[label] = (ct, f"{Path(path).name}:{name}")
    lines = [f"evaluate ({'final' if args.final else 'search'} settings of {args.spec}), "
             f"{args.threads} thread(s): {seconds:.1f} s"]  # fmt: skip
    for label, (ct, where) in sorted(rows.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"  {label:36s} {ct:7.1f} s  {100 * ct / seconds:5.1f}%  ({where})")
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(40)
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        profile.dump_stats(args.out / "evaluate.prof")
        (args.out / "evaluate.txt").write_text("\n".join(lines) + "\n\n" + text.getvalue())


if __name__ == "__main__":
    main()
