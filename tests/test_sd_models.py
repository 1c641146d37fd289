"""Real base models by name: SD v1.5's hub ids (old and maintained) from the local cache only, and an
SD-2-shaped pipeline (v-prediction, 1024-d text states, 768 px) built from config with tiny channels."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from capsearch.errors import UserError
from capsearch.models.load import HUB_FILES, SD15_HUB_ID, TOKENIZER_DIR, load_pipeline
from capsearch.models.sampling import generate
from capsearch.training.loop import TrainSettings, finetune
from capsearch.worlds.phantom import write_phantom_dataset

OLD_SD15_ID = "runwayml/stable-diffusion-v1-5"
REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache that huggingface_hub reads (offline)."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def _cache(cache, hub_id: str, pipe) -> None:
    """Put a pipeline into the cache as hub_id's snapshot, the layout `hf download` leaves."""
    repo = cache / f"models--{hub_id.replace('/', '--')}"
    pipe.save(repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)


@pytest.mark.parametrize(
    "cached, asked",
    [(SD15_HUB_ID, OLD_SD15_ID), (OLD_SD15_ID, SD15_HUB_ID)],
    ids=["maintained-cached", "old-cached"],
)
def test_either_sd15_id_loads_whichever_is_cached(hub_cache, cached, asked):
    _cache(hub_cache, cached, load_pipeline("tiny:random"))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        pipe = load_pipeline(asked)
    assert pipe.unet.config.in_channels == 1 and pipe.spec == asked
    lines = [str(w.message) for w in seen if "same weights" in str(w.message)]
    assert lines == [f"model {asked!r}: using the cached {cached!r} (the same weights)"]
    with warnings.catch_warnings(record=True) as seen:  # the id that is cached: no note
        warnings.simplefilter("always")
        load_pipeline(cached)
    assert not [w for w in seen if "same weights" in str(w.message)]


@pytest.mark.parametrize("asked", [OLD_SD15_ID, SD15_HUB_ID])
def test_a_missing_sd15_says_the_download_command_and_the_cache(hub_cache, asked):
    with pytest.raises(UserError) as err:
        load_pipeline(asked)
    message = str(err.value)
    assert "\n" not in message
    assert f"`hf download {SD15_HUB_ID} --include " in message  # the maintained id, either way
    assert (
        f"models--stable-diffusion-v1-5--stable-diffusion-v1-5 of its cache into {hub_cache}"
        in (message)
    )
    assert ("now 'stable-diffusion-v1-5/stable-diffusion-v1-5' on the Hub" in message) == (
        asked == OLD_SD15_ID
    )


# --- an SD-2-shaped pipeline -----------------------------------------------------------------------


def _sd2_pipeline():
    """Stable Diffusion 2 (768-v)'s shape at tiny widths: v-prediction DDIM config, 1024-d text
    states, per-block attention heads, linear projections, a VAE of factor 8 at 768 px."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from capsearch.models.tokenizer import load_clip_tokenizer

    tokenizer = load_clip_tokenizer(TOKENIZER_DIR)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=96,  # SD 2's 768 px over the VAE's factor 8
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(4, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        cross_attention_dim=1024,
        attention_head_dim=[1, 2, 2],
        use_linear_projection=True,
    )
    vae = AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[2, 2, 2, 2],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=1,
        sample_size=768,
    )
    text = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=1024,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction",
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(text),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@pytest.fixture(scope="module")
def sd2_folder(tmp_path_factory):
    """The SD-2-shaped pipeline saved by diffusers, keeping only the files `hf download` fetches."""
    from huggingface_hub.utils import filter_repo_objects

    full = tmp_path_factory.mktemp("sd2_full")
    _sd2_pipeline().save_pretrained(full)
    folder = tmp_path_factory.mktemp("sd2")
    names = [str(p.relative_to(full)) for p in full.rglob("*") if p.is_file()]
    for name in filter_repo_objects(names, allow_patterns=list(HUB_FILES)):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(full / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    write_phantom_dataset(root, patients=8, size=32, seed=7)
    return root


def _cfg(**kw) -> TrainSettings:
    return TrainSettings(
        **{"steps": 2, "batch_size": 2, "lr": 1e-3, "size": 64, "caption_dropout": 0.0, **kw}
    )


def test_an_sd2_folder_loads_as_a_v_prediction_latent_pipeline(sd2_folder):
    pipe = load_pipeline(str(sd2_folder))
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.vae is not None and pipe.latent_shape == (4, 96, 96)
    assert pipe.unet.config.cross_attention_dim == 1024
    assert list(pipe.unet.config.attention_head_dim) == [1, 2, 2]
    assert pipe.encode_prompts(["a"]).shape == (1, 77, 1024)
    images = generate(pipe, ["small left pleural effusion"], steps=2, guidance=1.0)
    assert images.shape == (1, 3, 768, 768) and torch.isfinite(images).all()


def test_an_sd2_model_trains_on_the_velocity(sd2_folder, data, monkeypatch):
    """The loss's target is v = α_t·ε − σ_t·x0 (the scheduler's get_velocity), not the noise."""
    import capsearch.training.loop as train_mod

    seen = []
    original = train_mod._target

    def spy(pipe, x0, noise, t):
        target = original(pipe, x0, noise, t)
        seen.append((target, pipe.scheduler.get_velocity(x0, noise, t), noise, x0.shape))
        return target

    monkeypatch.setattr(train_mod, "_target", spy)
    pipe = load_pipeline(str(sd2_folder))
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    # DiffFit there: every bias, each norm's scale, one γ per output of attn1/attn2/ff's last layer
    block = "down_blocks.1.attentions."
    modules = {n: m for n, m in pipe.unet.named_modules() if n.startswith(block)}
    expected = sum(
        v.numel() for n, v in before.items() if n.startswith(block) and n.endswith(".bias")
    )
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    expected += sum(m.weight.numel() for m in modules.values() if isinstance(m, norms))
    ends = ("attn1.to_out.0", "attn2.to_out.0", "ff.net.2")
    expected += sum(m.out_features for n, m in modules.items() if n.endswith(ends))
    spec = [{"method": "difffit", "units": "down_blocks.1.attentions"}]
    result = finetune(pipe, spec, data, _cfg(), quiet=True)
    assert result.status == "ok" and result.steps == 2
    assert result.trainable == expected
    assert len(seen) == 2
    for target, velocity, noise, shape in seen:
        assert shape == (2, 4, 8, 8)  # 64 px through the VAE's factor 8
        assert torch.equal(target, velocity) and not torch.allclose(target, noise)
    moved = [n for n, p in pipe.unet.named_parameters() if n in before and
             not torch.equal(p, before[n])]  # fmt: skip
    assert moved and all(n.startswith("down_blocks.1.attentions") for n in moved)


def test_previews_leave_an_sd2_fine_tune_unchanged(sd2_folder, data, tmp_path, monkeypatch):
    """With a VAE, training draws latents from the global RNG: previews must not move it."""
    import capsearch.training.previews as previews
    from capsearch.training.tblog import LOSS_TAG, image_steps, read_scalars

    monkeypatch.setattr(previews, "PREVIEW_STEPS", 1)  # one 768 px image, one DDIM step: cheap
    monkeypatch.setattr(previews, "PREVIEW_PER_PROMPT", 1)
    spec = [{"method": "bitfit", "units": "mid_block"}]
    on, off = load_pipeline(str(sd2_folder)), load_pipeline(str(sd2_folder))
    cfg = _cfg(preview_every=1, preview_prompts=["no acute findings"])  # between steps 1 and 2
    finetune(on, spec, data, cfg, out_dir=tmp_path / "on", quiet=True)
    finetune(off, spec, data, _cfg(), out_dir=tmp_path / "off", quiet=True)
    assert image_steps(tmp_path / "on") == [1, 2]
    assert read_scalars(tmp_path / "on")[LOSS_TAG] == read_scalars(tmp_path / "off")[LOSS_TAG]
