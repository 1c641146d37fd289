"""Pipeline loading (every spec form), sampling determinism, save/load round trip, shipped files."""

from __future__ import annotations

import json

import pytest
import torch

from capsearch.errors import UserError
from capsearch.models.load import TINY_BASE, load_pipeline
from capsearch.models.sampling import generate
from capsearch.training.pretrain import folder_sha256


@pytest.fixture(scope="module")
def random_pipe():
    return load_pipeline("tiny:random")


def test_tiny_random_has_sd_classes_and_names(random_pipe):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    assert isinstance(random_pipe.unet, UNet2DConditionModel)
    assert isinstance(random_pipe.text_encoder, CLIPTextModel)
    names = {n for n, _ in random_pipe.unet.named_modules()}
    for expected in (
        "down_blocks.0.resnets.1",
        "down_blocks.2.attentions.0",
        "mid_block",
        "up_blocks.1.attentions.2",
    ):
        assert expected in names
    assert random_pipe.vae is None
    assert random_pipe.latent_shape == (1, 32, 32)


def test_tokenizer_keeps_radiology_words_whole(random_pipe):
    toks = random_pipe.tokenizer.tokenize("small left pleural effusion, no pneumothorax")
    assert "effusion</w>" in toks and "pneumothorax</w>" in toks


def test_shipped_base_loads_and_matches_its_sha256():
    meta = json.loads((TINY_BASE / "capsearch.json").read_text())
    assert folder_sha256(TINY_BASE) == meta["sha256"]
    pipe = load_pipeline("tiny")
    assert pipe.dtype == torch.float32
    assert sum(p.numel() for p in pipe.unet.parameters()) == meta["unet_parameters"]
    assert "--device cuda" in meta["command"] and meta["steps"] > 1000


def test_same_seed_same_samples_different_seed_differs(random_pipe):
    a = generate(random_pipe, ["a circle", "a ring"], n_per_prompt=2, steps=3, seed=1)
    b = generate(random_pipe, ["a circle", "a ring"], n_per_prompt=2, steps=3, seed=1)
    c = generate(random_pipe, ["a circle", "a ring"], n_per_prompt=2, steps=3, seed=2)
    assert a.shape == (4, 1, 32, 32)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert a.min() >= -1 and a.max() <= 1


def test_on_step_sees_both_predictions_and_changes_nothing(random_pipe):
    prompts = ["a circle", "a ring"]
    seen = []

    def hook(first, t, eps_u, eps_c):
        seen.append((first, int(t), eps_u.shape[0], float((eps_c - eps_u).abs().max())))

    plain = generate(random_pipe, prompts, n_per_prompt=3, steps=2, seed=4, batch_size=4)
    hooked = generate(
        random_pipe, prompts, n_per_prompt=3, steps=2, seed=4, batch_size=4, on_step=hook
    )
    assert torch.equal(plain, hooked)
    assert [(f, b) for f, _, b, _ in seen] == [(0, 4), (0, 4), (4, 2), (4, 2)]
    assert all(diff > 0 for *_, diff in seen)  # conditional and unconditional predictions differ
    # At guidance 1 the unconditional pass exists only for the hook; the images are the conditional ones.
    at_one = generate(random_pipe, prompts, 2, 2, guidance=1.0, seed=4)
    hooked = generate(random_pipe, prompts, 2, 2, guidance=1.0, seed=4, on_step=hook)
    assert torch.allclose(at_one, hooked, atol=1e-5)


def test_save_load_round_trip(random_pipe, tmp_path):
    random_pipe.save(tmp_path / "pipe")
    again = load_pipeline(str(tmp_path / "pipe"))
    x = torch.randn(2, 1, 32, 32)
    ehs = random_pipe.encode_prompts(["a", "b"])
    assert torch.equal(ehs, again.encode_prompts(["a", "b"]))
    with torch.no_grad():
        ref = random_pipe.unet(x, torch.tensor([10, 500]), encoder_hidden_states=ehs).sample
        got = again.unet(x, torch.tensor([10, 500]), encoder_hidden_states=ehs).sample
    assert torch.equal(ref, got)


@pytest.mark.parametrize("spec", ["/nonexistent/model", "nobody/no-such-model-xyz", "not a spec!"])
def test_missing_model_is_one_clear_line(spec, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(UserError) as err:
        load_pipeline(spec)
    assert "\n" not in str(err.value) and spec.split("/")[-1] in str(err.value)


def test_folder_without_unet_is_rejected(tmp_path):
    with pytest.raises(UserError, match="unet"):
        load_pipeline(str(tmp_path))


def test_hub_id_from_local_cache(random_pipe, tmp_path, monkeypatch):
    """A hub id resolves through the local HF cache layout only (no network)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    snap = cache / "models--acme--tiny-sd" / "snapshots" / ("0" * 40)
    random_pipe.save(snap)
    (cache / "models--acme--tiny-sd" / "refs").mkdir(parents=True)
    (cache / "models--acme--tiny-sd" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    pipe = load_pipeline("acme/tiny-sd")
    assert pipe.unet.config.in_channels == 1


def test_cli_sample_draws_what_its_flags_say(tmp_path, monkeypatch, capsys):
    """`capsearch sample`'s images are generate's for --prompt, --n, --steps, --guidance,
    --scheduler and --seed on --model with --delta applied; the grid has --n per row."""
    import capsearch.models.sampling as sampling
    from capsearch.cli import main
    from capsearch.methods import apply_methods
    from capsearch.models.delta import load_delta, save_delta

    trained = load_pipeline("tiny")  # the shipped base: its samples are not saturated
    applied = apply_methods(trained.unet, [{"method": "bitfit", "units": "mid_block"}])
    with torch.no_grad():  # a "trained" delta: every trainable tensor moved from its init
        for p in trained.unet.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    save_delta(trained.unet, tmp_path / "delta", applied=applied, base_model="tiny")
    drawn, grids = [], []
    real_generate, real_grid = sampling.generate, sampling.save_grid

    def spy_generate(*args, **kwargs):
        drawn.append((args[1:], kwargs, real_generate(*args, **kwargs)))
        return drawn[-1][2]

    def spy_grid(images, path, nrow=8, captions=None):
        grids.append((nrow, captions))
        real_grid(images, path, nrow=nrow, captions=captions)

    monkeypatch.setattr(sampling, "generate", spy_generate)
    monkeypatch.setattr(sampling, "save_grid", spy_grid)
    out = tmp_path / "grid" / "s.png"
    prompts = ["small left pleural effusion", "no acute process"]
    argv = ["sample", "--model", "tiny", "--delta", str(tmp_path / "delta"),
            "--prompt", prompts[0], "--prompt", prompts[1], "--n", "3", "--steps", "2",
            "--guidance", "2.0", "--scheduler", "unipc", "--seed", "7", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert capsys.readouterr().out == f"wrote {out} (6 images)\n"
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert grids == [(3, [prompts[0]] * 3 + [prompts[1]] * 3)]
    ((args, kwargs, images),) = drawn
    assert args == (prompts, 3, 2, 2.0, 7) and kwargs == {"scheduler": "unipc"}
    pipe = load_pipeline("tiny")
    without = real_generate(pipe, prompts, 3, 2, 2.0, 7, scheduler="unipc")
    pipe.unet = load_delta(pipe.unet, tmp_path / "delta")
    assert torch.equal(images, real_generate(pipe, prompts, 3, 2, 2.0, 7, scheduler="unipc"))
    assert (images - without).abs().max() > 1e-3  # the delta was applied


def test_the_broad_base_is_loaded_by_name_and_missing_is_one_line(tmp_path, monkeypatch):
    """`tiny-broad` names the base pretrained on the broad corpus: loaded from its folder like `tiny`,
    and while that folder is not built, a UserError that says how to build it."""
    from capsearch.export.pipeline import base_folder
    from capsearch.models import load

    monkeypatch.setitem(load.SHIPPED, "tiny-broad", tmp_path / "absent")
    with pytest.raises(UserError, match=r"tiny-broad base model is missing .* build it with "
                       r"`capsearch pretrain shapes --corpus broad"):  # fmt: skip
        load_pipeline("tiny-broad")
    folder = tmp_path / "tiny_broad"
    saved = load_pipeline("tiny:random")
    saved.save(folder)
    monkeypatch.setitem(load.SHIPPED, "tiny-broad", folder)
    pipe = load_pipeline("tiny-broad")
    assert pipe.spec == "tiny-broad" and base_folder("tiny-broad") == folder
    for name, p in saved.unet.state_dict().items():
        assert torch.equal(pipe.unet.state_dict()[name], p)
