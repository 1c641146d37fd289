"""A run refused after its folder was written leaves nothing that blocks the retry (docs/reliability.md).

A search checks all it can before it writes its run folder (capsearch.search.inputs, check_run_dir);
a refusal after that — here a check at run time made to fail once — leaves spec.yaml, optuna.db and
the generated data but no trial record, and such a folder is started afresh by the next `run` with
the spec as it now is, with or without --resume. A folder with a trial record keeps its protection.
Ray, training and the final stage are patched out: the trials the search would run are counted.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import yaml

from capsearch.cli import main
from capsearch.errors import UserError
from capsearch.search.runlock import LOCK_FILE
from capsearch.search.runs import load_trials, trial_dir, write_json

SPEC = {
    "model": "tiny:random",
    "data": {"phantom": {"patients": 6, "size": 32, "held_out_images": 8}},
    "search": {"num_samples": 2},
    "baselines": {"methods": ["freeze"]},
    "space": {"groups": [{"name": "a", "units": "mid_block.attentions",
                          "methods": {"frozen": {}, "full": {}}}]},
}  # fmt: skip


def spec_file(tmp_path: Path, name: str = "s.yaml", **changes) -> Path:
    data = json.loads(json.dumps(SPEC))
    for key, value in changes.items():
        data[key] = {**data.get(key, {}), **value}
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"name": "s", **data}))
    return path


@pytest.fixture
def search(monkeypatch, tmp_path):
    """The search without Ray, training or the final stage: `tuned` lists (num_samples, trials pending)
    of each search that got to its trials; `refuse(message)` refuses the next one where Ray would
    start, once (after its folder, study and data were written, its baselines enqueued)."""
    import capsearch.commands.search as command
    import capsearch.search.cluster as cluster
    import capsearch.search.loop as loop

    tuned: list = []
    refusals: list[str] = []

    def ray_start():
        if refusals:
            raise UserError(refusals.pop())

    monkeypatch.setattr(loop, "_tune", lambda spec, run_dir, data, pending, *a: tuned.append(
        (spec.search.num_samples, pending)))  # fmt: skip
    monkeypatch.setattr(loop, "run_final_stage", lambda *a, **k: None)
    monkeypatch.setattr(loop, "start_local_ray", lambda *a, **k: None)
    monkeypatch.setattr(loop, "stop_local_ray", lambda: None)
    monkeypatch.setattr(loop, "prepare_ray_start", ray_start)
    monkeypatch.setattr(cluster, "reap_orphans", lambda *a, **k: [])  # no other search's processes
    monkeypatch.setattr(command, "_summarise", lambda run_dir, spec, console: run_dir / "report.md")
    monkeypatch.chdir(tmp_path)
    return SimpleNamespace(refuse=refusals.append, tuned=tuned)


def study_baselines(run: Path) -> list:
    study = optuna.load_study(study_name="capsearch", storage=f"sqlite:///{run / 'optuna.db'}")
    return [t.user_attrs.get("baseline") for t in study.trials]


def refused_leftover(search, tmp_path, capsys) -> Path:
    """A run refused at run time: its folder holds spec.yaml, optuna.db and data/, no trial."""
    run = tmp_path / "run"
    search.refuse("a check that runs only once the folder is written")
    assert main(["run", str(spec_file(tmp_path, "first.yaml")), "--out", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["capsearch: error: a check that runs only once the folder is written"]
    assert {p.name for p in run.iterdir()} == {"spec.yaml", "optuna.db", "data"}
    assert not load_trials(run, finished_only=False) and study_baselines(run) == ["freeze"]
    return run


@pytest.mark.parametrize("resume", [False, True], ids=["plain", "resume"])
def test_a_refused_run_is_started_again_with_the_fixed_spec(search, tmp_path, capsys, resume):
    run = refused_leftover(search, tmp_path, capsys)
    data_marker = (run / "data" / "complete.json").stat().st_mtime_ns
    world = {**SPEC["data"]["phantom"], "seed": 1}  # another phantom world
    fixed = spec_file(tmp_path, "fixed.yaml", search={"num_samples": 3}, baselines={"methods": []},
                      data={"phantom": world})  # fmt: skip
    argv = ["run", str(fixed), "--out", str(run)] + (["--resume"] if resume else [])
    assert main(argv) == 0, capsys.readouterr().err
    out = " ".join(capsys.readouterr().out.split())  # rich wraps its lines
    assert "held no trial yet: started again with this spec" in out
    assert yaml.safe_load((run / "spec.yaml").read_text())["search"]["num_samples"] == 3
    assert search.tuned == [(3, 3)]  # the new spec's trials: no baseline of the first spec
    assert study_baselines(run) == []  # a new study: the first one had the freeze baseline enqueued
    # the data of another phantom world was made again
    assert (run / "data" / "complete.json").stat().st_mtime_ns != data_marker


def test_the_same_spec_goes_on_with_its_data(search, tmp_path, capsys):
    run = refused_leftover(search, tmp_path, capsys)
    data_marker = (run / "data" / "complete.json").stat().st_mtime_ns
    assert main(["run", str(spec_file(tmp_path, "again.yaml")), "--out", str(run)]) == 0
    assert "started again" not in " ".join(capsys.readouterr().out.split())  # nothing replaced
    assert search.tuned == [(2, 3)] and study_baselines(run) == ["freeze"]
    assert (run / "data" / "complete.json").stat().st_mtime_ns == data_marker


def test_a_run_with_a_trial_record_keeps_its_protection(search, tmp_path, capsys):
    run = refused_leftover(search, tmp_path, capsys)
    folder = trial_dir(run, 0)
    folder.mkdir(parents=True)
    write_json(folder / "params.json", {"trial": "t000", "number": 0, "status": "running"})
    other = spec_file(tmp_path, "other.yaml", search={"num_samples": 5})
    assert main(["run", str(other), "--out", str(run)]) == 2
    assert "already holds a search; finish it with --resume" in capsys.readouterr().err
    assert main(["run", str(other), "--out", str(run), "--resume"]) == 2
    assert "the spec differs from the one" in capsys.readouterr().err
    assert yaml.safe_load((run / "spec.yaml").read_text())["search"]["num_samples"] == 2
    assert search.tuned == []


def test_a_killed_searchs_lock_in_a_folder_without_trials_is_taken_over(search, tmp_path, capsys):
    """Killed while it generated the data: a plain rerun takes the folder (no --resume needed)."""
    run = refused_leftover(search, tmp_path, capsys)
    (run / LOCK_FILE).write_text(json.dumps({"pid": 2**22 + 7, "host": socket.gethostname(),
                                             "started": time.time(), "token": "old"}))  # fmt: skip
    other = spec_file(tmp_path, "other.yaml", search={"num_samples": 1})
    assert main(["run", str(other), "--out", str(run)]) == 0, capsys.readouterr().err
    assert "took over the lock of a killed search" in " ".join(capsys.readouterr().out.split())
    assert search.tuned == [(1, 2)] and not (run / LOCK_FILE).exists()


def test_a_live_search_in_a_folder_without_trials_is_not_replaced(search, tmp_path, capsys):
    run = refused_leftover(search, tmp_path, capsys)
    (run / LOCK_FILE).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(),
                                             "started": time.time(), "token": "live"}))  # fmt: skip
    before = (run / "spec.yaml").read_bytes()
    other = spec_file(tmp_path, "other.yaml", search={"num_samples": 1})
    assert main(["run", str(other), "--out", str(run)]) == 2
    assert "is in use by another search" in capsys.readouterr().err
    assert (run / "spec.yaml").read_bytes() == before and search.tuned == []


def test_without_out_a_refused_runs_folder_is_used_again(search, tmp_path, capsys):
    """`capsearch run SPEC` (runs/NAME by default) after a refusal: the same runs/s, not runs/s-2."""
    search.refuse("refused where Ray starts")
    assert main(["run", str(spec_file(tmp_path, "s.yaml"))]) == 2
    capsys.readouterr()
    assert (tmp_path / "runs" / "s" / "spec.yaml").is_file()
    fixed = spec_file(tmp_path, "s.yaml", search={"num_samples": 1})
    assert main(["run", str(fixed)]) == 0, capsys.readouterr().err
    assert search.tuned == [(1, 2)] and sorted(p.name for p in (tmp_path / "runs").iterdir()) == [
        "s"
    ]
    folder = trial_dir(tmp_path / "runs" / "s", 0)  # once it holds a trial record, it is taken
    folder.mkdir(parents=True)
    write_json(folder / "params.json", {"trial": "t000", "number": 0, "status": "running"})
    assert main(["run", str(fixed)]) == 0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["s", "s-2"]
