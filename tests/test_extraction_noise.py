"""experiments/extraction_noise.py: the attack on one saved model over seeds, kept as it goes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import extraction_noise  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run folder with phantom data (a memorisation subset) and one trial's delta (tiny:random)."""
    from capsearch.methods import apply_methods
    from capsearch.models.delta import save_delta
    from capsearch.models.load import load_pipeline
    from capsearch.search.runs import write_json
    from capsearch.worlds.phantom import write_phantom_dataset

    run = tmp_path_factory.mktemp("noise") / "run"
    write_phantom_dataset(
        run / "data", patients=16, size=32, seed=0, dup_fraction=0.2, dup_copies=3
    )
    folder = run / "trials" / "t000"
    unet = load_pipeline("tiny:random").unet
    applied = apply_methods(unet, [{"method": "difffit", "units": ["mid_block"]}])
    save_delta(unet, folder / "delta", applied=applied, base_model="tiny:random")
    record = {"trial": "t000", "number": 0, "status": "ok", "baseline": "difffit",
              "model": "tiny:random"}  # fmt: skip
    write_json(folder / "result.json", record)
    return run


def test_each_seed_is_probed_once_and_kept(run, tmp_path, capsys):
    out = tmp_path / "noise"
    assert (
        extraction_noise.main([f"{run}:t000", "--seeds", "0", "1", "--n", "3", "--out", str(out)])
        == 0
    )
    data = json.loads(out.with_suffix(".json").read_text())
    per_seed = data["results"]["run/t000 (difffit)"]
    assert sorted(per_seed) == ["0", "1"]
    for probe in per_seed.values():
        assert 0 <= probe["extracted"] <= probe["of"] and 0 <= probe["nearest_own"] <= 1
    assert data["command"].startswith("python experiments/extraction_noise.py ")
    table = out.with_suffix(".md").read_text()
    assert "| run/t000 (difffit) | " in table and "| seed 0 | seed 1 |" in table
    # run again: the finished probes are kept, none runs twice
    capsys.readouterr()
    extraction_noise.main([f"{run}:t000", "--seeds", "0", "1", "--n", "3", "--out", str(out)])
    assert "seed" not in capsys.readouterr().out
    assert (
        json.loads(out.with_suffix(".json").read_text())["results"]["run/t000 (difffit)"]
        == per_seed
    )
    # the same seed gives the same samples: the spread over seeds is sampling, not nondeterminism
    twin = tmp_path / "twin"
    extraction_noise.main([f"{run}:t000", "--seeds", "1", "--n", "3", "--out", str(twin)])
    probe = json.loads(twin.with_suffix(".json").read_text())["results"]["run/t000 (difffit)"]["1"]
    assert {k: v for k, v in probe.items() if k != "seconds"} == {
        k: v for k, v in per_seed["1"].items() if k != "seconds"
    }


@pytest.mark.parametrize("arg, message", [("nowhere", "expected RUN:tNNN"),
                                          ("{run}:t009", "holds no delta")])  # fmt: skip
def test_a_bad_trial_is_one_line(run, tmp_path, capsys, arg, message):
    assert extraction_noise.main([arg.format(run=run), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
