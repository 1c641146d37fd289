"""The driver killed (SIGKILL) at three points of a real micro search, then `--resume` finishes it.

Each case runs `python -m capsearch run SPEC --out RUN` as a subprocess, kills it (a) while the phantom
data set is generated, (b) while a trial trains, (c) right after the first trial recorded its result,
(d) while the searched trial trains, after its first checkpoint, and runs `--resume`: it takes over the dead driver's lock, reaps the Ray workers it left, and finishes.
Afterwards every planned trial has exactly one `ok` record, no trial finished before the kill was run
again, and the Optuna study holds one COMPLETE trial per `ok` record (same reward) and FAIL only for the
trials the kill interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from test_search import MICRO

from capsearch.config import spec_from_dict
from capsearch.search.runs import load_trials

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _spec(point: str) -> dict:
    spec = json.loads(json.dumps(MICRO))
    spec["baselines"]["methods"] = ["difffit"]  # one baseline and one searched trial: both train
    spec["search"].update(num_samples=1, concurrency=1)
    spec["train"].update(steps=8, probe_every=2, checkpoint_every=4)
    spec["final"] = {"enabled": False}
    if point == "data":  # enough patients that generation takes a while to hit
        spec["data"]["phantom"]["patients"] = 400
    return spec


def _trials(run: Path) -> list[Path]:
    return sorted((run / "trials").glob("t*")) if (run / "trials").is_dir() else []


def _generating(run: Path) -> bool:
    return (run / "data").is_dir() and not (run / "data" / "complete.json").exists()


def _training(run: Path) -> bool:
    for folder in _trials(run):
        log = folder / "train_log.jsonl"
        if not (folder / "result.json").exists() and log.is_file() and log.stat().st_size > 0:
            return True
    return False


def _one_finished(run: Path) -> bool:
    return any((folder / "result.json").is_file() for folder in _trials(run))


def _searched_checkpointed(run: Path) -> bool:
    """The searched trial (t001, after the baseline) saved a checkpoint and has not finished."""
    folder = run / "trials" / "t001"
    return (folder / "checkpoint").is_dir() and not (folder / "result.json").exists()


KILL_WHEN = {
    "data": _generating,
    "training": _training,
    "between": _one_finished,
    "searched": _searched_checkpointed,
}


def _scorer_installed() -> bool:
    from capsearch.metrics.scorer import CONFIG_FILE, SCORER_DIR

    return (SCORER_DIR / CONFIG_FILE).is_file()


@pytest.mark.slow
@pytest.mark.parametrize("point", ["data", "training", "between", "searched"])
def test_a_killed_driver_is_finished_by_resume(point, tmp_path):
    if not _scorer_installed():
        pytest.skip("the phantom scorer is not installed (capsearch pretrain scorer)")
    data = _spec(point)
    spec_path = tmp_path / "kill.yaml"
    spec_path.write_text(yaml.safe_dump(data))
    spec = spec_from_dict(data)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "capsearch", "run", str(spec_path), "--out", str(run)]
    started = time.time()
    with open(tmp_path / "first.log", "w") as log:
        driver = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 600
        while not KILL_WHEN[point](run):
            assert driver.poll() is None, (
                f"the search ended before the kill point {point!r}: "
                + (tmp_path / "first.log").read_text()[-3000:]
            )
            assert time.time() < deadline, f"never reached the kill point {point!r}"
            time.sleep(0.02)
        os.kill(driver.pid, signal.SIGKILL)
    finally:
        driver.kill()
        driver.wait()
    killed_at = time.time() - started
    # what was finished at the kill: it must come through --resume untouched
    before = {
        folder.name: (
            (folder / "result.json").read_bytes(),
            (folder / "result.json").stat().st_mtime_ns,
        )
        for folder in _trials(run)
        if (folder / "result.json").is_file()
    }
    if point == "data":
        assert not (run / "data" / "complete.json").exists() and not before
    if point == "between":
        assert before
    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "took over the lock of a killed search" in resumed.stdout
    assert (run / "data" / "complete.json").is_file()

    records = load_trials(run, finished_only=False)
    ok = [r for r in records if r.status == "ok"]
    cut = [r for r in records if r.status != "ok"]
    # every planned trial (the baseline, then num_samples searched ones) finished exactly once
    assert sorted(r.baseline or "" for r in ok) == sorted(
        [b.name for b in spec.baseline_points] + [""] * spec.search.num_samples
    ), [(r.trial, r.status, r.error) for r in records]
    assert all(r.status == "interrupted" for r in cut), cut
    if point == "training":
        assert len(cut) == 1  # the trial the kill cut short, run again as a new trial
    if point == "searched":  # the sampler's proposal is kept: retried with its parameters, from its
        (retry,) = [r for r in ok if r.retry_of is not None]  # checkpoint
        assert [r.trial for r in cut] == ["t001"] and retry.retry_of == 1
        assert retry.params == cut[0].params
        assert retry.resume_from == str(run.resolve() / "trials" / "t001" / "checkpoint")
        assert "going on from t001's checkpoint" in resumed.stdout
    for name, (content, mtime) in before.items():
        result = run / "trials" / name / "result.json"
        assert (result.read_bytes(), result.stat().st_mtime_ns) == (content, mtime), name
        assert json.loads(content)["status"] == "ok"

    study = optuna.load_study(
        study_name=spec.search.study_name, storage=f"sqlite:///{run / 'optuna.db'}"
    )
    states = {t.number: t.state for t in study.trials}
    complete = {t.number: t.value for t in study.trials if t.state.name == "COMPLETE"}
    assert complete == {r.number: pytest.approx(r.reward) for r in ok}
    assert {n for n, s in states.items() if s.name == "FAIL"} == {r.number for r in cut}
    assert set(states) == set(complete) | {r.number for r in cut}  # nothing RUNNING or WAITING

    report = (run / "report.md").read_text()
    assert all(r.trial in report for r in ok)
    print(
        f"{point}: killed after {killed_at:.1f} s; resumed in {time.time() - started:.1f} s total"
    )
