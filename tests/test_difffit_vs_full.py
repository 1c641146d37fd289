"""experiments/difffit_vs_full.py runs each method as the library's trial and summarises the records."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import difffit_vs_full  # noqa: E402

from capsearch.methods import apply_methods, count_trainable  # noqa: E402
from capsearch.models.load import load_pipeline  # noqa: E402


def test_each_method_is_a_library_trial_and_the_summary_reads_its_record(tmp_path, monkeypatch):
    out = tmp_path / "out"
    argv = ["difffit_vs_full.py", "--steps", "2", "--patients", "12", "--methods", "freeze,difffit",
            "--n-prompts", "2", "--lr", "difffit=3e-3", "--out", str(out)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    difffit_vs_full.main()
    summary = json.loads((out / "results.json").read_text())
    assert list(summary) == ["freeze", "difffit"]
    records = {
        name: json.loads((out / "trials" / entry["trial"] / "result.json").read_text())
        for name, entry in summary.items()
    }
    assert [r["trial"] for r in records.values()] == ["t000", "t001"]
    unet = load_pipeline("tiny").unet
    apply_methods(unet, difffit_vs_full.RUNS["difffit"][0])
    expected = count_trainable(unet)
    difffit = records["difffit"]
    assert difffit["status"] == "ok" and difffit["steps"] == 2 and difffit["train"]["lr"] == 3e-3
    assert summary["difffit"]["trainable"] == difffit["trainable"] == expected
    assert summary["difffit"]["fid"] == difffit["metrics"]["fid"]
    assert records["freeze"]["trainable"] == 0 and summary["freeze"]["steps"] == 0
