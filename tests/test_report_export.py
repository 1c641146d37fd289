"""Report, status and export on a run folder the test builds itself (tiny:random, no search needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import mid_block_groups

from capsearch.cli import main
from capsearch.export.trial import select_trial
from capsearch.reporting.report import write_report
from capsearch.search.runs import load_trials, trial_dir, write_json

SPEC = {
    "name": "synthetic",
    "model": "tiny:random",
    "evaluate": {"steps": 3, "guidance": 2.0},
    "baselines": {"methods": ["freeze", "difffit"]},
    "space": {"groups": mid_block_groups()},
}
PROMPTS = ["small left pleural effusion", "no acute cardiopulmonary process"]


def metrics(fid: float, amd: float, extracted: int, pct: float) -> dict:
    return {"fid": fid, "amd": amd, "alignment": 0.5, "extracted": extracted,
            "extracted_fraction": extracted / 8, "trainable_pct": pct}  # fmt: skip


def add_trial(run: Path, number: int, status: str, baseline: str | None, m: dict | None,
              reward: float | None, spec_entries: list | None = None) -> Path:  # fmt: skip
    folder = trial_dir(run, number)
    folder.mkdir(parents=True)
    record = {"trial": folder.name, "number": number, "baseline": baseline, "status": status,
              "params": {}, "method_spec": spec_entries or [], "train": {"lr": 1e-4, "steps": 4,
              "mitigations": []}, "groups": {"attn": "difffit", "res": "frozen"}}  # fmt: skip
    if m is not None:
        record["metrics"] = m
    if reward is not None:
        record["reward"] = reward
    if status == "error":
        record["error"] = "RuntimeError: out of memory\nmore"
    write_json(folder / "result.json", record)
    return folder


@pytest.fixture
def run(tmp_path):
    """A finished run: two baselines, two searched trials (one failed), one still running."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    add_trial(run, 0, "ok", "freeze", metrics(300.0, 0.8, 0, 0.0), -4.0)
    add_trial(run, 1, "ok", "difffit", metrics(15.0, 0.06, 6, 0.5), -2.5)
    add_trial(run, 2, "ok", None, metrics(12.0, 0.07, 4, 0.3), -1.9)
    add_trial(run, 3, "error", None, None, None)
    folder = trial_dir(run, 4)
    folder.mkdir(parents=True)
    write_json(folder / "params.json", {"trial": "t004", "number": 4, "status": "running"})
    return run


def test_report_has_paper_table_plot_best_config_and_failures(run):
    path = write_report(run)
    text = path.read_text()
    assert (
        "| trial | method | FID ↓ | KID ↓ | AMD ↑ | image-text ↑ | extracted ↓ | own-image NN ↓ | trainable % "
        "| reward ↑ |" in text
    )
    rows = [line for line in text.splitlines() if line.startswith("| t00")]
    assert rows[0].startswith("| t000 | **Freeze (baseline)** | 300.00 | – | 0.800 |")
    assert rows[1].startswith("| t001 | **DiffFit (baseline)** | 15.00")
    assert "| t002 | attn=difffit | 12.00 | – | 0.070 | 0.50 | 4 | – | 0.300 | -1.900 |" in text
    assert (
        "t003" not in "\n".join(rows[:3]) and "t004" not in text
    )  # failed listed apart, running not
    assert "- t003 (attn=difffit): error — RuntimeError: out of memory" in text
    assert (run / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    best = text.split("## Best configuration")[1]
    assert "Trial t002" in best
    snippet = yaml.safe_load(best.split("```yaml")[1].split("```")[0])
    assert snippet == {"methods": [], "train": {"lr": 1e-4, "steps": 4}, "mitigations": []}
    assert "[samples.png](trials/t001/samples.png)" in text


def test_pareto_mode_marks_the_front(run):
    spec = dict(SPEC, objective={"mode": "pareto", "pareto": ["fid", "amd"]})
    (run / "spec.yaml").write_text(yaml.safe_dump(spec))
    text = write_report(run).read_text()
    table = text.split("## Results")[1].split("\n## ")[0]
    rows = {
        line.split(" | ")[0][2:]: line for line in table.splitlines() if line.startswith("| t00")
    }
    # Freeze (best AMD) and t002 (best FID) are non-dominated; DiffFit is dominated by t002
    assert rows["t000"].endswith("★ |") and rows["t002"].endswith("★ |")
    assert not rows["t001"].endswith("★ |")


def test_status_and_report_commands(run, capsys):
    assert main(["status", str(run)]) == 0
    out = capsys.readouterr().out
    assert "t004" in out and "running" in out and "Freeze" in out
    assert "1 error, 3 ok, 1 running; 10 planned (2 baselines)" in out
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out == f"wrote {run / 'report.md'}\n"
    report = (run / "report.md").read_text()  # the run given, its trials in the table
    assert (
        report.startswith("# capsearch report: synthetic")
        and "| t002 | attn=difffit | 12.00 |" in report
    )
    assert main(["status", str(run / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_select_trial(run):
    records = load_trials(run)
    assert select_trial(records).number == 2
    assert select_trial(records, "t001").baseline == "difffit"
    assert select_trial(records, "1").number == 1
    assert select_trial(records, "freeze").number == 0


def test_export_errors_are_one_line(run, tmp_path, capsys):
    assert main(["export", str(run), "--trial", "t003", "--out", str(tmp_path / "e")]) == 2
    assert "did not finish successfully" in capsys.readouterr().err
    assert main(["export", str(run), "--trial", "t009", "--out", str(tmp_path / "e")]) == 2
    assert "no trial 't009'" in capsys.readouterr().err
    assert main(["export", str(run), "--trial", "t002", "--out", str(tmp_path / "e")]) == 2
    assert "has no delta" in capsys.readouterr().err


def test_export_loads_with_stock_diffusers_and_reproduces_the_samples(tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    from capsearch.methods import apply_methods
    from capsearch.models.delta import save_delta
    from capsearch.models.load import load_pipeline
    from capsearch.models.sampling import generate

    run = tmp_path / "run"
    run.mkdir()
    (run / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    entries = [{"method": "difffit", "units": ["mid_block.attentions"]},
               {"method": "lora", "units": ["mid_block.resnets"], "rank": 2}]  # fmt: skip
    pipe = load_pipeline("tiny:random")
    applied = apply_methods(pipe.unet, entries)
    torch.manual_seed(3)
    with torch.no_grad():  # a "trained" delta: move every trainable tensor away from its init
        for p in pipe.unet.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    folder = add_trial(run, 5, "ok", None, metrics(20.0, 0.1, 1, 0.4), -2.0, entries)
    save_delta(pipe.unet, folder / "delta", applied=applied, base_model="tiny:random")
    trial_samples = generate(pipe, PROMPTS, n_per_prompt=2, steps=3, guidance=2.0, seed=5)

    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out)]) == 0, capsys.readouterr().err
    assert {p.name for p in out.iterdir()} >= {"unet", "delta", "method_spec.yaml", "README.md"}
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers\nbase_model: tiny:random")
    assert "| FID ↓ | 20.00 | – |" in card
    assert "no final re-evaluation" in card
    seeds = card.split("## Seeds")[1].split("\n## ")[0]  # a record without its seeds says so
    assert seeds.strip().splitlines() == [
        "- Training seed of these weights: not recorded (`train.seed`).",
        "- Evaluated once, by the search: a split and sampling seed the record does not hold.",
    ]
    assert yaml.safe_load((out / "method_spec.yaml").read_text())["methods"] == entries

    fresh = load_pipeline("tiny:random")
    fresh.unet = UNet2DConditionModel.from_pretrained(out / "unet")
    assert type(fresh.unet) is UNet2DConditionModel
    exported = generate(fresh, PROMPTS, n_per_prompt=2, steps=3, guidance=2.0, seed=5)
    base = generate(
        load_pipeline("tiny:random"), PROMPTS, n_per_prompt=2, steps=3, guidance=2.0, seed=5
    )
    assert not torch.allclose(base, trial_samples, atol=1e-3)  # the delta changes the samples...
    torch.testing.assert_close(
        exported, trial_samples, atol=2e-4, rtol=0
    )  # ...and the export keeps it
    assert json.loads((out / "delta" / "spec.json").read_text())["base_model"] == "tiny:random"
    assert main(["export", str(run), "--out", str(out)]) == 2  # never overwrites an export
    assert "not empty" in capsys.readouterr().err


def add_final(folder: Path, fid: float, reward: float, ci: tuple[float, float]) -> None:
    (folder / "final").mkdir()
    m = metrics(fid, 0.1, 0, 0.5)
    write_json(folder / "final" / "result.json", {
        "trial": folder.name, "split": "test", "seed": 1000, "metrics": m, "reward": reward,
        "intervals": {"fid": list(ci), "amd": [0.09, 0.11], "alignment": [0.4, 0.6],
                      "extracted": [0.0, 1.0]},
        "noise_floor": {"n": 48, "fid": {"mean": 3.0, "low": 2.0, "high": 4.5}},
    })  # fmt: skip


def test_the_final_stage_picks_the_best_and_compares_it_with_each_baseline(run, tmp_path):
    from capsearch.reporting.report import separation
    from capsearch.search.final import finalists
    from capsearch.search.records import Evaluation

    # Search reward prefers t002; on the fresh test-split evaluation DiffFit (t001) comes out ahead.
    add_final(trial_dir(run, 0), 300.0, -4.2, (280.0, 320.0))
    add_final(trial_dir(run, 1), 14.0, -1.7, (12.0, 16.0))
    add_final(trial_dir(run, 2), 15.0, -2.0, (13.0, 17.5))
    records = load_trials(run)
    assert [r.number for r in finalists(records, top_k=1)] == [0, 1, 2]
    assert [r.number for r in finalists(records, top_k=0)] == [0, 1]
    assert select_trial(records).number == 1  # export --trial best follows the final stage
    text = write_report(run).read_text()
    final = text.split("## Final re-evaluation")[1].split("\n## ")[0]
    assert "on the test split" in final and "14.00 [12.00, 16.00]" in final
    assert "Noise floor of the final evaluation" in final and "FID 3.00" in final
    # the attack's capped-clique count reaches the report (the synthetic records carry none)
    assert "hit its cap" not in text
    assert "| Freeze | better | n/a | overlap | overlap | overlap | n/a |" in final
    assert "Trial t001 (DiffFit), final reward -1.700 on the test split" in text

    def seen(**intervals: list[float]) -> Evaluation:
        return Evaluation(intervals=intervals)

    best = seen(fid=[12.0, 16.0])
    assert separation(best, seen(fid=[17.0, 20.0]), "fid") == "better"
    assert separation(best, seen(fid=[5.0, 11.0]), "fid") == "worse"
    assert separation(best, seen(fid=[15.0, 20.0]), "fid") == "overlap"
    assert separation(best, seen(), "fid") == "n/a"
    assert separation(seen(amd=[0.3, 0.4]), seen(amd=[0.1, 0.2]), "amd") == "better"
    from capsearch.export.trial import model_card

    card = model_card(select_trial(records), "tiny:random", "t001")
    assert "| FID ↓ | 14.00 | [12.00, 16.00] |" in card
    assert "final re-evaluation (test split, sampling seed 1000" in card


def test_committed_records_of_the_first_format_still_report(tmp_path):
    """Version-1 records (before the trial plan) under experiments/results stay readable."""
    import shutil

    demo = Path(__file__).resolve().parents[1] / "experiments" / "results" / "demo_tiny"
    run = shutil.copytree(demo, tmp_path / "demo")
    records = load_trials(run)
    assert len(records) == 8 and {r.version for r in records} == {1}
    assert select_trial(records).trial == "t007"  # chosen by the final re-evaluation
    text = write_report(run).read_text()
    assert "## Final re-evaluation" in text and "caption_dropout(p=0.1) · threshold" in text
    assert "enumerated every clique of all 8 trials" in text


def test_a_capped_clique_enumeration_is_reported():
    from capsearch.reporting.notes import capped_lines
    from capsearch.search.records import TrialRecord

    def trial(number: int, **metrics: int) -> TrialRecord:
        return TrialRecord(trial=f"t{number:03d}", number=number, dir=f"x/t{number:03d}",
                           metrics=metrics)  # fmt: skip

    records = [trial(0, capped_prompts=0), trial(1, capped_prompts=2)]
    assert "hit its cap in t001 (2 prompts)" in capped_lines(records)[1]
    assert capped_lines([trial(0)]) == []
