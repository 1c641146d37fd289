"""experiments/search_followups.py: the confirmation, stops-check and transfer specs written from a
search's records — the winner by final reward, the first-rung stops by probe score — load as specs and
fit the search's space."""

import importlib.util
import json
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from capsearch.config import load_spec, resolve_extends
from capsearch.search.baselines import fixed_points
from capsearch.search.space import define_space

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "experiments" / "search_vs_baselines.yaml"

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def followups(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    spec = importlib.util.spec_from_file_location(
        "search_followups", ROOT / "experiments" / "search_followups.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("search_compare", None)


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _run(tmp_path: Path) -> tuple[Path, dict]:
    """A search folder: 3 finalists (t005 wins on final reward, not on search reward), 4 ASHA stops."""
    run = tmp_path / "runs" / "search_vs_baselines"
    (run).mkdir(parents=True)
    resolved = resolve_extends(BASE)
    (run / "spec.yaml").write_text(yaml.safe_dump({**resolved, "name": "search_vs_baselines"}))
    spec = load_spec(run / "spec.yaml", check_model=False)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3),
                                study_name="capsearch", storage=f"sqlite:///{run / 'optuna.db'}")  # fmt: skip
    params, trials = {}, {}
    for number in range(0, 13):
        trial = trials[number] = study.ask()
        define_space(trial, spec.search_space)
        params[number] = dict(trial.params)
    _write(run / "trials" / "t000" / "result.json", {"trial": "t000", "number": 0,
           "baseline": "full", "params": {}, "status": "ok", "reward": -4.0})  # fmt: skip
    finals = {5: (-4.3, -4.1), 6: (-4.0, -4.4), 7: (-4.2, -4.3)}  # search reward, final reward
    for number, (reward, final) in finals.items():
        folder = run / "trials" / f"t{number:03d}"
        _write(folder / "result.json", {"trial": folder.name, "number": number, "baseline": None,
               "params": params[number], "status": "ok", "reward": reward})  # fmt: skip
        _write(folder / "final" / "result.json", {"trial": folder.name, "split": "test",
               "seed": 1000, "metrics": {}, "reward": final})  # fmt: skip
    stops = {
        8: (500, 0.031),
        9: (500, 0.027),
        10: (1500, 0.020),
        11: (500, 0.029),
        12: (500, 0.035),
    }
    for number, (step, score) in stops.items():
        folder = run / "trials" / f"t{number:03d}"
        _write(folder / "result.json", {"trial": folder.name, "number": number, "baseline": None,
               "params": params[number], "status": "stopped", "steps": step})  # fmt: skip
        lines = [{"step": 10, "loss": 0.05}, {"probe": {"step": step, "probe_score": score}}]
        (folder / "train_log.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
        trials[number].report(score, step)  # what the search told Optuna at the stopping probe
    return run, params


def test_followup_specs_from_a_search_record(followups, tmp_path):
    run, params = _run(tmp_path)
    out = tmp_path / "specs"
    specs = followups.followups(run, BASE)
    assert sorted(specs) == ["search_confirm_seed1.yaml", "search_confirm_seed3.yaml",
                             "search_control_seed0.yaml", "search_control_seed1.yaml",
                             "search_control_seed3.yaml", "search_stops.yaml",
                             "search_transfer.yaml"]  # fmt: skip
    out.mkdir()
    loaded = {}
    for name, data in specs.items():
        (out / name).write_text(yaml.safe_dump(data))
        spec = load_spec(out / name, check_model=False)
        fixed_points(spec.search_space, spec.baselines.fixed, set(spec.baselines.methods))
        assert spec.search.num_samples == 0 and spec.search.reuse == []
        loaded[name] = spec
    for seed in (1, 3):
        spec = loaded[f"search_confirm_seed{seed}.yaml"]
        assert spec.data.phantom.seed == seed and spec.train.seed == seed
        assert spec.final.seed == 1000 + seed and spec.baselines.methods == []
        # the winner is chosen on the final reward (t005), not the search reward (t006)
        assert [(f.name, f.params) for f in spec.baselines.fixed] == [("found", params[5])]
        assert spec.train.steps == 2000 and spec.data.phantom.patients == 80  # the search's regime
    for seed in (0, 1, 3):  # Full FT at W's rate, on the search's seed and the confirmation seeds
        spec = loaded[f"search_control_seed{seed}.yaml"]
        assert spec.data.phantom.seed == seed and spec.train.seed == seed
        assert spec.final.seed == 1000 + seed and spec.baselines.methods == []
        (control,) = spec.baselines.fixed
        groups = [k for k in params[5] if k.endswith(".method")]
        assert control.name == "full_at_w_rate" and len(groups) == 6
        assert control.params == {**{g: "full" for g in groups}, "lr": params[5]["lr"],
                                  "mitigation": "none"}  # fmt: skip
    stops = loaded["search_stops.yaml"]
    assert [f.name for f in stops.baselines.fixed] == [
        "stopped_t009",
        "stopped_t011",
        "stopped_t008",
    ]
    assert stops.baselines.fixed[0].params == params[9] and stops.data.phantom.seed == 0
    transfer = loaded["search_transfer.yaml"]
    assert transfer.data.phantom.seed == 27 and transfer.final.seed == 1027
    avoid = transfer.data.phantom.avoid_reports_of
    assert (avoid.seed, avoid.patients) == (0, 80)
    assert transfer.baselines.methods == ["freeze", "full", "attention", "difffit", "svdiff"]
    assert [f.name for f in transfer.baselines.fixed] == ["found"]


def test_the_stopping_probe_is_read_from_the_study_where_the_log_lacks_it(followups, tmp_path):
    """Logs of trials ASHA stopped before capsearch logged a probe ahead of reporting it end before
    the probe that stopped them; the study holds its score."""
    run, params = _run(tmp_path)
    for number in (9, 11):
        log = run / "trials" / f"t{number:03d}" / "train_log.jsonl"
        log.write_text(log.read_text().splitlines()[0] + "\n")  # the probe line gone
    stops = followups.first_rung_stops(followups.load_run(run), 500)
    assert [(score, r.number) for score, r in stops] == [(0.027, 9), (0.029, 11), (0.031, 8)]
    (run / "optuna.db").unlink()  # without the study, those two cannot be ranked: left out
    stops = followups.first_rung_stops(followups.load_run(run), 500)
    assert [r.number for _, r in stops] == [8, 12]


def test_no_final_stage_yet_is_one_line(followups, tmp_path):
    run, _ = _run(tmp_path)
    for final in run.glob("trials/*/final/result.json"):
        final.unlink()
    with pytest.raises(Exception) as exc:
        followups.followups(run, BASE)
    assert "no searched trial has a final re-evaluation" in str(exc.value)


def test_a_confirmation_seed_the_choice_used_is_refused(followups, tmp_path):
    from capsearch.errors import UserError

    run, _ = _run(tmp_path)
    spec = yaml.safe_load((run / "spec.yaml").read_text())
    spec["final"]["train_seeds"] = [1]  # every finalist also trained on seed 1 before the choice
    (run / "spec.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(UserError, match=r"^confirmation seed\(s\) 1: the winner was chosen on "
                       r"training seed\(s\) 0, 1 \(train\.seed, final\.train_seeds\)"):  # fmt: skip
        followups.followups(run, BASE)
    with pytest.raises(UserError, match=r"^confirmation seed\(s\) 0: "):
        followups.followups(run, BASE, seeds=(0, 2))
    specs = followups.followups(run, BASE, seeds=(2, 3))
    confirm = sorted(name for name in specs if name.startswith("search_confirm"))
    assert confirm == ["search_confirm_seed2.yaml", "search_confirm_seed3.yaml"]
    assert specs["search_confirm_seed2.yaml"]["train"]["seed"] == 2
