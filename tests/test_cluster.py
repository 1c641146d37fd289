"""Joining a Ray cluster with --address: token authentication, and trials spread over its nodes.

The slow test starts a real two-node cluster on the loopback (a head and a second node, each one CPU,
with its own temporary folder and ports) the way docs/search.md tells it, runs a micro search on it
through `capsearch run --address 127.0.0.1:PORT`, and stops only the nodes it started (their process
groups), never another Ray instance on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from test_search import MICRO

from capsearch.errors import UserError
from capsearch.search.runs import load_trials

RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_ports() -> list[str]:
    """Ports of one node's own services: free ones, so two nodes (and other Ray instances) fit."""
    flags = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"]  # fmt: skip
    ports = [arg for flag in flags for arg in (flag, str(_free_port()))]
    return [*ports, "--min-worker-port", "0", "--max-worker-port", "0"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    return {**env, **extra}


def _start_node(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    cmd = [
        RAY,
        "start",
        *args,
        "--num-cpus",
        "1",
        "--block",
        "--disable-usage-stats",
        *_node_ports(),
    ]
    with open(log, "w") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM a node's process group (Ray drains it), then SIGKILL whatever is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=40)


def _wait_for(what: str, ready, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not ready():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.mark.slow
def test_a_search_joins_a_token_cluster_by_address_and_uses_both_nodes(tmp_path):
    from capsearch.metrics.scorer import CONFIG_FILE, SCORER_DIR

    if not (SCORER_DIR / CONFIG_FILE).is_file():
        pytest.skip("the phantom scorer is not installed (capsearch pretrain scorer)")
    token = Path.home() / ".ray" / "auth_token"
    if not token.is_file() and "RAY_AUTH_TOKEN" not in os.environ:
        # what any local ray.init does: a token in ~/.ray/auth_token (the head then uses token mode)
        subprocess.run([RAY, "get-auth-token", "--generate"], check=True, capture_output=True)
    temp = tempfile.mkdtemp(prefix="cs")  # Ray's socket paths must stay short: not under tmp_path
    port = _free_port()
    nodes: list[subprocess.Popen] = []
    try:
        # the head: `ray start --head --port P` (token mode: a token exists on this machine)
        head_args = ["--head", "--port", str(port), "--include-dashboard", "false",
                     "--ray-client-server-port", str(_free_port()), "--temp-dir", temp]  # fmt: skip
        nodes.append(_start_node(head_args, tmp_path / "head.log", _env()))
        _wait_for("the head", lambda: _answers(port))
        # a second node: `RAY_AUTH_MODE=token ray start --address HEAD:P` (it needs the mode set)
        nodes.append(_start_node(["--address", f"127.0.0.1:{port}", "--temp-dir", temp],
                                 tmp_path / "worker.log", _env(RAY_AUTH_MODE="token")))  # fmt: skip
        _wait_for("the second node", lambda: "Ray runtime started" in
                  (tmp_path / "worker.log").read_text())  # fmt: skip
        assert all(p.poll() is None for p in nodes), (tmp_path / "worker.log").read_text()[-2000:]
        spec = json.loads(json.dumps(MICRO))
        spec["baselines"]["methods"] = ["difffit"]  # two trials that train, one on each node
        spec["search"].update(num_samples=1, concurrency=2)
        spec["resources"] = {"cpu": 1}
        spec["final"] = {"enabled": False}
        (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(spec))
        run = tmp_path / "run"
        started = time.time()
        # the driver as a user runs it: RAY_AUTH_MODE unset, the token in ~/.ray/auth_token
        proc = subprocess.run(
            [sys.executable, "-m", "capsearch", "run", str(tmp_path / "cluster.yaml"), "--out",
             str(run), "--address", f"127.0.0.1:{port}"],
            env=_env(), capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        records = load_trials(run)
        assert len(records) == 2 and all(r.status == "ok" for r in records), records
        nodes_used = {r.node for r in records}
        assert len(nodes_used) == 2 and None not in nodes_used  # one trial on each node
        assert (run / "report.md").is_file()
        print(f"two-node search: {time.time() - started:.1f} s")
    finally:
        for node in reversed(nodes):
            _stop(node)
        shutil.rmtree(temp, ignore_errors=True)


def test_a_refused_explicit_address_says_how_to_give_the_token(monkeypatch):
    """Another machine's cluster refusing us: one line naming RAY_AUTH_MODE=token and the token."""
    import ray
    from rich.console import Console

    from capsearch.search import cluster

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setattr(cluster, "_check_reachable", lambda address: None)

    def refused(**kwargs):
        raise ConnectionError("Failed to connect to Ray cluster at 198.51.100.7:6379")

    monkeypatch.setattr(ray, "init", refused)
    with pytest.raises(UserError) as caught:
        cluster.connect("198.51.100.7:6379", False, Console())
    text = str(caught.value)
    assert "\n" not in text and text.startswith("cannot reach a Ray cluster at 198.51.100.7:6379")
    assert "RAY_AUTH_MODE=token" in text and "ray get-auth-token" in text
    assert "~/.ray/auth_token" in text and "RAY_AUTH_TOKEN" in text
    assert "RAY_AUTH_MODE" not in os.environ  # this machine's token is not sent to another one


def test_an_unreachable_address_fails_in_seconds_with_one_line():
    from rich.console import Console

    from capsearch.search.cluster import connect as connect_ray

    started = time.time()
    with pytest.raises(UserError, match=r"^cannot reach a Ray cluster at 127\.0\.0\.1:\d+: "):
        connect_ray(f"127.0.0.1:{_free_port()}", False, Console())
    assert time.time() - started < 10


def test_only_addresses_of_this_machine_count_as_local():
    from capsearch.search.cluster import _is_this_machine

    assert _is_this_machine("127.0.0.1:6379") and _is_this_machine("localhost:6379")
    assert not _is_this_machine("198.51.100.7:6379")
    assert not _is_this_machine("no-such-host.invalid:6379")
