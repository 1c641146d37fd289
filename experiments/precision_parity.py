"""The CPU precision parity check (docs/benchmarks.md, "Precision on the CPU"), from committed records.

Usage: python experiments/precision_parity.py --bf16 S0 S1 --fp32 F0 F1 F3 [--out FILE]
S0, S1: the kept records of experiments/precision_bf16_seed0.yaml and _seed1.yaml (Full FT and DiffFit
trained in bf16); F0, F1, F3: Table 1's fp32 records on seeds 0, 1 and 3, the first two on the same
seeds as S0 and S1. For each method and quantity (the probe's held-out diffusion loss at the last
step; the final stage's FID, AMD, image-text score and extracted count) the rule fixed before the runs:
|bf16 − fp32| on the same seed at most the fp32 range over the three seeds, for both seeds. Prints the
table and the verdict; `--out` writes them as Markdown with the command that made them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

METHODS = ("full", "difffit")
QUANTITIES = ("heldout_loss", "fid", "amd", "alignment", "extracted")


def trial_of(run: Path, method: str) -> Path:
    """The finished (status ok) baseline trial of `method` in a run's records, the last if several."""
    found = []
    for result in sorted((run / "trials").glob("t*/result.json")):
        record = json.loads(result.read_text())
        if record.get("baseline") == method and record.get("status") == "ok":
            found.append(result.parent)
    if not found:
        raise SystemExit(f"{run} has no finished {method} baseline")
    return found[-1]


def quantities(trial: Path) -> dict[str, float]:
    """The probe's last held-out loss and the final stage's metrics of one trial's records."""
    probes = [
        json.loads(line)["probe"]
        for line in (trial / "train_log.jsonl").read_text().splitlines()
        if '"probe"' in line
    ]
    final = json.loads((trial / "final" / "result.json").read_text())["metrics"]
    return {"heldout_loss": probes[-1]["heldout_loss"], **{q: final[q] for q in QUANTITIES[1:]}}


def parity(bf16: list[Path], fp32: list[Path]) -> tuple[list[str], bool]:
    """Markdown table lines and whether every method, quantity and paired seed is inside the range."""
    lines = [
        "| method | quantity | fp32 (seeds 0 / 1 / 3) | fp32 range | bf16 (seeds 0 / 1) "
        "| abs(bf16 − fp32) (seeds 0 / 1) | within |",
        "|---|---|---|---|---|---|---|",
    ]
    passed = True
    for method in METHODS:
        f = [quantities(trial_of(run, method)) for run in fp32]
        b = [quantities(trial_of(run, method)) for run in bf16]
        for q in QUANTITIES:
            values = [x[q] for x in f]
            spread = max(values) - min(values)
            deltas = [abs(b[i][q] - f[i][q]) for i in range(len(bf16))]
            ok = all(d <= spread for d in deltas)
            passed &= ok
            lines.append(
                f"| {method} | {q} | {' / '.join(f'{v:.4g}' for v in values)} | {spread:.4g} "
                f"| {' / '.join(f'{x[q]:.4g}' for x in b)} | {' / '.join(f'{d:.3g}' for d in deltas)} "
                f"| {'yes' if ok else '**no**'} |"
            )
    return lines, passed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bf16", type=Path, nargs=2, required=True)
    ap.add_argument("--fp32", type=Path, nargs=3, required=True)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    lines, passed = parity(args.bf16, args.fp32)
    verdict = (
        "**bf16 passes**: every quantity of both methods within fp32's seed-to-seed range on both seeds"
        if passed
        else "**bf16 does not pass**: at least one quantity outside fp32's seed-to-seed range"
    )
    text = "\n".join([*lines, "", verdict])
    print(text)
    if args.out is not None:
        command = "python experiments/precision_parity.py " + " ".join(sys.argv[1:])
        args.out.write_text(f"# CPU precision parity\n\n`{command}`\n\n{text}\n")


if __name__ == "__main__":
    main()
