"""Memorisation at matched quality: every kept delta of a run, evaluated after training.

    python experiments/kept_deltas.py RUN --out DIR [--split test] [--threads 1]

A run whose spec sets `train.keep_deltas_every` keeps each trial's delta at points of its schedule
(`trials/tNNN/deltas/stepNNNNNN/`) beside the final one (`trials/tNNN/delta/`). Each is evaluated here
with the run's final-stage settings (the tables' evaluation: held-out split, sampling seed, the attack on
every memorised caption) and paired with the training probe's held-out diffusion loss at that step
(`train_log.jsonl`), so that each method's extracted count and own-image share can be read against how
well it has learnt the domain (docs/results.md, "The second world"). Nothing is trained.

Writes DIR/tNNN/stepNNNNNN/metrics.json (the evaluation), DIR/matched.json (one row per trial and step)
DIR/matched.md (the table, with the command) and DIR/matched.png (both against held-out loss). An evaluation already in DIR is not run again, so a
stopped run loses at most the one in progress.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from capsearch.atomic import atomic_write
from capsearch.errors import UserError
from capsearch.search.records import TrialRecord
from capsearch.search.runs import load_trials, read_run_spec, read_train_log
from capsearch.training.books import KEPT_DELTAS

ROW_KEYS = ("fid", "extracted", "nearest_own", "nn_ratio", "strength_ratio")


def kept(record: TrialRecord, steps: int) -> list[tuple[int, Path]]:
    """(step, delta folder) of a trial: its kept deltas in step order, then its final delta."""
    points = sorted(
        (int(p.name.removeprefix("step")), p)
        for p in (record.folder / KEPT_DELTAS).glob("step*")
        if (p / "delta.safetensors").is_file()
    )
    final = record.folder / "delta"
    if (final / "delta.safetensors").is_file():
        points.append((steps, final))
    return points


def held_out_loss(record: TrialRecord, step: int) -> float | None:
    """The training probe's held-out diffusion loss at `step` (None where no probe ran then)."""
    for line in read_train_log(record.folder):
        probe = line.get("probe")
        if probe and probe.get("step") == step:
            return probe.get("heldout_loss")
    return None


def evaluate_point(model: str, delta: Path, data: Path, settings, out: Path) -> dict:
    """One kept delta's evaluation (metrics.json in `out`), read back if it is there already."""
    if (out / "metrics.json").is_file():
        return json.loads((out / "metrics.json").read_text())
    # lazy: the evaluation stack loads only when something is evaluated
    from capsearch.metrics.evaluate import evaluate
    from capsearch.models.delta import load_delta
    from capsearch.models.load import load_pipeline

    pipe = load_pipeline(model)
    pipe.unet = load_delta(pipe.unet, delta)
    return evaluate(pipe, data, settings, out_dir=out)


def rows_of(run: Path, out: Path, split: str | None) -> list[dict]:
    """Every kept point of every trained trial of `run`, evaluated (or read back from `out`)."""
    spec = read_run_spec(run)
    settings = spec.final.settings(spec.evaluate)
    if split:
        settings = settings.model_copy(update={"split": split})
    settings = settings.model_copy(update={"cache_dir": str(out / "cache")})
    data = run / "data"
    if not data.is_dir():
        raise UserError(f"{data} does not exist (the run's phantom data)")
    rows = []
    for record in load_trials(run):
        if record.status != "ok" or record.model is None:
            continue
        for step, delta in kept(record, spec.train.steps):
            name = f"{record.trial}/step{step:06d}"
            print(f"{name} ({record.baseline or 'searched'})", flush=True)
            metrics = evaluate_point(record.model, delta, data, settings, out / name)
            rows.append({
                "trial": record.trial,
                "method": record.baseline,
                "step": step,
                "heldout_loss": held_out_loss(record, step),
                **{k: metrics.get(k) for k in ROW_KEYS},
                "intervals": {k: metrics.get("intervals", {}).get(k) for k in ROW_KEYS},
            })  # fmt: skip
    return rows


def table(rows: list[dict], command: str) -> str:
    """The Markdown table of the rows, with the command that made it."""
    lines = [
        "# Memorisation at matched quality: kept deltas evaluated after training",
        "",
        f"Command: `{command}`",
        "",
        "| trial | method | step | held-out loss | FID | extracted | own-image share | NN ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def fmt(v, spec: str) -> str:
        return "—" if v is None else format(v, spec)

    for r in rows:
        lines.append(
            f"| {r['trial']} | {r['method'] or 'searched'} | {r['step']} | "
            f"{fmt(r['heldout_loss'], '.4f')} | {fmt(r['fid'], '.1f')} | {fmt(r['extracted'], '.0f')} | "
            f"{fmt(r['nearest_own'], '.2f')} | {fmt(r['nn_ratio'], '.2f')} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """matched.png: extracted images and own-image share against held-out loss, one line per trial
    through its kept steps (the method's name at its last point)."""
    # lazy: matplotlib loads only when a plot is drawn
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from capsearch.figures import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for key, ax, label in ((("extracted", axes[0], "extracted images ↓")),
                           ("nearest_own", axes[1], "own-image NN share ↓")):  # fmt: skip
        for trial in dict.fromkeys(r["trial"] for r in rows):
            points = [(r["heldout_loss"], r[key], r["step"]) for r in rows
                      if r["trial"] == trial and r["heldout_loss"] is not None
                      and r[key] is not None]  # fmt: skip
            if not points:
                continue
            xs, ys, _ = zip(*points)
            line = ax.plot(xs, ys, marker="o", markersize=3)[0]
            name = next(r["method"] for r in rows if r["trial"] == trial) or trial
            ax.annotate(name, (xs[-1], ys[-1]), fontsize=7, color=line.get_color())
        ax.set_xlabel("held-out diffusion loss (probe) ↓")
        ax.set_ylabel(label)
    fig.suptitle("memorisation at matched quality: kept deltas of each run", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--split", choices=("validate", "test"), default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    # lazy: torch loads after the arguments are read
    import torch

    torch.set_num_threads(args.threads)
    try:
        rows = rows_of(args.run, args.out, args.split)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    command = "python experiments/kept_deltas.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    atomic_write(
        args.out / "matched.json", json.dumps({"command": command, "rows": rows}, indent=2)
    )
    atomic_write(args.out / "matched.md", table(rows, command))
    plot(rows, args.out / "matched.png")
    print(f"{len(rows)} points in {args.out / 'matched.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
