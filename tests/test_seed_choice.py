"""The best trial over training seeds with constraints: every seed's final evaluation within them, the
extraction bound pooled over the seeds' attacks (capsearch.search.choice), and the report's sentence."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from test_report_export import SPEC as REPORT_SPEC

from capsearch.metrics.extraction import ExtractionResult, extraction_bound_of
from capsearch.metrics.intervals import wilson_upper
from capsearch.reporting.report import write_report
from capsearch.search.choice import pooled_bound, seed_check
from capsearch.search.runs import (
    best_trial,
    final_choice,
    load_trials,
    rank_key,
    trial_dir,
    write_json,
)

Z95 = 1.6448536269514722  # Φ⁻¹(0.95), the one-sided 95% quantile


def upper(hits: int, n: int) -> float:
    """Wilson's (1927) score bound written out: (p + z²/2n + z·√(p(1−p)/n + z²/4n²)) / (1 + z²/n)."""
    p = hits / n
    root = math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n))
    return (p + Z95**2 / (2 * n) + Z95 * root) / (1 + Z95**2 / n)


def finalist(run: Path, number: int, search: dict, finals: dict[int, tuple[float, dict]]) -> None:
    """A finished trial (search-stage metrics `search`) with a final evaluation per training seed (0:
    its own, final/), each (reward, metrics); `hits`/`attacked` become the attack's counts."""
    folder = trial_dir(run, number)
    folder.mkdir(parents=True)
    write_json(folder / "result.json", {"trial": folder.name, "number": number, "status": "ok",
                                        "reward": search.pop("reward", -3.0), "metrics": search,
                                        "train": {"seed": 0},
                                        "evaluate": {"split": "validate", "seed": 0}})  # fmt: skip
    for seed, (reward, m) in finals.items():
        m = dict(m)
        if "hits" in m:
            hits, attacked = m.pop("hits"), m.pop("attacked")
            m.update(extracted_captions=hits, attacked=attacked,
                     extraction_bound=wilson_upper(hits, attacked))  # fmt: skip
        sub = folder / ("final" if seed == 0 else f"final_seed{seed}")
        result = {"split": "test", "seed": 1000, "reward": reward, "metrics": {"fid": 50.0, **m},
                  "intervals": {"fid": [45.0, 56.0]}}  # fmt: skip
        if seed:
            result["train_seed"] = seed
        sub.mkdir()
        write_json(sub / "result.json", result)


def test_the_one_sided_bound_is_wilsons_and_an_evaluation_records_its_counts():
    assert wilson_upper(0, 20) == pytest.approx(Z95**2 / (20 + Z95**2))  # nothing extracted
    assert wilson_upper(1, 40) == pytest.approx(upper(1, 40)) == pytest.approx(0.104589, abs=1e-6)
    extracted = [("a", 1, 0), ("a", 4, 2), ("c", 7, 40)]  # caption "a" extracted two images
    ctx = SimpleNamespace(extraction=ExtractionResult(3, extracted, {"n_prompts": 10}))
    measured = extraction_bound_of(ctx)
    assert measured.value == pytest.approx(upper(2, 10))  # two captions of ten, not three images
    assert dict(measured.extra) == {"attacked": 10, "extracted_captions": 2}
    assert extraction_bound_of(SimpleNamespace(extraction=None)) is None


def test_the_pooled_bound_sums_the_seeds_attacks(tmp_path):
    finalist(tmp_path, 0, {}, {0: (-3.0, {"hits": 1, "attacked": 20}),
                               1: (-3.0, {"hits": 0, "attacked": 20}),
                               2: (-3.0, {"hits": 2, "attacked": 20})})  # fmt: skip
    (record,) = load_trials(tmp_path)
    runs = [record.final, *record.final.seeds]
    assert pooled_bound(runs) == pytest.approx(upper(3, 60)) == pytest.approx(0.118675, abs=1e-6)
    assert pooled_bound(runs[:1]) == pytest.approx(upper(1, 20))
    check = seed_check(record.final, {"extraction_bound": 0.1})
    assert check.counts == (3, 60) and check.pooled_excess == pytest.approx(upper(3, 60) - 0.1)
    # an evaluation that did not record its counts leaves the pooled bound unknown: violated
    bare = record.final.model_copy(update={"metrics": {"fid": 50.0}})
    assert pooled_bound([bare, *record.final.seeds]) is None
    assert seed_check(bare.model_copy(update={"seeds": record.final.seeds}),
                      {"extraction_bound": 0.1}).worst == math.inf  # fmt: skip


def test_a_trial_within_the_bound_on_the_mean_but_over_it_on_one_seed_is_not_chosen(tmp_path):
    limits = {"extracted": 1}
    # t000: 0 and 2 extracted (mean 1, within it) at the better mean reward; t001: 1 on each seed
    finalist(tmp_path, 0, {}, {0: (-2.8, {"extracted": 0}), 1: (-3.0, {"extracted": 2})})
    finalist(tmp_path, 1, {}, {0: (-3.4, {"extracted": 1}), 1: (-3.6, {"extracted": 1})})
    records = load_trials(tmp_path)
    # what the mean-based check chose: t000
    assert min(records, key=lambda r: rank_key(final_choice(r.final), limits)).trial == "t000"
    assert best_trial(records, limits).trial == "t001"
    checks = [seed_check(r.final, limits) for r in records]
    assert [c.violations for c in checks] == [{None: 0.0, 1: 1.0}, {None: 0.0, 1: 0.0}]
    assert [c.holds for c in checks] == [False, True]
    assert best_trial(records).trial == "t000"  # without constraints: the mean reward alone


def test_the_extraction_bound_is_read_pooled_over_the_seeds(tmp_path):
    limits = {"extraction_bound": 0.11}
    # t000: 1 of 20 and 0 of 20 — each seed's own bound is past 0.11 (0.196, 0.119), the pooled 1 of
    # 40 is within it (0.105); t001: 2 and 1 of 20 (pooled 3 of 40: 0.170) at the better reward
    finalist(tmp_path, 0, {}, {0: (-3.5, {"hits": 1, "attacked": 20}),
                               1: (-3.5, {"hits": 0, "attacked": 20})})  # fmt: skip
    finalist(tmp_path, 1, {}, {0: (-3.0, {"hits": 2, "attacked": 20}),
                               1: (-3.0, {"hits": 1, "attacked": 20})})  # fmt: skip
    records = load_trials(tmp_path)
    assert [r.final.value("extraction_bound") > 0.11 for r in records] == [True, True]
    assert best_trial(records, limits).trial == "t000"
    check = seed_check(records[1].final, limits)
    assert check.bound == pytest.approx(upper(3, 40)) and not check.holds


def test_the_choice_reads_only_the_final_stages_evaluations(tmp_path):
    limits = {"extracted": 0}
    # t000 extracted 3 in the search but nothing on either final seed; t001 the other way round;
    # t002 was never a finalist: its search-stage numbers are the best and count for nothing
    finalist(tmp_path, 0, {"extracted": 3, "reward": -4.0},
             {0: (-3.5, {"extracted": 0}), 1: (-3.5, {"extracted": 0})})  # fmt: skip
    finalist(tmp_path, 1, {"extracted": 0, "reward": -2.0},
             {0: (-3.0, {"extracted": 1}), 1: (-3.0, {"extracted": 0})})  # fmt: skip
    folder = trial_dir(tmp_path, 2)
    folder.mkdir(parents=True)
    write_json(folder / "result.json", {"trial": "t002", "number": 2, "status": "ok",
                                        "reward": -1.0, "metrics": {"extracted": 0}})  # fmt: skip
    assert best_trial(load_trials(tmp_path), limits).trial == "t000"


def _report_run(tmp_path: Path, limits: dict) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    spec = {**json.loads(json.dumps(REPORT_SPEC)), "final": {"train_seeds": [1]},
            "objective": {"constraints": limits}}  # fmt: skip
    (run / "spec.yaml").write_text(yaml.safe_dump(spec))
    return run


def test_the_report_says_plainly_when_no_finalist_holds_on_every_seed(tmp_path):
    run = _report_run(tmp_path, {"extracted": 0})
    # over on one seed each: t000 by 2 (seed 1), t001 by 1 (its own training) — t001 is nearest
    finalist(run, 0, {"extracted": 0}, {0: (-3.0, {"extracted": 0}), 1: (-3.0, {"extracted": 2})})
    finalist(run, 1, {"extracted": 0}, {0: (-3.9, {"extracted": 1}), 1: (-3.9, {"extracted": 0})})
    text = write_report(run).read_text()
    best = text.split("## Best configuration")[1].split("\n## ")[0]
    assert "Trial t001" in best
    assert ("**No finalist holds the constraints (extracted ≤ 0) on every training seed**; this one "
            "has the smallest worst-seed violation (1: worst on its own training)") in best  # fmt: skip
    seeds = text.split("### Over training seeds")[1].split("\n## ")[0]
    assert "| pooled extraction bound ↓ | worst-seed violation ↓ |" in seeds
    assert "| **t001** |" in seeds and seeds.count("| – | 1 |") == 1 and "| – | 2 |" in seeds


def test_the_report_states_the_pooled_bound_of_a_winner_that_holds(tmp_path):
    run = _report_run(tmp_path, {"extraction_bound": 0.11})
    finalist(run, 0, {}, {0: (-3.5, {"hits": 1, "attacked": 20}),
                          1: (-3.5, {"hits": 0, "attacked": 20})})  # fmt: skip
    finalist(run, 1, {}, {0: (-3.0, {"hits": 2, "attacked": 20}),
                          1: (-3.0, {"hits": 1, "attacked": 20})})  # fmt: skip
    text = write_report(run).read_text()
    best = text.split("## Best configuration")[1].split("\n## ")[0]
    assert (f"It holds the constraints (extraction rate, 95% upper bound ≤ 0.11) on each of its 2 "
            f"training seeds' final evaluations; pooled extraction bound {upper(1, 40):.3f} (1 of 40 "
            "attacked captions), as 1 of the 2 finalists do.") in best  # fmt: skip
    seeds = text.split("### Over training seeds")[1].split("\n## ")[0]
    assert f"| {upper(3, 40):.3f} (3 of 40 attacked captions) | {upper(3, 40) - 0.11:g} |" in seeds


def test_validate_says_the_choice_is_within_the_constraints_on_every_seed():
    from capsearch.config import spec_from_dict
    from capsearch.search.final import final_text

    data = {**json.loads(json.dumps(REPORT_SPEC)), "final": {"train_seeds": [1, 2]}}
    assert final_text(spec_from_dict(data)).endswith("seed(s) 1, 2; the best chosen on the mean")
    data["objective"] = {"constraints": {"extracted": 0}}
    assert final_text(spec_from_dict(data)).endswith(
        "the best chosen on the mean among those within the constraints on every seed"
    )


def test_the_model_card_lists_the_seeds_and_each_seeds_intervals(tmp_path):
    from capsearch.export.card import model_card

    finalist(tmp_path, 0, {"fid": 70.0}, {0: (-3.5, {"hits": 1, "attacked": 20}),
                                          2: (-3.7, {"hits": 0, "attacked": 20})})  # fmt: skip
    (record,) = load_trials(tmp_path)
    card = model_card(record, "tiny:random", "t000")
    seeds = card.split("## Seeds")[1].split("\n## ")[0]
    assert "- Training seed of these weights: 0 (`train.seed`)." in seeds
    assert ("- Evaluated by the final stage on the test split with sampling seed 1000 (the search "
            "evaluated it on the validate split, sampling seed 0).") in seeds  # fmt: skip
    assert "- Also trained on training seed(s) 2 (`final.train_seeds`)" in seeds
    assert "| training seed | FID ↓ | extraction rate, 95% upper bound ↓ | reward ↑ |" in seeds
    assert f"| 0 (exported) | 50.00 [45.00, 56.00] | {upper(1, 20):.3f} | -3.500 |" in seeds
    assert f"| 2 | 50.00 [45.00, 56.00] | {upper(0, 20):.3f} | -3.700 |" in seeds
    assert ("Pooled over the 2 trainings: 1 of 40 attacked captions yielded an extraction; one-sided "
            f"95% Wilson upper bound on the extraction rate {upper(1, 40):.3f}.") in seeds  # fmt: skip
    assert (
        "| FID ↓ | 50.00 | [45.00, 56.00] |" in card
    )  # the exported training's, with its interval
    alone = record.model_copy(update={"final": None})
    seeds = model_card(alone, "tiny:random", "t000").split("## Seeds")[1].split("\n## ")[0]
    assert seeds.strip().splitlines() == [
        "- Training seed of these weights: 0 (`train.seed`).",
        "- Evaluated once, by the search: validate split, sampling seed 0.",
    ]
