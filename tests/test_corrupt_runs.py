"""Corrupt run folders: status, report, export and run --resume on a finished run with one file damaged.

Each command gives exit 0 with the good trials intact, or exit 2 with one line naming the broken file;
never a traceback, and nothing under trials/ is rewritten. The finished run is built without Ray or
training (records, deltas of tiny:random, an Optuna study that holds its trials, generated data).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import sqlite3
from pathlib import Path

import pytest
import yaml
from conftest import mid_block_groups

from capsearch.cli import main

SPEC = {
    "name": "corrupt",
    "model": "tiny:random",
    "data": {"phantom": {"patients": 6, "size": 32, "held_out_images": 4}},
    "train": {"steps": 2},
    "final": {"top_k": 1},
    "search": {"num_samples": 1},
    "baselines": {"methods": ["freeze", "difffit"]},
    "space": {
        "groups": [
            *mid_block_groups(),
            {"name": "rest",
             "units": ["down_blocks", "up_blocks", "conv_in", "time_embedding", "conv_out"],
             "methods": {"frozen": {}, "difffit": {}}},
        ]
    },
}  # fmt: skip


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> tuple[Path, Path]:
    """A finished run (t000 Freeze, t001 DiffFit, t002 searched; all ok, all re-evaluated) and its spec."""
    from capsearch.config import load_spec
    from capsearch.methods import apply_methods
    from capsearch.models.delta import save_delta
    from capsearch.models.load import load_pipeline
    from capsearch.search.inputs import prepare_data
    from capsearch.search.loop import open_study, plan_trials
    from capsearch.search.runs import prepare_run_dir, trial_dir, write_json
    from capsearch.search.space import define_space
    from capsearch.search.trial import build_plan

    root = tmp_path_factory.mktemp("template")
    spec_path = root / "corrupt.yaml"
    spec_path.write_text(yaml.safe_dump(SPEC))
    spec = load_spec(spec_path)
    run = prepare_run_dir(spec, root / "run", resume=False)
    prepare_data(spec, run)
    study = open_study(spec, run)
    plan_trials(spec, study, run)
    for number in range(3):
        trial = study.ask()
        baseline = define_space(trial, spec.search_space).get("baseline")
        plan = build_plan(spec, dict(trial.params), baseline, number, run)
        folder = trial_dir(run, number)
        (folder / "final").mkdir(parents=True)
        record = {"version": 2, "trial": folder.name, **plan.model_dump(mode="json")}
        write_json(folder / "params.json", {**record, "status": "running"})
        unet = load_pipeline("tiny:random").unet
        applied = apply_methods(unet, plan.method_spec or [{"method": "freeze", "units": []}])
        save_delta(unet, folder / "delta", applied=applied, base_model="tiny:random")
        metrics = {"fid": 100.0 - number, "amd": 0.1, "alignment": 0.3, "extracted": 0,
                   "extracted_fraction": 0.0, "trainable_pct": 1.0}  # fmt: skip
        write_json(folder / "metrics.json", metrics)
        reward = -5.0 + number / 10
        write_json(folder / "result.json", {**record, "status": "ok", "metrics": metrics,
                                            "reward": reward, "steps": 2})  # fmt: skip
        write_json(folder / "final" / "result.json", {"trial": folder.name, "split": "test",
                   "seed": 1000, "metrics": metrics, "reward": reward})  # fmt: skip
        study.tell(trial, reward)
    return spec_path, run


def _assert_exported_t001(export: Path, run: Path) -> None:
    """The export holds --trial t001's delta (DiffFit), not another trial's."""
    from safetensors.torch import load_file

    got, want = (
        load_file(f / "delta" / "delta.safetensors") for f in (export, run / "trials/t001")
    )
    assert got.keys() == want.keys() and got and all((got[k] == want[k]).all() for k in got)
    methods = json.loads((export / "delta" / "spec.json").read_text())["methods"]
    assert {e["method"] for e in methods} == {"difffit"}


def _cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under the folder: its SHA-256 and modification time."""
    return {
        str(p.relative_to(folder)): (
            hashlib.sha256(p.read_bytes()).hexdigest(),
            p.stat().st_mtime_ns,
        )
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _random_bytes(path: Path) -> None:
    path.write_bytes(random.Random(0).randbytes(path.stat().st_size))


def _rewrite(path: Path, change) -> None:
    """A record that still parses as JSON but no longer fits its schema."""
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


CORRUPTIONS = {
    "metrics-cut": lambda run: _cut(run / "trials" / "t001" / "metrics.json"),
    "result-cut": lambda run: _cut(run / "trials" / "t001" / "result.json"),
    # parses, but is no trial record: only a status left, or a status capsearch never writes
    "result-reduced": lambda run: _rewrite(
        run / "trials/t001/result.json", lambda r: {"status": "ok"}
    ),
    "result-bad-status": lambda run: _rewrite(
        run / "trials/t001/result.json", lambda r: {**r, "status": "finished"}
    ),
    # a final re-evaluation that fails its schema reads as none (as one cut short does)
    "final-reduced": lambda run: _rewrite(run / "trials/t001/final/result.json", lambda r: {}),
    "delta-deleted": lambda run: shutil.rmtree(run / "trials" / "t001" / "delta"),
    "study-random-bytes": lambda run: _random_bytes(run / "optuna.db"),
    "study-locked": None,  # another connection holds an exclusive transaction (below)
    "data-cut": lambda run: _cut(run / "data" / "metadata.jsonl"),
}
COMMANDS = ("status", "report", "export", "resume")
# (corruption, command) → the one error line's telling part; a pair not listed exits 0
REFUSED = {
    ("metrics-cut", "export"): "trials/t001/metrics.json is cut short or corrupt",
    ("result-cut", "export"): "trials/t001/result.json is cut short or corrupt",
    ("result-cut", "resume"): "trials/t001/result.json is cut short or corrupt",
    ("result-reduced", "export"): "trials/t001/result.json is cut short or corrupt (not a valid "
    "trial record: trial: Field required",
    ("result-reduced", "resume"): "trials/t001/result.json is cut short or corrupt",
    ("result-bad-status", "export"): "trials/t001/result.json is cut short or corrupt (not a valid "
    "trial record: status: Input should be",
    ("result-bad-status", "resume"): "trials/t001/result.json is cut short or corrupt",
    ("delta-deleted", "export"): "trial t001 has no delta (",
    ("study-random-bytes", "resume"): "optuna.db: file is not a database",
    ("study-locked", "resume"): "optuna.db: database is locked",
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_corrupt_run_folder_gives_exit_0_or_one_line(
    template, tmp_path, capsys, monkeypatch, corruption, command
):
    monkeypatch.setenv("COLUMNS", "200")  # the status table's last column is the status
    spec_path, original = template
    run = tmp_path / "run"
    shutil.copytree(original, run)
    lock = None
    if corruption == "study-locked":
        lock = sqlite3.connect(run / "optuna.db", isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")
    else:
        CORRUPTIONS[corruption](run)
    before = _snapshot(run / "trials")
    argv = {
        "status": ["status", str(run)],
        "report": ["report", str(run)],
        "export": ["export", str(run), "--trial", "t001", "--out", str(tmp_path / "export")],
        "resume": ["run", str(spec_path), "--out", str(run), "--resume"],
    }[command]
    try:
        code = main(argv)
    finally:
        if lock is not None:
            lock.close()
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert _snapshot(run / "trials") == before  # no trial lost or rewritten
    expected = REFUSED.get((corruption, command))
    if expected is not None:
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and expected in lines[0], (code, err)
        assert not (tmp_path / "export").exists()
        return
    assert code == 0, err
    if command == "status":
        counts = "1 corrupt, 2 ok" if corruption.startswith("result-") else "3 ok"
        assert f"{counts}; 3 planned (2 baselines)" in out
        for name, fid in (("t000", "100.00"), ("t002", "98.00")):
            assert fid in next(ln for ln in out.splitlines() if name in ln)
    elif command == "export":
        assert (tmp_path / "export" / "unet" / "config.json").is_file()
        _assert_exported_t001(tmp_path / "export", run)
    else:  # report, resume: report.md lists the good trials
        report = (run / "report.md").read_text()
        assert "| t000 | **Freeze (baseline)** |" in report and "| t002 |" in report
        if corruption.startswith("result-"):
            assert "- t001 (DiffFit): corrupt — " in report
        if corruption == "final-reduced":  # t001 is no finalist now: t000 and t002 are
            final = report.split("## Final re-evaluation")[1].split("\n## ")[0]
            assert "| t000 |" in final and "| t001 |" not in final
    if command == "resume" and corruption == "data-cut":  # generated again, the same bytes
        assert (run / "data" / "metadata.jsonl").read_bytes() == (
            original / "data" / "metadata.jsonl"
        ).read_bytes()


def test_a_damaged_record_is_shown_as_corrupt(template, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    _, original = template
    run = tmp_path / "run"
    shutil.copytree(original, run)
    _cut(run / "trials" / "t001" / "result.json")
    assert main(["status", str(run)]) == 0
    out = capsys.readouterr().out
    row = next(ln for ln in out.splitlines() if "t001" in ln)
    assert row.rstrip(" │").endswith("corrupt") and "1 corrupt, 2 ok; 3 planned" in out


def test_a_study_that_lost_its_trials_is_refused_on_resume(template, tmp_path, capsys):
    """An optuna.db deleted, or replaced by an older copy: new trials would overwrite t000..t002."""
    spec_path, original = template
    run = tmp_path / "run"
    shutil.copytree(original, run)
    before = _snapshot(run / "trials")
    (run / "optuna.db").unlink()
    assert main(["run", str(spec_path), "--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "optuna.db is missing but the run has trials" in err[0]
    with sqlite3.connect(original / "optuna.db") as src, sqlite3.connect(run / "optuna.db") as dst:
        src.backup(dst)
    with sqlite3.connect(run / "optuna.db") as db:  # the study as it was before its last trial
        db.execute("DELETE FROM trials WHERE number = 2")
    assert main(["run", str(spec_path), "--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds 2 trial(s) but the run has trials/t002" in err[0], err
    assert _snapshot(run / "trials") == before


def test_a_spec_edited_before_resume_is_refused(template, tmp_path, capsys):
    """Also in tests/test_bad_inputs.py (`run-resume-other-spec`, a changed --set)."""
    spec_path, original = template
    run = tmp_path / "run"
    shutil.copytree(original, run)
    before = _snapshot(run)
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump({**SPEC, "search": {"num_samples": 3}}))
    assert main(["run", str(edited), "--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the spec differs from the one" in err[0]
    assert err[0].endswith("was started with (at search.num_samples)")
    saved = yaml.safe_load((run / "spec.yaml").read_text())  # the run's own copy edited instead
    saved["train"]["steps"] = 3
    (run / "spec.yaml").write_text(yaml.safe_dump(saved))
    assert main(["run", str(spec_path), "--out", str(run), "--resume"]) == 2
    assert "(at train.steps)" in capsys.readouterr().err
    assert {k: v for k, v in _snapshot(run).items() if k != "spec.yaml"} == {
        k: v for k, v in before.items() if k != "spec.yaml"
    }
    assert json.loads((run / "trials" / "t001" / "result.json").read_text())["status"] == "ok"


def test_status_report_and_export_read_a_folder_a_search_holds(template, tmp_path, capsys):
    """A busy run folder (its lock held by a running search) is read, never refused or written to."""
    from capsearch.search.runlock import LOCK_FILE, RunLock

    _, original = template
    run = tmp_path / "run"
    shutil.copytree(original, run)
    with RunLock(run, resume=False):
        before = {k: v for k, v in _snapshot(run).items() if k != LOCK_FILE}
        assert main(["status", str(run)]) == 0
        assert main(["export", str(run), "--trial", "t001", "--out", str(tmp_path / "x")]) == 0
        _assert_exported_t001(tmp_path / "x", run)
        assert main(["report", str(run)]) == 0  # it writes report.md and its plots only
        written = (LOCK_FILE, "report.md", "pareto.png", "learning_curve.png")
        after = {k: v for k, v in _snapshot(run).items() if k not in written}
        assert after == {k: v for k, v in before.items() if k not in written}
        assert (run / LOCK_FILE).is_file()  # still the search's
    capsys.readouterr()
