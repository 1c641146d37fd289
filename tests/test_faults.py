"""Faults while a search runs: injected into trials (capsearch.faults), and the Optuna study's file failing.

The slow test runs a real micro search (Ray workers, tiny:random) with a different fault injected into
each of seven trials; the fast ones check the injection hook itself and what the search does when the
study's SQLite file cannot be written (that happens in the driver, so it is patched there directly).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from capsearch import faults
from capsearch.cli import main
from capsearch.search.runs import load_trials

optuna.logging.set_verbosity(optuna.logging.WARNING)

# Every trial trains (no group is all frozen), so a train_step fault always strikes.
GROUPS = [
    {"name": "attn", "units": "mid_block.attentions",
     "methods": {"difffit": {}, "lora": {"rank": [2, 4]}}},
    {"name": "res", "units": "mid_block.resnets", "methods": {"frozen": {}, "difffit": {}}},
    # the rest of the UNet, so that the DiffFit baseline is DiffFit on the whole UNet
    {"name": "rest", "units": ["down_blocks", "up_blocks", "conv_in", "time_embedding", "conv_out"],
     "methods": {"frozen": {}, "difffit": {}}},
]  # fmt: skip
FAULTY = {
    "name": "faulty",
    "model": "tiny:random",
    "data": {
        "phantom": {"patients": 12, "size": 32, "seed": 1, "dup_fraction": 0.1, "dup_copies": 3}
    },
    "train": {"steps": 4, "batch_size": 4, "probe_every": 2, "checkpoint_every": 2},
    "evaluate": {"n_prompts": 2, "n_per_prompt": 2, "steps": 2, "extraction_prompts": 2,
                 "extraction_n": 3, "strength_prompts": 1, "strength_n": 1, "batch_size": 8},
    "final": {"enabled": False},
    "search": {"num_samples": 8, "concurrency": 2, "seed": 0},
    "baselines": {"methods": ["difffit"]},
    "space": {"groups": GROUPS},
}  # fmt: skip
# trial → (point, fault, what its record's error line must say); t000 and t008 run untouched
INJECTED = {
    "t001": ("train_step", "raise", "RuntimeError: fault injected at train_step of t001"),
    "t002": ("train_step", "nan", "non-finite loss at step 1"),
    "t003": ("train_step", "memory", "MemoryError"),
    "t004": ("checkpoint", "enospc", "No space left on device"),
    "t005": ("delta", "enospc", "No space left on device"),
    "t006": ("metrics", "enospc", "No space left on device"),
    "t007": ("train_step", "kill", "the Ray worker died (pid "),
}


def _scorer_installed() -> bool:
    from capsearch.metrics.scorer import CONFIG_FILE, SCORER_DIR

    return (SCORER_DIR / CONFIG_FILE).is_file()


def _stamps(run: Path) -> dict[str, int]:
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in (run / "trials").rglob("*")}


@pytest.mark.slow
def test_faults_in_trials_are_recorded_and_the_search_goes_on(tmp_path, capsys, monkeypatch):
    if not _scorer_installed():
        pytest.skip("the phantom scorer is not installed (capsearch pretrain scorer)")
    text = ",".join(f"{t}:{point}:{fault}" for t, (point, fault, _) in INJECTED.items())
    # Ray's workers get the driver's environment: the search starts its own local Ray from here.
    monkeypatch.setenv(faults.ENV, text)
    spec_path = tmp_path / "faulty.yaml"
    spec_path.write_text(yaml.safe_dump(FAULTY))
    run = tmp_path / "run"
    assert main(["run", str(spec_path), "--out", str(run)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    records = {r.trial: r for r in load_trials(run, finished_only=False)}
    assert sorted(records) == [f"t{i:03d}" for i in range(9)]
    for name in ("t000", "t008"):  # the good trials: evaluated, scored, with a delta
        record = records[name]
        assert record.status == "ok" and record.metrics["fid"] > 0, record.error
        assert (run / "trials" / name / "delta" / "delta.safetensors").is_file()
        assert json.loads((run / "trials" / name / "metrics.json").read_text())["fid"] > 0
    report = (run / "report.md").read_text()
    failed = report.split("## Failed or stopped trials")[1]
    for name, (point, fault, cause) in INJECTED.items():
        record = records[name]
        assert record.status == ("nan" if fault == "nan" else "error"), (name, record)
        assert cause in record.error, (name, record.error)
        assert cause in next(ln for ln in failed.splitlines() if ln.startswith(f"- {name} "))
        folder = run / "trials" / name
        # nothing half-written: no metrics.json (no evaluation finished), no temporary files or
        # checkpoint folders, and a delta only where training finished before the fault (t006)
        assert not (folder / "metrics.json").exists()
        assert not [p for p in folder.rglob("*") if p.name.endswith((".tmp", ".old"))]
        assert (folder / "delta" / "delta.safetensors").is_file() == (point == "metrics")
        assert main(["export", str(run), "--trial", name, "--out", str(tmp_path / name)]) == 2
        assert "did not finish successfully" in capsys.readouterr().err
        assert not (tmp_path / name).exists()
    assert "t007" in out and "error" in out  # the progress line of the killed trial
    study = optuna.load_study(study_name="capsearch", storage=f"sqlite:///{run / 'optuna.db'}")
    states = {f"t{t.number:03d}": t.state.name for t in study.trials}
    assert states == {n: "FAIL" if n in INJECTED else "COMPLETE" for n in records}
    # --resume reruns nothing: no record touched, no trial added to the study
    stamps = _stamps(run)
    monkeypatch.delenv(faults.ENV)
    assert main(["run", str(spec_path), "--out", str(run), "--resume"]) == 0
    assert _stamps(run) == stamps and len(study.trials) == 9
    assert main(["status", str(run)]) == 0
    assert "6 error, 1 nan, 2 ok; 9 planned" in capsys.readouterr().out


# --- the injection hook ------------------------------------------------------------------------------


def test_maybe_fail_strikes_only_where_injected(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    assert faults.maybe_fail("t001", "delta") is None  # unset: nothing
    monkeypatch.setenv(faults.ENV, "t001:delta:enospc, t002:train_step:nan,t003:metrics:memory")
    with pytest.raises(OSError, match="No space left on device") as info:
        faults.maybe_fail("t001", "delta")
    assert info.value.errno == errno.ENOSPC
    assert faults.maybe_fail("t001", "metrics") is None and faults.maybe_fail(None, "delta") is None
    assert faults.maybe_fail("t002", "train_step") == "nan"
    with pytest.raises(MemoryError, match="injected at metrics of t003"):
        faults.maybe_fail("t003", "metrics")
    monkeypatch.setenv(faults.ENV, "t004:checkpoint:raise")
    with pytest.raises(RuntimeError, match="fault injected at checkpoint of t004"):
        faults.maybe_fail("t004", "checkpoint")
    for bad in ("t001:delta", "t001:weights:raise", "t001:delta:nan", "t001:delta:melt"):
        with pytest.raises(ValueError, match=faults.ENV):
            faults.parse(bad)


def test_the_kill_fault_kills_its_own_process():
    code = (
        "from capsearch.faults import maybe_fail; maybe_fail('t001', 'train_step'); print('alive')"
    )
    env = {**os.environ, faults.ENV: "t001:train_step:kill"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL and b"alive" not in proc.stdout


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from conftest import phantom_data

    return phantom_data(tmp_path_factory, seed=2, held_out_images=4)


@pytest.mark.parametrize(
    "fault, left",
    [
        ("checkpoint:enospc", {"train_log.jsonl"}),  # the failed checkpoint's folder is gone
        ("delta:enospc", {"checkpoint", "train_log.jsonl", "delta", "delta/spec.json"}),
        ("train_step:memory", {"train_log.jsonl"}),
    ],
    ids=["checkpoint:enospc", "delta:enospc", "train_step:memory"],
)
def test_a_fault_while_training_leaves_nothing_half_written(
    data, tmp_path, monkeypatch, fault, left
):
    """In process (no Ray): the trial's folder holds whole files only, never half a delta or checkpoint."""
    from capsearch.models.load import load_pipeline
    from capsearch.training.loop import TrainSettings, finetune

    monkeypatch.setenv(faults.ENV, f"t001:{fault}")
    out = tmp_path / "t001"
    settings = TrainSettings(steps=2, batch_size=2, checkpoint_every=1, caption_dropout=0.0)
    entries = [{"method": "difffit", "units": "mid_block.attentions"}]
    with pytest.raises((OSError, MemoryError), match="t001"):
        finetune(load_pipeline("tiny:random"), entries, data, settings, out_dir=out, quiet=True)
    names = {str(p.relative_to(out)) for p in out.rglob("*")} - {
        str(p.relative_to(out)) for p in (out / "checkpoint").rglob("*")
    }
    events = {n for n in names if n.startswith("events.out.tfevents.")}  # an append-only log
    assert len(events) == 1
    assert names - events == left  # no delta.safetensors, no temporary file, no checkpoint.tmp


def test_a_nan_loss_is_a_nan_trial_without_a_delta(data, tmp_path, monkeypatch):
    from capsearch.models.load import load_pipeline
    from capsearch.training.loop import TrainSettings, finetune

    monkeypatch.setenv(faults.ENV, "t002:train_step:nan")
    out = tmp_path / "t002"
    settings = TrainSettings(steps=2, batch_size=2, caption_dropout=0.0)
    entries = [{"method": "difffit", "units": "mid_block.attentions"}]
    result = finetune(
        load_pipeline("tiny:random"), entries, data, settings, out_dir=out, quiet=True
    )
    assert result.status == "nan" and "non-finite loss at step 1" in result.message
    assert not (out / "delta").exists()


# --- the Optuna study's file failing (in the driver) -----------------------------------------------


def full_disk(storage) -> None:
    """Make every write to this storage's SQLite file fail as a full disk does.

    SQLite's own SQLITE_FULL (a file at its PRAGMA max_page_count) raises exactly this exception,
    sqlite3.OperationalError("database or disk is full"), which SQLAlchemy wraps and Optuna turns
    into a StorageInternalError; raising it before each write makes the failure certain.
    """
    from sqlalchemy import event

    @event.listens_for(storage.engine, "before_cursor_execute")
    def _full(conn, cursor, statement, *args):
        if statement.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE")):
            raise sqlite3.OperationalError("database or disk is full")


STUDY_SPEC = {
    "name": "study",
    "model": "tiny:random",
    "data": {"phantom": {"patients": 6, "size": 32, "held_out_images": 4}},
    "final": {"enabled": False},
    "search": {"num_samples": 0},
    "baselines": {"methods": ["difffit"]},
    "space": {"groups": GROUPS},
}


def test_a_study_write_that_fails_stops_new_trials_and_is_remembered(tmp_path):
    from conftest import make_searcher
    from ray.tune.search import Searcher

    from capsearch.config import spec_from_dict
    from capsearch.search.loop import study_storage

    spec = spec_from_dict(json.loads(json.dumps(STUDY_SPEC)))
    storage = study_storage(tmp_path)
    searcher = make_searcher(spec, tmp_path, storage)
    assert "plan" in searcher.suggest("a")
    full_disk(storage)
    searcher.on_trial_result("a", {"training_step": 2, "probe_score": 0.3})  # raises nothing
    searcher.on_trial_complete("a", {"status": "ok", "reward": 0.5, "trial": "t000"})
    error = str(searcher.study_error)
    assert error.startswith(f"could not save the Optuna study {tmp_path / 'optuna.db'} (database")
    assert "or disk is full); the search stopped" in error and error.endswith("with --resume")
    assert searcher.suggest("b") == Searcher.FINISHED  # no trial starts after the failure


def test_a_full_study_file_ends_the_run_with_one_line_and_resume_recovers(
    tmp_path, capsys, monkeypatch
):
    """The whole command without Ray: Ray Tune's Tuner is replaced by one that runs one trial."""
    import capsearch.search.cluster
    import capsearch.search.loop
    from capsearch.search.runs import trial_dir, write_json

    if not _scorer_installed():
        pytest.skip("the phantom scorer is not installed (capsearch pretrain scorer)")
    storages = []

    def storage(run_dir):
        storages.append(study_storage(run_dir))
        return storages[-1]

    class OneTrial:  # suggests a trial, "runs" it (writes its record), fills the disk, reports it
        def __init__(self, trainable, tune_config, run_config):
            self.searcher = tune_config.search_alg

        def fit(self):
            config = self.searcher.suggest("a")
            folder = trial_dir(run, config["_number"])
            folder.mkdir(parents=True)
            write_json(folder / "result.json", {**config["plan"], "trial": folder.name,
                                                "status": "ok", "reward": 0.5})  # fmt: skip
            full_disk(storages[-1])
            self.searcher.on_trial_complete("a", {"status": "ok", "reward": 0.5})
            assert self.searcher.suggest("b") == "FINISHED"

    from capsearch.search.study import study_storage

    monkeypatch.setattr(capsearch.search.loop, "study_storage", storage)
    monkeypatch.setattr(capsearch.search.loop.tune, "Tuner", OneTrial)
    monkeypatch.setattr(capsearch.search.cluster, "start_local_ray", lambda *a, **k: None)
    monkeypatch.setattr(capsearch.search.cluster, "stop_local_ray", lambda: None)
    spec_path = tmp_path / "study.yaml"
    spec_path.write_text(yaml.safe_dump(STUDY_SPEC))
    run = tmp_path / "run"
    assert main(["run", str(spec_path), "--out", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith("capsearch: error: could not save the Optuna study ")
    assert "(database or disk is full)" in err[0] and "free disk space" in err[0]
    assert err[0].endswith(f"`capsearch run {spec_path} --out {run} --resume`")
    study = optuna.load_study(study_name="capsearch", storage=f"sqlite:///{run / 'optuna.db'}")
    assert study.trials[0].state.name == "RUNNING"  # Optuna never heard how it ended
    # with the disk freed, --resume tells the study what the trial's record says
    assert main(["run", str(spec_path), "--out", str(run), "--resume"]) == 0
    assert study.trials[0].state.name == "COMPLETE" and study.trials[0].value == 0.5


@pytest.mark.slow
def test_a_study_file_that_fills_up_mid_search_stops_it_and_resume_finishes(
    tmp_path, capsys, monkeypatch
):
    """A real search: once t000 has finished, every write to optuna.db fails as on a full disk."""
    import capsearch.search.loop
    from capsearch.search.study import study_storage

    if not _scorer_installed():
        pytest.skip("the phantom scorer is not installed (capsearch pretrain scorer)")
    run = tmp_path / "run"
    first_done = run / "trials" / "t000" / "result.json"

    def filling_storage(run_dir):
        from sqlalchemy import event

        storage = study_storage(run_dir)

        @event.listens_for(storage.engine, "before_cursor_execute")
        def _full(conn, cursor, statement, *args):
            writes = statement.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE"))
            if writes and first_done.is_file():
                raise sqlite3.OperationalError("database or disk is full")

        return storage

    monkeypatch.setattr(capsearch.search.loop, "study_storage", filling_storage)
    spec = json.loads(json.dumps(FAULTY))
    spec["search"].update(num_samples=2, concurrency=1)  # t000, then t001, t002 (one at a time)
    spec_path = tmp_path / "full.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    assert main(["run", str(spec_path), "--out", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert "could not save the Optuna study" in err[0] and "(database or disk is full)" in err[0]
    assert err[0].endswith(f"`capsearch run {spec_path} --out {run} --resume`")
    records = {r.trial: r.status for r in load_trials(run, finished_only=False)}
    assert records == {"t000": "ok"}  # no trial started after the study could not be saved
    monkeypatch.undo()  # the disk freed
    assert main(["run", str(spec_path), "--out", str(run), "--resume"]) == 0
    records = {r.trial: r.status for r in load_trials(run, finished_only=False)}
    assert records == {"t000": "ok", "t001": "ok", "t002": "ok"}
    study = optuna.load_study(study_name="capsearch", storage=f"sqlite:///{run / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3


def test_an_interrupted_search_skips_the_final_stage(tmp_path, monkeypatch):
    """Ctrl-C ends the trials unfinished: the driver stops instead of re-evaluating the finished ones."""
    from conftest import bare_search_spec

    import capsearch.search.loop as search
    from capsearch.search.runs import trial_dir, write_json

    def interrupted(spec, run_dir, *args, **kwargs):
        folder = trial_dir(run_dir, 0)
        folder.mkdir(parents=True)
        write_json(folder / "params.json", {"trial": "t000", "number": 0, "status": "running"})

    finals = []
    monkeypatch.setattr(search, "_tune", interrupted)
    monkeypatch.setattr(search, "run_final_stage", lambda *a, **k: finals.append(a))
    spec = bare_search_spec(num_samples=1)
    search.run_search(spec, tmp_path / "run")
    assert finals == []
