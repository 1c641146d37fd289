"""experiments/kept_deltas.py: every kept delta of a run evaluated after training, with its step's probe."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import kept_deltas  # noqa: E402

EVAL = {"n_prompts": 2, "n_per_prompt": 2, "steps": 2, "extraction_prompts": 3, "extraction_n": 3,
        "strength_prompts": 1, "strength_n": 1, "bootstrap": 100, "noise_floor_repeats": 2,
        "reference_ratio": 1.0}  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run folder: phantom data, its spec, and one DiffFit trial trained 4 steps that kept its
    delta at step 2 and probed the held-out loss at steps 2 and 4."""
    from capsearch.models.load import load_pipeline
    from capsearch.search.runs import write_json
    from capsearch.training.loop import TrainSettings, finetune
    from capsearch.worlds.phantom import write_phantom_dataset

    run = tmp_path_factory.mktemp("kept") / "run"
    write_phantom_dataset(run / "data", patients=16, size=32, seed=0, dup_fraction=0.2,
                          dup_copies=3, held_out_images=8)  # fmt: skip
    spec = {"model": "tiny:random", "train": {"steps": 4},
            "space": {"groups": [{"name": "mid", "units": "mid_block.resnets",
                                  "methods": {"frozen": {}, "difffit": {}}}]},
            "evaluate": EVAL, "final": {"split": "test", "seed": 7}}  # fmt: skip
    (run / "spec.yaml").write_text(yaml.safe_dump(spec))
    folder = run / "trials" / "t000"
    cfg = TrainSettings(steps=4, batch_size=4, lr=1e-2, probe_every=2, keep_deltas_every=2)
    entry = [{"method": "difffit", "units": ["mid_block.resnets"]}]
    finetune(load_pipeline("tiny:random"), entry, run / "data", cfg, out_dir=folder, quiet=True)
    write_json(folder / "result.json", {"trial": "t000", "number": 0, "status": "ok",
                                        "baseline": "difffit", "model": "tiny:random"})  # fmt: skip
    return run


def test_each_kept_point_is_evaluated_with_its_steps_probe(run, tmp_path):
    from capsearch.metrics.evaluate import evaluate
    from capsearch.models.delta import load_delta
    from capsearch.models.load import load_pipeline
    from capsearch.search.runs import read_run_spec

    out = tmp_path / "matched"
    assert kept_deltas.main([str(run), "--out", str(out)]) == 0
    rows = json.loads((out / "matched.json").read_text())["rows"]
    assert [(r["trial"], r["method"], r["step"]) for r in rows] == [
        ("t000", "difffit", 2), ("t000", "difffit", 4)]  # fmt: skip
    probes = [json.loads(line)["probe"] for line in
              (run / "trials/t000/train_log.jsonl").read_text().splitlines() if '"probe"' in line]  # fmt: skip
    assert [r["heldout_loss"] for r in rows] == [p["heldout_loss"] for p in probes]
    # each row is the evaluation of the delta kept at its step, with the final stage's settings
    spec = read_run_spec(run)
    settings = spec.final.settings(spec.evaluate).model_copy(
        update={"cache_dir": str(tmp_path / "c")}
    )
    assert settings.split == "test" and settings.seed == 7
    for row, delta in zip(rows, ["deltas/step000002", "delta"]):
        pipe = load_pipeline("tiny:random")
        pipe.unet = load_delta(pipe.unet, run / "trials/t000" / delta)
        direct = evaluate(pipe, run / "data", settings)
        assert row["fid"] == pytest.approx(direct["fid"], rel=1e-6)
        assert row["extracted"] == direct["extracted"]
        assert row["nearest_own"] == pytest.approx(direct["nearest_own"], rel=1e-6)
    assert rows[0]["fid"] != rows[1]["fid"]  # two different models, not one evaluated twice
    assert 0 < (out / "matched.png").stat().st_size < 150_000
    table = (out / "matched.md").read_text()
    assert "python experiments/kept_deltas.py" in table and table.count("| t000 | difffit |") == 2
    # again: every point is read back, nothing evaluated twice
    stamp = (out / "t000/step000002/metrics.json").stat().st_mtime_ns
    assert kept_deltas.main([str(run), "--out", str(out)]) == 0
    assert (out / "t000/step000002/metrics.json").stat().st_mtime_ns == stamp


def test_a_folder_that_is_not_a_run_is_one_line(tmp_path, capsys):
    assert kept_deltas.main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 1
