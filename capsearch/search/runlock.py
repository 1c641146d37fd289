"""One search per run folder: RUN/lock.json names its holder and a heartbeat keeps it fresh.

Two drivers on one run folder both ask Optuna for trials and both write records: trials run twice and
Optuna raises on the second tell. `capsearch run` therefore holds RUN/lock.json (host, pid, start
time, a random token) while it runs; a second search on the folder is refused with one line naming the
holder. The lock is created with O_EXCL, so exactly one of two simultaneous starts gets it.

A driver killed with SIGKILL leaves its lock behind. It is stale when its process is gone (same host,
the pid no longer exists) or its heartbeat (the file's modification time, refreshed every
HEARTBEAT_S seconds by a thread of the holder) is older than STALE_S: a pid means nothing on another
host of a shared file system, the heartbeat does. `--resume` takes a stale lock over; a fresh one is
never broken: the message says how to remove it by hand when no search runs there.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

from capsearch.errors import UserError

LOCK_FILE = "lock.json"
HEARTBEAT_S = 15.0
STALE_S = 90.0


def process_alive(pid: int) -> bool:
    """Whether a process runs (a killed one its parent has not waited for is a zombie: not alive)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def read_lock(run_dir: Path) -> dict[str, Any] | None:
    """The holder of a run folder's lock (with `age`, seconds since its heartbeat), or None."""
    path = Path(run_dir) / LOCK_FILE
    try:
        age = time.time() - path.stat().st_mtime
        holder = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        holder = {}  # being written, or cut short by a kill: judged by its age alone
    holder = holder if isinstance(holder, dict) else {}
    return {**holder, "age": age}


def is_stale(holder: dict[str, Any]) -> bool:
    """Whether a lock's holder is gone: its process ended (this host) or its heartbeat stopped."""
    if holder["age"] > STALE_S:
        return True
    same_host = holder.get("host") == socket.gethostname()
    pid = holder.get("pid")
    return same_host and isinstance(pid, int) and not process_alive(pid)


def describe(holder: dict[str, Any]) -> str:
    """The holder in words: pid, host, start time and heartbeat age."""
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
    return (
        f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {when}, "
        f"heartbeat {holder['age']:.0f} s ago"
    )


class RunLock:
    """Hold a run folder for one search: `with RunLock(run_dir, resume): ...`."""

    def __init__(self, run_dir: Path, resume: bool) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.resume = resume
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self.took_over: dict[str, Any] | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
              "token": self.token}  # fmt: skip
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._clear_stale()
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me))
            self._beat = threading.Thread(target=self._heartbeat, daemon=True, name="run-lock")
            self._beat.start()
            return
        raise UserError(f"{self.path.parent}: could not take its lock ({self.path}); try again")

    def _clear_stale(self) -> None:
        holder = read_lock(self.path.parent)
        if holder is None:
            return  # released meanwhile: try again
        where = self.path.parent
        if not is_stale(holder):
            raise UserError(
                f"{where} is in use by another search ({describe(holder)}); wait for it to end, or "
                f"if no search runs there (another host's driver was killed), delete {self.path}"
            )
        if not self.resume:
            raise UserError(f"{where} holds the lock of a killed search; finish it with --resume")
        # Rename, not unlink: of two drivers taking the same stale lock over, one rename fails.
        aside = self.path.with_name(f"{LOCK_FILE}.stale-{self.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        aside.unlink(missing_ok=True)
        self.took_over = holder

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass  # removed by hand: the next start may take the folder; nothing to do here

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        holder = read_lock(self.path.parent)
        if holder is not None and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)
