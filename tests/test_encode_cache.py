"""Frozen encodings computed once per fine-tune (capsearch.training.encode_cache): the same losses as encoding
every step, bit for bit, on the tiny pixel-space base and on an SD-shaped pipeline with a VAE."""

from __future__ import annotations

import pytest
import torch

import capsearch.training.books as books_mod
import capsearch.training.loop as train_mod
from capsearch.models.load import TOKENIZER_DIR, Pipeline, load_pipeline
from capsearch.training.encode_cache import TextStates, TrainingInputs, host_draw, to_device
from capsearch.training.loop import TrainSettings, finetune
from capsearch.worlds.phantom import write_phantom_dataset

REAL_LOSS = train_mod._loss
MITIGATIONS = {
    "dropout": [],
    "dropout+rwa-per-draw": [{"name": "rwa", "k": 2, "p": 0.5}],
    "rwa-fixed+replace+gni": [
        {"name": "rwa", "k": 1, "p": 0.5, "mode": "fixed"},
        {"name": "caption_replace", "p": 0.3},
        {"name": "gni", "sigma": 0.1},
    ],
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    write_phantom_dataset(root, patients=8, size=32, seed=7)  # 17 images, 7 distinct reports
    return root


def sd_shaped() -> Pipeline:
    """A pipeline of SD's classes at tiny widths: CLIP text encoder, VAE of factor 8, latent UNet."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from capsearch.models.tokenizer import load_clip_tokenizer

    torch.manual_seed(0)
    tok = load_clip_tokenizer(TOKENIZER_DIR)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=16, attention_head_dim=2,
    )  # fmt: skip
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16), latent_channels=4, norm_num_groups=4, layers_per_block=1,
    ).requires_grad_(False).eval()  # fmt: skip
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    ))  # fmt: skip
    scheduler = DDPMScheduler(beta_schedule="scaled_linear")
    return Pipeline(tok, text.requires_grad_(False).eval(), unet, scheduler, vae, spec="sd-shaped")


def _fine_tune(pipe, data, monkeypatch, **kw) -> dict:
    """A short fine-tune; every micro-batch's loss, the trained weights and how often encoders ran."""
    losses, calls = [], {"text": 0, "vae": 0}

    def spy(run, state):
        loss, touched = REAL_LOSS(run, state)
        losses.append(loss.item())
        return loss, touched

    monkeypatch.setattr(train_mod, "_loss", spy)
    pipe.text_encoder.register_forward_hook(lambda *a: calls.__setitem__("text", calls["text"] + 1))
    if pipe.vae is not None:
        hook = lambda *a: calls.__setitem__("vae", calls["vae"] + 1)  # noqa: E731
        pipe.vae.encoder.register_forward_hook(hook)
    cfg = TrainSettings(**{"steps": 8, "batch_size": 4, "lr": 1e-3, "caption_dropout": 0.3, **kw})
    spec = [{"method": "lora", "units": "*:*_attn", "rank": 2}]
    res = finetune(pipe, spec, data, cfg, quiet=True)
    assert res.status == "ok" and res.steps == cfg.steps
    weights = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if p.requires_grad}
    return {"losses": losses, "weights": weights, "rng": torch.get_rng_state(), **calls}


@pytest.mark.parametrize("mitigations", MITIGATIONS.values(), ids=list(MITIGATIONS))
def test_cached_tiny_fine_tune_has_the_per_step_losses(data, monkeypatch, mitigations):
    kw = {"mitigations": mitigations}
    runs = {c: _fine_tune(load_pipeline("tiny:random"), data, monkeypatch, cache_encodings=c, **kw)
            for c in (True, False)}  # fmt: skip
    cached, plain = runs[True], runs[False]
    assert len(cached["losses"]) == 8 and cached["losses"] == plain["losses"]  # bit for bit
    assert all(torch.equal(cached["weights"][n], w) for n, w in plain["weights"].items())
    assert plain["text"] == 8  # the text encoder ran every step ...
    if mitigations != MITIGATIONS["dropout+rwa-per-draw"]:  # ... and, cached, only on new captions
        assert cached["text"] < 8


@pytest.mark.parametrize("mitigations", list(MITIGATIONS.values())[:2], ids=list(MITIGATIONS)[:2])
def test_cached_vae_latents_give_the_per_step_losses_and_the_random_stream(
    data, monkeypatch, mitigations
):
    kw = {"size": 64, "mitigations": mitigations}
    runs = {c: _fine_tune(sd_shaped(), data, monkeypatch, cache_encodings=c, **kw)
            for c in (True, False)}  # fmt: skip
    cached, plain = runs[True], runs[False]
    assert cached["losses"] == plain["losses"]
    assert all(torch.equal(cached["weights"][n], w) for n, w in plain["weights"].items())
    # The latents are drawn from the global RNG exactly as latent_dist.sample() draws them.
    assert torch.equal(cached["rng"], plain["rng"])
    assert plain["vae"] == 8 and cached["vae"] == 5  # every step; once, 17 images in chunks of 4


def test_posterior_draws_are_the_vae_samples(data):
    """Latents from the stored mean and std equal latent_dist.sample() after the same seed."""
    from capsearch.datasets.folder import load_images

    pipe, images = sd_shaped(), load_images(data, "train", 64)
    inputs = TrainingInputs(pipe, images, chunk=4, cache=True)
    assert inputs.mean.shape == (len(images), 4, 8, 8) and torch.all(inputs.std > 0)
    idx = [3, 0, 16, 3]
    torch.manual_seed(5)
    cached = inputs.latents(idx)
    torch.manual_seed(5)
    with torch.no_grad():
        direct = pipe.vae.encode(images[idx].expand(-1, 3, -1, -1)).latent_dist.sample()
    assert torch.equal(cached, direct * pipe.vae.config.scaling_factor)
    assert not torch.equal(cached[0], cached[3])  # the same image, two draws


def test_text_states_store_recurring_captions_only_and_stay_bounded():
    pipe = load_pipeline("tiny:random")
    recurring = ["", "a", "b", "c", "d"]
    table = TextStates(pipe, recurring, max_entries=3)
    batch = ["a", "", "a", "rewritten a"]
    assert torch.equal(table(batch), pipe.encode_prompts(batch))
    assert list(table.table) == ["a", ""] and table.encoded == 3  # a duplicate encodes once
    table(["b", "c", "a"])  # "" is the least recently used: out first
    assert list(table.table) == ["b", "c", "a"] and table.encoded == 5
    table(["rewritten b", "a"])
    assert list(table.table) == ["b", "c", "a"] and table.encoded == 6  # only the new caption ran
    row = table.table["a"]
    small = TextStates(pipe, recurring, max_bytes=2 * row.numel() * row.element_size())
    small(recurring)
    assert list(small.table) == ["c", "d"]  # two entries fit the byte bound
    assert row.untyped_storage().size() == row.numel() * row.element_size()  # not a batch view


def test_pixel_images_stay_on_the_device_and_cache_off_keeps_them_as_given():
    pipe = load_pipeline("tiny:random")
    images = torch.rand(5, 1, 32, 32) * 2 - 1
    on, off = TrainingInputs(pipe, images, 4, cache=True), TrainingInputs(pipe, images, 4, False)
    assert on.images.device == pipe.device and on.text is not None and off.text is None
    assert torch.equal(on.latents([4, 1]), images[[4, 1]])
    assert torch.equal(off.states(["x", "x"]), pipe.encode_prompts(["x", "x"]))


def test_host_draws_on_cpu_are_the_plain_draws():
    cpu = torch.device("cpu")
    a = host_draw(torch.randn, (3, 4), generator=torch.Generator().manual_seed(1), to=(cpu,))
    b = torch.randn((3, 4), generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and to_device(b, cpu) is b


@pytest.mark.gpu
def test_pinned_host_draws_reach_cuda_unchanged():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    cuda = torch.device("cuda")
    g, ref = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    noise = host_draw(torch.randn, (64, 4, 8, 8), generator=g, to=(cuda, torch.float16))
    t = host_draw(torch.randint, 0, 1000, (64,), generator=g, to=(cuda,))
    assert torch.equal(noise, torch.randn((64, 4, 8, 8), generator=ref).to(cuda, torch.float16))
    assert torch.equal(t, torch.randint(0, 1000, (64,), generator=ref).to(cuda))
    images = torch.rand(3, 1, 8, 8)
    assert torch.equal(to_device(images, cuda).cpu(), images)


def test_a_vae_base_resumes_bit_identically(data, tmp_path, monkeypatch):
    """Its posterior draws take the global stream, which the checkpoint keeps and restores."""
    spec = [{"method": "lora", "units": "*:*_attn", "rank": 2}]
    cfg = TrainSettings(steps=6, batch_size=4, lr=1e-3, size=64, checkpoint_every=3)
    straight = sd_shaped()
    torch.manual_seed(123)
    finetune(straight, spec, data, cfg, quiet=True)
    original = books_mod._save_checkpoint

    def save_then_stop(*args, **kwargs):
        original(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(books_mod, "_save_checkpoint", save_then_stop)
    torch.manual_seed(123)
    assert finetune(sd_shaped(), spec, data, cfg, out_dir=tmp_path, quiet=True).status == "stopped"
    monkeypatch.setattr(books_mod, "_save_checkpoint", original)
    torch.manual_seed(999)  # whatever the process drew since: the checkpoint's stream is restored
    resumed = sd_shaped()
    assert finetune(resumed, spec, data, cfg, out_dir=tmp_path, resume=True, quiet=True).steps == 6
    ref = {n: p for n, p in straight.unet.named_parameters() if p.requires_grad}
    got = {n: p for n, p in resumed.unet.named_parameters() if p.requires_grad}
    assert ref.keys() == got.keys() and all(torch.equal(ref[n], got[n]) for n in ref)
