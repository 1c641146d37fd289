"""The mid-training probe: memorisation-aware early-stopping signal (capsearch.training.probe)."""

from __future__ import annotations

import json

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


def test_the_own_share_factor_is_one_up_to_chance_and_two_at_full_copying():
    held, gap, ratio = 0.2, 0.5, 2.0
    before = held * (1 + max(0, gap)) * max(1, ratio)  # the two-signal score, as it always was
    assert probe_score(held, gap, ratio) == before  # exactly: no own-image share measured
    assert probe_score(held, gap, ratio, own_share=0.1, own_chance=0.1) == pytest.approx(0.6)
    assert probe_score(held, gap, ratio, own_share=0.05, own_chance=0.1) == pytest.approx(0.6)
    # (0.55 − 0.1) / (1 − 0.1) = 0.5 of the room above chance
    assert probe_score(held, gap, ratio, own_share=0.55, own_chance=0.1) == pytest.approx(0.9)
    assert probe_score(held, gap, ratio, own_share=1.0, own_chance=0.1) == pytest.approx(1.2)
    assert probe_score(held, None, None, own_share=1.0, own_chance=1.0) == pytest.approx(0.2)


def _tiled_l2(a: torch.Tensor, b: torch.Tensor, tiles: int = 4) -> float:
    """Carlini et al.'s distance by hand: per tile √(mean squared difference) of [0, 1] pixels, the
    largest over the tiles."""
    a, b = (a.double() + 1) / 2, (b.double() + 1) / 2
    h = a.shape[-1] // tiles
    worst = 0.0
    for i in range(tiles):
        for j in range(tiles):
            part = (slice(None), slice(i * h, (i + 1) * h), slice(j * h, (j + 1) * h))
            worst = max(worst, float(((a[part] - b[part]) ** 2).mean().sqrt()))
    return worst


def _own_probe(pipe, data, monkeypatch, make_sample, n_captions=3):
    """A probe with own captions whose sampler is `make_sample(caption_index, sample_index, caption)`;
    the probe, the training set and the sampler's calls."""
    import capsearch.training.probe as probe_mod
    from capsearch.training.loop import _load_training_images

    ds, images, captions, groups = _load_training_images(data, 32)
    calls = []

    def stub(pipe_, prompts, n_per_prompt, steps, guidance, seed, **kw):
        calls.append((list(prompts), n_per_prompt, steps, guidance, seed))
        torch.randn(5)  # draws from the global RNG: the probe must put its state back
        return torch.stack(
            [make_sample(j, k, p) for j, p in enumerate(prompts) for k in range(n_per_prompt)]
        )

    monkeypatch.setattr(probe_mod, "generate", stub)
    probe = Probe(pipe, ds.root, images, captions, groups, 32, seed=7, own_captions=n_captions)
    return probe, (images, captions, groups), calls


def test_own_share_is_the_known_share_of_copies(data, monkeypatch):
    """Caption j's sampler returns its own training image on j + 1 of its 4 samples and another
    caption's training image on the rest: 1 + 2 + 3 copies of 12 samples."""
    pipe = load_pipeline("tiny:random")
    box = {}

    def sample(j, k, caption):
        images, captions, groups = box["train"]
        if k <= j:
            return images[captions.index(caption)]
        return images[next(i for i, g in enumerate(groups) if g is None)]

    probe, box["train"], calls = _own_probe(pipe, data, monkeypatch, sample)
    images, captions, groups = box["train"]
    memorised = {c for c, g in zip(captions, groups) if g is not None}
    assert len(probe.own) == 3 and set(probe.own) <= memorised
    pipe.unet.train()
    rng = torch.get_rng_state()
    first, second = probe(pipe, lambda x: x), probe(pipe, lambda x: x)
    assert torch.equal(torch.get_rng_state(), rng) and pipe.unet.training
    assert first["own_share"] == second["own_share"] == 0.5
    # the same captions and initial noise at every probe, 4 samples of a 10-step DDIM at guidance 1
    assert calls == [(probe.own, 4, 10, 1.0, 7)] * 2
    chance = 3 / len(images)  # each memorised image is stored 3 times (conftest.phantom_data)
    assert first["own_chance"] == pytest.approx(chance)
    expected = first["heldout_loss"] * max(1.0, first["strength_ratio"])  # no gap: no base measured
    assert first["probe_score"] == pytest.approx(expected * (1 + (0.5 - chance) / (1 - chance)))


def test_own_share_matches_a_brute_force_nearest_neighbour(data, monkeypatch):
    """Noisy training images, of own and other rows: the share a loop over every training image finds."""
    pipe = load_pipeline("tiny:random")
    g = torch.Generator().manual_seed(11)
    box = {}

    def sample(j, k, caption):
        images, captions, _ = box["train"]
        own = [i for i, c in enumerate(captions) if c == caption]
        row = (
            own[k % len(own)] if (j + k) % 2 else int(torch.randint(len(images), (1,), generator=g))
        )
        return (images[row] + 0.6 * torch.randn(images[row].shape, generator=g)).clamp(-1, 1)

    probe, box["train"], _ = _own_probe(pipe, data, monkeypatch, sample, n_captions=4)
    images, captions, _ = box["train"]
    g.manual_seed(11)
    samples = torch.stack([sample(j, k, p) for j, p in enumerate(probe.own) for k in range(4)])
    g.manual_seed(11)
    got = probe(pipe, lambda x: x)["own_share"]
    hits = 0
    for n, x in enumerate(samples):
        dist = [_tiled_l2(x, y) for y in images]
        hits += captions[dist.index(min(dist))] == probe.own[n // 4]
    assert 0 < hits < len(samples) and got == hits / len(samples)


def test_the_own_share_leaves_training_bit_identical_and_is_logged(data, tmp_path):
    spec = [{"method": "bitfit", "units": "mid_block"}]
    runs = {}
    for n in (0, 2):
        pipe = load_pipeline("tiny:random")
        config = TrainSettings(steps=4, batch_size=4, lr=1e-2, probe_every=2, probe_own_captions=n)
        finetune(pipe, spec, data, config, out_dir=tmp_path / str(n), quiet=True)
        lines = (tmp_path / str(n) / "train_log.jsonl").read_text().splitlines()
        runs[n] = (
            pipe.unet.state_dict(),
            [e["probe"] for e in map(json.loads, lines) if "probe" in e],
        )
    (off, off_probes), (on, on_probes) = runs[0], runs[2]
    assert off.keys() == on.keys() and all(torch.equal(off[k], on[k]) for k in off)
    assert [p["step"] for p in on_probes] == [2, 4]
    base = load_pipeline("tiny:random").unet.state_dict()
    assert not all(torch.equal(base[k], on[k]) for k in base)  # it did train
    chance = 3 / 49  # 7 images stored 3 times among 49 training images (conftest.phantom_data)
    for a, b in zip(off_probes, on_probes, strict=True):
        assert "own_share" not in a
        assert a["probe_score"] == a["heldout_loss"] * (1 + max(0, a["loss_gap"])) * max(
            1, a["strength_ratio"]
        )
        assert {k: b[k] for k in a if k != "probe_score"} == {
            k: v for k, v in a.items() if k != "probe_score"
        }  # every other signal unchanged
        assert b["own_share"] * 8 == round(b["own_share"] * 8)  # 2 captions × 4 samples
        assert b["own_chance"] == pytest.approx(chance)
        factor = 1 + max(0.0, b["own_share"] - chance) / (1 - chance)
        assert b["probe_score"] == pytest.approx(a["probe_score"] * factor)
