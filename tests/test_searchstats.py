"""A search's accounting: compute used, early stopping's saving, learning curve, shares per group."""

from __future__ import annotations

import pytest

from capsearch.reporting.searchstats import best_so_far, compute_used, curve_plot, group_shares
from capsearch.search.records import TrialRecord

DIFFFIT = [{"method": "difffit", "units": ["mid_block.attentions"]}]
FREEZE = [{"method": "freeze", "units": []}]


def rec(number, status="ok", reward=None, baseline=None, **kw) -> TrialRecord:
    out = {"trial": f"t{number:03d}", "number": number, "status": status, "baseline": baseline,
           "method_spec": DIFFFIT}  # fmt: skip
    if reward is not None:
        out["reward"] = reward
    return TrialRecord.model_validate({**out, **kw})


def test_compute_counts_steps_seconds_and_what_early_stopping_saved():
    records = [
        rec(0, baseline="freeze", method_spec=FREEZE, steps=0, seconds=60.0),
        rec(
            1,
            baseline="difffit",
            steps=2000,
            seconds=900.0,
            train_seconds=2000.0,
            reuse_from="other/trials/t003",
        ),  # fmt: skip
        rec(
            2,
            steps=2000,
            seconds=2000.0,
            cpu=1,
            final={"split": "test", "seed": 1000, "metrics": {}, "seconds": 300.0},
        ),  # fmt: skip
        rec(3, "stopped", steps=500, seconds=500.0),
        rec(4, "stopped", steps=500, seconds=520.0, cpu=2),
    ]
    used = compute_used(records, 2000)
    assert used["by_status"] == {"ok": 3, "stopped": 2} and used["reused"] == 1
    # trained here: t002 to the end, t003 and t004 stopped at their first rung (Freeze trains nothing)
    assert used["steps"] == 3000 and used["steps_if_run_to_the_end"] == 6000
    assert used["saved_fraction"] == pytest.approx(0.5)
    assert used["search_cpu_hours"] == pytest.approx((60 + 900 + 2000 + 500 + 2 * 520) / 3600)
    assert used["final_cpu_hours"] == pytest.approx(300 / 3600)
    assert used["reused_training_cpu_hours"] == pytest.approx(2000 / 3600)


def test_learning_curve_counts_every_proposal_and_keeps_the_best(tmp_path):
    records = [
        rec(0, reward=-3.0, baseline="full"),  # not a proposal of the sampler
        rec(3, reward=-5.0),
        rec(1, "stopped"),
        rec(2, reward=-4.0),
        rec(4, "error"),
        rec(5, reward=-4.5),
    ]
    assert best_so_far(records) == [(2, -4.0), (3, -4.0), (4, -4.0), (5, -4.0)]
    assert best_so_far([rec(1, "stopped")]) == []
    path = curve_plot([("tpe", best_so_far(records))], [("Full FT", -3.0)], tmp_path / "c.png")
    assert path is not None and path.stat().st_size > 1000
    assert curve_plot([("tpe", [])], [], tmp_path / "none.png") is None


def test_group_shares_count_each_groups_trainable_parameters():
    from capsearch.models.load import load_pipeline

    record = rec(
        0,
        model="tiny:random",
        groups={"mid_attn": "difffit(lr=0.1)", "up_res": "frozen", "down_attn": "attention"},
        method_spec=[
            {"method": "difffit", "units": ["mid_block.attentions"], "lr": 0.1},
            {"method": "attention", "units": ["down_blocks.*.attentions"]},
        ],
    )
    rows = group_shares(record)
    assert [r["group"] for r in rows] == ["mid_attn", "down_attn"]
    unet = load_pipeline("tiny:random").unet
    mid = sum(p.numel() for n, p in unet.named_parameters() if n.startswith("mid_block.attentions"))
    assert rows[0]["parameters"] == mid and 0 < rows[0]["trainable"] < 0.05 * mid
    assert rows[1]["share"] == pytest.approx(1.0)  # Attn Tuning trains all of its attention blocks


def test_interrupted_trials_count_what_they_trained_before_they_stopped(tmp_path):
    import json

    from capsearch.reporting.searchstats import interrupted_work, report_lines
    from capsearch.search.runs import write_json

    for number, status, log in (
        (1, "interrupted", [{"step": 10, "time": 1000.0}, {"step": 20, "time": 1100.0}]),
        (2, "interrupted", [{"step": 5}]),  # a log from before lines carried a time
        (3, "ok", [{"step": 30, "time": 2000.0}]),
    ):
        folder = tmp_path / "trials" / f"t{number:03d}"
        folder.mkdir(parents=True)
        write_json(folder / "params.json", {"trial": folder.name, "number": number,
                                            "started": 900.0, "cpu": 2})  # fmt: skip
        if status == "ok":
            write_json(folder / "result.json", {"trial": folder.name, "number": number,
                                                "status": "ok"})  # fmt: skip
        lines = [json.dumps(e) for e in log] + ['{"step": 2']  # the last line cut short
        (folder / "train_log.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "trials" / "t001" / "result.json").write_text(
        json.dumps(
            {"trial": "t001", "number": 1, "status": "interrupted", "started": 900.0, "cpu": 2}
        )
    )
    (tmp_path / "trials" / "t002" / "result.json").write_text(
        json.dumps({"trial": "t002", "number": 2, "status": "interrupted"})
    )
    write_json(tmp_path / "trials" / "t003" / "result.json", {"trial": "t003", "number": 3,
               "status": "ok", "resume_from": str(tmp_path / "trials" / "t001" / "checkpoint")})  # fmt: skip
    cut = interrupted_work(tmp_path)
    assert cut["trials"] == 2 and cut["steps"] == 25 and cut["timed"] == 1
    assert cut["continued"] == 1  # t003 went on from t001's checkpoint; t002 was not taken up
    assert cut["cpu_hours"] == pytest.approx(2 * 200 / 3600)
    text = "\n".join(report_lines(tmp_path, [], 100))
    assert "interrupted trials, not counted above: 2 (25 steps" in text
    assert "time known for 1 of them" in text
    assert "went on from the checkpoint of 1 of them" in text
