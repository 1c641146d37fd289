"""experiments/benchmarks/bench_gpu.py on a CPU at toy shapes (--tiny): every loop runs and records.

The numbers are meaningless here; what is checked is that each part writes its JSON with sane fields,
that capsearch's loops and the plain ones both ran, and that a missing module or a spent budget is
recorded as a skip instead of a crash.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks"
METHODS = ("full", "difffit", "svdiff", "lora")


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    import bench_gpu

    yield bench_gpu
    sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def run(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu")
    argv = [
        "--device",
        "cpu",
        "--tiny",
        "--out",
        str(out),
        "--parts",
        "finetune,sampling,nearest,tiny",
    ]
    assert bench.main(argv) == 0
    return out


def _load(out: Path, part: str) -> dict:
    data = json.loads((out / f"{part}.json").read_text())
    assert data["status"] == "done", data.get("traceback")
    return data


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_finetune_part_runs_both_loops_for_every_method(run):
    data = _load(run, "finetune")
    res = data["results"]
    assert data["skipped"] == {}
    trainable = {}
    for method in METHODS:
        fine, plain = res[f"{method}/no/finetune"], res[f"{method}/no/plain"]
        assert fine["status"] == "ok"
        assert _positive(fine["steps_per_s"]) and _positive(plain["steps_per_s"])
        assert all(math.isfinite(v) for v in plain["losses"].values())
        assert all(math.isfinite(v) for v in fine["losses"].values())
        flops = res[f"{method}/flops"]
        assert 0 < flops["forward"] < flops["step"]
        row = res["summary"][f"{method}/no"]
        assert _positive(row["ratio"]) and _positive(row["mfu_finetune"])
        trainable[method] = fine["trainable"]
        assert fine["total"] >= fine["trainable"] > 0
    # the methods were applied: PEFT trains a small part of what full fine-tuning trains
    assert all(trainable[m] < trainable["full"] / 4 for m in ("difffit", "svdiff", "lora"))


def test_finetune_variants_and_encoding_gain(run):
    res = _load(run, "finetune")["results"]
    for key in (
        "math_attention",
        "channels_last",
        "checkpointing",
        "encoding/full",
        "encoding/lora",
    ):
        assert _positive(res[f"variant/{key}"]["steps_per_s"]), key
    assert _positive(res["variant/encode_cost"]["vae_s"])
    assert _positive(res["variant/encode_cost"]["text_s"])
    summary = res["summary"]
    assert _positive(summary["full_caching_speedup"]) and _positive(summary["sdpa_over_math"])
    assert _positive(res["matmul_rate"]["tflops"])


def test_sampling_part_compares_generate_with_a_plain_loop(run):
    res = _load(run, "sampling")["results"]
    assert _positive(res["generate"]["images_per_s"]) and _positive(res["plain"]["images_per_s"])
    assert _positive(res["ratio"]["generate_over_plain"])
    assert _positive(res["extraction"]["images_per_s"])


def test_nearest_part_agrees_with_the_reference_exactly(run):
    res = _load(run, "nearest")["results"]
    assert res["device_matmul"]["planted_found"] == 1.0
    ref = res.get("capsearch_faiss_cpu") or res["torch_cpu_subset"]
    assert ref["top1_agree"] == 1.0 and ref["disagreements"] == 0
    assert ref["max_sim_diff"] < 1e-5


def test_tiny_part_times_and_profiles_the_tiny_model(run):
    data = _load(run, "tiny")
    res = data["results"]
    assert res["finetune"]["status"] == "ok" and _positive(res["finetune"]["steps_per_s"])
    pretrain = [v for k, v in res.items() if k.startswith("pretrain/")]
    assert len(pretrain) == 2 and all(_positive(p["steps_per_s"]) for p in pretrain)
    profile = res["profile"]
    assert _positive(profile["wall_s_per_step"]) and profile["top_ops"]
    assert all(op["op"] and op["calls"] > 0 for op in profile["top_ops"])
    assert data["skipped"]["cuda_graph"] == "skipped: no CUDA"


def test_environment_names_what_capsearch_imports(run):
    env = json.loads((run / "env.json").read_text())
    imports = env["results"]["capsearch_imports"]
    assert imports["capsearch.training.loop"]["import"] == "ok"
    assert "pydantic" in imports["capsearch.training.loop"]["pulls_in"]
    for module in ("capsearch.models.load", "capsearch.models.sampling", "capsearch.methods"):
        assert not {"ray", "optuna", "faiss"} & set(imports[module]["pulls_in"])
    summary = (run / "summary.txt").read_text()
    assert "full/no finetune/plain" in summary and "nearest: top-1 agreement" in summary


def test_sharing_part_runs_trials_as_processes(bench, tmp_path):
    argv = ["--device", "cpu", "--tiny", "--out", str(tmp_path), "--parts", "sharing"]
    assert bench.main([*argv, "--no-import-check"]) == 0
    res = _load(tmp_path, "sharing")["results"]
    assert res["alone"]["status"] == "ok" and _positive(res["alone"]["steps_per_s"])
    workers = res["together"]["workers"]
    assert len(workers) == 2 and all(w["status"] == "ok" for w in workers)
    assert _positive(res["speedup"]["speedup"]) and res["speedup"]["overlap_fraction"] > 0


def test_missing_module_is_a_recorded_skip(bench, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pydantic", None)  # importing it now raises ImportError
    argv = ["--device", "cpu", "--tiny", "--out", str(tmp_path), "--parts", "finetune,sharing",
            "--methods", "full", "--no-import-check"]  # fmt: skip
    assert bench.main(argv) == 0
    fine = _load(tmp_path, "finetune")
    assert "pydantic" in fine["skipped"]["full/no/finetune"]
    assert _positive(fine["results"]["full/no/plain"]["steps_per_s"])  # the plain loop still ran
    assert "pydantic" in _load(tmp_path, "sharing")["skipped"]["all"]


def test_spent_budget_and_bad_arguments(bench, tmp_path, capsys):
    argv = ["--device", "cpu", "--tiny", "--out", str(tmp_path), "--parts", "finetune",
            "--budget-s", "finetune=0", "--no-import-check"]  # fmt: skip
    assert bench.main(argv) == 0
    assert "time budget" in _load(tmp_path, "finetune")["skipped"]["full/*"]
    assert bench.main(["--device", "cpu", "--out", str(tmp_path)]) == 2
    assert "--tiny" in capsys.readouterr().err
    for bad in (["--parts", "nope"], ["--budget-s", "soon"], ["--methods", "dora"]):
        with pytest.raises(SystemExit) as exit_:
            bench.main(["--device", "cpu", "--tiny", *bad])
        assert exit_.value.code == 2


def test_profile_finetune_alternates_the_loops_and_profiles_both(bench, tmp_path):
    import profile_finetune

    out = tmp_path / "prof"
    profile_finetune.main(["--device", "cpu", "--tiny", "--out", str(out), "--rounds", "2"])
    result = json.loads((out / "profile.json").read_text())
    assert result["method"] == "difffit" and result["precision"] == "no"
    for loop in ("finetune", "plain"):
        rates = result["rounds"][loop]
        assert len(rates) == 2 and all(r > 0 and math.isfinite(r) for r in rates)
    ratio = result["median"]["finetune"] / result["median"]["plain"]
    assert result["finetune_over_plain"] == pytest.approx(ratio)
    assert (
        "capsearch/training/loop.py" in (out / "finetune.txt").read_text()
    )  # the profiled loop is capsearch's
    assert "plain_train" in (out / "plain.txt").read_text()
