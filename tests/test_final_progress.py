"""The final stage's progress: each finalist being trained again (capsearch.search.retrain) shows its step and
rate on the stage's bar, read from the retraining's own log, and each finished re-evaluation a line."""

from __future__ import annotations

import io
import json

from rich.console import Console

from capsearch.search.final import _StageBar, retraining_progress
from capsearch.search.records import TrialRecord
from capsearch.search.retrain import PLAN_FILE, RETRAIN_DIR


def write_log(folder, steps: list[int], planned: int) -> None:
    folder.mkdir(parents=True)
    (folder / PLAN_FILE).write_text(json.dumps({"train": {"steps": planned}}))
    lines = [{"step": s, "loss": 0.1, "time": 1000.0 + s / 2} for s in steps]
    (folder / "train_log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_a_retraining_shows_its_step_total_and_rate(tmp_path):
    record = TrialRecord(trial="t009", number=9, dir=str(tmp_path / "t009"))
    assert retraining_progress(record, None) is None  # not being retrained (its delta was there)
    write_log(tmp_path / "t009" / RETRAIN_DIR, [10, 20, 30, 40], planned=2000)
    assert retraining_progress(record, None) == "t009 retraining 40/2000 2.0 it/s"
    write_log(tmp_path / "t009" / "final_seed3" / RETRAIN_DIR, [10], planned=2000)
    assert retraining_progress(record, 3) == "t009 training on seed 3 10/2000"


def test_the_stage_bar_prints_each_result_and_the_running_retrainings(tmp_path):
    write_log(tmp_path / "t005" / RETRAIN_DIR, [100, 200], planned=2000)
    out = io.StringIO()
    bar = _StageBar(Console(file=out, width=200, force_terminal=True), total=2)
    pending = [(TrialRecord(trial=t, number=int(t[1:]), dir=str(tmp_path / t)), None)
               for t in ("t005", "t017")]  # fmt: skip
    bar.running(pending)
    running = bar.bar.tasks[0].fields["running"]
    assert running == "t005 retraining 200/2000 2.0 it/s"  # t017 shows nothing: not retraining
    bar.done("  final t017/final: reward -4.162 (1/2)")
    assert bar.bar.tasks[0].completed == 1
    bar.stop()
    assert "final t017/final: reward -4.162 (1/2)" in out.getvalue()


def test_a_result_line_says_when_a_retraining_went_on_from_a_checkpoint():
    from capsearch.search.final import FailedReevaluation, _outcome
    from capsearch.search.records import FinalResult, SeedResult

    again = {"steps": 2000, "identical": False, "went_on_from_step": 1000}
    shared = {"trial": "t004", "split": "test", "seed": 1000, "metrics": {}}
    line = _outcome(FinalResult(**shared, reward=-3.815, retrained=again))
    assert line == (
        "reward -3.815; trained again from its record, 2000 steps, differs from it "
        "(went on from its checkpoint at step 1000)"
    )
    again = {**again, "went_on_from_step": None}
    assert "went on" not in _outcome(FinalResult(**shared, reward=-3.8, retrained=again))
    other = {"steps": 40, "seed": 3, "final_loss": 0.1, "seconds": 9.0}
    line = _outcome(SeedResult(**shared, train_seed=3, reward=-3.9, retrained=other))
    assert line == "reward -3.900; trained on seed 3, 40 steps"
    assert _outcome(FinalResult(**shared, error="no reward: metric fid is missing")) == (
        "no reward: metric fid is missing"
    )
    assert _outcome(FailedReevaluation("t004", "trial t004 has no delta")) == (
        "trial t004 has no delta"
    )
