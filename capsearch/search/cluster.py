"""The local Ray instances capsearch starts, and the workers a killed driver leaves behind.

When a driver that started its own Ray instance is killed with SIGKILL, Ray's GCS server and raylet go
at once, but its worker processes notice only when their raylet's heartbeat times out, and its agents
later still: measured here (experiments/ray_linger.py, docs/reliability.md), the trial's workers
trained on for ~62 s, taking the cores the next search wanted, and the dashboard and runtime-env agents
stayed for minutes. So every driver that starts a local instance registers
it (its pid, host and its raylet's pid and start time) in a per-user folder, and every search starts by
reaping the workers of registered instances whose driver is gone: processes whose environment names
that raylet (Ray sets RAY_RAYLET_PID in each worker) and whose raylet no longer runs, and the processes
the instance had when it was registered (its agents outlive the driver by minutes), each recognised by
pid and start time. Nothing else is touched: not other users' processes, not Ray clusters capsearch did
not start, not live instances.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import time
from pathlib import Path

from capsearch.search.runlock import process_alive

REGISTRY = Path(tempfile.gettempdir()) / f"capsearch-ray-{os.getuid()}"


def _entry_path(registry: Path) -> Path:
    return registry / f"{socket.gethostname()}-{os.getpid()}.json"


def register_local_instance(registry: Path = REGISTRY) -> Path | None:
    """Record the Ray instance this process just started (its raylet is a child of this process)."""
    import psutil

    started = psutil.Process().children(recursive=True)
    raylets = [p for p in started if _is_raylet(p)]
    if not raylets:
        return None
    registry.mkdir(parents=True, exist_ok=True)
    entry = {
        "driver_pid": os.getpid(),
        "host": socket.gethostname(),
        "raylet_pid": raylets[0].pid,
        "raylet_started": raylets[0].create_time(),
        # the instance's own processes (GCS, raylet, agents: the agents outlive a killed driver)
        "processes": [[p.pid, p.create_time()] for p in started],
        "registered": time.time(),
    }
    path = _entry_path(registry)
    path.write_text(json.dumps(entry))
    return path


def unregister(path: Path | None) -> None:
    if path is not None:
        path.unlink(missing_ok=True)


def _is_raylet(proc) -> bool:
    import psutil

    try:
        return proc.name() == "raylet" or "raylet" in Path(proc.cmdline()[0]).name
    except (psutil.Error, IndexError):
        return False


def _running(pid: int, started: float) -> bool:
    """Whether the process `pid` that started at `started` still runs (not a reuse of its pid)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        return abs(proc.create_time() - started) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def reap_orphans(registry: Path = REGISTRY) -> list[int]:
    """Kill the leftover workers of registered instances whose driver is gone; return their pids."""
    import psutil

    if not registry.is_dir():
        return []
    killed: list[int] = []
    for path in sorted(registry.glob("*.json")):
        try:
            entry = json.loads(path.read_text())
            driver, raylet = int(entry["driver_pid"]), int(entry["raylet_pid"])
            raylet_started = float(entry["raylet_started"])
        except (OSError, ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)  # unreadable: nothing can be reaped safely by it
            continue
        if entry.get("host") != socket.gethostname() or process_alive(driver):
            continue  # another host's, or its driver still runs (pids are only reused after exit)
        if _running(raylet, raylet_started):
            continue  # the instance itself still runs: not ours to stop
        for pid, created in entry.get("processes", []):
            if _running(int(pid), float(created)):
                with contextlib.suppress(psutil.Error):
                    psutil.Process(int(pid)).kill()
                    killed.append(int(pid))
        for proc in psutil.process_iter():
            try:
                if proc.uids().real != os.getuid() or proc.create_time() < raylet_started:
                    continue
                if proc.environ().get("RAY_RAYLET_PID") == str(raylet):
                    proc.kill()
                    killed.append(proc.pid)
            except psutil.Error:
                continue
        path.unlink(missing_ok=True)
    return killed


def start_local_ray(console=None, **kwargs):
    """Reap what killed searches left, start a new local Ray instance (address="local"), register it.

    Returns ray.init's context; its registry entry is removed by `stop_local_ray`.
    """
    import ray

    reaped = reap_orphans()
    if reaped and console is not None:
        console.print(f"stopped {len(reaped)} Ray worker(s) that a killed search had left running")
    # address="local": always a new instance of our own. With None, Ray would join whatever
    # RAY_ADDRESS or the last `ray start` names, including a cluster still shutting down.
    context = ray.init(address="local", **kwargs)
    global _registered
    _registered = register_local_instance()
    return context


_registered: Path | None = None


def stop_local_ray() -> None:
    """Shut the local instance down and remove its registry entry."""
    import ray

    global _registered
    ray.shutdown()
    unregister(_registered)
    _registered = None
