"""The inner loop: determinism, resume, mitigations in the loop, EMA, mixed precision, NaN, corrupt data."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.optim.optimizer import register_optimizer_step_post_hook

import capsearch.training.books as books_mod
from capsearch.errors import UserError
from capsearch.models import precision as models_precision
from capsearch.models.load import load_pipeline
from capsearch.training import precision
from capsearch.training.loop import TrainResult, TrainSettings, finetune
from capsearch.worlds.phantom import write_phantom_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    write_phantom_dataset(root, patients=16, size=32, seed=3, dup_fraction=0.2, dup_copies=3)
    return root


def _trained(unet):
    return {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}


def _cfg(**kw):
    return TrainSettings(**{"steps": 4, "batch_size": 4, "lr": 1e-3, "caption_dropout": 0.0, **kw})


def test_only_trainable_parameters_change_and_seed_is_deterministic(data):
    pipe_a, pipe_b = load_pipeline("tiny:random"), load_pipeline("tiny:random")
    before = {k: v.clone() for k, v in pipe_a.unet.state_dict().items()}
    spec = [{"method": "bitfit", "units": "mid_block"}]
    res = finetune(pipe_a, spec, data, _cfg(), quiet=True)
    finetune(pipe_b, spec, data, _cfg(), quiet=True)
    mid_biases = sum(v.numel() for k, v in before.items() if k.startswith("mid_block.") and
                     k.endswith(".bias"))  # fmt: skip
    assert res.status == "ok" and res.steps == 4 and res.trainable == mid_biases > 0
    assert res.total == sum(v.numel() for v in before.values())
    after = pipe_a.unet.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("mid_block" in k and k.endswith("bias") for k in changed)
    for name, value in _trained(pipe_a.unet).items():
        assert torch.equal(value, _trained(pipe_b.unet)[name])


@pytest.mark.parametrize(
    "mitigations",
    [
        [{"name": "rwa", "k": 1, "p": 0.5}],
        [{"name": "caption_dropout", "p": 0.3}, {"name": "rwa", "k": 4, "p": 1.0, "mode": "fixed"}],
    ],
    ids=["rwa-per-draw", "dropout+rwa-fixed"],
)
def test_resume_is_bit_identical(data, tmp_path, mitigations):
    spec = [{"method": "lora", "units": "*:*_attn", "rank": 2}]
    straight = load_pipeline("tiny:random")
    finetune(straight, spec, data, _cfg(steps=6, mitigations=mitigations), quiet=True)
    first = load_pipeline("tiny:random")
    cfg = _cfg(steps=6, checkpoint_every=3, mitigations=mitigations)

    original = books_mod._save_checkpoint

    def save_then_stop(*args, **kwargs):
        original(*args, **kwargs)
        raise KeyboardInterrupt

    books_mod._save_checkpoint = save_then_stop
    try:
        res = finetune(first, spec, data, cfg, out_dir=tmp_path, quiet=True)
    finally:
        books_mod._save_checkpoint = original
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


def test_one_host_sync_per_optimizer_step(data, monkeypatch):
    """Between one optimizer step and the next, finetune reads the loss back once, however many
    micro-batches it accumulates: every Tensor → Python conversion (item, float, bool) is counted.
    The optimizer's own (AdamW reads its CPU step counters) are not the loop's and not counted."""
    import capsearch.training.loop as train_mod

    events = []
    for name in ("item", "__float__", "__bool__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _r=real: events.append("sync") or _r(self, *a))  # fmt: skip
    real_step = train_mod._optimizer_step

    def step(run, state):
        events.append("step")
        real_step(run, state)
        events.append("stepped")

    monkeypatch.setattr(train_mod, "_optimizer_step", step)
    pipe = load_pipeline("tiny:random")
    res = finetune(pipe, [{"method": "bitfit", "units": "mid_block"}], data,
                   _cfg(steps=4, grad_accum=2), quiet=True)  # fmt: skip
    assert res.status == "ok" and events.count("step") == 4
    ends = [i for i, e in enumerate(events) if e == "stepped"]
    starts = [i for i, e in enumerate(events) if e == "step"]
    between = [events[a + 1 : b].count("sync") for a, b in zip(ends, starts[1:])]
    assert between == [1, 1, 1]


def test_a_nan_in_a_later_micro_batch_reaches_no_weight(data, monkeypatch):
    """The step's loss is checked once, after its micro-batches and before its optimizer step: a NaN in
    the second micro-batch of step 2 stops training with step 1's weights untouched since."""
    import capsearch.training.loop as train_mod

    calls, real_loss = [], train_mod._loss

    def loss(run, state):
        value, touched = real_loss(run, state)
        calls.append(1)
        return (value * float("nan") if len(calls) == 4 else value), touched

    monkeypatch.setattr(train_mod, "_loss", loss)
    saved = {}
    real_step = train_mod._optimizer_step

    def step(run, state):
        real_step(run, state)
        saved.update(_trained(run.unet))

    monkeypatch.setattr(train_mod, "_optimizer_step", step)
    pipe = load_pipeline("tiny:random")
    spec = [{"method": "bitfit", "units": "mid_block"}]
    res = finetune(pipe, spec, data, _cfg(steps=3, grad_accum=2), quiet=True)
    assert res.status == "nan" and "non-finite loss at step 2" in res.message
    assert len(calls) == 4 and saved  # step 1's optimizer step ran, step 2's did not
    assert all(torch.equal(v, saved[k]) for k, v in _trained(pipe.unet).items())
    assert all(torch.isfinite(v).all() for v in saved.values())


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


def test_probe_reports_heldout_loss_and_strength(data, monkeypatch):
    """The probe's numbers, recomputed from the trained UNet's predictions on the probe's own fixed
    batches: held-out MSE, and Wen et al.'s ‖ε(z, e_p) − ε(z, e_∅)‖₂ at t = 800 averaged over the
    memorised and over the other captions, their ratio, and the score that combines them."""
    import numpy as np

    import capsearch.training.loop as train_mod
    from capsearch.training.probe import Probe

    probes_made = []

    class Recorded(Probe):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            probes_made.append(self)

    monkeypatch.setattr(train_mod, "Probe", Recorded)
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
    assert len(probes) == 1 and len(probes_made) == 1 and events[-1][0] == "end"
    got, probe, unet = probes[0], probes_made[0], pipe.unet.eval()  # the step-2 weights: no EMA
    assert got["step"] == 2 and probe.mem and probe.other

    def eps(x, t, prompts):
        with torch.no_grad():
            return unet(x, t, encoder_hidden_states=pipe.encode_prompts(prompts)).sample.double()

    def strength(prompts):
        z, t = probe.z[: len(prompts)], torch.tensor(800)  # 0.8 of the 1000 training timesteps
        diff = (eps(z, t, prompts) - eps(z, t, [""] * len(prompts))).numpy()
        return float(np.sqrt((diff.reshape(len(diff), -1) ** 2).sum(axis=1)).mean())

    mem, other = strength(probe.mem), strength(probe.other)
    assert got["strength_memorised"] == pytest.approx(mem, rel=1e-5)
    assert got["strength_other"] == pytest.approx(other, rel=1e-5)
    assert got["strength_ratio"] == pytest.approx(mem / other, rel=1e-5) and mem / other != 1
    noisy = pipe.scheduler.add_noise(probe.held, probe.noise, probe.t)  # pixel space: x0 = pixels
    held = float(((eps(noisy, probe.t, probe.held_caps) - probe.noise.double()) ** 2).mean())
    assert got["heldout_loss"] == pytest.approx(held, rel=1e-5)
    gap = got["loss_gap"]
    expected_score = held * (1 + max(0.0, gap)) * max(1.0, mem / other)
    assert got["probe_score"] == pytest.approx(expected_score, rel=1e-5)


def test_a_resumed_fine_tune_reports_its_earlier_probes_first(data, tmp_path, monkeypatch):
    """A scheduler (ASHA) sees a resumed trial's whole probe history, as if it had not stopped."""

    spec = [{"method": "bitfit", "units": "mid_block"}]
    cfg = _cfg(steps=6, probe_every=2, checkpoint_every=4)
    original = books_mod._save_checkpoint

    def save_then_stop(*args, **kwargs):
        original(*args, **kwargs)
        raise KeyboardInterrupt

    first: list = []
    monkeypatch.setattr(books_mod, "_save_checkpoint", save_then_stop)
    finetune(load_pipeline("tiny:random"), spec, data, cfg, out_dir=tmp_path, quiet=True,
             callbacks=[lambda e, p: first.append(p) if e == "probe" else None])  # fmt: skip
    monkeypatch.setattr(books_mod, "_save_checkpoint", original)
    again: list = []
    res = finetune(load_pipeline("tiny:random"), spec, data, cfg, out_dir=tmp_path, resume=True,
                   quiet=True, callbacks=[lambda e, p: again.append(p) if e == "probe" else None])  # fmt: skip
    assert [p["step"] for p in first] == [2, 4] and [p["step"] for p in again] == [2, 4, 6]
    assert again[:2] == first and res.probes == again
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert sum(1 for line in log if "probe" in line) == 3  # replayed to callbacks, not logged again


def test_a_probe_is_logged_before_a_callback_can_end_the_run(data, tmp_path):
    """ASHA ends a trial's worker inside the report of the probe that stops it: that probe must
    already be in train_log.jsonl (it was missing from every stopped trial's log before)."""

    def scheduler_stops(event: str, payload: dict) -> None:
        if event == "probe":
            raise KeyboardInterrupt  # the worker ends here, as when Ray stops the trial

    res = finetune(load_pipeline("tiny:random"), [{"method": "bitfit", "units": "mid_block"}],
                   data, _cfg(steps=4, probe_every=2), callbacks=[scheduler_stops],
                   out_dir=tmp_path, quiet=True)  # fmt: skip
    assert res.status == "stopped"
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [line["probe"]["step"] for line in log if "probe" in line] == [2]


def test_cli_train_writes_delta_and_log(data, tmp_path, capsys, monkeypatch):
    """Each flag lands where `capsearch train` puts it: the fine-tune's settings and method spec, and
    the records it writes (result, log, delta spec, TensorBoard rates)."""
    import capsearch.training.loop as train_mod
    from capsearch.cli import main
    from capsearch.training.tblog import LOSS_TAG, read_scalars

    seen, real = [], train_mod.finetune

    def spy(pipe, spec, data, cfg, **kw):
        seen.append((pipe.spec, spec, cfg, kw))
        return real(pipe, spec, data, cfg, **kw)

    monkeypatch.setattr(train_mod, "finetune", spy)
    out = tmp_path / "o"
    rc = main(["train", "--model", "tiny:random", "--data", str(data), "--method", "svdiff",
               "--units", "mid_block", "--param", "lr_1d=0.02", "--steps", "2", "--batch-size", "2",
               "--lr", "3e-3", "--seed", "5", "--out", str(out), "--mitigation", "rwa:k=1,p=1"])  # fmt: skip
    assert rc == 0
    (model, spec, cfg, kw), = seen  # fmt: skip
    assert model == "tiny:random" and kw == {"out_dir": out, "resume": False}
    assert spec == [{"method": "svdiff", "units": "mid_block", "lr_1d": 0.02}]
    rwa = [{"name": "rwa", "k": 1, "p": 1}]
    assert cfg == TrainSettings(steps=2, batch_size=2, lr=3e-3, seed=5, size=32, mitigations=rwa)
    result = json.loads((out / "train_result.json").read_text())
    assert (
        result["status"] == "ok"
        and result["steps"] == 2
        and [s for s, _ in result["losses"]] == [2]
    )
    assert result["mitigation_counts"]["rwa"] == 2 * 2  # p=1: every caption of 2 steps × 2
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in log] == [2] and log[0]["mitigations"]["rwa"] == 4
    delta = json.loads((out / "delta" / "spec.json").read_text())
    assert delta["base_model"] == "tiny:random"
    assert [(e["method"], e["units"], e["lr_1d"]) for e in delta["methods"]] == [
        ("svdiff", "mid_block", 0.02)
    ]
    assert delta["trainable_parameters"] == result["trainable"]
    scalars = read_scalars(out)  # constant schedule: --lr for the spectral shifts, lr_1d for norms'
    assert [s for s, _ in scalars[LOSS_TAG]] == [1, 2]
    assert scalars["lr/vectors"] == [(1, pytest.approx(3e-3)), (2, pytest.approx(3e-3))]
    assert scalars["lr/vectors_0.02"] == [(1, pytest.approx(0.02)), (2, pytest.approx(0.02))]
    # --spec (over --method), --resume and --device, the fine-tune itself stubbed this time
    entries = [{"method": "lora", "units": "mid_block:*_attn", "rank": 2}, {"method": "bitfit"}]
    (tmp_path / "spec.json").write_text(json.dumps(entries))
    seen.clear()
    monkeypatch.setattr(train_mod, "finetune", lambda pipe, spec, data, cfg, **kw: seen.append(
        (str(pipe.device), spec, kw)) or TrainResult("ok", 2, 0.1, 1, 2, 0.0))  # fmt: skip
    again = ["train", "--model", "tiny:random", "--data", str(data), "--method", "svdiff",
             "--spec", str(tmp_path / "spec.json"), "--resume", "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert main(again) == 0
    assert seen == [("cpu", entries, {"out_dir": out, "resume": True})]
    assert main(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_gradient_checkpointing_gives_the_same_result(data, monkeypatch):
    """With gradient_checkpointing the UNet recomputes its blocks through torch.utils.checkpoint (it
    is called, and never without the setting), and the trained weights, which moved by ~lr per step,
    equal those of the same fine-tune without it to 1e-6."""
    import torch.utils.checkpoint

    calls = []
    real = torch.utils.checkpoint.checkpoint

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counted)
    spec = [{"method": "bitfit", "units": "mid_block"}]
    plain, ckpt = load_pipeline("tiny:random"), load_pipeline("tiny:random")
    start = {n: p.detach().clone() for n, p in ckpt.unet.named_parameters()}
    finetune(plain, spec, data, _cfg(steps=2), quiet=True)
    plain_calls = len(calls)
    finetune(ckpt, spec, data, _cfg(steps=2, gradient_checkpointing=True), quiet=True)
    assert plain_calls == 0 and not plain.unet.is_gradient_checkpointing
    assert len(calls) > 0 and ckpt.unet.is_gradient_checkpointing
    a, b = _trained(plain.unet), _trained(ckpt.unet)
    assert a.keys() == b.keys() and a
    moved = max((b[k] - start[k]).abs().max().item() for k in b)
    assert moved > 1e-4  # two AdamW steps at lr 1e-3: far above the tolerance below
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)


def test_ema_is_the_recursive_average_of_the_parameter_trajectory(data):
    """With decay d, EMA_k = lerp(EMA_{k-1}, θ_k, 1 − d) from EMA_0 = θ_0, over every optimizer step."""
    pipe = load_pipeline("tiny:random")
    start = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    trajectory = []  # trainable parameters right after each optimizer step

    def record(optimizer, args, kwargs):
        trajectory.append(_trained(pipe.unet))

    handle = register_optimizer_step_post_hook(record)
    try:
        cfg = _cfg(steps=4, grad_accum=2, ema_decay=0.6, lr_schedule="cosine", warmup_steps=1)
        res = finetune(pipe, [{"method": "bitfit", "units": "mid_block"}], data, cfg, quiet=True)
    finally:
        handle.remove()
    assert res.status == "ok" and len(trajectory) == 4
    ema = {n: start[n] for n in trajectory[0]}
    for theta in trajectory:
        ema = {n: torch.lerp(ema[n], theta[n], 1 - 0.6) for n in ema}
    final = _trained(pipe.unet)
    assert final.keys() == ema.keys()
    assert all(torch.allclose(final[n], ema[n], rtol=1e-6, atol=1e-8) for n in ema)
    assert any(not torch.allclose(final[n], trajectory[-1][n]) for n in ema)  # not the last step


@pytest.mark.parametrize("ema_decay", [None, 0.6], ids=["weights", "ema"])
def test_kept_deltas_are_the_weights_at_their_steps_and_leave_training_unchanged(
    data, tmp_path, ema_decay
):
    """train.keep_deltas_every=2 over 5 steps keeps deltas at steps 2 and 4 (the last step's is the
    run's own delta/): each holds the trainable tensors right after that optimizer step (their EMA
    where ema_decay is set), and the run ends bit-identical to one that kept nothing."""
    from safetensors.torch import load_file

    from capsearch.training.books import kept_delta_dir

    spec = [{"method": "bitfit", "units": "mid_block"}]
    pipe = load_pipeline("tiny:random")
    start = _trained(pipe.unet)
    trajectory = []
    handle = register_optimizer_step_post_hook(
        lambda o, a, k: trajectory.append(_trained(pipe.unet))
    )
    try:
        cfg = _cfg(steps=5, keep_deltas_every=2, ema_decay=ema_decay)
        res = finetune(pipe, spec, data, cfg, out_dir=tmp_path / "kept", quiet=True)
    finally:
        handle.remove()
    plain = load_pipeline("tiny:random")
    finetune(plain, spec, data, _cfg(steps=5, ema_decay=ema_decay), quiet=True)
    assert res.status == "ok" and len(trajectory) == 5
    kept = sorted(p.name for p in (tmp_path / "kept" / "deltas").iterdir())
    assert kept == ["step000002", "step000004"]
    expected = {n: start[n] for n in start}
    for step, theta in enumerate(trajectory, start=1):
        expected = (theta if ema_decay is None else
                    {n: torch.lerp(expected[n], theta[n], 1 - ema_decay) for n in theta})  # fmt: skip
        if step in (2, 4):
            got = load_file(str(kept_delta_dir(tmp_path / "kept", step) / "delta.safetensors"))
            assert got.keys() == expected.keys()
            assert all(torch.allclose(got[n], expected[n], rtol=1e-6, atol=1e-8) for n in got)
    for name, value in _trained(pipe.unet).items():  # keeping deltas changed nothing of the run
        assert torch.equal(value, _trained(plain.unet)[name])


def test_threshold_drops_the_strongest_samples_and_they_get_no_gradient(data, monkeypatch):
    """Wen et al.'s mitigation: samples whose ‖ε(x_t,e_p) − ε(x_t,e_∅)‖ exceeds the batch's limit leave
    the loss; the step's gradient is that of the kept samples' loss alone."""
    import capsearch.metrics.denoising as denoising
    import capsearch.training.loop as train_mod

    seen = {"scores": [], "targets": [], "outputs": [], "grads": []}
    real_scores, real_target = denoising.threshold_scores, train_mod._target

    def scores(*args, **kwargs):
        seen["scores"].append(real_scores(*args, **kwargs))
        return seen["scores"][-1]

    def target(*args):
        seen["targets"].append(real_target(*args))
        return seen["targets"][-1]

    def on_forward(module, args, output):
        seen["outputs"].append(output.sample.detach().clone())
        if output.sample.requires_grad:  # the conditional prediction the loss is built on
            output.sample.register_hook(lambda g: seen["grads"].append(g.clone()))

    monkeypatch.setattr(train_mod, "threshold_scores", scores)
    monkeypatch.setattr(train_mod, "_target", target)
    pipe = load_pipeline("tiny:random")
    pipe.unet.register_forward_hook(on_forward)
    cfg = _cfg(steps=1, batch_size=8, mitigations=[{"name": "threshold", "percentile": 50}])
    res = finetune(pipe, [{"method": "norm", "units": "*"}], data, cfg, quiet=True)
    cond, uncond = seen["outputs"]  # one conditional and one unconditional forward per step
    strength = seen["scores"][0]
    assert torch.allclose(strength, (cond - uncond).flatten(1).float().norm(dim=1))
    dropped = strength > torch.quantile(strength, 0.5)
    assert res.mitigation_counts["threshold"] == int(dropped.sum()) == 4
    grad = seen["grads"][0]
    assert torch.all(grad[dropped] == 0)
    assert torch.all(grad[~dropped].flatten(1).abs().sum(1) > 0)
    pred, tgt = cond.clone().requires_grad_(True), seen["targets"][0].detach()
    kept = F.mse_loss(pred[~dropped], tgt[~dropped], reduction="none").flatten(1).mean(1).mean()
    kept.backward()
    assert torch.allclose(grad, pred.grad, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize(
    "mode, message", [("fp16", "fp16 needs a GPU"), ("bf16", "needs native bf16")]
)
def test_a_precision_this_cpu_lacks_is_a_clear_error(data, monkeypatch, mode, message):
    """fp16 on any CPU; bf16 on a CPU without native bf16 (faked here: this one may have it)."""
    monkeypatch.setattr(models_precision, "cpu_has_bf16", lambda: False)
    with pytest.raises(UserError, match=message):
        finetune(
            load_pipeline("tiny:random"),
            [{"method": "freeze"}],
            data,
            _cfg(mixed_precision=mode),
            quiet=True,
        )


def test_bf16_trains_on_a_cpu_with_native_bf16_and_follows_fp32_closely(data, monkeypatch):
    """bf16 autocast on a CPU (the path `train.mixed_precision: bf16` takes, faked as native where
    the CPU lacks it: autocast computes bf16 either way) trains the same parameters as fp32, and
    its first step's loss agrees with fp32's to bf16's precision (8 mantissa bits)."""
    monkeypatch.setattr(models_precision, "cpu_has_bf16", lambda: True)
    spec = [{"method": "bitfit", "units": "mid_block"}]
    losses, moved = {}, {}
    for mode in ("no", "bf16"):
        pipe = load_pipeline("tiny:random")
        before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
        res = finetune(pipe, spec, data, _cfg(steps=2, mixed_precision=mode), quiet=True)
        assert res.status == "ok" and res.mixed_precision == mode
        losses[mode] = res.losses[0][1]
        moved[mode] = {n for n, p in pipe.unet.named_parameters() if not torch.equal(p, before[n])}
    assert moved["bf16"] == moved["no"] and moved["no"]
    assert losses["bf16"] == pytest.approx(losses["no"], rel=2e-2)
    assert losses["bf16"] != losses["no"]  # it did compute in bf16


class _RecordingAccelerator(Accelerator):
    """Records the gradient norms it clips; fakes an fp16 overflow on chosen backward calls."""

    norms: list[float]
    backward_calls: int = 0
    overflow_at: tuple[int, ...] = ()

    @property
    def mixed_precision(self) -> str:
        return "fp16" if self.scaler is not None else super().mixed_precision

    def backward(self, loss, **kwargs):
        self.backward_calls += 1
        if self.backward_calls in self.overflow_at:
            loss = loss * float("inf")  # what an fp16 overflow leaves in the gradients
        super().backward(loss, **kwargs)

    def clip_grad_norm_(self, parameters, max_norm, norm_type=2):
        norm = super().clip_grad_norm_(parameters, max_norm, norm_type)
        self.norms.append(float(norm))
        return norm


def _cpu_accelerator(scale: float | None, overflow_at: tuple[int, ...] = ()) -> Accelerator:
    """fp16's loss scaling on CPU (scale, unscale, skip) through accelerate's own GradScaler path."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import AutocastKwargs

    AcceleratorState._reset_state()
    acc = _RecordingAccelerator(cpu=True, device_placement=False)
    acc.norms, acc.overflow_at = [], overflow_at
    if scale:  # what Accelerator(mixed_precision="fp16") sets up on a GPU
        acc.scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=10**6)
        acc.native_amp = True
        acc.autocast_handler = AutocastKwargs(enabled=False)  # an fp32 forward: same numbers
    return acc


def test_fp16_loss_scaling_clips_unscaled_gradients(data, monkeypatch):

    spec, cfg = [{"method": "bitfit", "units": "mid_block"}], _cfg(steps=3, max_grad_norm=1e-4)
    runs = {}
    for scale in (None, 2.0**12):
        acc = _cpu_accelerator(scale)
        monkeypatch.setattr(precision, "make_accelerator", lambda precision, cuda, acc=acc: acc)
        pipe = load_pipeline("tiny:random")
        assert finetune(pipe, spec, data, cfg, quiet=True).status == "ok"
        runs[scale] = (acc, _trained(pipe.unet))
    (plain, ref), (scaled, got) = runs[None], runs[2.0**12]
    assert scaled.scaler.get_scale() == 2.0**12  # no step overflowed
    assert all(n > 1e-4 for n in plain.norms)  # clipping binds at every step
    # the norm clipping saw is the true one, not 4096 times it
    assert scaled.norms == pytest.approx(plain.norms, rel=1e-5)
    assert all(torch.allclose(ref[k], got[k], rtol=1e-5, atol=1e-8) for k in ref)


def test_fp16_overflow_step_is_skipped_and_the_schedule_waits(data, tmp_path, monkeypatch):

    acc = _cpu_accelerator(2.0**12, overflow_at=(1,))
    monkeypatch.setattr(precision, "make_accelerator", lambda precision, cuda: acc)
    saved, original = [], books_mod._save_checkpoint

    def save(path, step, unet, opt, lr_sched, *rest):
        saved.append((step, lr_sched.state_dict()["last_epoch"], _trained(unet)))
        original(path, step, unet, opt, lr_sched, *rest)

    monkeypatch.setattr(books_mod, "_save_checkpoint", save)
    pipe = load_pipeline("tiny:random")
    start = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    cfg = _cfg(steps=2, checkpoint_every=1, lr_schedule="linear")  # lr × 1, then × 0.5
    spec = [{"method": "bitfit", "units": "mid_block"}]
    res = finetune(pipe, spec, data, cfg, out_dir=tmp_path, quiet=True)
    assert res.status == "ok" and acc.scaler.get_scale() == 2.0**11  # backed off once
    (step1, epoch1, after1), (step2, epoch2, after2) = saved
    assert (step1, epoch1) == (1, 0) and all(torch.equal(v, start[k]) for k, v in after1.items())
    assert (step2, epoch2) == (2, 1)
    assert any(not torch.equal(v, start[k]) for k, v in after2.items())
    state = torch.load(tmp_path / "checkpoint" / "state.pt", weights_only=True)
    assert state["scaler"]["scale"] == 2.0**11  # resumes with the scaler where it was
    # after training the UNet is the plain module again: no autocast wrapper, ready to prepare anew
    unet = pipe.unet
    assert "forward" not in unet.__dict__ and "_original_forward" not in unet.__dict__
    assert not getattr(unet, "_is_accelerate_prepared", False)
    assert unet.forward.__func__ is type(unet).forward


def test_autocast_runs_during_training_and_is_undone_afterwards(data, monkeypatch):
    """accelerate's prepare wraps the UNet's forward in autocast (bf16 here, on CPU); after training
    pipe.unet computes in fp32 again, as sampling and saving expect."""
    from accelerate.state import AcceleratorState

    def bf16_on_cpu(precision, cuda):
        AcceleratorState._reset_state()
        return Accelerator(mixed_precision="bf16", cpu=True, device_placement=False)

    monkeypatch.setattr(precision, "make_accelerator", bf16_on_cpu)
    pipe = load_pipeline("tiny:random")
    dtypes = []
    pipe.unet.conv_in.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
    res = finetune(
        pipe, [{"method": "bitfit", "units": "mid_block"}], data, _cfg(steps=1), quiet=True
    )
    assert res.status == "ok" and set(dtypes) == {torch.bfloat16}
    assert "forward" not in pipe.unet.__dict__
    with torch.no_grad():
        pipe.unet(torch.randn(1, *pipe.latent_shape), 10, pipe.encode_prompts(["x"]))
    assert dtypes[-1] == torch.float32


def test_auto_precision_is_bf16_where_the_gpu_has_it(monkeypatch):
    monkeypatch.setattr(precision, "CPU_AUTO", "no")
    assert precision.resolve_precision("auto", cuda=False) == "no"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert precision.resolve_precision("auto", cuda=True) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert precision.resolve_precision("auto", cuda=True) == "fp16"
    assert precision.resolve_precision("fp16", cuda=True) == "fp16"
    with pytest.raises(UserError, match="needs a GPU"):
        precision.resolve_precision("fp16", cuda=False)


def test_auto_on_a_cpu_takes_bf16_only_where_chosen_and_native(monkeypatch):
    monkeypatch.setattr(precision, "CPU_AUTO", "bf16")
    monkeypatch.setattr(models_precision, "cpu_has_bf16", lambda: True)
    assert precision.resolve_precision("auto", cuda=False) == "bf16"
    assert precision.resolve_precision("no", cuda=False) == "no"
    monkeypatch.setattr(models_precision, "cpu_has_bf16", lambda: False)
    assert precision.resolve_precision("auto", cuda=False) == "no"


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16", "auto"])
def test_mixed_precision_trains_on_a_gpu(data, precision):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    pipe = load_pipeline("tiny:random").to("cuda")
    start = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    spec = [{"method": "full", "units": "*:*_attn"}]
    res = finetune(pipe, spec, data, _cfg(steps=5, mixed_precision=precision), quiet=True)
    assert res.status == "ok" and torch.isfinite(torch.tensor(res.final_loss))
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    assert res.mixed_precision == (expected if precision == "auto" else precision)
    trained = _trained(pipe.unet)
    assert all(v.dtype == torch.float32 for v in trained.values())  # fp32 master weights
    assert any(not torch.equal(v, start[k]) for k, v in trained.items())
    assert "forward" not in pipe.unet.__dict__  # sampling runs the plain module


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


def test_cache_encodings_is_a_train_flag_and_older_records_train_the_same(
    data, tmp_path, monkeypatch
):
    """`--no-cache-encodings` reaches the fine-tune; a record written before the field existed
    compares as the default (cache on), so resumed searches keep their finished trials."""
    import capsearch.training.loop as train_mod
    from capsearch.cli import main
    from capsearch.settings import same_training

    seen, real = [], train_mod.finetune

    def spy(pipe, spec, data, cfg, **kw):
        seen.append(cfg.cache_encodings)
        return real(pipe, spec, data, cfg, **kw)

    monkeypatch.setattr(train_mod, "finetune", spy)
    args = ["train", "--model", "tiny:random", "--data", str(data), "--method", "bitfit",
            "--units", "mid_block", "--steps", "1", "--batch-size", "2"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "off"), "--no-cache-encodings"]) == 0
    assert main([*args, "--out", str(tmp_path / "on")]) == 0
    assert seen == [False, True]
    old = {"steps": 300, "lr": 1e-4}
    assert same_training(old, {**old, "cache_encodings": True})
