"""The inner loop: determinism, bit-identical resume, mitigations, NaN handling, corrupt images."""

from __future__ import annotations

import json
import random

import pytest
import torch

from capsearch.errors import UserError
from capsearch.mitigations import Mitigations
from capsearch.models import load_pipeline
from capsearch.train import TrainConfig, finetune
from capsearch.worlds.phantom import write_phantom_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    write_phantom_dataset(root, patients=16, size=32, seed=3, dup_fraction=0.2, dup_copies=3)
    return root


def _trained(unet):
    return {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}


def _cfg(**kw):
    return TrainConfig(**{"steps": 4, "batch_size": 4, "lr": 1e-3, **kw})


def test_only_trainable_parameters_change_and_seed_is_deterministic(data):
    pipe_a, pipe_b = load_pipeline("tiny:random"), load_pipeline("tiny:random")
    before = {k: v.clone() for k, v in pipe_a.unet.state_dict().items()}
    spec = [{"method": "bitfit", "units": "mid_block"}]
    res = finetune(pipe_a, spec, data, _cfg(), quiet=True)
    finetune(pipe_b, spec, data, _cfg(), quiet=True)
    assert res.status == "ok" and res.steps == 4 and res.trainable > 0
    after = pipe_a.unet.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("mid_block" in k and k.endswith("bias") for k in changed)
    for name, value in _trained(pipe_a.unet).items():
        assert torch.equal(value, _trained(pipe_b.unet)[name])


def test_resume_is_bit_identical(data, tmp_path):
    spec = [{"method": "lora", "units": "*:*_attn", "rank": 2}]
    straight = load_pipeline("tiny:random")
    finetune(
        straight,
        spec,
        data,
        _cfg(steps=6, mitigations=[{"name": "rwa", "k": 1, "p": 0.5}]),
        quiet=True,
    )
    first = load_pipeline("tiny:random")
    cfg = _cfg(steps=6, checkpoint_every=3, mitigations=[{"name": "rwa", "k": 1, "p": 0.5}])
    import capsearch.train as train_mod

    original = train_mod._save_checkpoint

    def save_then_stop(*args, **kwargs):
        original(*args, **kwargs)
        raise KeyboardInterrupt

    train_mod._save_checkpoint = save_then_stop
    try:
        res = finetune(first, spec, data, cfg, out_dir=tmp_path, quiet=True)
    finally:
        train_mod._save_checkpoint = original
    assert res.status == "stopped" and (tmp_path / "checkpoint" / "state.json").exists()
    resumed = load_pipeline("tiny:random")
    res2 = finetune(resumed, spec, data, cfg, out_dir=tmp_path, resume=True, quiet=True)
    assert res2.status == "ok" and res2.steps == 6
    ref, got = _trained(straight.unet), _trained(resumed.unet)
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_nan_loss_stops_with_status_and_no_model(data, tmp_path):
    pipe = load_pipeline("tiny:random")
    with torch.no_grad():
        pipe.unet.conv_out.bias.fill_(float("nan"))
    res = finetune(
        pipe, [{"method": "full", "units": "conv_out"}], data, _cfg(), out_dir=tmp_path, quiet=True
    )
    assert res.status == "nan" and "non-finite" in res.message
    assert not (tmp_path / "delta").exists()
    assert json.loads((tmp_path / "train_result.json").read_text())["status"] == "nan"


def test_threshold_drops_top_samples_and_counts(data):
    pipe = load_pipeline("tiny:random")
    res = finetune(
        pipe,
        [{"method": "norm", "units": "*"}],
        data,
        _cfg(steps=2, batch_size=8, mitigations=[{"name": "threshold", "percentile": 50}]),
        quiet=True,
    )
    # 50th percentile of 8 scores keeps the lower half: about 4 dropped per step.
    assert 4 <= res.mitigation_counts["threshold"] <= 10


def test_rwa_inserts_fresh_words_each_draw():
    m = Mitigations.parse(
        [{"name": "rwa", "k": 2, "p": 1.0}], ["alpha", "beta", "gamma", "delta", "omega"]
    )
    rng = random.Random(0)
    a, counts = m.captions(["small left effusion"], [], rng)
    b, _ = m.captions(["small left effusion"], [], rng)
    assert counts == {"rwa": 1}
    assert len(a[0].split()) == 5 and a != b


@pytest.mark.parametrize(
    "items, match",
    [
        ([{"name": "nope"}], "unknown mitigation"),
        ([{"name": "rwa", "q": 1}], "unknown parameter"),
        ([{"name": "threshold"}], "exactly one"),
        ([{"name": "caption_dropout", "p": 3}], r"\[0, 1\]"),
    ],
)
def test_bad_mitigations_are_user_errors(items, match):
    with pytest.raises(UserError, match=match):
        Mitigations.parse(items, ["word"])


def test_corrupt_image_is_skipped_not_fatal(data, tmp_path):
    import shutil

    copy = tmp_path / "d"
    shutil.copytree(data, copy)
    first = json.loads((copy / "metadata.jsonl").read_text().splitlines()[0])
    (copy / first["file_name"]).write_bytes(b"not a png")
    pipe = load_pipeline("tiny:random")
    with pytest.warns(UserWarning, match="unreadable"):
        res = finetune(
            pipe, [{"method": "bitfit", "units": "conv_out"}], copy, _cfg(steps=1), quiet=True
        )
    assert res.status == "ok" and res.skipped_images >= 1


def test_probe_reports_heldout_loss_and_strength(data):
    pipe = load_pipeline("tiny:random")
    events = []
    finetune(
        pipe,
        [{"method": "bitfit", "units": "mid_block"}],
        data,
        _cfg(steps=2, probe_every=2),
        callbacks=[lambda e, p: events.append((e, p))],
        quiet=True,
    )
    probes = [p for e, p in events if e == "probe"]
    assert len(probes) == 1 and probes[0]["heldout_loss"] > 0 and probes[0]["strength_ratio"] > 0
    assert events[-1][0] == "end"


def test_cli_train_writes_delta_and_log(data, tmp_path, capsys):
    from capsearch.cli import main

    rc = main(
        [
            "train",
            "--model",
            "tiny:random",
            "--data",
            str(data),
            "--method",
            "svdiff",
            "--units",
            "mid_block",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--out",
            str(tmp_path / "o"),
            "--mitigation",
            "rwa:k=1,p=1",
        ]
    )
    assert rc == 0
    assert (tmp_path / "o" / "delta" / "spec.json").exists() and (
        tmp_path / "o" / "train_log.jsonl"
    ).exists()
    assert main(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_grad_accum_checkpointing_ema_and_warmup_schedule_run(data):
    """Options of the loop: accumulation, gradient checkpointing (same result), EMA and warm-up schedules."""
    spec = [{"method": "bitfit", "units": "mid_block"}]
    plain, ckpt = load_pipeline("tiny:random"), load_pipeline("tiny:random")
    finetune(plain, spec, data, _cfg(steps=2), quiet=True)
    finetune(ckpt, spec, data, _cfg(steps=2, gradient_checkpointing=True), quiet=True)
    a, b = _trained(plain.unet), _trained(ckpt.unet)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    ema = load_pipeline("tiny:random")
    res = finetune(
        ema,
        spec,
        data,
        _cfg(steps=2, grad_accum=2, ema_decay=0.5, lr_schedule="cosine", warmup_steps=1),
        quiet=True,
    )
    assert res.status == "ok" and res.steps == 2
    c = _trained(ema.unet)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_mixed_precision_on_cpu_is_a_clear_error(data):
    with pytest.raises(UserError, match="needs a GPU"):
        finetune(
            load_pipeline("tiny:random"),
            [{"method": "freeze"}],
            data,
            _cfg(mixed_precision="bf16"),
            quiet=True,
        )


def test_the_optimizer_trains_each_entry_at_its_own_rates(data):
    """No global 1-D rate: full fine-tuning's biases train at train.lr; SV-DIFF's norm-layer shifts at
    its entry's lr_1d, its spectral shifts at its lr."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    pipe = load_pipeline("tiny:random")
    rates = {}

    def record(optimizer, args, kwargs):
        names = {id(p): n for n, p in pipe.unet.named_parameters()}
        for group in optimizer.param_groups:
            rates.update({names[id(p)]: group["lr"] for p in group["params"]})

    spec = [
        {"method": "full", "units": "mid_block.resnets.0"},
        {"method": "svdiff", "units": "up_blocks.0", "lr": 3e-3, "lr_1d": 1e-6},
    ]
    handle = register_optimizer_step_post_hook(record)
    try:
        res = finetune(pipe, spec, data, _cfg(steps=1, lr=2e-4), quiet=True)
    finally:
        handle.remove()
    assert res.status == "ok"
    assert {rates[n] for n in rates if n.startswith("mid_block")} == {2e-4}
    norm_shifts = {n for n in rates if ".norm" in n and ".parametrizations." in n}
    assert norm_shifts and {rates[n] for n in norm_shifts} == {1e-6}
    assert {rates[n] for n in rates if n.startswith("up_blocks") and n not in norm_shifts} == {3e-3}
