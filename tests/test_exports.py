"""`capsearch export` output that loads where Stable Diffusion users work: a diffusers pipeline folder,
diffusers and kohya LoRA files, one SD 1.x checkpoint in the original layout, and the model card.

Every model is built from config (an SD-shaped pipeline with SD v1.5's block structure, small widths).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from conftest import mid_block_groups

from capsearch.cli import main
from capsearch.errors import UserError
from capsearch.methods import apply_methods
from capsearch.models.delta import LORA_FILE, merge, save_delta
from capsearch.search.runs import trial_dir, write_json

pytestmark = pytest.mark.usefixtures("one_thread")

LORA = [
    {"method": "lora", "units": "*:*_attn", "rank": 4, "alpha": 8},  # α ≠ r: the scale must survive
    {"method": "lora", "units": "down_blocks.1:conv", "rank": 2},  # 3×3 convs
    {"method": "lora", "units": "conv_in", "rank": 2, "alpha": 1},
    {"method": "lora", "units": "time_embedding", "rank": 3},
    {"method": "lora", "units": "up_blocks.1.upsamplers", "rank": 2},
]


def small_sd(seed: int = 0, linear_projection: bool = False):
    """A random StableDiffusionPipeline with SD v1.5's block structure and tiny widths."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from capsearch.models.load import TOKENIZER_DIR
    from capsearch.models.tokenizer import load_clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(8, 16, 32, 32), norm_num_groups=4, cross_attention_dim=16,
        attention_head_dim=2, use_linear_projection=linear_projection,
    )  # fmt: skip
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16), latent_channels=4, norm_num_groups=4, layers_per_block=2,
    )  # fmt: skip
    tokenizer = load_clip_tokenizer(TOKENIZER_DIR)  # capsearch's own CLIP-format BPE vocabulary
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))  # fmt: skip
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", steps_offset=1, clip_sample=False)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def unet_out(unet: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    c, size = unet.config.in_channels, unet.config.sample_size
    x = torch.randn(2, c, size, size, generator=g)
    ehs = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([5, 600]), encoder_hidden_states=ehs).sample


def perturb(unet: torch.nn.Module) -> None:
    """A "trained" adapter: move every trainable tensor away from its init (LoRA's B starts at 0)."""
    torch.manual_seed(3)
    with torch.no_grad():
        for p in unet.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))


def make_run(root: Path, model: str, unet: torch.nn.Module, entries: list, data: dict | None = None) -> Path:  # fmt: skip
    """A run folder with one finished trial t000 whose delta is `unet` with `entries` applied."""
    applied = apply_methods(unet, entries)
    perturb(unet)
    run = root / "run"
    run.mkdir()
    spec = {"name": "sd test", "model": model, "space": {"groups": mid_block_groups()}}
    if data is not None:
        spec["data"] = data
    (run / "spec.yaml").write_text(yaml.safe_dump(spec))
    folder = trial_dir(run, 0)
    folder.mkdir(parents=True)
    metrics = {"fid": 20.0, "amd": 0.1, "amd_heldout": 0.12, "extracted": 2, "alignment": 0.5}
    write_json(folder / "result.json", {
        "trial": "t000", "number": 0, "baseline": None, "status": "ok", "version": 2,
        "method_spec": entries, "groups": {"attn": "lora(rank=4)", "res": "frozen"},
        "train": {"lr": 1e-4, "steps": 4, "mitigations": []}, "metrics": metrics, "reward": -1.0,
        "intervals": {"extracted": [1.0, 4.0], "amd": [0.08, 0.12]},
    })  # fmt: skip
    write_json(
        folder / "metrics.json", {**metrics, "settings": {"attack_prompts": 8, "extraction_n": 4}}
    )
    (folder / "samples.png").write_bytes(b"not really a png")
    save_delta(unet, folder / "delta", applied=applied, base_model=model)
    return run


@pytest.fixture(scope="module")
def sd_export(tmp_path_factory):
    """An SD-shaped base folder, a LoRA trial on it and its export with --lora --single-file."""
    root = tmp_path_factory.mktemp("sd")
    small_sd().save_pretrained(root / "base")
    trained = small_sd().unet
    run = make_run(root, str(root / "base"), trained, LORA)
    merged = unet_out(merge(trained))
    out = root / "export"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["export", str(run), "--out", str(out), "--lora", "--single-file"]) == 0
    print(printed.getvalue())
    return root, out, merged, printed.getvalue()


def test_sd_export_is_a_pipeline_folder_diffusers_loads(sd_export, capsys) -> None:
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    root, out, merged, _ = sd_export
    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe) is StableDiffusionPipeline
    torch.testing.assert_close(unet_out(pipe.unet), merged, atol=1e-5, rtol=0)
    base = StableDiffusionPipeline.from_pretrained(root / "base")
    assert not torch.allclose(unet_out(base.unet), merged, atol=1e-3)  # the trial changed the UNet
    for name in ("vae", "text_encoder"):
        ours, theirs = getattr(pipe, name).state_dict(), getattr(base, name).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    # Same filesystem: the base's weights are hard links (one inode), not symlinks or copies.
    weights = out / "vae" / "diffusion_pytorch_model.safetensors"
    assert not weights.is_symlink()
    source = root / "base" / "vae" / "diffusion_pytorch_model.safetensors"
    assert os.stat(weights).st_ino == os.stat(source).st_ino
    assert (out / "model_index.json").read_text() == (root / "base/model_index.json").read_text()


def test_lora_file_loads_into_the_base_pipeline_without_key_warnings(sd_export) -> None:
    from diffusers import StableDiffusionPipeline

    root, out, merged, _ = sd_export
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(level=logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe = StableDiffusionPipeline.from_pretrained(root / "base")
            pipe.load_lora_weights(out)  # finds pytorch_lora_weights.safetensors by itself
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    said = [r.getMessage() for r in records] + [str(w.message) for w in caught]
    problems = r"unexpected keys|missing keys|missing adapter|were not used|newly initiali"
    assert not [m for m in said if re.search(problems, m, re.I)], said
    # diffusers warns of unexpected keys only: check that every tensor of the file reached the UNet
    import safetensors.torch
    from peft.utils import get_peft_model_state_dict

    saved = safetensors.torch.load_file(out / LORA_FILE)
    (adapter,) = pipe.unet.peft_config
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name=adapter)
    assert {f"unet.{k}" for k in loaded} == set(saved)
    assert all(torch.equal(loaded[k.removeprefix("unet.")], v) for k, v in saved.items())
    torch.testing.assert_close(unet_out(pipe.unet), merged, atol=1e-5, rtol=0)


def test_kohya_file_follows_the_layout_and_round_trips(sd_export) -> None:
    import safetensors.torch
    from diffusers import StableDiffusionPipeline

    from capsearch.export.lora import apply_kohya, kohya_targets

    root, out, merged, _ = sd_export
    (path,) = out.glob("*_lora.safetensors")
    state = safetensors.torch.load_file(path)
    base = StableDiffusionPipeline.from_pretrained(root / "base").unet
    targets = kohya_targets(base)
    stems = {k.removesuffix(".lora_down.weight") for k in state if k.endswith(".lora_down.weight")}
    assert len(state) == 3 * len(stems) and len(stems) > 50
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in stems
    assert {"lora_unet_conv_in", "lora_unet_time_embedding_linear_1"} <= stems
    for stem in stems:
        down, up = state[f"{stem}.lora_down.weight"], state[f"{stem}.lora_up.weight"]
        alpha = state[f"{stem}.alpha"]
        assert alpha.dim() == 0 and alpha.dtype == torch.float32
        module = base.get_submodule(targets[stem])  # the name maps back to a module of the UNet
        rank = down.shape[0]
        if isinstance(module, torch.nn.Linear):
            assert down.shape == (rank, module.in_features)
            assert up.shape == (module.out_features, rank)
        else:
            assert down.shape == (rank, module.in_channels, *module.kernel_size)
            assert up.shape == (module.out_channels, rank, 1, 1)
    assert float(state["lora_unet_conv_in.alpha"]) == 1.0  # alpha as trained; scale = alpha / r
    assert apply_kohya(base, state) == len(stems)
    torch.testing.assert_close(unet_out(base), merged, atol=1e-5, rtol=0)
    exported = safetensors.torch.load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    ours = base.state_dict()
    assert max((ours[k] - v).abs().max().item() for k, v in exported.items()) < 1e-6
    # diffusers reads the kohya layout too: a second, independent reader of the names
    pipe = StableDiffusionPipeline.from_pretrained(root / "base")
    pipe.load_lora_weights(out, weight_name=path.name)
    torch.testing.assert_close(unet_out(pipe.unet), merged, atol=1e-5, rtol=0)


def test_single_file_loads_with_diffusers_from_a_local_config(sd_export) -> None:
    import safetensors.torch
    from diffusers import StableDiffusionPipeline

    _, out, merged, _ = sd_export
    (path,) = [p for p in out.glob("capsearch_*.safetensors") if not p.stem.endswith("_lora")]
    keys = set(safetensors.torch.load_file(path))
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)
    assert any(k.startswith("first_stage_model.decoder.up.") for k in keys)
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in keys
    pipe = StableDiffusionPipeline.from_single_file(path, config=str(out), local_files_only=True)
    torch.testing.assert_close(unet_out(pipe.unet), merged, atol=1e-5, rtol=0)
    folder = StableDiffusionPipeline.from_pretrained(out)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(folder, name).state_dict(), getattr(pipe, name).state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name


def test_the_export_prints_each_file_and_its_card_holds_the_record(sd_export) -> None:
    root, out, _, printed = sd_export
    lines = printed.splitlines()
    assert (
        f'StableDiffusionPipeline.from_pretrained("{out}")' in lines[1]
        and "hard-linked" in lines[1]
    )
    loads = {
        "unet/": "UNet2DConditionModel.from_pretrained",
        "delta/": "capsearch.models.delta.load_delta",
        LORA_FILE: f'.load_lora_weights("{out}")',
        "_lora.safetensors": "ComfyUI models/loras/, A1111 models/Lora/",
        "sd_test_t000.safetensors": f'from_single_file("{out}/capsearch_sd_test_t000.safetensors"',
        "README.md": "model card",
    }
    for name, how in loads.items():
        assert len([line for line in lines if name in line.split()[0] and how in line]) == 1, name
    card = (out / "README.md").read_text()
    assert f"base_model: {root / 'base'}" in card
    assert "| attn | mid_block.attentions | lora(rank=4) |" in card
    assert "capsearch phantom chest X-rays" in card
    assert "**2 training image(s) extracted** (95% interval 1.0–4.0)" in card
    assert "generating 4 images for each of 8 training captions" in card
    assert "**0.100** (95% interval 0.080–0.120); held-out real images score 0.120" in card
    assert "PhysioNet" not in card and (out / "samples.png").is_file()


def test_ldm_key_map_covers_every_tensor_once_and_round_trips() -> None:
    from capsearch.export.single_file import UNET_PREFIX, from_ldm, to_ldm

    pipe = small_sd()
    unet, vae, text = pipe.unet, pipe.vae, pipe.text_encoder
    state = to_ldm(unet, vae, text)
    n_unet, n_vae = len(unet.state_dict()), len(vae.state_dict())
    assert len([k for k in state if k.startswith(UNET_PREFIX)]) == n_unet
    assert len([k for k in state if k.startswith("first_stage_model.")]) == n_vae
    blocks = {(m[1], int(m[2])) for k in state
              if (m := re.match(r"model\.diffusion_model\.(\w+_blocks?)\.(\d+)\.", k))}  # fmt: skip
    assert blocks == {("input_blocks", i) for i in range(12)} | {
        ("middle_block", i) for i in range(3)} | {("output_blocks", i) for i in range(12)}  # fmt: skip
    u = "model.diffusion_model."
    assert state[u + "input_blocks.1.1.proj_in.weight"].shape == (8, 8, 1, 1)  # SD 1.x: 1×1 conv
    assert state[u + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape == (32, 16)
    for key in ("input_blocks.0.0.weight", "input_blocks.3.0.op.weight", "input_blocks.4.0.skip_connection.weight",
                "input_blocks.1.0.in_layers.2.weight", "input_blocks.1.0.emb_layers.1.weight",
                "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight", "time_embed.2.weight",
                "out.0.weight", "out.2.weight", "middle_block.2.out_layers.3.weight"):  # fmt: skip
        assert u + key in state, key
    assert state["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)
    assert state["first_stage_model.encoder.down.0.downsample.conv.weight"].shape[0] == 8
    torch.testing.assert_close(  # decoder.up counts from the lowest resolution
        state["first_stage_model.decoder.up.0.block.2.conv2.weight"],
        vae.decoder.up_blocks[3].resnets[2].conv2.weight,
    )
    assert state["first_stage_model.encoder.down.2.block.0.nin_shortcut.weight"].dim() == 4
    assert state["cond_stage_model.transformer.text_model.embeddings.position_ids"].shape == (1, 77)
    for model, back in zip((unet, vae, text), from_ldm(state, unet, vae, text), strict=True):
        original = model.state_dict()
        assert set(back) == set(original)
        assert all(torch.equal(back[k], v) for k, v in original.items())


def test_single_file_refuses_what_the_sd1_layout_cannot_hold() -> None:
    from capsearch.export.single_file import check_sd1

    pipe = small_sd(linear_projection=True)
    with pytest.raises(UserError, match="SD 2.x"):
        check_sd1(pipe.unet, pipe.vae, pipe.text_encoder)
    with pytest.raises(UserError, match="VAE"):
        check_sd1(small_sd().unet, None, pipe.text_encoder)


# ---- the tiny pixel-space base ------------------------------------------------------------------------


def test_tiny_export_loads_with_capsearch_and_its_lora_with_diffusers(tmp_path, capsys) -> None:
    from capsearch.models.load import load_pipeline

    trained = load_pipeline("tiny:random").unet
    run = make_run(tmp_path, "tiny:random", trained, [LORA[0]])
    merged = unet_out(merge(trained))
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out), "--lora"]) == 0
    printed = capsys.readouterr().out
    assert f'capsearch.models.load.load_pipeline("{out}")' in printed
    assert LORA_FILE in printed and "kohya" in printed
    pipe = load_pipeline(str(out))  # one line with capsearch installed
    assert pipe.vae is None and pipe.tokenizer is not None
    torch.testing.assert_close(unet_out(pipe.unet), merged, atol=1e-5, rtol=0)
    base = load_pipeline("tiny:random")
    base.unet.load_lora_adapter(str(out), prefix="unet", use_safetensors=True)
    torch.testing.assert_close(unet_out(base.unet), merged, atol=1e-5, rtol=0)


def test_pipeline_folder_copies_where_hard_links_fail(tmp_path, monkeypatch) -> None:
    from capsearch.export.pipeline import write_pipeline_folder
    from capsearch.models.load import TINY_BASE, load_folder

    base = tmp_path / "base"
    load_folder(TINY_BASE).save(base)
    (base / "text_encoder" / "pytorch_model.bin").write_bytes(b"old format")  # left behind
    pipe = load_folder(base)

    def refuse(*args, **kwargs):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", refuse)
    folder = write_pipeline_folder(tmp_path / "out", pipe.unet, pipe, base)
    assert folder.how["copied"] > 0 and not folder.how["hard-linked"] and not folder.latent
    assert not (tmp_path / "out" / "text_encoder" / "pytorch_model.bin").exists()
    assert (
        os.stat(tmp_path / "out/scheduler/scheduler_config.json").st_ino
        != os.stat(base / "scheduler/scheduler_config.json").st_ino
    )
    assert load_folder(tmp_path / "out").text_encoder is not None


def test_hub_cache_symlinks_become_hard_links_to_their_blobs(tmp_path) -> None:
    from capsearch.export.pipeline import write_pipeline_folder
    from capsearch.models.load import TINY_BASE, load_folder

    base = tmp_path / "snapshot"
    load_folder(TINY_BASE).save(base)
    blob = tmp_path / "blobs" / "abc123"  # a Hugging Face cache: snapshot files link to blobs
    blob.parent.mkdir()
    (base / "text_encoder" / "model.safetensors").rename(blob)
    (base / "text_encoder" / "model.safetensors").symlink_to(blob)
    pipe = load_folder(base)
    folder = write_pipeline_folder(tmp_path / "out", pipe.unet, pipe, base)
    placed = tmp_path / "out" / "text_encoder" / "model.safetensors"
    assert folder.how["hard-linked"] > 0 and not placed.is_symlink()
    assert os.stat(placed).st_ino == os.stat(blob).st_ino
    blob.unlink()  # the cache is cleaned: the export still loads
    assert load_folder(tmp_path / "out").text_encoder is not None


# ---- errors and notes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entries", "flags", "message"),
    [
        ([{"method": "bitfit", "units": "mid_block"}], ["--lora"], "trains bitfit, not LoRA"),
        ([LORA[0], {"method": "bitfit", "units": "mid_block"}], ["--lora"], "bitfit besides LoRA"),
        ([LORA[0]], ["--single-file"], "needs a latent Stable Diffusion base"),
    ],
)
def test_export_errors_are_one_line_and_write_nothing(
    entries, flags, message, tmp_path, capsys
) -> None:
    from capsearch.models.load import load_pipeline

    run = make_run(tmp_path, "tiny:random", load_pipeline("tiny:random").unet, entries)
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_a_base_missing_a_component_is_one_line(tmp_path, capsys) -> None:
    root = tmp_path
    small_sd().save_pretrained(root / "base")
    run = make_run(root, str(root / "base"), small_sd().unet, [LORA[0]])
    import shutil

    shutil.rmtree(root / "base" / "vae")
    assert main(["export", str(run), "--out", str(root / "export")]) == 2
    err = capsys.readouterr().err
    assert "lacks vae" in err and len(err.strip().splitlines()) == 1
    assert not (root / "export").exists()


def test_loha_exports_merged_only_and_mimic_keeps_its_images_out(tmp_path, capsys) -> None:
    from capsearch.models.load import load_pipeline

    data = tmp_path / "cxr"
    data.mkdir()
    (data / "metadata.jsonl").write_text('{"file_name": "a.jpg", "text": "x", "dicom_id": "d1"}\n')
    entries = [{"method": "loha", "units": "mid_block:*_attn"}]
    run = make_run(
        tmp_path, "tiny:random", load_pipeline("tiny:random").unet, entries, {"path": str(data)}
    )
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (
        "loha: no diffusers loader reads these adapters; exported as merged weights only" in printed
    )
    card = (out / "README.md").read_text()
    assert "MIMIC-CXR-JPG (PhysioNet)" in card and "Credentialed Health Data Use Agreement" in card
    assert "license_name: physionet-credentialed-health-data-license-1.5.0" in card
    assert not (out / "samples.png").exists() and (out / "metrics.json").is_file()
    assert not list(out.glob("*lora*"))
