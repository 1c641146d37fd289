"""The run folder's typed records (capsearch.search.records): every committed record loads, and a
record read and written back keeps its keys and values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from capsearch.search.records import (
    CORRUPT,
    RECORD_VERSION,
    CorruptRecord,
    FinalResult,
    SeedMean,
    SeedResult,
    TrialRecord,
    parse,
)
from capsearch.search.runs import (
    final_choice,
    load_trials,
    read_record,
    trial_dir,
    write_json,
    write_record,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
RUNS = sorted(p.parent for p in RESULTS.rglob("spec.yaml") if (p.parent / "trials").is_dir())
FILES = sorted(RESULTS.rglob("trials/t*/**/result.json")) + sorted(
    RESULTS.rglob("trials/t*/params.json")
)


def _model(path: Path) -> type[TrialRecord] | type[FinalResult] | type[SeedResult]:
    """The model of a record file by where it lies in its trial folder."""
    folder = path.parent.name
    if folder == "final":
        return FinalResult
    return SeedResult if folder.startswith("final_seed") else TrialRecord


def _same(a: dict, b: dict) -> bool:
    """Equal as JSON: the same keys and values, 0 and 0.0 told apart."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_the_committed_records_are_there():
    assert len(RUNS) >= 10 and len(FILES) >= 250, (len(RUNS), len(FILES))
    assert any(_model(f) is FinalResult for f in FILES)
    assert any("version" not in json.loads(f.read_text()) for f in FILES)  # version 1 is covered


@pytest.mark.parametrize("path", FILES, ids=[str(f.relative_to(RESULTS)) for f in FILES])
def test_every_committed_record_loads_and_writes_back_unchanged(path: Path):
    data = json.loads(path.read_text())
    record = parse(_model(path), data)
    assert _same(record.to_dict(), data)
    if isinstance(record, TrialRecord):
        assert record.status != CORRUPT and 1 <= record.version <= RECORD_VERSION


@pytest.mark.parametrize("run", RUNS, ids=[str(r.relative_to(RESULTS)) for r in RUNS])
def test_every_committed_run_reads_without_a_corrupt_trial(run: Path):
    records = load_trials(run, finished_only=False)
    assert records and all(isinstance(r, TrialRecord) for r in records)
    assert [r.status for r in records if r.status == CORRUPT] == []
    assert all(r.folder.parent == run / "trials" for r in records)
    finals = [r.final for r in records if r.final is not None]
    folders = {p.parent.parent.name for p in run.glob("trials/t*/final/result.json")}
    assert len(finals) == len(folders)  # no final re-evaluation was dropped as unreadable
    assert all(isinstance(f, FinalResult) and f.metrics for f in finals)


def test_a_record_of_any_version_keeps_its_keys_and_the_reader_adds_its_own(tmp_path):
    folder = trial_dir(tmp_path, 3)
    folder.mkdir(parents=True)
    old = {"trial": "t003", "number": 3, "params": {"lr": 1e-4}, "method_spec": [],
           "a_key_of_an_older_capsearch": [1, 2], "metrics": {"fid": 80.0, "extracted": 0}}  # fmt: skip
    write_json(folder / "params.json", old)
    (record,) = load_trials(tmp_path, finished_only=False)
    assert record.version == 1 and record.status == "running" and record.folder == folder
    assert record.model_extra == {"a_key_of_an_older_capsearch": [1, 2]}
    assert record.value("fid") == 80.0 and record.value("extracted") == 0.0
    assert isinstance(record.metrics["extracted"], int)  # kept as written, not made a float
    # what a resumed run writes back for it: the same keys and values, and what the reader set
    again = record.to_dict()
    assert _same({k: v for k, v in again.items() if k not in ("version", "status", "dir")}, old)
    assert (again["version"], again["status"], again["dir"]) == (1, "running", str(folder))
    # read as the file holds it (no reader's keys), as a stopped trial's record is written from it
    assert _same(read_record(folder / "params.json").to_dict(), old)


@pytest.mark.parametrize(
    "data, why",
    [
        ({"status": "ok"}, "trial: Field required"),
        ({"trial": "t001", "number": 1, "status": "finished"}, "status: Input should be"),
        ({"trial": "t001", "number": "1"}, "number: Input should be a valid integer"),
        ({"trial": "t001", "number": 1, "version": 3}, "version 3: this capsearch reads 1 to 2"),
        ({"trial": "t001", "number": 1, "metrics": {"fid": "80"}}, "metrics.fid"),
        ({"trial": "t001", "number": 1, "status": "corrupt"}, "names what is wrong"),
        ([1, 2], "not a JSON object"),
    ],
)
def test_a_record_that_fails_its_schema_is_corrupt_with_a_reason(data, why):
    with pytest.raises(CorruptRecord) as exc:
        parse(TrialRecord, data)
    assert why in str(exc.value) and "\n" not in str(exc.value)


def test_a_damaged_record_that_still_parses_reads_as_corrupt_with_its_plan(tmp_path):
    folder = trial_dir(tmp_path, 1)
    folder.mkdir(parents=True)
    plan = {"version": 2, "trial": "t001", "number": 1, "baseline": "difffit", "params": {}}
    write_json(folder / "params.json", {**plan, "status": "running"})
    write_json(folder / "result.json", {**plan, "status": "ok", "reward": "high"})
    (record,) = load_trials(tmp_path)  # a corrupt trial counts as finished: never rerun
    assert record.status == CORRUPT and record.baseline == "difffit"
    assert record.error.startswith(
        f"{folder / 'result.json'} is cut short or corrupt (not a valid "
    )
    assert "reward: Input should be a valid number" in record.error


def test_a_writer_never_leaves_a_record_a_reader_would_call_corrupt(tmp_path):
    path = tmp_path / "result.json"
    with pytest.raises(CorruptRecord, match="number: Field required"):
        write_record(path, {"trial": "t000", "status": "ok"})
    assert not path.exists()
    written = write_record(path, {"trial": "t000", "number": 0, "status": "ok", "steps": 4})
    assert written == read_record(path) and written.steps == 4
    with pytest.raises(CorruptRecord, match="seed: Field required"):
        write_record(tmp_path / "final.json", {"split": "test", "metrics": {}}, FinalResult)


def test_final_choice_is_the_final_itself_or_the_mean_over_seeds():
    own = FinalResult(split="test", seed=1000, metrics={"fid": 80.0, "kid": 1.0}, reward=-4.0)
    assert final_choice(own) is own
    other = SeedResult(split="test", seed=1000, train_seed=1, metrics={"fid": 90.0}, reward=-5.0)
    mean = final_choice(own.model_copy(update={"seeds": [other]}))
    assert isinstance(mean, SeedMean) and mean.n_seeds == 2
    assert mean.metrics == {"fid": 85.0} and mean.reward == -4.5  # kid: not on every seed
    assert mean.value("kid") is None and mean.value("fid") == 85.0
