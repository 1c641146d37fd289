"""An evaluation's sampling precision: bf16 autocast on the UNet's calls only, resolved per machine."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import phantom_data

from capsearch.errors import UserError
from capsearch.metrics.evaluate import EvalSettings, evaluate
from capsearch.models import precision
from capsearch.models.load import load_pipeline
from capsearch.models.sampling import generate, sampling_precision

PROMPTS = ["small left pleural effusion", "no acute findings"]


def _autocast_seen(pipe) -> list[tuple[bool, torch.dtype]]:
    """Record, at every UNet call, whether CPU autocast is on and at which dtype."""
    seen: list[tuple[bool, torch.dtype]] = []
    pipe.unet.register_forward_pre_hook(
        lambda *_: seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
    )
    return seen


def test_bf16_sampling_autocasts_the_unet_only_and_stays_near_fp32():
    pipe = load_pipeline("tiny")
    seen = _autocast_seen(pipe)
    fp32 = generate(pipe, PROMPTS, n_per_prompt=2, steps=4, guidance=3.0, seed=7)
    assert seen and not any(on for on, _ in seen)
    seen.clear()
    with sampling_precision("bf16"):
        bf16 = generate(pipe, PROMPTS, n_per_prompt=2, steps=4, guidance=3.0, seed=7)
        assert torch.is_autocast_enabled("cpu") is False  # only inside the UNet's calls
    assert len(seen) == 4 and all(on and dtype == torch.bfloat16 for on, dtype in seen)
    assert bf16.dtype == torch.float32 and bf16.shape == fp32.shape
    assert not torch.equal(bf16, fp32)  # the calls really ran in bf16
    # bf16 keeps 8 bits of mantissa: images in [-1, 1] move by a few hundredths, not more
    assert (bf16 - fp32).abs().mean() < 0.05
    seen.clear()
    again = generate(pipe, PROMPTS, n_per_prompt=2, steps=4, guidance=3.0, seed=7)  # context left
    assert torch.equal(again, fp32) and not any(on for on, _ in seen)


def test_auto_follows_the_cpu_constant_and_bf16_needs_native_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(precision, "CPU_SAMPLING_AUTO", "no")
    assert precision.resolve_sampling_precision("auto", cuda=False) == "no"
    monkeypatch.setattr(precision, "CPU_SAMPLING_AUTO", "bf16")
    assert precision.resolve_sampling_precision("auto", cuda=False) == "bf16"
    assert precision.resolve_sampling_precision("auto", cuda=True) == "no"  # the pipeline's dtype
    assert precision.resolve_sampling_precision("bf16", cuda=False) == "bf16"
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    assert precision.resolve_sampling_precision("auto", cuda=False) == "no"
    with pytest.raises(UserError, match="evaluate.precision=bf16 on a CPU needs native bf16"):
        precision.resolve_sampling_precision("bf16", cuda=False)
    assert precision.resolve_sampling_precision("bf16", cuda=True) == "bf16"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return phantom_data(tmp_path_factory, seed=5, held_out_images=30)


def test_an_evaluation_records_the_precision_it_sampled_at(data, tmp_path, monkeypatch):
    small = EvalSettings(n_prompts=2, n_per_prompt=2, steps=2, extraction_prompts=2,
                         extraction_n=3, strength_prompts=2, strength_n=1)  # fmt: skip
    pipe = load_pipeline("tiny:random")
    seen = _autocast_seen(pipe)
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(precision, "CPU_SAMPLING_AUTO", "bf16")
    evaluate(pipe, data, small, out_dir=tmp_path / "auto")
    saved = json.loads((tmp_path / "auto" / "metrics.json").read_text())["settings"]
    assert saved["precision"] == "bf16"
    sampled = len(seen)
    # every sampling call (samples, attack, strength) in bf16; the membership pass's own calls are not
    assert sum(on for on, _ in seen) >= 2 * small.steps and not all(on for on, _ in seen)
    seen.clear()
    evaluate(pipe, data, small.model_copy(update={"precision": "no"}), out_dir=tmp_path / "no")
    saved = json.loads((tmp_path / "no" / "metrics.json").read_text())["settings"]
    assert saved["precision"] == "no" and len(seen) == sampled and not any(on for on, _ in seen)


def test_the_bench_rule_compares_each_seeds_pair_with_fp32s_spread_over_seeds():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "benchmarks"))
    from bench_eval_precision import verdict

    def runs(fid_fp32, fid_bf16, extracted_bf16=(3, 3, 3)):
        out = []
        for seed, (f, b, e) in enumerate(zip(fid_fp32, fid_bf16, extracted_bf16, strict=True)):
            out.append({"precision": "no", "seed": seed, "metrics": {"fid": f, "extracted": 3}})
            out.append({"precision": "bf16", "seed": seed, "metrics": {"fid": b, "extracted": e}})
        return out

    # fp32's FID spans 10 over the seeds: pairs 2 apart pass, one 11 apart fails
    lines, passed = verdict(runs((50, 60, 55), (52, 58, 57)), [0, 1, 2])
    assert passed and any(line.startswith("fid") and "within" in line for line in lines)
    assert any(line.startswith("amd") and "not measured" in line for line in lines)
    assert not verdict(runs((50, 60, 55), (52, 58, 66)), [0, 1, 2])[1]
    # the same count on every fp32 seed: any bf16 difference is outside its (zero) spread
    assert not verdict(runs((50, 60, 55), (50, 60, 55), (3, 4, 3)), [0, 1, 2])[1]
