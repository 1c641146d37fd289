"""The quality–memorisation front of a run (capsearch.reporting.tradeoff): its points, front and
intervals from the records, the report's plot and table."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from test_report_export import SPEC

from capsearch.figures import MAX_IMAGE_BYTES
from capsearch.reporting.report import write_report
from capsearch.reporting.tradeoff import tradeoff_points
from capsearch.search.runs import best_trial, load_trials, trial_dir, write_json

Z95 = 1.6448536269514722  # the two-sided 90% interval's z


def wilson90(k: int, n: int) -> tuple[float, float]:
    """Wilson's score interval written out at z = Φ⁻¹(0.95)."""
    p, z2 = k / n, Z95**2
    centre, half = p + z2 / (2 * n), Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, (centre - half) / (1 + z2 / n)), (centre + half) / (1 + z2 / n)


# number: (baseline, FID, its interval, attacked captions with an extraction of 8, own-image share)
TRIALS = {
    0: ("freeze", 300.0, (280.0, 320.0), 0, 0.05),
    1: ("difffit", 15.0, (13.0, 17.0), 2, 0.30),  # beaten by t004 on both
    2: (None, 12.0, (11.0, 13.5), 3, 0.40),
    3: (None, 20.0, (18.0, 22.0), 3, 0.45),  # beaten by t002
    4: (None, 14.0, (12.5, 15.5), 1, 0.20),
}


def make_run(root: Path, counts: bool = True) -> Path:
    run = root / "run"
    run.mkdir(parents=True)
    (run / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    for number, (baseline, fid, ci, hits, own) in TRIALS.items():
        folder = trial_dir(run, number)
        folder.mkdir(parents=True)
        metrics = {"fid": fid, "extracted": hits, "nearest_own": own}
        if counts:
            metrics |= {"attacked": 8, "extracted_captions": hits}
        write_json(folder / "result.json", {
            "trial": folder.name, "number": number, "baseline": baseline, "status": "ok",
            "reward": -math.log(fid) - hits / 8, "metrics": metrics,
            "intervals": {"fid": list(ci), "nearest_own": [own - 0.05, own + 0.05]}})  # fmt: skip
    return run


def test_the_points_and_the_front_come_from_the_records(tmp_path):
    records = load_trials(make_run(tmp_path))
    best = best_trial(records)  # t004: −ln 14 − 1/8 is the highest reward
    measure, points = tradeoff_points(records, best)
    assert measure.name == "extraction_rate" and best.trial == "t004"
    assert [p["trial"] for p in points] == ["t000", "t001", "t002", "t003", "t004"]
    assert [p["front"] for p in points] == [True, False, True, False, True]
    assert [p["kind"] for p in points] == ["baseline", "baseline", "searched", "searched", "best"]
    assert [p["label"] for p in points][:2] == ["Freeze", "DiffFit"]
    for p, (_, fid, ci, hits, _) in zip(points, TRIALS.values(), strict=True):
        assert p["fid"] == fid and p["fid_ci"] == ci and p["x"] == hits / 8
        assert p["x_ci"] == pytest.approx(wilson90(hits, 8))
    # records without the attack's counts: the own-image share, with its interval
    measure, points = tradeoff_points(load_trials(make_run(tmp_path / "old", counts=False)))
    assert measure.name == "nearest_own"
    assert [p["x"] for p in points] == [0.05, 0.30, 0.40, 0.45, 0.20]
    assert points[1]["x_ci"] == pytest.approx((0.25, 0.35))
    assert [p["front"] for p in points] == [True, False, True, False, True]


def test_the_report_draws_the_front_small_and_lists_it_to_pick_from(tmp_path):
    run = make_run(tmp_path)
    text = write_report(run).read_text()
    png = run / "pareto.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size < MAX_IMAGE_BYTES
    section = text.split("## Quality against memorisation")[1].split("\n## ")[0]
    assert "![held-out FID against extraction rate](pareto.png)" in section
    assert "(validate split, sampling seed 0, the same for all)" in section
    rows = [line for line in section.splitlines() if line.startswith("| t0")]
    by_memorisation = ["| t000", "| t004", "| t002"]
    assert [row.split(" | ")[0] for row in rows] == by_memorisation
    low, high = wilson90(1, 8)
    assert rows[1].startswith(f"| t004 | all frozen | 14.00 [12.50, 15.50] | 0.125 [{low:.3f}, "
                              f"{high:.3f}] | `capsearch export {run} --trial t004 --out EXPORT` |")  # fmt: skip
