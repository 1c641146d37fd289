"""Time phantom generation: about 1,000 images at 64x64 (target: under 60 s on 2 CPU cores).

Run: .venv/bin/python experiments/benchmarks/bench_phantom.py [--patients N] [--size S]
     .venv/bin/python experiments/benchmarks/bench_phantom.py --ctr   (cardiothoracic ratio per grade)
     .venv/bin/python experiments/benchmarks/bench_phantom.py --visibility   (findings at 32 px)
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path


def cardiothoracic_ratios(patients: int = 60) -> dict:
    """Widest heart row over widest lung extent, per cardiomegaly grade, over random anatomies."""
    import numpy as np

    from capsearch.worlds.anatomy import build_scene, sample_anatomy
    from capsearch.worlds.lesions import HEART_SCALE

    result = {}
    for grade, scale in [("normal", 1.0), *HEART_SCALE.items()]:
        ratios = []
        for k in range(patients):
            scene = build_scene(
                sample_anatomy(np.random.default_rng([k, 0])), 128, heart_scale=scale
            )
            heart = scene.heart > 0.5
            widest = max(np.ptp(np.flatnonzero(r)) + 1 for r in heart if r.any())
            lungs = np.flatnonzero((scene.lungs > 0.5).any(0))
            ratios.append(widest / (np.ptp(lungs) + 1))
        result[grade] = {
            "mean": round(float(np.mean(ratios)), 3),
            "p5": round(float(np.percentile(ratios, 5)), 3),
            "p95": round(float(np.percentile(ratios, 95)), 3),
        }
    return result


VISIBILITY_CASES = [
    ("effusion", {"size": "small"}),
    ("effusion", {"size": "moderate"}),
    ("cardiomegaly", {"size": "small"}),
    ("cardiomegaly", {"size": "moderate"}),
    ("pneumothorax", {"size": "large"}),
    ("consolidation", {"size": "small"}),
    ("consolidation", {"size": "large"}),
    ("nodule", {"size": "small"}),
    ("nodule", {"size": "large"}),
    ("atelectasis", {"size": "small"}),
    ("support_device", {}),
]


def visibility(seeds: int = 30) -> dict:
    """Grey levels one finding changes in a 32-px image (strongest pixel; pixels changed by > 10)."""
    import numpy as np

    from capsearch.worlds.phantom import render_phantom

    result = {}
    for finding, attributes in VISIBILITY_CASES:
        strongest, changed = [], []
        for seed in range(seeds):
            normal = render_phantom((), 32, seed).astype(float)
            sick = render_phantom({finding}, 32, seed, attributes={finding: attributes})
            diff = np.abs(sick.astype(float) - normal)
            strongest.append(diff.max())
            changed.append((diff > 10).sum())
        name = f"{finding} {attributes.get('size', '')}".strip()
        result[name] = {
            "max_diff_median": float(np.median(strongest)),
            "max_diff_min": float(np.min(strongest)),
            "pixels_over_10_median": float(np.median(changed)),
        }
    return result


def main() -> None:
    """Generate a phantom dataset in a temporary folder and print timings as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--patients", type=int, default=360, help="360 patients give ~1,000 images")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ctr", action="store_true", help="measure cardiothoracic ratios instead")
    parser.add_argument(
        "--visibility", action="store_true", help="measure findings at 32 px instead"
    )
    args = parser.parse_args()
    if args.ctr or args.visibility:
        print(json.dumps(cardiothoracic_ratios() if args.ctr else visibility(), indent=1))
        return

    started = time.perf_counter()
    from capsearch.worlds.anatomy import mask_count
    from capsearch.worlds.cooccurrence import finding_combinations
    from capsearch.worlds.phantom import write_phantom_dataset
    from capsearch.worlds.reports import report_bank

    imported = time.perf_counter()
    report_bank()
    finding_combinations()
    mask_count()
    tables = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        path = write_phantom_dataset(Path(folder) / "phantom", args.patients, args.size, args.seed)
        done = time.perf_counter()
        records = [json.loads(line) for line in path.read_text().splitlines()]
    n = len(records)
    print(
        json.dumps(
            {
                "images": n,
                "patients": args.patients,
                "size": args.size,
                "cpus": os.cpu_count(),
                "import_s": round(imported - started, 2),
                "reports_and_labels_s": round(tables - imported, 2),
                "generate_s": round(done - tables, 2),
                "total_s": round(done - started, 2),
                "ms_per_image": round(1000 * (done - tables) / n, 2),
                "report_sources": Counter(r["report_source"] for r in records),
                "splits": Counter(r["split"] for r in records),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
