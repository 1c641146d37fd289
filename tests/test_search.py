"""The outer loop: define-by-run space, baselines as enqueued points, reward, trials, resume, a real run."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from conftest import bare_search_spec, make_searcher, mid_block_groups

from capsearch.config import spec_from_dict
from capsearch.search.records import TrialRecord
from capsearch.search.reward import compute_reward, pareto_front, reward_terms
from capsearch.search.runs import load_trials, read_record, trial_dir
from capsearch.search.space import (
    define_space,
    params_to_method_spec,
    params_to_mitigations,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPEC = {
    "name": "unit",
    "model": "tiny:random",
    "train": {"steps": 3, "batch_size": 2, "lr": 1.0e-4},
    "search": {"num_samples": 2},
    "baselines": {"methods": ["freeze", "difffit", "lora"], "train": {"lora": {"lr": 2.0e-4}}},
    "space": {
        "groups": [
            {
                "name": "attn",
                "units": "*:*_attn",
                "methods": {
                    "frozen": {},
                    "lora": {"rank": [2, 8], "alpha": {"choices": [4.0, 8.0]}},
                    "difffit": {"gamma_shape": {"choices": ["channel", "scalar"]}},
                },
            },
            {"name": "mid", "units": "mid_block.resnets", "methods": {"frozen": {}, "difffit": {}}},
        ],
        "lr": [3.0e-5, 3.0e-4],
        "mitigations": {"none": {}, "rwa": {"k": [1, 3], "p": 0.5}},
    },
}


@pytest.fixture
def spec():
    return spec_from_dict(json.loads(json.dumps(SPEC)))


def test_define_by_run_suggests_only_the_chosen_methods_parameters(spec):
    space = spec.search_space
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    extras = []
    study.optimize(lambda t: extras.append(define_space(t, space)) or 0.0, n_trials=40)
    seen = set()
    for trial, extra in zip(study.trials, extras):
        assert extra["_number"] == trial.number and "baseline" not in extra
        method = trial.params["attn.method"]
        seen.add(method)
        attn_keys = {k for k in trial.params if k.startswith("attn.") and k != "attn.method"}
        expected = {"lora": {"attn.lora.rank", "attn.lora.alpha"},
                    "difffit": {"attn.difffit.gamma_shape"}, "frozen": set()}[method]  # fmt: skip
        assert attn_keys == expected
        rwa_keys = {k for k in trial.params if k.startswith("mitigation.")}
        assert rwa_keys == ({"mitigation.rwa.k"} if trial.params["mitigation"] == "rwa" else set())
        entries = params_to_method_spec(trial.params, space)
        assert [e["method"] for e in entries] == [
            m for m in (method, trial.params["mid.method"]) if m != "frozen"
        ]
        if method == "lora":
            assert 2 <= entries[0]["rank"] <= 8 and entries[0]["units"] == ["*:*_attn"]
        mitigations = params_to_mitigations(trial.params, space)
        if trial.params["mitigation"] == "rwa":  # p is fixed in the space, k is searched
            assert mitigations == [{"name": "rwa", "k": trial.params["mitigation.rwa.k"], "p": 0.5}]
        else:
            assert mitigations == []
    assert seen == {"frozen", "lora", "difffit"}


def test_baselines_are_points_of_the_space(spec):
    from capsearch.search.trial import build_plan

    points = {b.name: b for b in spec.baseline_points}
    assert list(points) == ["freeze", "difffit", "lora"]
    assert points["freeze"].params["attn.method"] == "frozen"
    assert points["freeze"].params["mid.method"] == "frozen"
    # DiffFit on every group that allows it; categorical hyper-parameters take the method's default
    assert points["difffit"].params["attn.difffit.gamma_shape"] == "channel"
    # LoRA's rank is searched: the baseline uses the method's default rank 4 (inside [2, 8])
    assert (
        points["lora"].params["attn.lora.rank"] == 4
        and points["lora"].params["mid.method"] == "frozen"
    )
    assert points["lora"].params["lr"] == pytest.approx(2.0e-4)  # its baselines.train override
    plan = build_plan(spec, dict(points["difffit"].params), "difffit", 1, Path("run"))
    assert [e["method"] for e in plan.method_spec] == ["difffit", "difffit"]
    assert plan.train.lr == pytest.approx(1.0e-4)
    assert plan.train.caption_dropout == 0.1 and plan.train.mitigations == []  # the default
    assert plan.evaluate.cache_dir == str(Path("run") / "cache")


def test_trial_mitigations_stack_base_ones_under_the_chosen_one(spec):
    """Caption dropout and train.mitigations reach every trial, baselines too, under its choice."""
    from capsearch.search.trial import TrialPlan, build_plan

    data = json.loads(json.dumps(SPEC))
    data["train"].update(caption_dropout=0.2, mitigations=[{"name": "gni", "sigma": 0.01}])
    data["baselines"]["mitigations"] = ["none", "rwa"]
    stacked = spec_from_dict(data)
    params = dict(stacked.baseline("difffit+rwa").params)
    plan = build_plan(stacked, params, "difffit+rwa", 3, Path("run"))
    assert plan.train.all_mitigations() == [
        {"name": "caption_dropout", "p": 0.2},
        {"name": "gni", "sigma": 0.01},
        {"name": "rwa", "k": 2, "p": 0.5},
    ]
    # the plan is what the trial trains with: it survives its JSON round trip unchanged
    assert TrialPlan.model_validate(json.loads(plan.model_dump_json())) == plan
    data["train"].update(caption_dropout=0.0, mitigations=[])
    none = build_plan(spec_from_dict(data), params, "difffit+rwa", 3, Path("run"))
    assert none.train.all_mitigations() == [{"name": "rwa", "k": 2, "p": 0.5}]


@pytest.mark.parametrize(
    "train, space_mitigations, match",
    [
        ({}, {"none": {}, "caption_dropout": {"p": [0.0, 0.3]}}, "caption_dropout: train already"),
        (
            {"mitigations": [{"name": "caption_dropout", "p": 0.2}]},
            {"none": {}},
            "train.mitigations: mitigation caption_dropout is listed twice",
        ),
        ({"mitigations": [{"name": "gni", "sigma": 0.1}]}, {"none": {}, "gni": {}}, "space.mit"),
        ({"mitigations": [{"name": "rwa", "mode": "once"}]}, {"none": {}}, "must be one of"),
    ],
)
def test_a_mitigation_twice_in_a_trial_is_one_line(train, space_mitigations, match):
    from capsearch.errors import UserError

    data = json.loads(json.dumps(SPEC))
    data["train"].update(train)
    data["space"]["mitigations"] = space_mitigations
    with pytest.raises(UserError, match=match):
        spec_from_dict(data)


def test_plan_trials_enqueues_baselines_with_their_names(spec, tmp_path):
    from capsearch.search.loop import open_study, plan_trials

    study = open_study(spec, tmp_path)
    assert plan_trials(spec, study, tmp_path) == 3 + 2
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert [t.user_attrs["baseline"] for t in waiting] == ["freeze", "difffit", "lora"]
    assert plan_trials(spec, study, tmp_path) == 5  # planning again enqueues nothing twice
    assert len(study.get_trials(states=(optuna.trial.TrialState.WAITING,))) == 3
    for name in ("freeze", "difffit", "lora"):
        trial = study.ask()
        extra = define_space(trial, spec.search_space)
        assert extra["baseline"] == name
        assert trial.params == spec.baseline(name).params
        study.tell(trial, 0.0)
    trial = study.ask()
    assert "baseline" not in define_space(trial, spec.search_space)


def test_fixed_configurations_run_by_name_like_baselines(tmp_path):
    from capsearch.errors import UserError
    from capsearch.search.loop import open_study, plan_trials
    from capsearch.search.runs import write_json
    from capsearch.search.trial import build_plan

    found = {"attn.method": "lora", "attn.lora.rank": 3, "attn.lora.alpha": 8.0,
             "mid.method": "difffit", "lr": 1.0e-4, "mitigation": "rwa", "mitigation.rwa.k": 2}  # fmt: skip
    folder = trial_dir(tmp_path, 12)
    folder.mkdir(parents=True)
    write_json(folder / "params.json", {"trial": "t012", "params": found})
    data = json.loads(json.dumps(SPEC))
    data["baselines"]["fixed"] = [
        {"name": "t012", "trial": str(folder)},
        {"name": "mine", "params": found},
    ]
    spec = spec_from_dict(data)
    assert [b.name for b in spec.baseline_points][-2:] == ["t012", "mine"]
    assert spec.baseline("t012").params == spec.baseline("mine").params == found
    # read once: the run folder's spec.yaml holds the parameters, and loads without the trial folder
    saved = spec.to_dict()
    assert saved["baselines"]["fixed"][0]["params"] == found
    (folder / "params.json").unlink()
    assert spec_from_dict(saved).baseline("t012").params == found
    plan = build_plan(spec, found, "t012", 9, tmp_path)
    assert plan.method_spec[0]["method"] == "lora" and plan.train.lr == 1.0e-4
    assert not plan.report_probes or spec.search.scheduler.name == "fifo"  # never stopped by ASHA
    (tmp_path / "run").mkdir()
    study = open_study(spec, tmp_path / "run")
    assert plan_trials(spec, study, tmp_path / "run") == 5 + 2
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert [t.user_attrs["baseline"] for t in waiting][-2:] == ["t012", "mine"]
    for fixed, message in (
        ({"name": "t012", "trial": str(folder)}, "cannot read the parameters of"),
        ({"name": "difffit", "params": found}, "already a baseline's name"),
        (
            {"name": "x", "params": {**found, "attn.method": "svdiff"}},
            r"baselines\.fixed\[0\]\.params: trial parameter attn",
        ),
        ({"name": "x"}, "give params, or trial"),
    ):
        data["baselines"]["fixed"] = [fixed]
        with pytest.raises(UserError, match=message):
            spec_from_dict(json.loads(json.dumps(data)))


def test_resume_counts_finished_trials_and_settles_interrupted_ones(spec, tmp_path):
    from capsearch.search.loop import open_study, plan_trials
    from capsearch.search.runs import write_json

    study = open_study(spec, tmp_path)
    plan_trials(spec, study, tmp_path)
    asked = [study.ask() for _ in range(5)]  # 3 baselines, then 2 searched trials start
    for t in asked:
        define_space(t, spec.search_space)
    statuses = {0: "ok", 1: "error", 3: "ok"}  # trial 2 (lora) and 4 were running when it stopped
    for number, status in statuses.items():
        folder = trial_dir(tmp_path, number)
        folder.mkdir(parents=True)
        record = {"trial": folder.name, "number": number, "status": status,
                  "params": asked[number].params,
                  "baseline": asked[number].user_attrs.get("baseline"),
                  "metrics": {}, "reward": 1.5}  # fmt: skip
        write_json(folder / "result.json", record)
    for number in (2, 4):
        trial_dir(tmp_path, number).mkdir(parents=True)
        write_json(trial_dir(tmp_path, number) / "params.json",
                   {"trial": f"t{number:03d}", "number": number, "status": "running"})  # fmt: skip
    left = plan_trials(spec, study, tmp_path)
    assert left == 1 + 1  # the lora baseline again, and one of the two searched trials
    states = {t.number: t.state for t in study.get_trials()}
    assert states[0] == states[3] == optuna.trial.TrialState.COMPLETE  # told with their reward
    assert states[1] == states[2] == states[4] == optuna.trial.TrialState.FAIL
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert [t.user_attrs["baseline"] for t in waiting] == ["lora"]
    statuses = {r.number: r.status for r in load_trials(tmp_path, finished_only=False)}
    assert statuses == {0: "ok", 1: "error", 2: "interrupted", 3: "ok", 4: "interrupted"}


def test_an_interrupted_baseline_goes_on_from_its_own_checkpoint(spec, tmp_path):
    from capsearch.search.runs import write_json
    from capsearch.search.trial import _take_checkpoint, build_plan, resumable_checkpoint

    plan = build_plan(spec, spec.baseline("difffit").params, "difffit", 5, tmp_path)
    record = {**plan.model_dump(mode="json"), "trial": "t005", "status": "interrupted"}
    for number, changes in (
        (1, {}),
        (2, {"status": "ok"}),
        (3, {"train": {**record["train"], "lr": 1.0}}),
    ):
        folder = trial_dir(tmp_path, number)
        (folder / "checkpoint").mkdir(parents=True)
        (folder / "checkpoint" / "state.json").write_text(str(number))
        write_json(folder / "result.json",
                   {**record, **changes, "trial": folder.name, "number": number})  # fmt: skip
    # only trial 1 was interrupted with exactly this plan (2 finished; 3 trained at another rate)
    assert resumable_checkpoint(tmp_path, plan) == str(trial_dir(tmp_path, 1) / "checkpoint")
    lora = build_plan(spec, spec.baseline("lora").params, "lora", 6, tmp_path)
    assert resumable_checkpoint(tmp_path, lora) is None
    new = trial_dir(tmp_path, 5)
    new.mkdir()
    assert not _take_checkpoint(plan, new)  # no resume_from: train from step 0
    plan.resume_from = resumable_checkpoint(tmp_path, plan)
    assert _take_checkpoint(plan, new) and (new / "checkpoint" / "state.json").read_text() == "1"


def test_an_interrupted_searched_trial_is_retried_once_with_its_parameters(spec, tmp_path):
    from capsearch.search.loop import open_study, plan_trials
    from capsearch.search.runs import write_json
    from capsearch.search.trial import build_plan, resumable_checkpoint

    study = open_study(spec, tmp_path)
    plan_trials(spec, study, tmp_path)
    asked = [study.ask() for _ in range(5)]  # 3 baselines, then 2 searched trials
    extras = [define_space(t, spec.search_space) for t in asked]
    for number in range(5):
        folder = trial_dir(tmp_path, number)
        (folder / "checkpoint").mkdir(parents=True)
        plan = build_plan(
            spec, asked[number].params, extras[number].get("baseline"), number, tmp_path
        )
        record = {**plan.model_dump(mode="json"), "trial": folder.name}
        if number == 4:  # running when the search stopped
            write_json(folder / "params.json", {**record, "status": "running"})
        else:
            write_json(folder / "result.json", {**record, "status": "ok", "reward": 1.0})
    spec.search.num_samples = 1  # a search with no budget left retries nothing
    assert plan_trials(spec, study, tmp_path) == 0
    assert not study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    spec.search.num_samples = 2
    assert plan_trials(spec, study, tmp_path) == 1  # one searched trial left in the budget...
    (retry,) = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert retry.user_attrs == {"retry_of": 4}  # ...its retry
    assert plan_trials(spec, study, tmp_path) == 1  # planning again enqueues nothing more
    assert len(study.get_trials(states=(optuna.trial.TrialState.WAITING,))) == 1
    again = study.ask()
    extra = define_space(again, spec.search_space)
    assert again.number == 5 and extra == {"_number": 5, "retry_of": 4}
    assert again.params == asked[4].params
    plan = build_plan(spec, again.params, None, 5, tmp_path)
    # it goes on from trial 4's checkpoint, the one interrupted trial that trained exactly this plan
    assert resumable_checkpoint(tmp_path, plan) == str(trial_dir(tmp_path, 4) / "checkpoint")


def test_with_budget_for_one_the_newest_interrupted_trial_is_retried(spec, tmp_path):
    from capsearch.search.loop import open_study, plan_trials
    from capsearch.search.runs import write_json

    study = open_study(spec, tmp_path)
    plan_trials(spec, study, tmp_path)
    asked = [study.ask() for _ in range(6)]  # 3 baselines, then 3 searched trials
    for number, t in enumerate(asked):
        define_space(t, spec.search_space)
        status = "interrupted" if number in (3, 5) else "ok"
        trial_dir(tmp_path, number).mkdir(parents=True)
        write_json(trial_dir(tmp_path, number) / "result.json",
                   {"trial": f"t{number:03d}", "number": number, "status": status,
                    "params": t.params, "baseline": t.user_attrs.get("baseline"), "reward": 1.0})  # fmt: skip
    # 2 searched trials allowed, 1 finished (t004): one retry, of t005 (t003's slot was refilled by t004)
    assert plan_trials(spec, study, tmp_path) == 1
    (retry,) = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert retry.user_attrs == {"retry_of": 5}


@pytest.mark.parametrize("sampler", ["random", "tpe", "nsga2", "gp"])
def test_a_resumed_search_does_not_draw_its_first_sittings_trials_again(spec, sampler):
    """A sampler rebuilt with the spec's seed would propose the first sitting's trials again (random
    draws: the random sampler, TPE's and the GP's start-up, NSGA-II's first generation); resumed, it
    draws anew."""
    from capsearch.search.study import make_sampler

    spec = spec.model_copy(update={"search": spec.search.model_copy(update={"sampler": sampler})})

    def draws(proposed: int) -> list[dict]:
        study = optuna.create_study(direction="maximize", sampler=make_sampler(spec, proposed))
        out = []
        for _ in range(4):
            t = study.ask()
            define_space(t, spec.search_space)
            study.tell(t, 0.0)
            out.append(t.params)
        return out

    first = draws(0)
    assert draws(0) == first  # a fresh search: the spec's seed, the same draws
    assert draws(4) == draws(4)  # a resumed one: deterministic for the same study
    assert not any(p in first for p in draws(4))


def test_the_search_seeds_its_sampler_from_the_trials_the_study_holds(tmp_path, monkeypatch):
    """run_search hands _tune the number of trials its study held when it started: 0 for a new
    search, the first sitting's count when resumed."""
    import capsearch.search.loop as search

    seen = []
    monkeypatch.setattr(search, "_tune", lambda *a: seen.append(a[-1]))
    monkeypatch.setattr(search, "run_final_stage", lambda *a, **k: None)
    spec = bare_search_spec(num_samples=3)
    run = tmp_path / "run"
    search.run_search(spec, run)
    study = optuna.load_study(study_name="capsearch", storage=f"sqlite:///{run / 'optuna.db'}")
    for _ in range(2):  # the first sitting proposed two trials, then stopped
        study.tell(study.ask(), 0.0)
    search.run_search(spec, run, resume=True)
    assert seen == [0, 2]


def test_a_finished_trial_of_a_reuse_run_stands_in_for_identical_training(
    spec, tmp_path, monkeypatch
):
    from capsearch.search.runs import write_json
    from capsearch.search.trial import build_plan, reusable_trial

    other = tmp_path / "other"
    other.mkdir()
    (other / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    plan = build_plan(spec, spec.baseline("difffit").params, "difffit", 7, tmp_path)
    record = {**plan.model_dump(mode="json"), "trial": "t007", "status": "ok"}
    for number, changes, kept in (
        (1, {"status": "interrupted"}, True),  # not finished
        (2, {"train": {**record["train"], "lr": 1.0}}, True),  # another rate
        (3, {}, False),  # its delta is gone
        (4, {}, True),  # this one
    ):
        folder = trial_dir(other, number)
        folder.mkdir(parents=True)
        if kept:
            (folder / "delta").mkdir()
            (folder / "train_result.json").write_text("{}")
        write_json(folder / "result.json",
                   {**record, **changes, "trial": folder.name, "number": number})  # fmt: skip
    assert reusable_trial(spec, plan) is None  # search.reuse is empty
    search = spec.search.model_copy(update={"reuse": [str(other)]})
    reusing = spec.model_copy(update={"search": search})
    assert reusable_trial(reusing, plan) == str(trial_dir(other, 4).resolve())
    # a relative reuse folder (as specs write it) comes back absolute: a trial's worker runs elsewhere
    monkeypatch.chdir(tmp_path)
    relative = spec.model_copy(
        update={"search": spec.search.model_copy(update={"reuse": ["other"]})}
    )
    assert reusable_trial(relative, plan) == str(trial_dir(other, 4).resolve())
    lora = build_plan(spec, spec.baseline("lora").params, "lora", 8, tmp_path)
    assert reusable_trial(reusing, lora) is None
    # other data: nothing is reused
    (other / "spec.yaml").write_text(
        yaml.safe_dump({**SPEC, "data": {"phantom": {"patients": 7, "size": 32}}})
    )
    assert reusable_trial(reusing, plan) is None


def test_reward_formula_and_pareto_front():
    weights = {"fid": 1.0, "alignment": 2.0, "amd": 0.5, "extracted": 3.0}
    m = {"fid": 20.0, "alignment": 0.6, "amd": 0.1, "amd_heldout": 0.2, "extracted_fraction": 0.25}
    # AMD enters as its shortfall against real held-out images: max(0, 1 − 0.1/0.2) = 0.5.
    expected = -math.log(20.0) + 2 * 0.6 - 0.5 * 0.5 - 3 * 0.25
    assert compute_reward(m, weights) == pytest.approx(expected)
    assert compute_reward({**m, "fid": 10.0}, weights) - compute_reward(
        m, weights
    ) == pytest.approx(math.log(2))  # halving FID is worth ln 2 whatever its scale
    assert set(reward_terms({"fid": 5.0}, {"fid": 1.0, "amd": 0.0})) == {"fid"}
    with pytest.raises(ValueError, match="amd is missing"):
        compute_reward({"fid": 5.0}, {"fid": 1.0, "amd": 1.0})
    with pytest.raises(ValueError, match="amd_heldout is missing"):
        compute_reward({"fid": 5.0, "amd": 0.3}, {"fid": 1.0, "amd": 1.0})
    with pytest.raises(ValueError, match="not finite"):
        compute_reward({"fid": float("nan")}, {"fid": 1.0})
    rows = [{"fid": 10, "amd": 0.1}, {"fid": 20, "amd": 0.3}, {"fid": 30, "amd": 0.2}, {"fid": 5}]
    assert pareto_front(rows, ["fid", "amd"]) == [0, 1]


def fake_evaluate(pipe, data_root, config, out_dir=None):
    metrics = {"fid": 12.0, "alignment": 0.5, "amd": 0.2, "amd_heldout": 0.25, "extracted": 1,
               "extracted_fraction": 0.125, "strength_ratio": 1.1, "settings": {"x": 1},
               "intervals": {"fid": [10.0, 14.0]}, "noise_floor": {"n": 8}}  # fmt: skip
    if out_dir is not None:
        (Path(out_dir) / "metrics.json").write_text(json.dumps(metrics))
    return metrics


def test_run_trial_records_success_failure_and_nan(spec, tmp_path, monkeypatch):
    import capsearch.metrics.evaluate
    import capsearch.search.trial
    import capsearch.training.loop
    from capsearch.search.trial import build_plan, final_result, run_trial
    from capsearch.training.loop import TrainResult

    def run(params, baseline, number, report=None):
        plan = build_plan(spec, params, baseline, number, tmp_path)
        return run_trial(plan, tmp_path, tmp_path, report=report)

    calls = []

    def fake_finetune(pipe, entries, data, config, callbacks=(), out_dir=None, **kw):
        calls.append((entries, config))
        from capsearch.methods import apply_methods
        from capsearch.models.delta import save_delta

        applied = apply_methods(pipe.unet, entries)
        for cb in callbacks:
            cb("probe", {"step": 2, "heldout_loss": 0.3, "probe_score": 0.4, "own_share": 0.25,
                         "own_chance": 0.1})  # fmt: skip
        save_delta(pipe.unet, Path(out_dir) / "delta", applied=applied)
        return TrainResult("ok", config.steps, 0.1, 123, 1000, 0.5)

    monkeypatch.setattr(capsearch.search.trial, "finetune", fake_finetune)
    monkeypatch.setattr(capsearch.search.trial, "evaluate", fake_evaluate)
    reported = []
    params = dict(spec.baseline("lora").params, mitigation="rwa", **{"mitigation.rwa.k": 2})
    record = run(params, None, 7, report=reported.append)
    assert record.status == "ok" and record.trainable == 123
    assert record.reward == pytest.approx(
        compute_reward(record.metrics, spec.objective.weights.model_dump())
    )
    assert calls[0][1].all_mitigations() == [
        {"name": "caption_dropout", "p": 0.1},
        {"name": "rwa", "k": 2, "p": 0.5},
    ]
    # the probe's signals for the dashboard (own_chance, constant over a run, stays in the log)
    assert reported == [
        {"training_step": 2, "probe_score": 0.4, "heldout_loss": 0.3, "own_share": 0.25}
    ]
    assert record.intervals == {"fid": [10.0, 14.0]} and record.noise_floor == {"n": 8}
    saved = json.loads((trial_dir(tmp_path, 7) / "result.json").read_text())
    assert saved["status"] == "ok" and saved["groups"]["attn"].startswith("lora(rank=4")
    assert final_result(record)["reward"] == pytest.approx(record.reward)
    assert read_record(trial_dir(tmp_path, 7) / "result.json") == record  # as a reader reads it

    def broken(*a, **kw):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(capsearch.search.trial, "finetune", broken)
    record = run(params, None, 8)
    assert record.status == "error" and "out of memory" in record.error
    assert (trial_dir(tmp_path, 8) / "error.txt").is_file()
    assert final_result(record) == {"status": "error", "trial": "t008", "training_step": 0,
                                    "error": "RuntimeError: out of memory"}  # fmt: skip

    monkeypatch.setattr(capsearch.search.trial, "finetune",
                        lambda *a, **kw: TrainResult("nan", 2, math.nan, 5, 10, 0.1, message="diverged"))  # fmt: skip
    record = run(params, None, 9)
    assert record.status == "nan" and record.error == "diverged" and record.reward is None
    assert "reward" not in json.loads((trial_dir(tmp_path, 9) / "result.json").read_text())


def test_freeze_trains_nothing_and_keeps_a_delta(spec, tmp_path, monkeypatch):
    import capsearch.metrics.evaluate
    import capsearch.search.trial
    import capsearch.training.loop
    from capsearch.search.trial import build_plan, run_trial

    monkeypatch.setattr(capsearch.search.trial, "finetune", lambda *a, **kw: pytest.fail("trained"))
    monkeypatch.setattr(capsearch.search.trial, "evaluate", fake_evaluate)
    plan = build_plan(spec, dict(spec.baseline("freeze").params), "freeze", 0, tmp_path)
    record = run_trial(plan, tmp_path, tmp_path)
    assert record.status == "ok" and record.trainable == 0 and record.metrics["trainable_pct"] == 0
    assert (trial_dir(tmp_path, 0) / "delta" / "delta.safetensors").is_file()


def test_searcher_records_failures_pruning_and_probes(spec, tmp_path):
    from capsearch.search.loop import study_storage

    searcher = make_searcher(spec, tmp_path)
    configs = {name: searcher.suggest(name) for name in ("ok", "error", "stopped")}
    assert all("_number" in c and "attn.method" in c for c in configs.values())
    # each proposal carries its plan, built and validated in the driver
    for config in configs.values():
        assert config["plan"]["number"] == config["_number"]
        assert config["plan"]["params"]["attn.method"] == config["attn.method"]
    searcher.on_trial_result("stopped", {"training_step": 50, "probe_score": 0.25})
    searcher.on_trial_complete("ok", {"status": "ok", "reward": 0.5, "fid": 3.0, "trial": "t000"})
    searcher.on_trial_complete("error", {"status": "error", "error": "boom"})
    # Ray hands the probe that made ASHA stop a trial to on_trial_complete only
    searcher.on_trial_complete("stopped", {"training_step": 100, "probe_score": 0.3})
    trials = {t.user_attrs.get("ray_trial_id"): t for t in optuna.load_study(
        study_name=spec.search.study_name, storage=study_storage(tmp_path)).trials}  # fmt: skip
    assert trials["ok"].state == optuna.trial.TrialState.COMPLETE and trials["ok"].value == 0.5
    assert trials["ok"].user_attrs["fid"] == 3.0
    assert trials["error"].state == optuna.trial.TrialState.FAIL
    assert trials["error"].user_attrs["error"] == "boom"
    assert trials["stopped"].state == optuna.trial.TrialState.PRUNED
    assert trials["stopped"].intermediate_values == {50: 0.25, 100: 0.3}
    assert trials["stopped"].user_attrs["status"] == "stopped"


MICRO = {
    "name": "micro",
    "model": "tiny:random",
    "data": {
        "phantom": {"patients": 12, "size": 32, "seed": 1, "dup_fraction": 0.1, "dup_copies": 3}
    },
    "train": {"steps": 4, "batch_size": 4, "probe_every": 2},
    "evaluate": {
        "n_prompts": 2,
        "n_per_prompt": 2,
        "steps": 2,
        "extraction_prompts": 2,
        "extraction_n": 3,
        "strength_prompts": 1,
        "strength_n": 1,
        "batch_size": 8,
    },  # fmt: skip
    "search": {"num_samples": 1, "concurrency": 2, "seed": 0},
    "baselines": {"methods": ["freeze", "difffit"]},
    "space": {
        "groups": [
            *mid_block_groups(),
            # the rest of the UNet, so that the DiffFit baseline is DiffFit on the whole UNet
            {
                "name": "rest",
                "units": ["down_blocks", "up_blocks", "conv_in", "time_embedding", "conv_out"],
                "methods": {"frozen": {}, "difffit": {}},
            },
        ]
    },
}


def test_a_real_search_runs_reports_resumes_and_exports(tmp_path, capsys, monkeypatch):
    from capsearch.cli import main

    # A stale address (a cluster gone, or one of someone else's) must not be joined: the search starts
    # its own local instance whatever RAY_ADDRESS says.
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")
    from capsearch.metrics.scorer import CONFIG_FILE, SCORER_DIR

    if not (SCORER_DIR / CONFIG_FILE).is_file():
        pytest.skip("the phantom scorer is not installed (capsearch pretrain scorer)")
    spec_path = tmp_path / "micro.yaml"
    spec_path.write_text(yaml.safe_dump(MICRO))
    run = tmp_path / "run"
    started = time.time()
    assert main(["run", str(spec_path), "--out", str(run)]) == 0, capsys.readouterr().err
    seconds = time.time() - started
    out = capsys.readouterr().out
    records = load_trials(run)
    assert sorted(r.baseline or "" for r in records) == ["", "difffit", "freeze"]
    assert all(r.status == "ok" for r in records), [r.error for r in records]
    assert "report:" in out and (run / "report.md").is_file() and (run / "optuna.db").is_file()
    study = optuna.load_study(study_name="capsearch", storage=f"sqlite:///{run / 'optuna.db'}")
    assert sorted(t.user_attrs.get("baseline", "") for t in study.trials) == [
        "",
        "difffit",
        "freeze",
    ]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    # the final stage re-evaluated both baselines and the searched trial on the test split
    finals = {r.trial: r.final for r in records if r.final is not None}
    assert len(finals) == 3 and {f.split for f in finals.values()} == {"test"}
    assert all(
        f.seed == 1000 and f.reward is not None and f.intervals["fid"] for f in finals.values()
    )
    report = (run / "report.md").read_text()
    assert "## Final re-evaluation" in report and "Noise floor" in report
    stamps = {t: (run / "trials" / t / "final" / "result.json").stat().st_mtime for t in finals}
    # without --resume the folder is refused; with it nothing is rerun
    assert main(["run", str(spec_path), "--out", str(run)]) == 2
    assert "already holds a search" in capsys.readouterr().err
    assert main(["run", str(spec_path), "--out", str(run), "--resume"]) == 0
    assert len(load_trials(run)) == 3 and len(study.trials) == 3
    assert stamps == {
        t: (run / "trials" / t / "final" / "result.json").stat().st_mtime for t in finals
    }
    assert main(["status", str(run)]) == 0
    assert "3 ok; 3 planned (2 baselines)" in " ".join(capsys.readouterr().out.split())
    assert main(["export", str(run), "--trial", "difffit", "--out", str(tmp_path / "e")]) == 0
    assert (tmp_path / "e" / "unet" / "config.json").is_file()
    (difffit,) = [r for r in records if r.baseline == "difffit"]  # --trial's, not the best's
    exported = yaml.safe_load((tmp_path / "e" / "method_spec.yaml").read_text())
    assert (
        exported["methods"] == difffit.method_spec and exported["methods"][0]["method"] == "difffit"
    )
    assert exported["train"]["steps"] == 4
    print(f"micro search: {seconds:.1f} s")
    _resume_from_kept_records(run, spec_path, records, capsys)
    # A second search on the same data reuses the finished DiffFit baseline: no step trained again.
    # The reuse folder is relative, as specs write it: Ray Tune runs a trial's worker in its own folder.
    monkeypatch.chdir(run.parent)
    again = {**MICRO, "search": {**MICRO["search"], "num_samples": 0, "reuse": [run.name]}}
    again["baselines"] = {"methods": ["difffit"]}
    spec_path.write_text(yaml.safe_dump(again))
    assert main(["run", str(spec_path), "--out", str(tmp_path / "run2")]) == 0
    (mine,) = load_trials(tmp_path / "run2")
    (theirs,) = [r for r in records if r.baseline == "difffit"]
    assert mine.status == "ok", mine.error
    assert Path(mine.reuse_from) == theirs.folder.resolve()
    assert mine.steps == 4 and mine.train_seconds == theirs.train_seconds
    assert mine.metrics["fid"] > 0 and mine.final is not None  # evaluated, then re-evaluated, here
    from safetensors.torch import load_file

    a = load_file(mine.folder / "delta" / "delta.safetensors")
    b = load_file(theirs.folder / "delta" / "delta.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _resume_from_kept_records(run: Path, spec_path: Path, records: list, capsys) -> None:
    """A fresh machine resumes from the committed records alone (the study and the trials' records;
    no deltas, data or cache), cut before the final stage: it trains each finalist again from its
    record (bit for bit here)."""
    import importlib.util

    from safetensors.torch import load_file

    from capsearch.cli import main

    path = Path(__file__).resolve().parents[1] / "experiments" / "keep_records.py"
    module = importlib.util.spec_from_file_location("keep_records", path)
    keep_records = importlib.util.module_from_spec(module)
    module.loader.exec_module(keep_records)
    kept = run.parent / "kept"
    keep_records.keep(run, kept)
    for final in kept.glob("trials/*/final"):  # committed before its final stage ran
        for f in final.iterdir():
            f.unlink()
        final.rmdir()
    assert not list(kept.rglob("delta.safetensors")) and not (kept / "data").exists()
    assert (kept / "optuna.db").is_file()
    assert main(["run", str(spec_path), "--out", str(kept), "--resume"]) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert "trained again from its record" in out and "differs" not in out
    again = {r.trial: r for r in load_trials(kept)}
    assert len(again) == len(records)
    for record in records:
        mine = again[record.trial]
        assert mine.final.retrained.identical is True
        assert mine.final.metrics == record.final.metrics  # the same numbers, recomputed
        a = load_file(mine.folder / "delta" / "delta.safetensors")
        b = load_file(record.folder / "delta" / "delta.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_dashboard_url_answers(tmp_path, monkeypatch):
    import urllib.request

    import ray
    from rich.console import Console

    from capsearch.search.cluster import connect as connect_ray

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)  # restored after the test: ray.init sets it
    console = Console(record=True, width=200)
    assert connect_ray(None, True, console)
    try:
        line = console.export_text()
        url = line.split("Ray dashboard: ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:")
        deadline = time.time() + 30
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    assert response.status == 200
                    break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
    finally:
        ray.shutdown()


def test_default_run_dir(tmp_path, monkeypatch):
    from capsearch.commands.search import default_run_dir
    from capsearch.errors import UserError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="nothing to resume"):
        default_run_dir("tiny", resume=True)
    assert default_run_dir("tiny", resume=False) == Path("runs/tiny")
    Path("runs/tiny").mkdir(parents=True)
    assert default_run_dir("tiny", resume=False) == Path("runs/tiny-2")
    Path("runs/tiny-2").mkdir()
    assert default_run_dir("tiny", resume=True) == Path("runs/tiny-2")


def test_run_passes_each_flag_to_the_search(tmp_path, monkeypatch, capsys):
    """`capsearch run`'s flags where they land (the search itself is stubbed: the tests above run
    it for real): --set in the spec searched, --out, --resume and --retry-errors in run_search,
    --address and --dashboard in the Ray connection (made by the search through `join`, after its
    checks; the search also closes it, so the stub here does neither)."""
    import capsearch.commands.search as search_command
    import capsearch.search.loop as search_loop
    from capsearch.cli import main
    from capsearch.search import cluster

    monkeypatch.setenv("COLUMNS", "300")  # rich wraps no path
    seen = {}
    monkeypatch.setattr(cluster, "reap_orphans", lambda: [])
    monkeypatch.setattr(cluster, "connect",
                        lambda address, dashboard, console: seen.update(connect=(address, dashboard)) or True)  # fmt: skip

    def run_search(spec, out, resume, console, callbacks, retry_errors, join):
        seen["search"] = (spec.search.num_samples, spec.train.steps, out, resume, retry_errors)
        join()  # as the search does once its checks pass: Ray is joined only then
        return out

    monkeypatch.setattr(search_loop, "run_search", run_search)
    monkeypatch.setattr(
        search_command, "_summarise", lambda run_dir, spec, console: run_dir / "report.md"
    )
    spec_path, out = tmp_path / "micro.yaml", tmp_path / "run"
    spec_path.write_text(yaml.safe_dump(MICRO))
    argv = ["run", str(spec_path), "--out", str(out), "--resume", "--retry-errors", "--address",
            "auto", "--dashboard", "--set", "search.num_samples=5", "--set", "train.steps=3"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert seen == {"connect": ("auto", True), "search": (5, 3, out, True, True)}
    assert f"report: {out / 'report.md'}" in capsys.readouterr().out
    seen.clear()  # the defaults: a new run, its own local Ray, no dashboard, the spec as written
    assert main(["run", str(spec_path), "--out", str(out)]) == 0
    assert seen == {"connect": (None, False), "search": (1, 4, out, False, False)}


@pytest.mark.slow
def test_asha_stops_searched_trials_but_never_baselines(tmp_path, capsys):
    from capsearch.cli import main
    from capsearch.metrics.scorer import CONFIG_FILE, SCORER_DIR

    if not (SCORER_DIR / CONFIG_FILE).is_file():
        pytest.skip("the phantom scorer is not installed (capsearch pretrain scorer)")
    spec = json.loads(json.dumps(MICRO))
    spec["train"].update(steps=8, probe_every=2)
    spec["search"].update(num_samples=5, scheduler={"name": "asha", "grace_period": 2,
                                                    "reduction_factor": 2})  # fmt: skip
    (tmp_path / "asha.yaml").write_text(yaml.safe_dump(spec))
    run = tmp_path / "run"
    assert main(["run", str(tmp_path / "asha.yaml"), "--out", str(run)]) == 0
    records = {r.number: r for r in load_trials(run)}
    assert len(records) == 7 and {r.status for r in records.values()} <= {"ok", "stopped"}
    assert all(r.status == "ok" for r in records.values() if r.baseline)
    stopped = [r for r in records.values() if r.status == "stopped"]
    assert all(0 < r.steps < 8 and r.seconds > 0 for r in stopped)  # what each one cost
    study = optuna.load_study(study_name="capsearch", storage=f"sqlite:///{run / 'optuna.db'}")
    for t in study.trials:
        expected = "PRUNED" if records[t.number].status == "stopped" else "COMPLETE"
        assert t.state.name == expected
        if not t.user_attrs.get("baseline"):
            assert t.intermediate_values  # probe losses, for optuna-dashboard's curves


def test_a_finalist_without_delta_or_training_record_is_one_line(tmp_path):
    from capsearch.errors import UserError
    from capsearch.search.retrain import retrain_delta

    record = TrialRecord(trial="t003", number=3, dir=str(tmp_path / "t003"), model="tiny")
    with pytest.raises(UserError) as exc:
        retrain_delta(record, tmp_path)
    message = str(exc.value)
    assert "t003" in message and "method_spec, train" in message and "\n" not in message


def test_retry_errors_runs_an_errored_baseline_and_searched_trial_again(spec, tmp_path):
    from capsearch.search.loop import open_study, plan_trials
    from capsearch.search.runs import write_json
    from capsearch.search.trial import build_plan

    study = open_study(spec, tmp_path)
    plan_trials(spec, study, tmp_path)
    asked = [study.ask() for _ in range(5)]  # 3 baselines, then 2 searched trials
    extras = [define_space(t, spec.search_space) for t in asked]
    names = [e.get("baseline") for e in extras]
    for number in range(5):
        folder = trial_dir(tmp_path, number)
        folder.mkdir(parents=True)
        plan = build_plan(spec, asked[number].params, names[number], number, tmp_path)
        record = {**plan.model_dump(mode="json"), "trial": folder.name}
        status = "error" if number in (1, 4) else "ok"  # a baseline and a searched trial failed
        write_json(folder / "result.json", {**record, "status": status, "reward": 1.0})
    spec.search.num_samples = 2
    assert plan_trials(spec, study, tmp_path) == 0  # --resume alone reruns nothing
    assert not study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert plan_trials(spec, study, tmp_path, retry_errors=True) == 2
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert sorted(map(str, (t.user_attrs for t in waiting))) == sorted(
        map(str, ({"baseline": names[1]}, {"retry_of": 4}))
    )
    assert plan_trials(spec, study, tmp_path, retry_errors=True) == 2  # nothing enqueued twice
    assert len(study.get_trials(states=(optuna.trial.TrialState.WAITING,))) == 2
    again = [study.ask() for _ in range(2)]
    extras = [define_space(t, spec.search_space) for t in again]
    by_attr = {str(t.user_attrs): t for t in again}
    assert by_attr[str({"retry_of": 4})].params == asked[4].params
    assert by_attr[str({"baseline": names[1]})].params == asked[1].params
    for trial, extra in zip(again, extras):  # both finish this time
        folder = trial_dir(tmp_path, trial.number)
        folder.mkdir(parents=True)
        plan = build_plan(spec, trial.params, extra.get("baseline"), trial.number, tmp_path)
        write_json(folder / "result.json", {**plan.model_dump(mode="json"), "trial": folder.name,
                                            "status": "ok", "reward": 1.0})  # fmt: skip
    assert plan_trials(spec, study, tmp_path, retry_errors=True) == 0
