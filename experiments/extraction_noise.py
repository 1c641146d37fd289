"""How much of an extracted-images count is the attack's own sampling? One trained model, several seeds.

    python experiments/extraction_noise.py RUN:tNNN [RUN:tNNN ...] --seeds 2000 2001 2002 2003 2004 \
        --out experiments/results/search/compare/extraction_noise

For each trial (its saved delta in RUN/trials/tNNN/delta, its data in RUN/data) the extraction attack
runs once per seed: every duplicated caption of the training set sampled 16 times (20 steps, guidance
1.0), the clique attack with the phantom threshold and cliques of 3 — the evaluation's attack
(capsearch.metrics.memorisation.memorisation_probe, which also gives the own-image share on the same
samples). Nothing is trained: the spread over seeds is the count's noise for a fixed model, the part of
a difference between two single evaluations that no training explains. Writes OUT.json (per trial and
seed: extracted, own-image share, copies) and OUT.md (the table, with the command), and keeps what it has
after each probe, so a stopped run loses at most one probe (run it again: finished probes are skipped).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from capsearch.atomic import atomic_write
from capsearch.errors import UserError
from capsearch.search.runs import load_trials


@dataclass(frozen=True)
class Trial:
    run: Path
    name: str  # tNNN
    label: str  # RUN/tNNN (baseline)
    model: str


def _trial(arg: str) -> Trial:
    """The trial named by RUN:tNNN, its record read once (UserError on anything missing)."""
    run, _, trial = arg.rpartition(":")
    if not run or not trial.startswith("t"):
        raise UserError(f"{arg!r}: expected RUN:tNNN (a run folder and one of its trials)")
    folder = Path(run) / "trials" / trial
    if not (folder / "delta" / "delta.safetensors").is_file():
        raise UserError(
            f"{folder / 'delta'} holds no delta (the weights stay on the machine that trained them)"
        )
    if not (Path(run) / "data").is_dir():
        raise UserError(f"{run}/data does not exist (the run's phantom data)")
    record = next((r for r in load_trials(Path(run)) if r.folder.name == trial), None)
    if record is None or record.status != "ok" or record.model is None:
        raise UserError(f"{folder} is not a finished trial of {run}")
    baseline = f" ({record.baseline})" if record.baseline else ""
    return Trial(Path(run), trial, f"{Path(run).name}/{trial}{baseline}", record.model)


def probe(trial: Trial, seed: int, n: int) -> dict:
    """The extraction attack on one trained model with one sampling seed."""
    from capsearch.metrics.memorisation import memorisation_probe
    from capsearch.models.delta import load_delta
    from capsearch.models.load import load_pipeline

    pipe = load_pipeline(trial.model)
    pipe.unet = load_delta(pipe.unet, trial.run / "trials" / trial.name / "delta")
    started = time.time()
    out = memorisation_probe(
        pipe, trial.run / "data", n=n, steps=20, guidance=1.0, strength_n=1, seed=seed
    )
    keep = ("extracted", "of", "nearest_own", "copies", "strength_ratio")
    return {**{k: out[k] for k in keep}, "seconds": round(time.time() - started, 1)}


def table(results: dict, seeds: list[int], command: str) -> str:
    lines = [
        "# Extracted images of one trained model over attack seeds",
        "",
        f"Command: `{command}`",
        "",
        "Each row is one trained model (its delta, nothing retrained); each column one sampling seed of "
        "the extraction attack (16 samples of each duplicated caption, 20 steps, guidance 1.0). The "
        "spread is the count's own noise for a fixed model.",
        "",
        "| trial | "
        + " | ".join(f"seed {s}" for s in seeds)
        + " | mean | range | own-image share |",
        "|---|" + "---|" * (len(seeds) + 3),
    ]
    for label, per_seed in results.items():
        done = [per_seed[str(s)] for s in seeds if str(s) in per_seed]
        counts = [d["extracted"] for d in done]
        cells = [str(per_seed[str(s)]["extracted"]) if str(s) in per_seed else "–" for s in seeds]
        own = [d["nearest_own"] for d in done]
        summary = (
            [f"{statistics.mean(counts):.1f}", f"{min(counts)}–{max(counts)}",
             f"{statistics.mean(own):.2f} ({min(own):.2f}–{max(own):.2f})"]
            if counts else ["–", "–", "–"]
        )  # fmt: skip
        lines.append(f"| {label} | " + " | ".join(cells + summary) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("trials", nargs="+", help="RUN:tNNN, a run folder with weights and a trial")
    ap.add_argument("--seeds", type=int, nargs="+", default=[2000, 2001, 2002, 2003, 2004])
    ap.add_argument("--n", type=int, default=16, help="samples per duplicated caption (16)")
    ap.add_argument("--out", type=Path, required=True, help="OUT.json and OUT.md are written")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: as each trial trains)"
    )
    args = ap.parse_args(argv)
    command = "python experiments/extraction_noise.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    try:
        trials = [_trial(t) for t in args.trials]
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(args.threads)
    path = args.out.with_suffix(".json")
    results = json.loads(path.read_text())["results"] if path.is_file() else {}
    for seed in args.seeds:  # seed-major: a stopped run has every trial on the first seeds
        for trial in trials:
            label = trial.label
            if str(seed) in results.get(label, {}):
                continue
            results.setdefault(label, {})[str(seed)] = probe(trial, seed, args.n)
            print(f"{label} seed {seed}: {results[label][str(seed)]}", flush=True)
            atomic_write(path, json.dumps({"command": command, "results": results}, indent=1))
            atomic_write(args.out.with_suffix(".md"), table(results, args.seeds, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
