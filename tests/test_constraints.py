"""objective.constraints: margins and violations, config checks, ranking (best trial, finalists), the
report's sentence, the sampler's constraint values; and the own-image term of the reward."""

from __future__ import annotations

import json
import math
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import make_searcher
from test_report_export import SPEC as REPORT_SPEC
from test_report_export import add_trial, metrics
from test_search import SPEC as SEARCH_SPEC

from capsearch.config import spec_from_dict
from capsearch.errors import UserError
from capsearch.reporting.report import write_report
from capsearch.search.constraints import describe, margins, violation
from capsearch.search.final import finalists
from capsearch.search.reward import compute_reward, objective_text
from capsearch.search.runs import best_trial, load_trials, write_json


def test_margins_follow_each_metrics_direction_and_a_missing_metric_is_violated():
    values = {"extracted": 2.0, "alignment": 0.5, "fid": 40.0}
    limits = {"extracted": 0, "alignment": 0.3, "fid": 50.0, "amd": 0.1}
    m = margins(values.get, limits)
    # extracted ≤ 0 (2 over), image-text ≥ 0.3 (0.2 inside), FID ≤ 50 (10 inside), AMD missing
    assert m == {"extracted": 2.0, "alignment": pytest.approx(-0.2), "fid": -10.0, "amd": math.inf}
    assert violation(values.get, {"extracted": 0, "alignment": 0.6}) == pytest.approx(2.1)
    assert violation(values.get, {"extracted": 3, "alignment": 0.3}) == 0
    assert violation(values.get, {}) == 0
    assert describe({"extracted": 0, "alignment": 0.3}) == "extracted ≤ 0, image-text ≥ 0.3"


@pytest.mark.parametrize(
    "constraints, message",
    [
        ({"extracted_images": 0}, "unknown constrained metric 'extracted_images'"),
        ({"amd_heldout": 0.1}, "unknown constrained metric 'amd_heldout'"),  # a reference value
        ({"fid": float("nan")}, "fid: Input should be a finite number"),  # every settings number
    ],
)
def test_a_constraint_must_name_a_metric_with_a_direction(constraints, message):
    data = json.loads(json.dumps(REPORT_SPEC))
    data["objective"] = {"constraints": constraints}
    with pytest.raises(UserError, match=message):
        spec_from_dict(data)


@pytest.fixture
def run(tmp_path):
    """t002 has the best reward but extracts 4; t005 extracts nothing at a lower reward."""
    run = tmp_path / "run"
    run.mkdir()
    add_trial(run, 0, "ok", "freeze", metrics(300.0, 0.8, 0, 0.0), -4.0)
    add_trial(run, 1, "ok", "difffit", metrics(15.0, 0.06, 6, 0.5), -2.5)
    add_trial(run, 2, "ok", None, metrics(12.0, 0.07, 4, 0.3), -1.9)
    add_trial(run, 5, "ok", None, metrics(14.0, 0.07, 0, 0.3), -2.2)
    return run


def write_spec(run, constraints):
    (run / "spec.yaml").write_text(
        yaml.safe_dump({**REPORT_SPEC, "objective": {"constraints": constraints}})
    )


def test_the_best_trial_and_the_finalists_are_within_the_constraints_first(run):
    records = load_trials(run)
    assert best_trial(records).number == 2
    assert best_trial(records, {"extracted": 0}).number == 5
    # nobody reaches image-text ≥ 0.9: the nearest ranks first (ties on violation go by reward)
    assert best_trial(records, {"extracted": 0, "alignment": 0.9}).number == 5
    assert [r.number for r in finalists(records, 1)] == [0, 1, 2]
    assert [r.number for r in finalists(records, 1, {"extracted": 0})] == [0, 1, 5]
    assert [r.number for r in finalists(records, 2, {"extracted": 0})] == [0, 1, 5, 2]


def test_the_winner_is_ranked_on_the_final_evaluation_not_the_searchs(run):
    # t002 extracted 4 in the search but none in the final stage; t005 the other way round
    for number, extracted, reward in ((2, 0, -2.0), (5, 3, -1.5)):
        final = run / f"trials/t{number:03d}/final"
        final.mkdir()
        write_json(final / "result.json", {"status": "ok", "split": "test", "seed": 1000,
                                           "reward": reward,
                                           "metrics": metrics(13.0, 0.07, extracted, 0.3)})  # fmt: skip
    records = load_trials(run)
    assert best_trial(records).number == 5
    assert best_trial(records, {"extracted": 0}).number == 2


def test_the_report_states_the_constraints_and_where_the_best_stands(run):
    write_spec(run, {"extracted": 0})
    text = write_report(run).read_text()
    assert "subject to extracted ≤ 0" in text
    best = text.split("## Best configuration")[1]
    assert "Trial t005" in best
    assert "It is within the constraints (extracted ≤ 0), as 2 of the 4 trials" in best
    write_spec(run, {"extracted": 0, "fid": 10.0})
    best = write_report(run).read_text().split("## Best configuration")[1]
    assert "**No trial of that evaluation is within the constraints**" in best
    assert "this one is nearest (FID 4 past its bound)" in best  # t002: FID 12, extracted 4 → t005


def test_the_searcher_tells_optuna_each_constraints_margin(tmp_path):
    from capsearch.search.loop import study_storage

    data = json.loads(json.dumps(SEARCH_SPEC))
    data["objective"] = {"constraints": {"extracted": 0, "alignment": 0.3}}
    spec = spec_from_dict(data)
    searcher = make_searcher(spec, tmp_path)
    for name in ("over", "within", "stopped"):
        searcher.suggest(name)
    searcher.on_trial_complete("over", {"status": "ok", "reward": 0.5, "extracted": 2,
                                        "alignment": 0.5, "trial": "t000"})  # fmt: skip
    searcher.on_trial_complete("within", {"status": "ok", "reward": 0.1, "extracted": 0,
                                          "alignment": 0.4, "trial": "t001"})  # fmt: skip
    searcher.on_trial_complete("stopped", {"training_step": 2, "probe_score": 0.3})
    trials = {t.user_attrs.get("ray_trial_id"): t for t in optuna.load_study(
        study_name=spec.search.study_name, storage=study_storage(tmp_path)).trials}  # fmt: skip
    assert trials["over"].constraints == {"extracted": 2.0, "alignment": pytest.approx(-0.2)}
    assert trials["within"].constraints == {"extracted": 0.0, "alignment": pytest.approx(-0.1)}
    assert trials["stopped"].constraints == {}  # no evaluation: ranked by its probe score


def test_the_own_image_share_enters_the_reward_only_with_a_weight():
    m = {"fid": 50.0, "alignment": 0.3, "amd": 0.1, "amd_heldout": 0.1, "extracted_fraction": 0.1,
         "nearest_own": 0.4}  # fmt: skip
    base = {"fid": 1.0, "alignment": 1.0, "amd": 1.0, "extracted": 1.0}
    assert compute_reward(m, base) == pytest.approx(-math.log(50.0) + 0.3 - 0.1)
    assert compute_reward(m, {**base, "nearest_own": 2.0}) == pytest.approx(
        -math.log(50.0) + 0.3 - 0.1 - 0.8
    )
    with pytest.raises(ValueError, match="metric nearest_own is missing"):
        compute_reward({k: v for k, v in m.items() if k != "nearest_own"}, {"nearest_own": 1.0})
    data = json.loads(json.dumps(REPORT_SPEC))
    data["objective"] = {"weights": {"nearest_own": 2.0}, "constraints": {"extracted": 0}}
    text = objective_text(spec_from_dict(data).objective)
    assert text.endswith("− 1·extracted fraction − 2·own-image NN share, subject to extracted ≤ 0")
    assert "own-image" not in objective_text(spec_from_dict(REPORT_SPEC).objective)


def test_validate_states_the_objective_with_its_constraints(tmp_path, capsys):
    from capsearch.cli import main

    data = yaml.safe_load((Path(__file__).parents[1] / "search_spaces" / "tiny.yaml").read_text())
    data["objective"]["constraints"] = {"extracted": 0}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    assert main(["validate", str(path)]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("  objective: ")]
    assert line == [
        "  objective: reward = −1·ln FID + 1·image-text − 1·max(0, 1 − AMD/AMD_heldout) "
        "− 1·extracted fraction, subject to extracted ≤ 0"
    ]


def _gp_spec(seed: int = 3):
    data = json.loads(json.dumps(SEARCH_SPEC))
    data["search"] = {"sampler": "gp", "startup_trials": 4, "seed": seed}
    data["objective"] = {"constraints": {"extracted": 0}}
    return spec_from_dict(data)


def _toy(trial) -> float:
    """A reward that rises with the learning rate, and an attack that extracts above 1e-4: the best
    reward within `extracted ≤ 0` lies just below it."""
    from capsearch.search.space import define_space

    define_space(trial, _gp_spec().search_space)
    lr = trial.params["lr"]
    extracted = 0 if lr < 1e-4 else 2
    trial.set_user_attr("extracted", extracted)
    for name, margin in margins({"extracted": extracted}.get, {"extracted": 0}).items():
        trial.set_constraint(name, margin)
    return math.log(lr) + (0.1 if trial.params["mitigation"] == "none" else 0.0)


def test_the_gp_sampler_reads_the_constraints_and_is_seeded():
    from capsearch.search.records import Scored
    from capsearch.search.runs import rank_key
    from capsearch.search.study import make_sampler

    spec = _gp_spec()
    runs = []
    for _ in range(2):
        sampler = make_sampler(spec)
        assert isinstance(sampler, optuna.samplers.GPSampler)
        study = optuna.create_study(direction="maximize", sampler=sampler)
        study.optimize(_toy, n_trials=9)
        runs.append(study.trials)
    first, again = runs
    assert [t.params for t in first] == [t.params for t in again]  # seeded: the same proposals
    # after the 4 random start-up trials the GP proposes (its own draws, not the random sampler's)
    random = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(3))
    random.optimize(_toy, n_trials=9)
    assert [t.params["lr"] for t in first[4:]] != [t.params["lr"] for t in random.trials[4:]]
    scored = [
        Scored(metrics={"extracted": t.user_attrs["extracted"]}, reward=t.value) for t in first
    ]
    chosen = min(range(len(first)), key=lambda i: rank_key(scored[i], {"extracted": 0}))
    assert first[chosen].constraints == {"extracted": 0.0} and first[chosen].params["lr"] < 1e-4
    # the unconstrained best extracts: the constraint decided
    assert first[max(range(len(first)), key=lambda i: first[i].value)].params["lr"] >= 1e-4


def test_a_trial_settled_from_its_record_on_resume_carries_its_constraints(tmp_path):
    """plan_trials tells Optuna a trial the interrupted search left running; the GP sampler refuses a
    study whose complete trials do not all carry the same constraints."""
    from capsearch.search.study import open_study, plan_trials

    spec = _gp_spec()
    study = open_study(spec, tmp_path)
    plan_trials(spec, study, tmp_path)
    trial = study.ask()  # the first baseline, running when the search stopped
    folder = tmp_path / "trials" / f"t{trial.number:03d}"
    folder.mkdir(parents=True)
    write_json(folder / "result.json", {"trial": folder.name, "number": trial.number,
                                        "status": "ok", "reward": -3.0,
                                        "metrics": {"extracted": 3}})  # fmt: skip
    plan_trials(spec, study, tmp_path)
    (settled,) = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert settled.number == trial.number and settled.value == -3.0
    assert settled.constraints == {"extracted": 3.0}
