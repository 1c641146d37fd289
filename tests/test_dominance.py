"""Does the winner dominate the baselines (capsearch.reporting.dominance), and the search comparison script."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path

import pytest
import yaml

from capsearch.errors import UserError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from dominance import dominance, dominance_lines

from capsearch.search.records import FinalResult, TrialRecord
from capsearch.search.runs import trial_dir, write_json

ROOT = Path(__file__).resolve().parents[1]
TABLE1 = ROOT / "experiments" / "results" / "paper" / "paper_table1"
T_975_2DF = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom (3 seeds)
HALF = {"fid": 20.0, "amd": 0.008, "alignment": 0.09, "extracted": 3.0}  # within-run half-widths

# Table 1 seed 0's final numbers, rounded (experiments/results/paper/paper_table1, docs/results.md)
TABLE1_SEED0 = {
    "freeze": {"fid": 207.1, "amd": 0.208, "alignment": 0.27, "extracted": 0},
    "full": {"fid": 71.0, "amd": 0.102, "alignment": 0.32, "extracted": 10},
    "attention": {"fid": 100.2, "amd": 0.123, "alignment": 0.34, "extracted": 0},
    "difffit": {"fid": 102.9, "amd": 0.113, "alignment": 0.28, "extracted": 0},
    "svdiff": {"fid": 107.3, "amd": 0.123, "alignment": 0.29, "extracted": 0},
}
GOOD_W = {"fid": 75.0, "amd": 0.125, "alignment": 0.33, "extracted": 0}


def final_result(trial: str, values: dict, seed: int = 1000, reward: float = -4.0) -> dict:
    """A final/result.json in the shape of the real ones (t007 of Table 1 seed 0), values made up."""
    metrics = {"fid": 100.0, "kid": 8.5, "amd": 0.1, "amd_heldout": 0.049, "alignment": 0.3,
               "extracted": 0, "extracted_fraction": 0.0, "capped_prompts": 0, "nearest_own": 0.1,
               "strength_memorised": 1.0, "strength_other": 1.2, "strength_ratio": 0.83,
               "trainable_pct": 1.0, **values}  # fmt: skip
    metrics["extracted_fraction"] = metrics["extracted"] / 20
    intervals = {k: [max(0.0, v - HALF[k]) if k == "extracted" else v - HALF[k], v + HALF[k]]
                 for k, v in metrics.items() if k in HALF}  # fmt: skip
    intervals["kid"] = [metrics["kid"] - 4.0, metrics["kid"] + 4.0]
    floor = {"n": 96, "reference_n": 288, "repeats": 20, "level": 0.95,
             "fid": {"mean": 15.9, "low": 11.0, "high": 21.4},
             "kid": {"mean": -0.1, "low": -0.6, "high": 0.75}}  # fmt: skip
    return {"trial": trial, "split": "test", "seed": seed, "metrics": metrics,
            "intervals": intervals, "noise_floor": floor, "seconds": 226.9, "reward": reward}  # fmt: skip


def record(number: int, baseline: str | None, values: dict | None, seed: int = 0) -> TrialRecord:
    """A trial record as load_trials returns it; `values` None: no final re-evaluation."""
    out = {"trial": f"t{number:03d}", "number": number, "baseline": baseline, "status": "ok",
           "dir": f"/runs/seed{seed}/trials/t{number:03d}", "train": {"seed": seed},
           "metrics": {"fid": 1.0, "amd": 0.5, "alignment": 0.9, "extracted": 0}}  # fmt: skip
    if values is not None:
        out["final"] = final_result(out["trial"], values, seed=1000 + seed)
    return TrialRecord.model_validate(out)


def one_seed(w: dict, **changes: dict) -> tuple[TrialRecord, dict]:
    """The winner and Table 1 seed 0's baselines, with some baselines' values changed."""
    base = {
        n: record(i, n, {**v, **changes.get(n, {})})
        for i, (n, v) in enumerate(TABLE1_SEED0.items())
    }
    return record(7, None, w), base


def by_text(result, start: str):
    rows = [c for c in result.conditions if c.text.startswith(start)]
    assert len(rows) == 1, [c.text for c in result.conditions]
    return rows[0]


def test_real_final_record_has_the_shape_the_tests_build():
    real = json.loads((TABLE1 / "trials" / "t007" / "final" / "result.json").read_text())
    made = final_result("t007", {})
    assert set(made) == set(real) and set(made["metrics"]) == set(real["metrics"])
    assert FinalResult.model_validate(made).to_dict() == made  # and it is a valid final record
    assert set(real["intervals"]) >= set(HALF) and len(real["intervals"]["fid"]) == 2


def test_one_seed_dominance_passes_on_overlaps_and_a_disjointly_better_fid_than_freeze():
    w, base = one_seed(GOOD_W)
    result = dominance(w, base, seeds=[0])
    assert result.passed and result.seeds == (0,) and result.winner == ("t007",)
    fid = by_text(result, "FID at least as good as Full FT")
    assert fid.verdict == "not shown" and fid.passed and fid.low is None  # 75 ± 20 overlaps 71 ± 20
    assert fid.values == ((75.0, 71.0),) and fid.mean == pytest.approx(-4.0)
    assert fid.intervals == (((55.0, 95.0), (51.0, 91.0)),)
    assert by_text(result, "FID better than Freeze").verdict == "holds"
    # both PEFT baselines extract 0: a tie, W is held to both; SV-DIFF has the better AMD
    extracted = [c for c in result.conditions if c.text.startswith("extracted count")]
    assert sorted(c.b for c in extracted) == ["DiffFit", "SV-DIFF"]
    assert all("tied on the mean" in c.text for c in extracted)
    assert "SV-DIFF's (the better PEFT" in by_text(result, "AMD at least").text
    assert len(result.conditions) == 7
    lines = dominance_lines(result)
    assert lines[-1].startswith("W dominates the baselines on seed 0") and "all 7" in lines[-1]
    assert sum(line.startswith("| ") for line in lines) == 1 + 7
    assert "75.00 [55.00, 95.00] / 71.00 [51.00, 91.00]" in "\n".join(lines)


def test_the_better_peft_baseline_is_chosen_per_metric():
    w, base = one_seed(GOOD_W, difffit={"extracted": 1, "amd": 0.14})
    result = dominance(w, base, seeds=[0])
    assert (
        "SV-DIFF's (the better PEFT" in by_text(result, "extracted count").text
    )  # 0 beats DiffFit's 1
    assert (
        "DiffFit's (the better PEFT" in by_text(result, "AMD at least").text
    )  # 0.14 beats SV-DIFF's 0.123


def test_fails_when_the_fid_is_disjointly_worse_than_full_ft():
    w, base = one_seed({**GOOD_W, "fid": 120.0})  # [100, 140] against Full FT's [51, 91]
    result = dominance(w, base, seeds=[0])
    fid = by_text(result, "FID at least as good as Full FT")
    assert fid.verdict == "reversed" and not fid.passed and fid.disjoint == (True,)
    assert not result.passed and [c for c in result.conditions if not c.passed] == [fid]
    assert by_text(result, "FID better than Freeze").passed  # [100, 140] vs [187.1, 227.1]
    assert "does not dominate" in dominance_lines(result)[-1]
    assert "(reversed)" in dominance_lines(result)[-1]


def test_fid_not_disjointly_better_than_freeze_fails():
    w, base = one_seed(GOOD_W, freeze={"fid": 110.0})  # [90, 130] overlaps W's [55, 95]
    result = dominance(w, base, seeds=[0])
    freeze = by_text(result, "FID better than Freeze")
    assert freeze.verdict == "not shown" and not freeze.passed and not result.passed


def test_fails_when_the_winner_extracts_anything():
    w, base = one_seed({**GOOD_W, "extracted": 1})  # [0, 4]: overlaps the PEFT baselines' [0, 3]
    result = dominance(w, base, seeds=[0])
    assert all(c.passed for c in result.conditions if c.text.startswith("extracted count"))
    nothing = by_text(result, "nothing extracted")
    assert not nothing.passed and nothing.verdict == "W extracts 1" and not result.passed
    assert nothing.values == ((1.0, 0.0),)


def three_seeds(w_fid: list[float], full_fid: list[float]) -> tuple[list, dict]:
    """Winner and baselines on seeds 0, 1, 3: Table 1's values with FIDs per seed as given."""
    seeds = (0, 1, 3)
    wins = [
        record(20 + i, None, {**GOOD_W, "fid": f}, s) for i, (s, f) in enumerate(zip(seeds, w_fid))
    ]
    base = {n: [record(i, n, {**v, **({"fid": full_fid[j]} if n == "full" else {})}, s)
                for j, s in enumerate(seeds)]
            for i, (n, v) in enumerate(TABLE1_SEED0.items())}  # fmt: skip
    return wins, base


def test_three_seeds_paired_rule_passes():
    # d = Full − W (lower FID better): −44, 13, 5. On seed 0 the within-run intervals are disjoint
    # ([95, 135] against [51, 91]) and the mean is negative, but the t-interval over the seeds
    # contains 0: not shown, so "at least as good" passes.
    wins, base = three_seeds([115.0, 60.0, 65.0], [71.0, 73.0, 70.0])
    result = dominance(wins, base, seeds=[0, 1, 3])
    fid = by_text(result, "FID at least as good as Full FT")
    d = [-44.0, 13.0, 5.0]
    half = T_975_2DF * statistics.stdev(d) / math.sqrt(3)
    assert fid.diffs == pytest.approx(tuple(d)) and fid.mean == pytest.approx(statistics.mean(d))
    assert (fid.low, fid.high) == pytest.approx((fid.mean - half, fid.mean + half))
    assert fid.verdict == "not shown" and fid.passed and fid.disjoint == (True, False, False)
    assert by_text(result, "FID better than Freeze").verdict == "holds"
    assert result.passed and result.seeds == (0, 1, 3)
    lines = dominance_lines(result)
    assert "over seeds 0, 1, 3: all" in lines[-1]
    table = "\n".join(lines)
    assert "seed 0: 115.00 [95.00, 135.00] / 71.00 [51.00, 91.00]" in table
    assert "intervals disjoint on 1 of 3 seeds" in table


def test_three_seeds_paired_rule_fails_on_a_consistently_worse_fid():
    wins, base = three_seeds([95.0, 99.0, 93.0], [71.0, 73.0, 70.0])  # d = −24, −26, −23
    result = dominance(wins, base, seeds=[0, 1, 3])
    fid = by_text(result, "FID at least as good as Full FT")
    assert fid.high < 0 and fid.verdict == "reversed" and not fid.passed and not result.passed
    # seed 0: [75, 115] against [51, 91] overlap, so within-run intervals alone would not decide
    assert fid.disjoint == (False, False, False)
    assert "intervals disjoint on 0 of 3 seeds" in "\n".join(dominance_lines(result))


def test_three_seeds_winner_extracting_on_one_seed_fails():
    wins, base = three_seeds([70.0, 72.0, 69.0], [71.0, 73.0, 70.0])
    wins[2].final.metrics["extracted"] = 2
    result = dominance(wins, base, seeds=[0, 1, 3])
    assert by_text(result, "nothing extracted").verdict == "W extracts 2 on seed 3"
    assert not result.passed


def test_a_record_without_final_re_evaluation_is_an_error_naming_it():
    w, base = one_seed(GOOD_W)
    with pytest.raises(UserError, match=r"t007 \(the winner, seed 0\) has no final re-evaluation"):
        dominance(record(7, None, None), base, seeds=[0])
    base["svdiff"] = record(4, "svdiff", None)
    with pytest.raises(UserError, match=r"t004 \(SV-DIFF, seed 0\) has no final re-evaluation"):
        dominance(w, base, seeds=[0])


def test_missing_baseline_interval_or_seed_count_is_an_error():
    w, base = one_seed(GOOD_W)
    with pytest.raises(UserError, match="needs the baselines DiffFit"):
        dominance(w, {k: v for k, v in base.items() if k != "difffit"}, seeds=[0])
    del base["full"].final.intervals["fid"]
    with pytest.raises(UserError, match="t001 .*no 95% interval for fid"):
        dominance(w, base, seeds=[0])
    wins, base3 = three_seeds([70.0, 72.0, 69.0], [71.0, 73.0, 70.0])
    with pytest.raises(UserError, match="2 records for 3 seeds"):
        dominance(wins, {**base3, "full": base3["full"][:2]}, seeds=[0, 1, 3])


# --- experiments/search_compare.py on tiny synthetic run folders ------------------------------------

W_PARAMS = {"down_attn.method": "frozen", "mid_attn.method": "difffit", "mid_attn.difffit.lr": 0.1,
            "up_attn.method": "lora", "up_attn.lora.rank": 4, "up_attn.lora.lr": 0.01,
            "down_res.method": "frozen", "mid_res.method": "frozen", "up_res.method": "frozen",
            "mitigation": "none"}  # fmt: skip
W_SPEC = [{"method": "difffit", "units": ["mid_block.attentions"]},
          {"method": "lora", "units": ["up_blocks.*.attentions"], "rank": 4}]  # fmt: skip
W_GROUPS = {"down_attn": "frozen", "mid_attn": "difffit", "up_attn": "lora(rank=4)",
            "down_res": "frozen", "mid_res": "frozen", "up_res": "frozen"}  # fmt: skip


def load_script():
    spec = importlib.util.spec_from_file_location(
        "search_compare", ROOT / "experiments" / "search_compare.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def write_trial(run: Path, number: int, baseline: str | None, reward: float | None,
                final: dict | None, status: str = "ok", params: dict | None = None) -> None:  # fmt: skip
    """params.json, result.json and (if given) final/result.json of one trial."""
    folder = trial_dir(run, number)
    (folder / "final").mkdir(parents=True)
    plan = {"version": 2, "trial": folder.name, "number": number, "baseline": baseline,
            "params": params or {"mid_attn.method": "full", "mitigation": "none"},
            "model": "tiny:random", "method_spec": W_SPEC, "groups": W_GROUPS,
            "train": {"steps": 2000, "lr": 0.003, "seed": 0, "caption_dropout": 0.1,
                      "mitigations": []}, "cpu": 1}  # fmt: skip
    write_json(folder / "params.json", {**plan, "status": "running"})
    steps = 500 if status == "stopped" else 2000
    result = {**plan, "status": status, "steps": steps, "seconds": 600.0, "trainable_pct": 1.5}
    if reward is not None:
        result.update(reward=reward, metrics={"fid": 90.0, "amd": 0.12, "alignment": 0.3,
                                              "extracted": 0, "trainable_pct": 1.5})  # fmt: skip
    write_json(folder / "result.json", result)
    if final is not None:
        write_json(folder / "final" / "result.json", final)


def make_run(root: Path, name: str, sampler: str, seed: int, searched: list,
             extra: dict | None = None, w_fid: float = 75.0) -> Path:  # fmt: skip
    """A run folder: Table 1's spec renamed, its five baselines, the searched trials, then fixed
    trials (`extra`: name → params) with the winner's values (FID `w_fid`)."""
    spec = yaml.safe_load((TABLE1 / "spec.yaml").read_text())
    spec.update(name=name, model="tiny:random")
    spec["search"]["sampler"] = sampler
    spec["data"]["phantom"]["seed"] = seed
    run = root / name
    run.mkdir()
    (run / "spec.yaml").write_text(yaml.safe_dump(spec))
    for i, (baseline, values) in enumerate(TABLE1_SEED0.items()):
        # Full FT's final reward beats every searched trial's: baselines are not candidates
        reward = -1.0 if baseline == "full" else -6.0
        final = final_result(f"t{i:03d}", values, 1000 + seed, reward)
        write_trial(run, i, baseline, -5.0 - i / 10, final)
    for j, (status, search_reward, final_reward) in enumerate(searched):
        number = len(TABLE1_SEED0) + j
        final = None
        if final_reward is not None:
            final = final_result(f"t{number:03d}", GOOD_W, 1000 + seed, final_reward)
        write_trial(run, number, None, search_reward, final, status, W_PARAMS if j == 2 else None)
    for number, (baseline, params) in enumerate((extra or {}).items(), start=20):
        final = final_result(f"t{number:03d}", {**GOOD_W, "fid": w_fid}, 1000 + seed, -4.0)
        write_trial(run, number, baseline, -4.0, final, params=params)
    return run


# (status, search reward, final reward): t007 wins on the final reward, not t006 (best search reward)
TPE = [("ok", -4.5, -4.2), ("ok", -3.9, -4.4), ("ok", -4.1, -3.5), ("stopped", None, None),
       ("ok", -4.6, None)]  # fmt: skip
RANDOM = [("ok", -4.8, -4.6), ("stopped", None, None), ("ok", -4.7, -4.9)]  # t005 wins


def test_search_compare_writes_the_sections_and_the_learning_curve(tmp_path):
    main_run = make_run(tmp_path, "search_vs_baselines", "tpe", 0, TPE)
    random_run = make_run(tmp_path, "search_random", "random", 0, RANDOM)
    decoy = {**W_PARAMS, "up_attn.lora.rank": 8}  # named "found" but not the winner's parameters
    # W's FID on seeds 0, 1, 3: 75, 68, 78 against Full FT's 71: d = −4, 3, −7, not shown
    confirm = [make_run(tmp_path, f"confirm_seed{s}", "tpe", s, [],
                        {"found": decoy, "w_again": W_PARAMS}, fid)
               for s, fid in ((1, 68.0), (3, 78.0))]  # fmt: skip
    out = tmp_path / "out"
    argv = [str(main_run), str(random_run), "--out", str(out), "--confirm", *map(str, confirm)]
    assert load_script().main(argv) == 0
    text = (out / "search.md").read_text()
    assert (out / "learning_curve.png").stat().st_size > 1000
    for section in ("## Learning curve", "## Winners", "## Final re-evaluation (main run)",
                    "## Found configuration", "## Compute", "## Dominance on seed 0 (the main run)",
                    "## Dominance over seeds 0, 1, 3"):  # fmt: skip
        assert section in text, section
    assert "search_compare.py " + " ".join(argv) in text  # the command line
    curve = text.split("## Learning curve")[1].split("\n## ")[0]
    # both runs propose the defaults, then W (t007 / t007): 2 distinct, the first 2 alike
    assert f"`{random_run}` (random) shares 2 of its 2 distinct searched configurations" in curve
    assert "the first 2 are the same, in the same order." in curve
    winners = text.split("## Winners")[1].split("##")[0]
    tpe_row, random_row = [line for line in winners.splitlines() if line.startswith("| `")]
    assert (
        "| tpe | t007 |" in tpe_row
        and "| 3 of 5 (2 before it) | -3.500 (test) | -4.100 |" in tpe_row
    )
    assert (
        "| random | t005 |" in random_row
        and "| 1 of 3 (0 before it) | -4.600 (test) |" in random_row
    )
    assert "**W: " in text.split("## Final re-evaluation")[1].split("##")[0]
    config = text.split("## Found configuration")[1].split("\n## ")[0]
    assert "method: difffit" in config and "| mid_attn | difffit |" in config
    assert "| up_attn | lora(rank=4) |" in config
    compute = text.split("## Compute")[1].split("\n## ")[0]
    assert compute.count("- trials:") == 2
    assert (
        "- trials: 10 (9 ok, 1 stopped)" in compute and "- trials: 8 (7 ok, 1 stopped)" in compute
    )
    over = text.split("## Dominance over seeds 0, 1, 3")[1]
    assert (
        "W = t007 (seed 0), t021 (seed 1), t021 (seed 3)." in over
    )  # matched by parameters, not by the name "found"
    assert "W dominates the baselines over seeds 0, 1, 3" in over
    assert "W dominates the baselines on seed 0" in text.split("## Dominance on seed 0")[1]
    # the random run's winner is judged too, on its own final re-evaluation and baselines
    theirs = text.split("## Dominance on seed 0 (the random run)")[1]
    assert f"W here is `{random_run}`'s winner." in theirs and "W = t005 (seed 0)." in theirs
    final = text.split("## Final re-evaluation (the random run)")[1].split("\n## ")[0]
    assert f"finalists of `{random_run}`" in final and "**W: " in final


def test_shared_configurations_count_distinct_ones_and_the_common_start():
    from types import SimpleNamespace

    script = load_script()

    def run(name, sampler, params):
        records = [
            TrialRecord(trial=f"t{i:03d}", number=i, params={"x": p}, dir=f"{name}/t{i:03d}")
            for i, p in enumerate(params)
        ]
        return script.Run(
            Path(name), SimpleNamespace(search=SimpleNamespace(sampler=sampler)), 0, records
        )

    tpe = run("a", "tpe", [1, 2, 3, 3, 5])  # t003 a retry of t002: one configuration
    rnd = run("b", "random", [1, 2, 4, 5, 2])
    (_, line) = script.shared_lines([tpe, rnd])
    assert line == ("`b` (random) shares 3 of its 4 distinct searched configurations with `a`; the "
                    "first 2 are the same, in the same order.")  # fmt: skip


def test_a_winner_chosen_over_training_seeds_shows_its_mean():
    script = load_script()
    final = {"reward": -4.0, "split": "test", "seed": 1000, "metrics": {}}
    seeds = {**final, "seeds": [{**final, "reward": -4.2, "train_seed": 1}]}
    w = TrialRecord(trial="t007", number=7, final=final)
    assert script._final_reward(w) == "-4.000 (test)"
    w = TrialRecord(trial="t007", number=7, final=seeds)
    assert script._final_reward(w) == "-4.100 (test, mean of 2 training seeds)"


def test_search_compare_without_finals_is_one_line_and_exit_2(tmp_path, capsys):
    main_run = make_run(tmp_path, "search_vs_baselines", "tpe", 0, [("ok", -4.0, None)])
    assert load_script().main([str(main_run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no searched trial has a final re-evaluation" in err
    confirm = make_run(tmp_path, "confirm_seed1", "tpe", 1, [], {"found": {"mitigation": "rwa"}})
    main_run = make_run(tmp_path, "main2", "tpe", 0, TPE)
    argv = [str(main_run), "--out", str(tmp_path / "o2"), "--confirm", str(confirm)]
    assert load_script().main(argv) == 2
    assert "has the winner's parameters" in capsys.readouterr().err


def test_search_compare_refuses_a_confirmation_on_a_training_seed_the_choice_used(tmp_path, capsys):
    main_run = make_run(tmp_path, "main", "tpe", 0, TPE)
    confirm = make_run(tmp_path, "confirm_seed1", "tpe", 1, [], {"found": W_PARAMS})
    for run, key, value in (
        (main_run, "final", {"train_seeds": [1]}),
        (confirm, "train", {"seed": 1}),
    ):
        spec = yaml.safe_load((run / "spec.yaml").read_text())
        spec[key].update(value)
        (run / "spec.yaml").write_text(yaml.safe_dump(spec))
    argv = [str(main_run), "--out", str(tmp_path / "out"), "--confirm", str(confirm)]
    assert load_script().main(argv) == 2
    err = capsys.readouterr().err
    assert f"{confirm} trains on seed 1, one the winner was chosen on (final.train_seeds)" in err


def test_search_compare_checks_the_stops_and_the_transfer_and_plots_the_front(tmp_path):
    main_run = make_run(tmp_path, "search_vs_baselines", "tpe", 0, TPE)
    spec = yaml.safe_load((main_run / "spec.yaml").read_text())
    spec["final"]["top_k"] = 3  # finalists: search rewards -3.9, -4.1, -4.5
    (main_run / "spec.yaml").write_text(yaml.safe_dump(spec))
    stopped = json.loads((trial_dir(main_run, 8) / "params.json").read_text())["params"]
    # t008, stopped by ASHA, run to the end: search reward -4.0 (a finalist), final -4.0 (W: -3.5)
    stops = make_run(tmp_path, "search_stops", "tpe", 0, [], {"stopped_t008": stopped})
    transfer = make_run(tmp_path, "search_transfer", "tpe", 27, [], {"found": W_PARAMS})
    out = tmp_path / "out"
    argv = [str(main_run), "--out", str(out), "--stops", str(stops), "--transfer", str(transfer)]
    assert load_script().main(argv) == 0
    text = (out / "search.md").read_text()
    assert (out / "front.png").stat().st_size > 1000 and "![front](front.png)" in text
    checked = text.split("## Were the stops right?")[1].split("\n## ")[0]
    assert "every stop was right" in checked  # a finalist had it run on, but it does not beat W
    assert "| t008 |" in checked and "| 500 | -4.000 | yes | -4.000 | no |" in checked
    moved = text.split("## Transfer")[1]
    assert "phantom seed 27" in moved and "**W: " in moved
    assert "W dominates the baselines on seed 27" in moved
    # a stops run of another seed, or one whose trial lost its parameters, is one line and exit 2
    other = make_run(tmp_path, "stops_seed1", "tpe", 1, [], {"stopped_t008": stopped})
    argv = [str(main_run), "--out", str(out), "--stops", str(other)]
    assert load_script().main(argv) == 2
    wrong = make_run(tmp_path, "stops_wrong", "tpe", 0, [], {"stopped_t008": W_PARAMS})
    assert load_script().main([str(main_run), "--out", str(out), "--stops", str(wrong)]) == 2


def test_the_front_keeps_the_points_nothing_beats_on_both_axes():
    from capsearch.reporting.plots import front

    points = [{"extracted": e, "fid": f} for e, f in ((10, 63), (0, 72), (0, 95), (7, 80), (0, 72))]
    assert front(points) == [1, 4, 0]  # (0, 72) twice (neither beats the other), then (10, 63)
