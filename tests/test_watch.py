"""Watching a fine-tune: TensorBoard loss and rates of every step, previews, resume, progress line."""

from __future__ import annotations

import json
import math

import pytest
import torch

from capsearch.models.load import load_pipeline
from capsearch.progress import trial_progress
from capsearch.training.loop import TrainSettings, finetune
from capsearch.training.previews import PREVIEW_PER_PROMPT, preview_prompts, render_preview
from capsearch.training.tblog import LOSS_TAG, event_files, image_steps, read_events, read_scalars
from capsearch.worlds.phantom import write_phantom_dataset

# Two entries, the second at its own rate: two parameter groups (capsearch.methods.optimizer_groups).
SPEC = [
    {"method": "bitfit", "units": "mid_block"},
    {"method": "bitfit", "units": "up_blocks.0", "lr": 1e-2},
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    write_phantom_dataset(root, patients=12, size=32, seed=5, dup_fraction=0.2, dup_copies=2)
    return root


def _cfg(**kw) -> TrainSettings:
    base = {"steps": 4, "batch_size": 4, "lr": 1e-3, "caption_dropout": 0.0,
            "lr_schedule": "constant_with_warmup", "warmup_steps": 2}  # fmt: skip
    return TrainSettings(**{**base, **kw})


def _trained(unet) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}


def test_every_step_logs_its_loss_and_the_rate_of_each_group(data, tmp_path):
    result = finetune(
        load_pipeline("tiny:random"), SPEC, data, _cfg(), out_dir=tmp_path, quiet=True
    )
    assert result.status == "ok"
    assert len(event_files(tmp_path)) == 1  # beside train_log.jsonl, in the fine-tune's folder
    scalars = read_scalars(tmp_path)
    assert set(scalars) == {LOSS_TAG, "lr/vectors", "lr/vectors_0.01"}
    losses = scalars[LOSS_TAG]
    assert [s for s, _ in losses] == [1, 2, 3, 4]
    assert all(math.isfinite(v) and v > 0 for _, v in losses)
    assert losses[-1][1] == pytest.approx(result.final_loss, rel=1e-6)  # float32 in the event
    # constant_with_warmup over 2 steps: the rate each step trained at is 0, 1/2, 1, 1 of the peak
    for tag, peak in (("lr/vectors", 1e-3), ("lr/vectors_0.01", 1e-2)):
        assert scalars[tag] == [(s, pytest.approx(peak * f)) for s, f in
                                ((1, 0.0), (2, 0.5), (3, 1.0), (4, 1.0))]  # fmt: skip
    texts = [v.tag for p in event_files(tmp_path) for e in read_events(p) for v in e.summary.value
             if v.HasField("tensor")]  # fmt: skip
    assert any("method_spec" in t for t in texts)


def test_previews_leave_the_training_stream_unchanged(data, tmp_path, monkeypatch):
    """Previews sample on their own generators: the loss of every step and the weights are the same."""
    import capsearch.training.previews as previews

    monkeypatch.setattr(previews, "PREVIEW_STEPS", 4)  # the default prompts, fewer sampler steps
    with_previews, without = load_pipeline("tiny:random"), load_pipeline("tiny:random")
    on, off = tmp_path / "on", tmp_path / "off"
    finetune(with_previews, SPEC, data, _cfg(preview_every=3), out_dir=on, quiet=True)
    finetune(without, SPEC, data, _cfg(), out_dir=off, quiet=True)
    assert read_scalars(on)[LOSS_TAG] == read_scalars(off)[LOSS_TAG]
    a, b = _trained(with_previews.unet), _trained(without.unet)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # every 3 steps and the last one, as PNG grids and TensorBoard images; none without the option
    assert sorted(p.name for p in (on / "previews").iterdir()) == [
        "step_000003.png",
        "step_000004.png",
    ]
    assert image_steps(on) == [3, 4]
    assert not (off / "previews").exists() and image_steps(off) == []


def test_a_preview_is_a_fixed_grid_and_touches_no_global_rng(data, tmp_path, monkeypatch):
    import capsearch.training.previews as previews

    monkeypatch.setattr(previews, "PREVIEW_STEPS", 4)
    pipe = load_pipeline("tiny:random")
    prompts = ["small left pleural effusion", "no acute findings"]
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first = render_preview(pipe, pipe.unet, prompts, 7, tmp_path / "a")
    assert torch.equal(torch.random.get_rng_state(), before)
    again = render_preview(pipe, pipe.unet, prompts, 7, tmp_path / "b")
    assert first.name == "step_000007.png" and first.read_bytes() == again.read_bytes()
    from PIL import Image

    with Image.open(first) as img:  # 2 prompts × PREVIEW_PER_PROMPT samples: taller than wide
        assert img.size[1] > img.size[0] and PREVIEW_PER_PROMPT == 2
    captions = ["b", "a", "b", "c", "d", "e"]
    assert preview_prompts([], captions) == ["b", "a", "c", "d"]  # first distinct captions
    assert preview_prompts(["x"], captions) == ["x"]


def test_a_resumed_fine_tune_appends_without_repeating_steps(data, tmp_path, monkeypatch):
    """Killed at step 5 after a checkpoint at 3: the resumed session's file restarts at step 4."""
    import capsearch.training.loop as train_mod

    straight = tmp_path / "straight"
    finetune(load_pipeline("tiny:random"), SPEC, data, _cfg(steps=6), out_dir=straight, quiet=True)
    cut = tmp_path / "cut"
    cfg = _cfg(steps=6, checkpoint_every=3)
    original, calls = train_mod._optimizer_step, []

    def stop_at_fifth(run, state):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        original(run, state)

    monkeypatch.setattr(train_mod, "_optimizer_step", stop_at_fifth)
    first = finetune(load_pipeline("tiny:random"), SPEC, data, cfg, out_dir=cut, quiet=True)
    monkeypatch.setattr(train_mod, "_optimizer_step", original)
    assert first.status == "stopped" and first.steps == 4
    again = finetune(load_pipeline("tiny:random"), SPEC, data, cfg, out_dir=cut, resume=True,
                     quiet=True)  # fmt: skip
    assert again.status == "ok" and again.steps == 6
    files = event_files(cut)
    assert len(files) == 2  # the interrupted session's file and the resumed one's
    logged = [e.step for p in files for e in read_events(p) for v in e.summary.value
              if v.tag == LOSS_TAG]  # fmt: skip
    assert logged == [1, 2, 3, 4, 4, 5, 6]  # step 4 twice on disk: once before the kill
    merged = read_scalars(cut)
    assert merged == read_scalars(straight)  # each step once, as if never interrupted


def test_read_scalars_agrees_with_tensorboard(data, tmp_path):
    """Where TensorBoard is installed, its EventAccumulator reads the same series."""
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    finetune(load_pipeline("tiny:random"), SPEC, data, _cfg(), out_dir=tmp_path, quiet=True)
    acc = accumulator.EventAccumulator(str(tmp_path))
    acc.Reload()
    for tag, points in read_scalars(tmp_path).items():
        assert [(e.step, e.value) for e in acc.Scalars(tag)] == points


def test_trial_progress_reads_step_and_rate_from_the_trial_log(tmp_path):
    folder = tmp_path / "t003"
    folder.mkdir()
    assert trial_progress(folder) is None  # not started
    (folder / "params.json").write_text(json.dumps({"train": {"steps": 300}}))
    lines = [{"step": 10 * i, "loss": 0.1, "time": 1000.0 + 5 * i} for i in range(1, 6)]
    (folder / "train_log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert trial_progress(folder) == "t003 50/300 2.0 it/s"
    (folder / "train_log.jsonl").write_text(json.dumps({"step": 10, "loss": 0.1}) + "\n")
    assert trial_progress(folder) == "t003 10/300"  # one line, or lines without times: no rate


def test_preview_settings_do_not_make_a_different_training():
    """A checkpoint of a trial recorded before the preview fields existed still matches its plan."""
    from capsearch.settings import same_training

    old_record = _cfg().model_dump(mode="json", exclude={"preview_every", "preview_prompts"})
    assert same_training(old_record, _cfg(preview_every=5, preview_prompts=["x"]).model_dump())
    assert not same_training(old_record, _cfg(lr=2e-3).model_dump())
    assert not same_training({"steps": "many"}, _cfg().model_dump())  # unreadable: no match


def test_trial_progress_of_a_retraining_reads_its_plan_and_takes_a_name(tmp_path):
    folder = tmp_path / "t009" / "retrained"
    folder.mkdir(parents=True)
    (folder / "plan.json").write_text(json.dumps({"train": {"steps": 2000}}))
    (folder / "train_log.jsonl").write_text(json.dumps({"step": 30, "loss": 0.1}) + "\n")
    assert trial_progress(folder, name="t009 retraining") == "t009 retraining 30/2000"
