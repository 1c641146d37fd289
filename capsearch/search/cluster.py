"""All of capsearch's Ray set-up: starting a local instance or joining a cluster (its address, token
and dashboard), the resources a spec asks of it, and the workers a killed driver leaves behind.

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
import ipaddress
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import ray

from capsearch.atomic import unwritable
from capsearch.errors import UserError
from capsearch.search.runlock import process_alive

if TYPE_CHECKING:
    from capsearch.config import Spec

REGISTRY = Path(tempfile.gettempdir()) / f"capsearch-ray-{os.getuid()}"


def _entry_path(registry: Path) -> Path:
    return registry / f"{socket.gethostname()}-{os.getpid()}.json"


def register_local_instance(registry: Path = REGISTRY) -> Path | None:
    """Record the Ray instance this process just started (its raylet is a child of this process)."""
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
    try:
        return proc.name() == "raylet" or "raylet" in Path(proc.cmdline()[0]).name
    except (psutil.Error, IndexError):
        return False


def _running(pid: int, started: float) -> bool:
    """Whether the process `pid` that started at `started` still runs (not a reuse of its pid)."""
    try:
        proc = psutil.Process(pid)
        return abs(proc.create_time() - started) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def reap_orphans(registry: Path = REGISTRY) -> list[int]:
    """Kill the leftover workers of registered instances whose driver is gone; return their pids."""
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

    Returns ray.init's context; its registry entry is removed by `stop_local_ray`. A place Ray cannot
    write to is one line first (check_ray_start).
    """
    check_ray_start()
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
    global _registered
    ray.shutdown()
    unregister(_registered)
    _registered = None


def prepare_ray_start() -> None:
    """Prepare a local Ray start: quiet notices that do not apply, trials at normal priority."""
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR
    )
    logging.getLogger("ray.tune.tune").setLevel(logging.ERROR)  # its resume hint is Ray's, not ours
    # Ray starts workers at nice 15 to keep its own services responsive; here the trials are the
    # work, and at 15 they get a fraction of a core whenever anything else runs on the machine.
    os.environ.setdefault("RAY_worker_niceness", "0")


def local_gpus() -> int:
    """The GPUs a Ray instance started here gets: Ray's own count (NVML, at most CUDA_VISIBLE_DEVICES)."""
    try:
        # lazy: Ray's private accelerator API; a Ray without it falls back to torch's count
        from ray._private.accelerators import get_accelerator_manager_for_resource

        manager = get_accelerator_manager_for_resource("GPU")
        count = int(manager.get_current_node_num_accelerators())
        visible = manager.get_current_process_visible_accelerator_ids()
        return min(count, len(visible)) if visible is not None else count
    except Exception:  # an older or newer Ray
        import torch  # lazy: only when Ray cannot tell

        return torch.cuda.device_count()


def local_resources() -> dict[str, float]:
    """What a local Ray instance (start_local_ray, as `capsearch run` starts it) offers a trial."""
    return {"CPU": float(os.cpu_count() or 1), "GPU": float(local_gpus())}


def check_resources(spec: Spec, have: Mapping[str, float] | None = None) -> None:
    """Refuse a spec whose trials ask for more CPUs or GPUs than the Ray cluster has (`have`: what a
    local instance started here would have, checked before it starts, as `validate` checks it)."""
    local = have is not None
    have = have if have is not None else ray.cluster_resources()
    for key, want in (("CPU", spec.resources.cpu), ("GPU", spec.resources.gpu)):
        if want > have.get(key, 0):
            where = (
                "this machine has" if local else "the Ray cluster has"
            ) + f" {have.get(key, 0):g}"
            if local:
                where += " (without --address the search starts Ray here)"
            raise UserError(
                f"resources.{key.lower()}: a trial asks for {want:g} but {where}; lower it or "
                "join a bigger cluster with --address"
            )


def check_ray_start() -> None:
    """Refuse, with one line, to start a local Ray instance where it cannot write: its temp folder
    (RAY_TMPDIR, TMPDIR or /tmp, then ray/) and, where no token exists yet, ~/.ray/ (a local
    ray.init turns token authentication on and saves a new token there). Ray itself would fail
    inside its start-up with a traceback."""
    temp = Path(ray_temp_dir())
    why = unwritable(temp)
    if why is not None:
        raise UserError(
            f"cannot start Ray here: its temp folder {temp} {why}; set RAY_TMPDIR to a folder you "
            "can write to"
        )
    if os.environ.get("RAY_AUTH_MODE") is not None or _token_exists():
        return
    folder = Path.home() / ".ray"
    why = unwritable(folder)
    if why is not None:
        raise UserError(
            f"cannot start Ray here: it saves a new token in {folder / 'auth_token'}, and {folder} "
            f"{why} (HOME={Path.home()}); set HOME to a folder you can write to"
        )


def ray_temp_dir() -> str:
    """The folder a local Ray instance writes its sessions to (RAY_TMPDIR, TMPDIR or /tmp, then ray)."""
    try:
        from ray._common.utils import get_default_ray_temp_dir  # lazy: Ray's private API

        return get_default_ray_temp_dir()
    except ImportError:  # an older or newer Ray: its documented rule
        base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
        return os.path.join(base, "ray")


def _token_exists() -> bool:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return Path(path).is_file() if path else (Path.home() / ".ray" / "auth_token").is_file()


def connect(address: str | None, dashboard: bool, console: Any) -> bool:
    """Join a cluster (--address) or start a local one with a dashboard; False if neither was asked."""
    if address is None and not dashboard:
        return False
    prepare_ray_start()
    quiet = {"log_to_driver": False, "logging_level": "WARNING"}
    explicit = address is not None and address != "auto"
    if explicit:
        _check_reachable(address)
        _token_mode_for_this_machine(address)
    try:
        if address is not None:
            context = ray.init(address=address, **quiet)
        else:
            context = start_local_ray(
                console,
                num_cpus=os.cpu_count(),
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                dashboard_port=_free_port(),
                **quiet,
            )
    except ConnectionError as exc:
        hint = _token_hint(address) if explicit else ""
        raise UserError(f"cannot reach a Ray cluster at {address}: {exc}{hint}") from None
    if dashboard:
        url = dashboard_url(context)
        if url is None:
            console.print("Ray's dashboard is not running on this cluster")
        else:
            note = ""
            if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
                # ray.init turns token authentication on for a local dashboard: the page asks once.
                note = (
                    " (token authentication: paste the output of `ray get-auth-token` when asked)"
                )
            console.print(f"Ray dashboard: {url}{note}")
    return True


def _check_reachable(address: str) -> None:
    """Fail in seconds, not minutes (Ray retries), when HOST:PORT does not answer."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return  # ray://... and other forms: leave them to Ray
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise UserError(f"cannot reach a Ray cluster at {address}: {exc}") from None


def _token_mode_for_this_machine(address: str) -> None:
    """Send this machine's Ray token to a cluster on this machine, as Ray does for `--address auto`.

    A `ray start --head` on a machine that holds a token (~/.ray/auth_token, which any local
    `ray.init` writes, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH) turns token authentication on. Ray's
    driver sends the token unasked only when it finds the cluster itself (`auto`); for an explicit
    address it sends none unless RAY_AUTH_MODE=token, and the connection fails after ~20 s. A
    HOST:PORT of this very machine is the `auto` case written out, so it gets `auto`'s rule; a
    token is never sent to another machine unasked (that would hand it to whoever listens there).
    """
    if os.environ.get("RAY_AUTH_MODE") is not None or not _is_this_machine(address):
        return
    try:  # Ray's own rule for `auto` (Ray 2.60): token mode if a token is found locally
        from ray._private.authentication.authentication_token_setup import (  # lazy: Ray >= 2.60
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray without token authentication: nothing to send
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _is_this_machine(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    try:
        ips = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    own = {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs}
    return all(ipaddress.ip_address(ip).is_loopback or ip in own for ip in ips)


def _token_hint(address: str) -> str:
    """What to do when an explicit address refused the connection: most often a missing token."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        how = "check that this machine has the head's token"
    else:
        how = "set RAY_AUTH_MODE=token and give this machine the head's token"
    return (
        f"; if the cluster uses token authentication (a `ray start --head` on a machine with a "
        f"token turns it on), {how}: copy the head's ~/.ray/auth_token here, or set "
        "RAY_AUTH_TOKEN to what `ray get-auth-token` prints on the head"
    )


def dashboard_url(context: Any) -> str | None:
    """The dashboard's http URL from a ray.init context, or None."""
    url = getattr(context, "dashboard_url", None)
    if not url:
        return None
    return url if url.startswith("http") else f"http://{url}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
