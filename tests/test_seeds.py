"""`capsearch report RUN [RUN ...] --out DIR`: seeds pooled, mean ± sd tables and paired verdicts."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest
import yaml
from conftest import mid_block_groups

from capsearch.cli import main
from capsearch.errors import UserError
from capsearch.reporting.seeds import load_pool, verdict, write_seeds_report
from capsearch.search.runs import trial_dir, write_json

SPEC = {
    "name": "paper_table1",
    "model": "tiny:random",
    "train": {"steps": 3, "batch_size": 2, "lr": 1.0e-4},
    "baselines": {"methods": ["freeze", "difffit"]},
    "space": {"groups": mid_block_groups()},
}
HALF = {"fid": 5.0, "amd": 0.005, "alignment": 0.05, "extracted": 1.0}  # within-run half-widths
T_975_2DF = 4.303  # Student t, 97.5% quantile, 2 degrees of freedom (3 seeds)


def make_run(root: Path, folder: str, seed: int, trials: dict[str, dict], name: str = "paper_table1",
             no_final: tuple[str, ...] = ()) -> Path:  # fmt: skip
    """A run folder of baseline trials: search-stage record, final re-evaluation (with 20 attacked)."""
    run = root / folder
    run.mkdir(parents=True)
    spec = {**SPEC, "name": name, "data": {"phantom": {"seed": seed, "patients": 10}}}
    (run / "spec.yaml").write_text(yaml.safe_dump(spec))
    for number, (baseline, values) in enumerate(trials.items()):
        metrics = {"fid": 100.0, "amd": 0.1, "alignment": 0.5, "extracted": 0, **values}
        intervals = {k: [v - HALF[k], v + HALF[k]] for k, v in metrics.items() if k in HALF}
        folder = trial_dir(run, number)
        folder.mkdir(parents=True)
        search = {k: v * 2 for k, v in metrics.items()}  # never what the report should show
        write_json(folder / "result.json", {"trial": folder.name, "number": number,
                   "baseline": baseline, "status": "ok", "metrics": search,
                   "intervals": intervals, "seconds": 90.0})  # fmt: skip
        if baseline in no_final:
            continue
        (folder / "final").mkdir()
        write_json(folder / "final" / "result.json", {"trial": folder.name, "split": "test",
                   "seed": 1000, "metrics": metrics, "intervals": intervals,
                   "seconds": 30.0})  # fmt: skip
        write_json(
            folder / "final" / "metrics.json", {**metrics, "settings": {"attack_prompts": 20}}
        )
    return run


def three_seeds(root: Path, per_method: dict[str, list[dict]]) -> list[Path]:
    """Three runs, seeds 0-2; per_method: baseline → the metric values of each seed."""
    return [
        make_run(root, f"seed{s}", s, {b: values[s] for b, values in per_method.items()})
        for s in range(3)
    ]


def numbers(cell: str) -> list[float]:
    """The mean and the interval of a verdict row's difference cell, e.g. `9.00 [6.52, 11.48]`."""
    mean, _, rest = cell.partition(" [")
    low, high = rest.rstrip("]").split(", ")
    return [float(mean), float(low), float(high)]


def by_hand(d: list[float]) -> list[float]:
    mean = statistics.mean(d)
    half = T_975_2DF * statistics.stdev(d) / math.sqrt(len(d))
    return [mean, mean - half, mean + half]


def test_the_paper_table_gives_mean_and_sample_sd_over_seeds(tmp_path):
    runs = three_seeds(tmp_path, {
        "full": [{"fid": 100.0, "extracted": 2}, {"fid": 110.0, "extracted": 3},
                 {"fid": 120.0, "extracted": 4}],
        "freeze": [{"fid": 300.0}] * 3,
    })  # fmt: skip
    text = write_seeds_report(runs, tmp_path / "out").read_text()
    table = text.split("## Table (paper format)")[1].split("## Per seed")[0]
    full = next(line for line in table.splitlines() if line.startswith("| Full FT |"))
    assert "110.00 ± 10.00" in full and "3.0 ± 1.0 / 20" in full and "0, 1, 2 |" in full
    freeze = next(line for line in table.splitlines() if line.startswith("| Freeze |"))
    assert "300.00 ± 0.00" in freeze
    # rows in the paper's order, and the paper's own numbers beside them
    assert table.index("| Freeze |") < table.index("| Full FT |")
    assert "| Full FT | 35.79 | 0.029 | 0.60 | 356 |" in table
    assert "# capsearch seeds report: paper_table1" in text


def test_a_claim_holds_one_is_reversed_one_is_not_shown(tmp_path):
    full = [{"fid": 100.0, "amd": 0.05, "extracted": 10}, {"fid": 110.0, "amd": 0.06,
            "extracted": 12}, {"fid": 120.0, "amd": 0.07, "extracted": 14}]  # fmt: skip
    difffit = [{"fid": 125.0, "amd": 0.07, "extracted": 2}, {"fid": 140.0, "amd": 0.05,
               "extracted": 3}, {"fid": 150.0, "amd": 0.08, "extracted": 4}]  # fmt: skip
    _, pool = load_pool(three_seeds(tmp_path, {"full": full, "difffit": difffit}))
    # extracted (lower better): d = Full − DiffFit = 8, 9, 10 → [6.52, 11.48], holds
    row = verdict(pool, 1, "difffit", "full", "extracted")
    assert row[3] == "DiffFit vs Full FT" and row[4] == "0, 1, 2" and row[6] == "holds"
    assert numbers(row[5]) == pytest.approx(by_hand([8, 9, 10]), abs=0.01)
    assert row[7] == "disjoint on 3 of 3 seeds"
    # FID (lower better): d = Full − DiffFit = −25, −30, −30 → about [−35.5, −21.2], reversed
    row = verdict(pool, 2, "difffit", "full", "fid")
    assert row[6] == "reversed"
    assert numbers(row[5]) == pytest.approx(by_hand([-25, -30, -30]), abs=0.01)
    # AMD (higher better): d = 0.02, −0.01, 0.01 → about [−0.031, 0.045], not shown
    row = verdict(pool, 3, "difffit", "full", "amd")
    assert row[6] == "not shown"
    assert numbers(row[5]) == pytest.approx(by_hand([0.02, -0.01, 0.01]), abs=0.001)
    assert row[7] == "disjoint on 1 of 3 seeds"  # only seed 1's AMD intervals (±0.005) miss


def test_attn_tuning_memorises_like_full_ft_only_where_full_ft_extracts(tmp_path):
    full = [{"extracted": 4}, {"extracted": 2}, {"extracted": 6}]
    misses = [{"extracted": 3}, {"extracted": 0}, {"extracted": 5}]
    _, pool = load_pool(three_seeds(tmp_path / "a", {"full": full, "attention": misses}))
    row = verdict(pool, 5, "attention", "full", "extracted")
    low, high = numbers(row[5])[1:]
    assert low < 0 < high  # the interval alone would let it hold
    assert row[6] == "does not hold: Attn Tuning extracts 0 on seed 1 where Full FT extracts 2"
    like = [{"extracted": 4}, {"extracted": 2}, {"extracted": 5}]
    _, pool = load_pool(three_seeds(tmp_path / "b", {"full": full, "attention": like}))
    assert verdict(pool, 5, "attention", "full", "extracted")[6] == "holds"
    fewer = [{"extracted": 1}, {"extracted": 2}, {"extracted": 3}]
    many = [{"extracted": 10}, {"extracted": 12}, {"extracted": 14}]
    _, pool = load_pool(three_seeds(tmp_path / "c", {"full": many, "attention": fewer}))
    row = verdict(pool, 5, "attention", "full", "extracted")
    assert row[6] == "does not hold: the t-interval excludes 0 (Attn Tuning extracts fewer)"
    none = [{"extracted": 0}] * 3  # nothing memorised by either: the claim cannot be tested
    _, pool = load_pool(three_seeds(tmp_path / "d", {"full": none, "attention": none}))
    row = verdict(pool, 5, "attention", "full", "extracted")
    assert row[6] == "not testable: Full FT extracts nothing on any seed"


def test_table_2_run_pools_with_table_1_run_of_the_same_seed(tmp_path):
    t1 = make_run(tmp_path, "t1", 0, {"full": {"extracted": 10}, "difffit": {"extracted": 3}})
    t1b = make_run(tmp_path, "t1b", 1, {"full": {"extracted": 11}})
    t2 = make_run(tmp_path, "t2", 0, {"full+rwa": {"extracted": 1}, "difffit+threshold": {}},
                  name="paper_table2")  # fmt: skip
    runs, pool = load_pool([t2, t1b, t1])
    assert [r.seed for r in runs] == [0, 0, 1] and runs[0].minutes == pytest.approx(4.0)
    assert sorted(pool["full"]) == [0, 1] and sorted(pool["full+rwa"]) == [0]
    row = verdict(pool, 4, "full+rwa", "full", "extracted")
    assert row[3] == "Full FT + RWA vs Full FT" and row[4] == "0"
    assert row[6] == "1 seed: within-run intervals only; Full FT + RWA better, intervals disjoint"
    text = write_seeds_report([t1, t1b, t2], tmp_path / "out").read_text()
    assert "# capsearch seeds report: paper_table1, paper_table2" in text
    table = text.split("## Table (paper format)")[1]
    assert table.index("| Full FT + RWA |") < table.index("| DiffFit + Threshold |")
    assert "| DiffFit + Threshold | 15.31 | 0.067 | 0.69 | 51 |" in text


def test_the_plot_colours_by_method_and_shapes_by_mitigation():
    from capsearch.reporting.plots import method_and_marker

    assert method_and_marker("Full FT") == ("Full FT", "o")
    assert method_and_marker("Full FT + RWA†") == ("Full FT", "s")
    assert method_and_marker("DiffFit + Threshold") == ("DiffFit", "^")
    assert method_and_marker("SV-DIFF + Something else")[1] == "D"


def test_the_same_baseline_twice_for_one_seed_is_an_error(tmp_path):
    a = make_run(tmp_path, "runA", 0, {"full": {}})
    b = make_run(tmp_path, "runB", 0, {"full": {}, "difffit": {}})
    with pytest.raises(UserError) as exc:
        load_pool([a, b])
    message = str(exc.value)
    assert "runA" in message and "runB" in message and "'full'" in message
    assert "\n" not in message


def test_the_report_is_the_same_twice_but_for_its_written_line(tmp_path):
    runs = three_seeds(tmp_path, {
        "full": [{"fid": 100.0 + s, "extracted": 3 + s, "kid": 1.5} for s in range(3)],
        "attention": [{"fid": 90.0 - s, "extracted": 2 * s} for s in range(3)],
        "svdiff": [{"fid": 80.0 + 2 * s} for s in range(3)],
    })  # fmt: skip
    grid = runs[0] / "trials" / "t000" / "final" / "memorised.png"
    grid.write_bytes(b"png")
    late = make_run(tmp_path, "late", 3, {"svdiff": {"fid": 70.0}}, no_final=("svdiff",))
    out = tmp_path / "out"
    texts = [write_seeds_report([late, *reversed(runs)], out).read_text() for _ in range(2)]
    texts.append(write_seeds_report([*runs, late], out).read_text())

    def stable(text: str) -> list[str]:
        return [line for line in text.splitlines() if not line.startswith("Written ")]

    assert stable(texts[0]) == stable(texts[1]) == stable(texts[2])
    assert sum(line.startswith("Written ") for line in texts[0].splitlines()) == 1
    text = texts[0]
    assert (
        "[../seed0/trials/t000/final/memorised.png](../seed0/trials/t000/final/memorised.png)"
        in text
    )
    assert "| SV-DIFF | 3 | late/t000† |" in text  # seed 3 has search-stage numbers only
    assert "†" in text.split("## Per seed")[0]  # the search-stage seed marks the paper table too
    assert "KID ↓" in text  # a per-seed column because some trial has it
    assert (out / "quality_memorisation.png").stat().st_size > 1000
    assert "![held-out FID against extracted images](quality_memorisation.png)" in text
    assert "Attn Tuning memorises like Full FT" in text


def test_report_command_over_several_runs(tmp_path, capsys):
    a = make_run(tmp_path, "a", 0, {"full": {"extracted": 5}, "difffit": {"extracted": 1}})
    b = make_run(tmp_path, "b", 1, {"full": {"extracted": 6}, "difffit": {"extracted": 2}})
    out = tmp_path / "out"
    assert main(["report", str(a), str(b), "--out", str(out)]) == 0
    assert (out / "report.md").is_file() and (out / "quality_memorisation.png").is_file()
    assert capsys.readouterr().out == f"wrote {out / 'report.md'}\n"
    text = (out / "report.md").read_text()  # both runs given, each as its seed
    assert f"- `{a}`: spec `paper_table1`, seed 0, 2 finished" in text
    assert f"- `{b}`: spec `paper_table1`, seed 1, 2 finished" in text
    assert "| 5.5 ± 0.7 / 20 | 0, 1 |" in text  # Full FT's extracted over the two seeds: 5 and 6
    assert main(["report", str(a), str(b)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--out" in err
