"""Delta checkpoints, merged export loaded by stock diffusers, and LoRA export in diffusers' format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import example_spec, run_unet, unet_inputs

from capsearch import __version__
from capsearch.errors import UserError
from capsearch.methods import (
    Applied,
    apply_methods,
    method_names,
    optimizer_groups,
)
from capsearch.models.delta import (
    DELTA_FILE,
    LORA_FILE,
    METHODS_FILE,
    export_lora,
    load_delta,
    merge,
    read_spec,
    save_delta,
)
from capsearch.models.tiny import TINY_UNET_CONFIG, build_tiny_unet

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return unet_inputs(seed=1, timesteps=(3, 400))


def trained(spec, inputs, steps: int = 2) -> tuple[torch.nn.Module, Applied]:
    """A tiny UNet with the spec applied and a few AdamW steps taken (so deltas are non-trivial)."""
    unet = build_tiny_unet()
    applied = apply_methods(unet, spec)
    if not applied.names:
        return unet.eval(), applied
    x, t, ehs = inputs
    opt = torch.optim.AdamW(optimizer_groups(applied, unet, 1e-2))
    for _ in range(steps):
        loss = (unet(x, t, encoder_hidden_states=ehs).sample - 1.0).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return unet.eval(), applied


MIXED = [
    {"method": "svdiff", "units": "*:conv"},
    # shares resnet conv2 with svdiff: γ must fold into the shifted weight
    {"method": "difffit", "units": "down_blocks", "gamma_on": ["attn1", "attn2", "ff", "resnet"]},
    {"method": "lora", "units": "up_blocks.*:self_attn", "rank": 2, "alpha": 6},
    {"method": "bitfit", "units": "up_blocks"},  # biases of LoRA-wrapped layers too
    {"method": "oft", "units": "mid_block:cross_attn", "block_size": 16},
    {"method": "lokr", "units": "up_blocks:ff"},
]
CASES = {name: example_spec(name) for name in method_names()} | {"mixed": MIXED}


@pytest.mark.parametrize("case", list(CASES))
def test_delta_round_trip_and_merged_export(case: str, inputs, tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    unet, applied = trained(CASES[case], inputs)
    adapted = run_unet(unet, inputs)
    save_delta(unet, tmp_path / "delta", applied=applied, base_model="tiny:random")

    meta = json.loads((tmp_path / "delta" / METHODS_FILE).read_text())
    assert meta["capsearch_version"] == __version__ and meta["base_model"] == "tiny:random"
    assert [e["method"] for e in meta["methods"]] == [
        e["method"] for e in (CASES[case] if isinstance(CASES[case], list) else [CASES[case]])
    ]
    from safetensors import safe_open

    with safe_open(tmp_path / "delta" / DELTA_FILE, "pt") as f:
        saved = set(f.keys())
    assert saved == {n for n, p in unet.named_parameters() if p.requires_grad}

    loaded = load_delta(build_tiny_unet().eval(), tmp_path / "delta")
    assert torch.equal(run_unet(loaded, inputs), adapted)

    merged = merge(loaded)
    assert type(merged) is UNet2DConditionModel
    merged.save_pretrained(tmp_path / "merged")
    stock = UNet2DConditionModel.from_pretrained(tmp_path / "merged").eval()
    assert (run_unet(stock, inputs) - adapted).abs().max().item() <= 1e-5


def test_delta_is_small_for_peft_methods(inputs, tmp_path: Path) -> None:
    unet, applied = trained({"method": "svdiff"}, inputs, steps=1)
    save_delta(unet, tmp_path, applied=applied)
    full_bytes = 4 * sum(p.numel() for p in build_tiny_unet().parameters())
    delta_bytes = (tmp_path / DELTA_FILE).stat().st_size
    shifts = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    assert 4 * shifts <= delta_bytes < 4 * shifts + 64_000  # the δ vectors plus a header
    assert delta_bytes < full_bytes / 20


def test_merge_folds_everything_in_place(inputs) -> None:
    unet, _ = trained(MIXED, inputs, steps=1)
    adapted = run_unet(unet, inputs)
    merged = merge(unet)
    assert merged is unet
    assert not any(
        hasattr(m, "difffit_gamma") or hasattr(m, "parametrizations") for m in unet.modules()
    )
    assert not any(m._forward_hooks for m in unet.modules())
    assert set(unet.state_dict()) == set(build_tiny_unet().state_dict())
    assert (run_unet(unet, inputs) - adapted).abs().max().item() <= 1e-5
    apply_methods(unet, {"method": "bitfit"})  # a merged UNet is a base UNet again


def test_a_version_1_delta_still_loads(inputs, tmp_path: Path) -> None:
    """Deltas written before `attention` became whole-block tuning, SV-DIFF shifted norms, and lr_1d
    was confined to methods with a second parameter set load as the same model."""
    spec = [
        {"method": "attn_proj", "units": "mid_block", "lr": 1e-3},
        {"method": "svdiff", "units": "down_blocks", "shift_norms": False, "lr_1d": 5e-2},
    ]
    unet, applied = trained(spec, inputs)
    adapted = run_unet(unet, inputs)
    save_delta(unet, tmp_path, applied=applied)
    meta = json.loads((tmp_path / METHODS_FILE).read_text())
    assert meta["format_version"] == 2
    # Rewrite spec.json as version 1 wrote it.
    meta["format_version"] = 1
    meta["methods"][0]["method"] = "attention"
    meta["methods"][0]["lr_1d"] = 2e-3  # version 1 let any entry carry a 1-D rate
    del meta["methods"][1]["shift_norms"]
    (tmp_path / METHODS_FILE).write_text(json.dumps(meta))
    loaded = load_delta(build_tiny_unet().eval(), tmp_path)
    assert torch.equal(run_unet(loaded, inputs), adapted)
    recorded = apply_methods(build_tiny_unet(), read_spec(tmp_path)["methods"]).entries
    assert [e["method"] for e in recorded] == ["attn_proj", "svdiff"]
    assert "lr_1d" not in recorded[0] and recorded[1]["lr_1d"] == 5e-2


# ---- errors ------------------------------------------------------------------------------------------


def test_save_needs_the_methods_applied_to_that_unet(tmp_path: Path) -> None:
    applied = apply_methods(build_tiny_unet(), {"method": "bitfit"})
    with pytest.raises(UserError, match="apply_methods"):
        save_delta(build_tiny_unet(), tmp_path, applied=applied)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "damage", ["no_folder", "no_spec", "bad_json", "no_tensors", "wrong_tensors"]
)
def test_load_refuses_damaged_deltas(damage: str, inputs, tmp_path: Path) -> None:
    unet, applied = trained({"method": "bitfit", "units": "mid_block"}, inputs, steps=1)
    folder = tmp_path / "delta"
    save_delta(unet, folder, applied=applied)
    if damage == "no_folder":
        folder = tmp_path / "missing"
    elif damage == "no_spec":
        (folder / METHODS_FILE).unlink()
    elif damage == "bad_json":
        (folder / METHODS_FILE).write_text("{not json")
    elif damage == "no_tensors":
        (folder / DELTA_FILE).unlink()
    else:
        meta = json.loads((folder / METHODS_FILE).read_text())
        meta["methods"][0]["units"] = "up_blocks"  # spec no longer matches the tensors
        (folder / METHODS_FILE).write_text(json.dumps(meta))
    with pytest.raises(UserError):
        load_delta(build_tiny_unet(), folder)


def test_load_refuses_another_architecture(inputs, tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    unet, applied = trained({"method": "norm", "units": "mid_block"}, inputs, steps=1)
    save_delta(unet, tmp_path, applied=applied)
    other = dict(TINY_UNET_CONFIG, cross_attention_dim=2 * TINY_UNET_CONFIG["cross_attention_dim"])
    with torch.device("meta"):
        different = UNet2DConditionModel(**other)
    with pytest.raises(UserError, match="cross_attention_dim"):
        load_delta(different, tmp_path)


# ---- LoRA export ---------------------------------------------------------------------------------------


def test_lora_export_round_trips_through_diffusers(inputs, tmp_path: Path) -> None:
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    spec = [
        {"method": "lora", "units": "*:*_attn", "rank": 4, "alpha": 8},  # α ≠ r: scale must survive
        {"method": "lora", "units": "down_blocks.1:conv", "rank": 2},  # a second rank, on convs
    ]
    unet, applied = trained(spec, inputs)
    adapted = run_unet(unet, inputs)
    export_lora(unet, tmp_path, applied=applied)
    assert (tmp_path / LORA_FILE).is_file()

    # the two calls pipe.load_lora_weights makes for a UNet
    state_dict, network_alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(str(tmp_path))
    assert state_dict and all(k.startswith("unet.") for k in state_dict)
    assert all(".lora_A.weight" in k or ".lora_B.weight" in k for k in state_dict)
    fresh = build_tiny_unet().eval()
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(state_dict, network_alphas, unet=fresh)
    assert (run_unet(fresh, inputs) - adapted).abs().max().item() <= 1e-5


def test_lora_export_refuses_other_methods(inputs, tmp_path: Path) -> None:
    unet, applied = trained(
        [{"method": "lora", "units": "mid_block"}, {"method": "svdiff", "units": "up_blocks"}],
        inputs,
        1,
    )
    with pytest.raises(UserError, match="svdiff"):
        export_lora(unet, tmp_path, applied=applied)
    bare = build_tiny_unet()
    applied = apply_methods(bare, {"method": "bitfit"})
    with pytest.raises(UserError):
        export_lora(bare, tmp_path, applied=applied)
