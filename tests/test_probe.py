"""The mid-training probe: memorisation-aware early-stopping signal (capsearch.training.probe)."""

from __future__ import annotations

import pytest
import torch
from conftest import phantom_data

from capsearch.models.load import load_pipeline
from capsearch.training.loop import TrainSettings, finetune
from capsearch.training.probe import Probe, probe_score


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return phantom_data(tmp_path_factory, seed=3, held_out_images=8)


def test_probe_score_grows_with_either_memorisation_signal():
    assert probe_score(0.2, None, None) == pytest.approx(0.2)
    assert probe_score(0.2, -0.3, 0.8) == pytest.approx(0.2)  # no gap opened, no stronger pull
    assert probe_score(0.2, 0.5, None) == pytest.approx(0.3)
    assert probe_score(0.2, 0.5, 2.0) == pytest.approx(0.6)


def _probe(pipe, data):
    from capsearch.training.loop import _load_training_images

    ds, images, captions, groups = _load_training_images(data, 32)
    return Probe(pipe, ds.root, images, captions, groups, 32, seed=7)


def test_the_base_gap_is_subtracted_and_batches_are_paired(data):
    pipe = load_pipeline("tiny:random")
    probe = _probe(pipe, data)
    assert probe.held.shape == probe.train.shape and len(probe.train_caps) == len(probe.held)
    assert probe.mem and probe.other and not set(probe.mem) & set(probe.other)
    probe.measure_base(pipe, lambda x: x)
    out = probe(pipe, lambda x: x)
    # The same model, the same noise and timesteps: the opened gap is exactly zero.
    assert out["loss_gap"] == pytest.approx(0.0, abs=1e-12)
    assert out["raw_gap"] == pytest.approx(probe.base_gap)
    assert out["probe_score"] == pytest.approx(
        probe_score(out["heldout_loss"], 0.0, out["strength_ratio"])
    )


def test_fitting_the_training_batch_opens_the_gap(data):
    """A model trained on exactly the probe's training images fits them better than held-out ones."""
    pipe = load_pipeline("tiny:random")
    probe = _probe(pipe, data)
    probe.measure_base(pipe, lambda x: x)
    unet = pipe.unet
    opt = torch.optim.Adam(unet.parameters(), lr=1e-3)
    ehs = pipe.encode_prompts(probe.train_caps)
    for _ in range(30):  # memorise the probe's own training batch (its fixed noise and timesteps)
        noisy = pipe.scheduler.add_noise(probe.train, probe.noise, probe.t)
        loss = torch.nn.functional.mse_loss(unet(noisy, probe.t, ehs).sample, probe.noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = probe(pipe, lambda x: x)
    assert out["train_loss"] < out["heldout_loss"] and out["loss_gap"] > 0.1
    assert out["probe_score"] > out["heldout_loss"]


def test_finetune_reports_the_probe_with_every_signal(data):
    pipe = load_pipeline("tiny:random")
    seen = []
    config = TrainSettings(steps=4, batch_size=4, lr=1e-3, probe_every=2)
    result = finetune(
        pipe,
        [{"method": "bitfit", "units": "mid_block"}],
        data,
        config,
        callbacks=[lambda event, payload: seen.append(payload) if event == "probe" else None],
        quiet=True,
    )
    assert [p["step"] for p in result.probes] == [2, 4] and seen == result.probes
    for p in result.probes:
        assert {"heldout_loss", "train_loss", "loss_gap", "strength_ratio", "probe_score"} <= set(p)
        assert p["probe_score"] >= p["heldout_loss"]
