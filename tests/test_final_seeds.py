"""final.train_seeds: finalists trained again on other seeds, and the best chosen on the means."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from capsearch.search.records import SeedMean
from capsearch.search.runs import best_trial, final_choice, load_trials, trial_dir, write_json


def finalist(run: Path, number: int, rewards: dict[int, float | None], fid: float = 80.0) -> None:
    """A finished trial with a final result per training seed (0: its own, final/)."""
    folder = trial_dir(run, number)
    folder.mkdir(parents=True)
    write_json(folder / "result.json", {"trial": folder.name, "number": number, "status": "ok",
                                        "reward": -3.0, "metrics": {"fid": 70.0}})  # fmt: skip
    for seed, reward in rewards.items():
        sub = "final" if seed == 0 else f"final_seed{seed}"
        result = {"split": "test", "seed": 1000, "metrics": {"fid": fid + seed, "extracted": seed}}
        if reward is not None:
            result["reward"] = reward
        if seed:
            result["train_seed"] = seed
        (folder / sub).mkdir()
        write_json(folder / sub / "result.json", result)


def test_the_best_is_chosen_on_the_mean_over_training_seeds(tmp_path):
    finalist(tmp_path, 0, {0: -3.9, 1: -4.5})  # best on its own seed, worst on the mean
    finalist(tmp_path, 1, {0: -4.0, 2: -4.1, 1: -4.1})
    records = load_trials(tmp_path)
    a, b = records
    assert [s.train_seed for s in b.final.seeds] == [1, 2]  # sorted by seed
    mean = final_choice(a.final)
    assert isinstance(mean, SeedMean) and mean.n_seeds == 2
    assert mean.metrics == {"extracted": 0.5, "fid": 80.5} and mean.reward == pytest.approx(-4.2)
    assert final_choice(b.final).reward == pytest.approx(-4.0666, abs=1e-3)
    best = best_trial(records)
    assert best.trial == "t001"
    from capsearch.export.card import model_card

    card = model_card(best, "tiny:random", "t001")
    assert "chosen on its final reward averaged over 3 training seeds (-4.067)" in card
    # without the other seeds, t000's own final decides
    alone = [r.model_copy(update={"final": r.final.model_copy(update={"seeds": []})})
             for r in records]  # fmt: skip
    assert final_choice(alone[0].final) is alone[0].final
    assert best_trial(alone).trial == "t000"


def test_a_failed_evaluation_on_another_seed_leaves_no_mean_and_ranks_last(tmp_path):
    finalist(tmp_path, 0, {0: -3.5, 1: None})  # the seed-1 evaluation has no reward
    finalist(tmp_path, 1, {0: -4.4, 1: -4.6})
    records = load_trials(tmp_path)
    assert final_choice(records[0].final).reward is None
    assert best_trial(records).trial == "t001"


def test_a_real_final_stage_trains_finalists_again_on_another_seed(tmp_path, capsys):
    from safetensors.torch import load_file
    from test_search import MICRO

    from capsearch.cli import main
    from capsearch.metrics.scorer import CONFIG_FILE, SCORER_DIR

    if not (SCORER_DIR / CONFIG_FILE).is_file():
        pytest.skip("the phantom scorer is not installed (capsearch pretrain scorer)")
    spec = json.loads(json.dumps(MICRO))
    spec["final"] = {"train_seeds": [1]}
    spec_path = tmp_path / "micro.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    run = tmp_path / "run"
    assert main(["run", str(spec_path), "--out", str(run)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "each also trained again on seed(s) 1" in out and "trained on seed 1, 4 steps" in out
    records = {r.baseline or "searched": r for r in load_trials(run)}
    assert records["freeze"].final.seeds == []  # trains nothing: its seed changes nothing
    for name in ("difffit", "searched"):
        record = records[name]
        (again,) = record.final.seeds
        assert again.train_seed == 1 and again.retrained.steps == 4
        assert again.seed == record.final.seed == 1000  # the same sampling seed
        own = load_file(record.folder / "delta" / "delta.safetensors")
        other = load_file(record.folder / "final_seed1" / "delta" / "delta.safetensors")
        assert own.keys() == other.keys()
        assert not all(torch.equal(own[k], other[k]) for k in own)  # another training
    report = (run / "report.md").read_text()
    section = report.split("### Over training seeds")[1].split("\n## ")[0]
    assert "| seed 0 | seed 1 | mean reward ↑ |" in section
    best = best_trial(load_trials(run))
    pooled = {r.trial: final_choice(r.final).reward for r in records.values()}
    assert pooled[best.trial] == max(pooled.values())  # chosen on the means
    said = report.split("## Best configuration")[1].split("\n## ")[0]
    assert ("averaged over 2 training seeds" in said) == (best.baseline != "freeze")
    # the records kept for a resume elsewhere include the other seed's evaluation
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "experiments" / "keep_records.py"
    module = importlib.util.spec_from_file_location("keep_records", path)
    keep_records = importlib.util.module_from_spec(module)
    module.loader.exec_module(keep_records)
    keep_records.keep(run, tmp_path / "kept")
    trial = records["difffit"].folder.name
    assert (tmp_path / "kept" / "trials" / trial / "final_seed1" / "result.json").is_file()
    assert not (tmp_path / "kept" / "trials" / trial / "final_seed1" / "delta").exists()


def test_validate_states_the_final_stage_and_its_training_seeds(capsys):
    from capsearch.cli import main

    tiny = str(Path(__file__).parents[1] / "search_spaces" / "tiny.yaml")
    assert main(["validate", tiny, "--set", "final.train_seeds=[1, 2]"]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("  final stage: ")]
    assert line == [
        "  final stage: the baselines and the 2 best searched trials re-evaluated on the test "
        "split, sampling seed 1000, each also trained on seed(s) 1, 2; the best chosen on the mean"
    ]
    assert main(["validate", tiny, "--set", "final.enabled=false"]) == 0
    assert "  final stage: off" in capsys.readouterr().out
