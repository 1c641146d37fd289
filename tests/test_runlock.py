"""One search per run folder: the lock, its heartbeat, stale locks, and the CLI's one-line refusal."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

import capsearch.search.runlock as runlock
from capsearch.errors import UserError
from capsearch.search.runlock import LOCK_FILE, RunLock, is_stale, read_lock


def _write(run, **holder):
    (run / LOCK_FILE).write_text(json.dumps(holder))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_search_is_refused_naming_the_holder(tmp_path):
    with RunLock(tmp_path, resume=False):
        holder = read_lock(tmp_path)
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(UserError, match=rf"in use by another search \(pid {os.getpid()} on "):
            RunLock(tmp_path, resume=True).acquire()
    assert not (tmp_path / LOCK_FILE).exists()  # released on exit


def test_a_killed_drivers_lock_is_taken_over_by_resume_only(tmp_path):
    _write(tmp_path, pid=_dead_pid(), host=socket.gethostname(), started=time.time(), token="old")
    assert is_stale(read_lock(tmp_path))
    with pytest.raises(UserError, match="killed search; finish it with --resume"):
        RunLock(tmp_path, resume=False).acquire()
    with RunLock(tmp_path, resume=True) as lock:
        assert lock.took_over["token"] == "old"
        assert read_lock(tmp_path)["token"] == lock.token


def test_another_hosts_lock_is_judged_by_its_heartbeat(tmp_path, monkeypatch):
    _write(tmp_path, pid=1, host="elsewhere", started=time.time(), token="x")
    assert not is_stale(read_lock(tmp_path))  # pid 1 means nothing here: the heartbeat is fresh
    with pytest.raises(UserError, match=f"delete {tmp_path / LOCK_FILE}"):
        RunLock(tmp_path, resume=True).acquire()
    old = time.time() - runlock.STALE_S - 5
    os.utime(tmp_path / LOCK_FILE, (old, old))
    assert is_stale(read_lock(tmp_path))
    with RunLock(tmp_path, resume=True) as lock:
        assert lock.took_over["host"] == "elsewhere"


def test_the_heartbeat_keeps_the_lock_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.05)
    with RunLock(tmp_path, resume=False):
        old = time.time() - 1000
        os.utime(tmp_path / LOCK_FILE, (old, old))
        time.sleep(0.3)
        assert read_lock(tmp_path)["age"] < 5


def test_an_unreadable_lock_is_judged_by_its_age(tmp_path):
    (tmp_path / LOCK_FILE).write_text("{cut sho")
    assert not is_stale(read_lock(tmp_path))
    old = time.time() - runlock.STALE_S - 5
    os.utime(tmp_path / LOCK_FILE, (old, old))
    assert is_stale(read_lock(tmp_path))


def test_capsearch_run_on_a_held_folder_exits_2_with_one_line(tmp_path, capsys):
    from capsearch.cli import main

    spec = tmp_path / "s.yaml"
    spec.write_text(
        "model: tiny:random\ntrain: {steps: 1}\nsearch: {num_samples: 1}\n"
        "space: {groups: [{name: a, units: mid_block.attentions, methods: {frozen: {}, full: {}}}]}\n"
    )
    run = tmp_path / "run"
    run.mkdir()
    from capsearch.config import load_spec
    from capsearch.search.runs import prepare_run_dir

    prepare_run_dir(load_spec(spec), run, resume=False)
    _write(run, pid=os.getppid(), host=socket.gethostname(), started=time.time(), token="t")
    assert main(["run", str(spec), "--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"pid {os.getppid()}" in err[0] and "Traceback" not in err[0]
    assert not (run / "trials").exists() and not (run / "optuna.db").exists()
