"""The shared training progress: plain log lines when stdout is not a terminal, nothing when off."""

from __future__ import annotations

from capsearch.progress import loss_bar


def test_loss_bar_logs_plain_lines_off_a_terminal(capsys):
    update = loss_bar(True, "fine-tune", total=7, start=0, log_every=3)
    for step in range(1, 8):
        update(step, 0.5 / step)
    update(None, None)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "fine-tune step 3/7 loss 0.1667",
        "fine-tune step 6/7 loss 0.0833",
        "fine-tune step 7/7 loss 0.0714",
    ]


def test_loss_bar_off_prints_nothing_and_nan_loss_is_a_dash(capsys):
    update = loss_bar(False, "pretrain", total=2)
    update(1, 0.1)
    update(None, None)
    assert capsys.readouterr().out == ""
    update = loss_bar(True, "pretrain", total=2, log_every=1)
    update(1, float("nan"))
    assert capsys.readouterr().out == "pretrain step 1/2 loss -\n"
