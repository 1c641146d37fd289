"""Workers a killed search left running are reaped, and nothing else is."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

from capsearch.search.cluster import reap_orphans

SLEEP = [sys.executable, "-c", "import time; time.sleep(60)"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _entry(registry, name, driver, raylet, started):
    registry.mkdir(exist_ok=True)
    entry = {"driver_pid": driver, "host": socket.gethostname(), "raylet_pid": raylet,
             "raylet_started": started}  # fmt: skip
    (registry / f"{name}.json").write_text(json.dumps(entry))


def test_only_the_workers_of_a_dead_drivers_instance_are_reaped(tmp_path):
    registry = tmp_path / "registry"
    started = time.time() - 5
    dead_raylet, live_raylet = _dead_pid(), _dead_pid()
    orphan = subprocess.Popen(SLEEP, env={**os.environ, "RAY_RAYLET_PID": str(dead_raylet)})
    # a worker of an instance whose driver (this test) still runs, and a process of no instance
    kept = subprocess.Popen(SLEEP, env={**os.environ, "RAY_RAYLET_PID": str(live_raylet)})
    other = subprocess.Popen(SLEEP)
    try:
        _entry(registry, "dead", _dead_pid(), dead_raylet, started)
        _entry(registry, "live", os.getpid(), live_raylet, started)
        assert reap_orphans(registry) == [orphan.pid]
        assert orphan.wait(timeout=10) != 0  # killed
        assert kept.poll() is None and other.poll() is None
        assert sorted(p.name for p in registry.iterdir()) == ["live.json"]  # done with the dead one
    finally:
        for proc in (orphan, kept, other):
            proc.kill()
            proc.wait()


def test_an_unreadable_entry_is_dropped_without_killing(tmp_path):
    registry = tmp_path / "registry"
    registry.mkdir()
    (registry / "cut.json").write_text('{"driver_pid": 1')
    assert reap_orphans(registry) == [] and not any(registry.iterdir())
    assert reap_orphans(tmp_path / "none") == []
