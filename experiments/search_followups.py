"""The search's follow-up runs (docs/results.md, "Search against the baselines: the plan"), written as
specs from a finished search's records, so that nothing in them is picked by hand after the numbers.

Usage:
    python experiments/search_followups.py runs/search_vs_baselines \
        [--base experiments/search_vs_baselines.yaml] [--out experiments] [--seeds 1 3]

Writes into --out, each spec the search's own spec (--base, resolved and written whole, so that a later
edit of it changes no follow-up) with no searched trial (`search.num_samples: 0`, FIFO, no reuse):
- `search_confirm_seed1.yaml`, `search_confirm_seed3.yaml`: W, the winner (the searched trial with the
  best final reward, as search_compare.py), unchanged — its parameters inline as `baselines.fixed`
  `found` — on Table 1's seeds 1 and 3 (`--seeds`; data, training, evaluation and search seeds N, final
  seed 1000 + N, as experiments/paper_table1_seedN.yaml) and nothing else: those seeds' baselines are
  Table 1's runs, which `search_compare.py --confirm RUN_T1_SEED1 RUN_CONFIRM_SEED1 ...` pairs with
  these. A confirmation is on seeds the choice never evaluated W on: a seed the search trained on
  (`train.seed`) or the final stage chose on (`final.train_seeds`) is refused.
- `search_stops.yaml`: the (up to) three searched trials that ASHA stopped at its first rung (the spec's
  grace period) with the best (lowest) probe scores there, each run to the end as `baselines.fixed`
  `stopped_tNNN` on the search's own seed.
- `search_control_seed0.yaml`, `_seed1`, `_seed3`: Full FT at W's learning rate (every unit group
  full, no mitigation but caption dropout, `lr` W's) as `baselines.fixed` `full_at_w_rate` on the
  search's seed and Table 1's seeds 1 and 3: whether W's advantage over Full FT comes from the capacity
  it chose or from its lower rate (`experiments/search_control.py`; added after the final stage,
  docs/results.md).
- `search_transfer.yaml`: W and the search's baselines on the transfer world: data seed 27 (fixed in the
  plan before the search ran), with no report sentence of the search world's (`avoid_reports_of` its
  data seed and patients), training, evaluation and search seed 27, final seed 1027.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_compare import load_run, searched, winner  # noqa: E402

from capsearch.config import deep_merge, resolve_extends  # noqa: E402
from capsearch.errors import UserError  # noqa: E402
from capsearch.search.records import TrialRecord  # noqa: E402
from capsearch.search.runs import read_train_log  # noqa: E402

CONFIRM_SEEDS = (1, 3)  # Table 1's other seeds (docs/results.md)
CONTROL = "full_at_w_rate"  # Full FT at the winner's learning rate
TRANSFER_SEED = 27  # the first seed from 21 on drawing 20 memorised captions under the avoidance
STOPS = 3


def _seeded(seed: int) -> dict[str, Any]:
    """The seed fields of a run on data seed `seed`, as experiments/paper_table1_seedN.yaml sets them."""
    return {
        "train": {"seed": seed},
        "evaluate": {"seed": seed},
        "final": {"seed": 1000 + seed},
        "search": {"seed": seed},
    }


def _spec(base: dict[str, Any], name: str, description: str, fixed: list[dict], seed: int | None,
          methods: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """The resolved search spec with this follow-up's changes: written whole, so that a later edit of
    the search's spec does not change a follow-up (and a baseline rate of a method not run is dropped)."""
    changes: dict[str, Any] = {"name": name, "description": description}
    if seed is not None:
        changes.update(_seeded(seed))
        changes["data"] = {"phantom": {"seed": seed}}
    changes.setdefault("final", {})["top_k"] = 0
    changes["search"] = {**changes.get("search", {}), "num_samples": 0, "scheduler": "fifo",
                         "reuse": []}  # fmt: skip
    spec = deep_merge(base, changes)
    methods = list(methods or [])
    old = spec.get("baselines") or {}
    spec["baselines"] = {
        "methods": methods,
        "mitigations": old.get("mitigations", ["none"]),
        "train": {k: v for k, v in (old.get("train") or {}).items() if k in methods},
        "fixed": fixed,
    }
    return spec


def chosen_on(spec: Any) -> set[int]:
    """The training seeds the winner was chosen on: the search's own and the final stage's others."""
    return {spec.train.seed, *spec.final.train_seeds}


def check_confirm_seeds(spec: Any, seeds: tuple[int, ...]) -> None:
    """UserError naming the confirmation seeds that the choice of the winner already used."""
    used = sorted(set(seeds) & chosen_on(spec))
    if used:
        raise UserError(
            f"confirmation seed(s) {', '.join(map(str, used))}: the winner was chosen on training "
            f"seed(s) {', '.join(map(str, sorted(chosen_on(spec))))} (train.seed, "
            "final.train_seeds); confirm it on seeds it was never evaluated on"
        )


def first_rung_stops(run: Any, grace: int, count: int = STOPS) -> list[tuple[float, TrialRecord]]:
    """Searched trials stopped at the first rung, best probe score there first (at most `count`).

    The score is read from the trial's train_log.jsonl or, where the log lacks it, from the study
    (`optuna.db`: the probe scores Optuna was told). Logs written before capsearch logged a probe
    ahead of reporting it lack the probe that stopped the trial: ASHA ended the worker first.
    """
    told = _told_probes(run)
    found = []
    for record in searched(run):
        if record.status != "stopped" or record.steps != grace:
            continue
        probes = [e["probe"] for e in read_train_log(record.folder) if "probe" in e]
        scores = [p["probe_score"] for p in probes if p.get("step") == grace and "probe_score" in p]
        score = scores[-1] if scores else told.get(record.number, {}).get(grace)
        if score is not None:
            found.append((float(score), record))
    return sorted(found, key=lambda sr: (sr[0], sr[1].number))[:count]


def _told_probes(run: Any) -> dict[int, dict[int, float]]:
    """Each trial's probe scores by step as the run's study holds them ({} without a study)."""
    import optuna

    path = run.folder / "optuna.db"
    if not path.is_file():
        return {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=run.spec.search.study_name, storage=f"sqlite:///{path}")
    return {t.number: dict(t.intermediate_values) for t in study.get_trials(deepcopy=False)}


def control_params(run: Any, w: TrialRecord) -> dict[str, Any]:
    """The search's own Full FT baseline point (`baseline_points`), at W's learning rate."""
    full = {p.name: p for p in run.spec.baseline_points}.get("full")
    if full is None or "lr" not in w.params:
        raise UserError(f"{run.folder}: the control needs the search's Full FT baseline and W's lr")
    return {**full.params, "lr": w.params["lr"]}


def followups(
    run_dir: Path, base: Path, seeds: tuple[int, ...] = CONFIRM_SEEDS
) -> dict[str, dict[str, Any]]:
    """The follow-up specs by file name (nothing written); `seeds`: the confirmation seeds."""
    run = load_run(run_dir)
    check_confirm_seeds(run.spec, seeds)
    w = winner(run)
    extends = resolve_extends(Path(base))
    source = f"{run_dir}/trials/{w.folder.name}"
    found = [{"name": "found", "params": dict(w.params)}]
    specs = {}
    for seed in seeds:
        specs[f"search_confirm_seed{seed}.yaml"] = _spec(
            extends, f"search_confirm_seed{seed}",
            f"The search's winner ({source}) unchanged on Table 1's seed {seed}.", found, seed)  # fmt: skip
    control = [{"name": CONTROL, "params": control_params(run, w)}]
    for seed in (run.seed, *seeds):
        specs[f"search_control_seed{seed}.yaml"] = _spec(
            extends, f"search_control_seed{seed}",
            f"Full FT at the search's winner's learning rate ({source}, lr "
            f"{w.params['lr']:.3g}) on seed {seed}.", control,
            None if seed == run.seed else seed)  # fmt: skip
    scheduler = run.spec.search.scheduler
    if scheduler.name == "asha":
        stops = first_rung_stops(run, scheduler.grace_period)
        fixed = [{"name": f"stopped_{r.folder.name}", "params": dict(r.params)}
                 for _, r in stops]  # fmt: skip
        if fixed:
            names = ", ".join(f"{r.folder.name} ({s:.4f})" for s, r in stops)
            specs["search_stops.yaml"] = _spec(
                extends, "search_stops",
                f"Trials ASHA stopped at step {scheduler.grace_period} with the best probe scores "
                f"there, run to the end: {names}.", fixed, None)  # fmt: skip
    phantom = run.spec.data.phantom
    if phantom is None:
        raise UserError(f"{run_dir}: not a phantom-world search; the transfer world needs one")
    transfer = _spec(extends, "search_transfer",
                     f"The search's winner ({source}) and the baselines on a second phantom world "
                     f"(seed {TRANSFER_SEED}, no report sentence of seed {phantom.seed}'s).", found,
                     TRANSFER_SEED, list(run.spec.baselines.methods))  # fmt: skip
    transfer["data"]["phantom"]["avoid_reports_of"] = {
        "seed": phantom.seed,
        "patients": phantom.patients,
    }
    specs["search_transfer.yaml"] = transfer
    return specs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="the finished search (its records are enough)")
    ap.add_argument("--base", type=Path, default=Path("experiments/search_vs_baselines.yaml"))
    ap.add_argument("--out", type=Path, default=Path("experiments"))
    ap.add_argument("--seeds", type=int, nargs="+", default=list(CONFIRM_SEEDS),
                    help="the confirmation seeds (default: Table 1's 1 and 3)")  # fmt: skip
    args = ap.parse_args()
    try:
        specs = followups(args.run, args.base, tuple(args.seeds))
    except UserError as exc:
        raise SystemExit(f"error: {exc}") from None
    args.out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python", "experiments/search_followups.py", *sys.argv[1:]])
    for name, spec in specs.items():
        text = (f"# Written by `{command}` from the search's records: {args.base} resolved, "
                "with this run's changes.\n")  # fmt: skip
        (args.out / name).write_text(text + yaml.safe_dump(spec, sort_keys=False))
        print(f"wrote {args.out / name}: {spec['description']}")


if __name__ == "__main__":
    main()
