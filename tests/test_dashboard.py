"""optuna-dashboard on a run's study: the documented command serves capsearch's trials over HTTP.

The study is made as a search makes it (capsearch.search.study and capsearch.search.space: baselines enqueued by
name, the define-by-run space, the user attributes the searcher stores), without training anything.
Skipped where optuna-dashboard is not installed (`pip install 'capsearch[dashboard]'`).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("optuna_dashboard")

ROOT = Path(__file__).resolve().parents[1]
METRICS = {"fid": 41.5, "amd": 0.12, "alignment": 0.6, "extracted": 1.0}


def _micro_study(run_dir: Path) -> dict[int, dict]:
    """RUN/optuna.db with two finished baselines and one failed trial; what each should show."""
    from optuna.trial import TrialState

    from capsearch.config import load_spec
    from capsearch.search.runs import prepare_run_dir
    from capsearch.search.space import define_space
    from capsearch.search.study import open_study, plan_trials

    spec = load_spec(ROOT / "search_spaces" / "tiny.yaml", ["search.num_samples=1"], False)
    run_dir = prepare_run_dir(spec, run_dir, resume=False)
    study = open_study(spec, run_dir)
    plan_trials(spec, study, run_dir)  # the baselines, enqueued with their names
    expected = {}
    for reward, status in ((0.25, "ok"), (-0.5, "ok"), (None, "error")):
        trial = study.ask()  # as Ray's OptunaSearch asks, then runs the define-by-run space
        define_space(trial, spec.search_space)
        # the attributes capsearch.search.loop.TrialSearch stores when a trial ends
        trial.set_user_attr("trial", f"t{trial.number:03d}")
        trial.set_user_attr("status", status)
        if reward is None:
            trial.set_user_attr("error", "RuntimeError: out of memory")
            study.tell(trial, state=TrialState.FAIL)
        else:
            for key, value in {**METRICS, "reward": reward}.items():
                trial.set_user_attr(key, value)
            study.tell(trial, reward)
        expected[trial.number] = {"params": trial.params, "reward": reward,
                                  "attrs": dict(trial.user_attrs)}  # fmt: skip
    return expected


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


@pytest.fixture
def dashboard(tmp_path):
    """`optuna-dashboard sqlite:///RUN/optuna.db --host 127.0.0.1 --port P` on a micro study."""
    expected = _micro_study(tmp_path / "run")
    port = _free_port()
    script = Path(sys.executable).with_name("optuna-dashboard")
    command = [str(script)] if script.is_file() else \
        [sys.executable, "-c", "from optuna_dashboard._cli import main; main()"]  # fmt: skip
    url = f"sqlite:///{tmp_path / 'run' / 'optuna.db'}"
    log = open(tmp_path / "dashboard.log", "w")
    proc = subprocess.Popen([*command, url, "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                _get(f"{base}/api/meta")
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    log.flush()
                    pytest.fail(
                        f"optuna-dashboard did not answer: {(tmp_path / 'dashboard.log').read_text()}"
                    )
                time.sleep(0.3)
        yield base, expected
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def test_the_dashboard_shows_the_trials_their_names_params_and_rewards(dashboard):
    base, expected = dashboard
    studies = _get(f"{base}/api/studies")["study_summaries"]
    assert [(s["study_name"], s["directions"]) for s in studies] == [("capsearch", ["maximize"])]
    detail = _get(f"{base}/api/studies/{studies[0]['study_id']}?after=0")
    trials = {t["number"]: t for t in detail["trials"]}
    assert len(trials) == 5  # the five baselines: three asked and told, two still waiting
    assert [trials[n]["state"] for n in range(5)] == ["Complete", "Complete", "Fail", "Waiting",
                                                      "Waiting"]  # fmt: skip
    for number, want in expected.items():
        got = trials[number]
        attrs = {a["key"]: a["value"] for a in got["user_attrs"]}
        assert attrs["trial"] == f"t{number:03d}" and attrs["baseline"] == want["attrs"]["baseline"]
        assert attrs["status"] == want["attrs"]["status"]
        params = {p["name"]: p["param_external_value"] for p in got["params"]}
        assert params == {k: str(v) for k, v in want["params"].items()} and params
        if want["reward"] is None:
            assert got.get("values") is None and attrs["error"].startswith("RuntimeError")
        else:
            assert got["values"] == [want["reward"]] and float(attrs["fid"]) == METRICS["fid"]
    assert [attrs["value"] for attrs in trials[0]["user_attrs"] if attrs["key"] == "baseline"] == [
        "freeze"
    ]
    best = detail["best_trials"]
    assert [t["number"] for t in best] == [0]  # the higher reward
