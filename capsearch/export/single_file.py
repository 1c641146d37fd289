"""One-file Stable Diffusion checkpoint in the original (CompVis/LDM) key layout, as A1111 and ComfyUI load.

The layout of SD 1.x's `v1-5-pruned.safetensors`: the UNet under `model.diffusion_model.` (input_blocks,
middle_block, output_blocks, time_embed, out), the VAE under `first_stage_model.` (encoder/decoder with
down/mid/up, block_N, attn_1) and the CLIP text encoder under `cond_stage_model.transformer.`.
The maps are built from the diffusers configs, so a UNet of SD 1.5's block structure with other widths
maps too. Each map is checked to cover every tensor exactly once.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import safetensors.torch
import torch

from capsearch.errors import UserError

if TYPE_CHECKING:
    import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."

# diffusers ResnetBlock2D → LDM ResBlock (in_layers = GroupNorm, SiLU, conv; out_layers = GroupNorm,
# SiLU, Dropout, conv; emb_layers = SiLU, Linear).
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
# diffusers' VAE attention uses Linear q/k/v/out; LDM's AttnBlock uses 1×1 convs (weights [c, c, 1, 1]).
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
_VAE_CONV_1X1 = tuple(f".mid.attn_1.{n}.weight" for n in ("q", "k", "v", "proj_out"))

# A module prefix (diffusers) → its LDM prefix and the renames of its children.
Rule = tuple[str, str, dict[str, str]]


def _layers(config: dict, key: str = "layers_per_block") -> int:
    value = config[key]
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise UserError(f"--single-file: per-block {key} {list(value)} has no SD 1.x layout")
        value = value[0]
    return int(value)


def unet_rules(config: dict) -> list[Rule]:
    """The UNet's module prefixes mapped to SD 1.x's input_blocks / middle_block / output_blocks."""
    for key in ("class_embed_type", "addition_embed_type", "encoder_hid_dim", "time_cond_proj_dim"):
        if config.get(key) is not None:
            raise UserError(
                f"--single-file: this UNet has {key}; only SD 1.x UNets have this layout"
            )
    if config.get("use_linear_projection"):
        raise UserError(
            "--single-file writes the SD 1.x layout; this base looks like SD 2.x (linear projections, "
            "OpenCLIP text encoder): use the pipeline folder instead"
        )
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise UserError(f"--single-file: mid block {config['mid_block_type']} has no SD 1.x layout")
    per = _layers(config) + 1  # LDM counts a block's layers plus its down/up sampler
    n = len(config["down_block_types"])
    rules: list[Rule] = [
        ("conv_in", "input_blocks.0.0", {}),
        ("time_embedding.linear_1", "time_embed.0", {}),
        ("time_embedding.linear_2", "time_embed.2", {}),
        ("conv_norm_out", "out.0", {}),
        ("conv_out", "out.2", {}),
        ("mid_block.resnets.0", "middle_block.0", _UNET_RESNET),
        ("mid_block.attentions.0", "middle_block.1", {}),
        ("mid_block.resnets.1", "middle_block.2", _UNET_RESNET),
    ]
    for i in range(n):
        for j in range(per - 1):
            at = 1 + i * per + j
            rules.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{at}.0", _UNET_RESNET))
            rules.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{at}.1", {}))
        if i < n - 1:
            rules.append(
                (f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{(i + 1) * per}.0.op", {})
            )
        has_attention = "CrossAttn" in config["up_block_types"][i]
        for j in range(per):
            at = i * per + j
            rules.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{at}.0", _UNET_RESNET))
            rules.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{at}.1", {}))
        if i < n - 1:
            slot = 2 if has_attention else 1  # the upsampler follows the resnet (and attention)
            rules.append((f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{i * per + per - 1}.{slot}.conv", {}))  # fmt: skip
    return rules


def vae_rules(config: dict) -> list[Rule]:
    """The VAE's module prefixes mapped to LDM's encoder.down / decoder.up (reversed) / mid.attn_1."""
    n = len(config["block_out_channels"])
    per = _layers(config)
    same = ("quant_conv", "post_quant_conv", "encoder.conv_in", "encoder.conv_out", "decoder.conv_in",
            "decoder.conv_out")  # fmt: skip
    rules: list[Rule] = [(name, name, {}) for name in same]
    rules += [("encoder.conv_norm_out", "encoder.norm_out", {}),
              ("decoder.conv_norm_out", "decoder.norm_out", {})]  # fmt: skip
    for part in ("encoder", "decoder"):
        rules += [
            (f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", _VAE_RESNET),
            (f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", _VAE_RESNET),
            (f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTENTION),
        ]
    for i in range(n):
        for j in range(per):
            rules.append((f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", _VAE_RESNET))  # fmt: skip
        if i < n - 1:
            rules.append((f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv", {}))  # fmt: skip
        up = n - 1 - i  # LDM's decoder.up is indexed from the lowest resolution upwards
        for j in range(per + 1):
            rules.append((f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{up}.block.{j}", _VAE_RESNET))  # fmt: skip
        if i < n - 1:
            rules.append((f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{up}.upsample.conv", {}))  # fmt: skip
    return rules


def _rename(key: str, rules: list[Rule]) -> str | None:
    """A diffusers key under the rule whose prefix it extends (None: no rule covers it)."""
    for source, target, children in rules:
        if key.startswith(source + "."):
            rest = key[len(source) + 1 :]
            for old, new in children.items():
                if rest.startswith(old + "."):
                    rest = new + rest[len(old) :]
                    break
            return f"{target}.{rest}"
    return None


def key_map(keys: list[str], rules: list[Rule], prefix: str, what: str) -> dict[str, str]:
    """Every diffusers key → its LDM key; a key no rule covers, or two keys on one name, fail loudly."""
    # Longest prefixes first, so that `conv_out` never captures a key of a longer name that starts alike.
    ordered = sorted(rules, key=lambda rule: -len(rule[0]))
    out, seen = {}, {}
    for key in keys:
        name = _rename(key, ordered)
        if name is None:
            raise UserError(
                f"--single-file: the {what} tensor {key} has no place in the SD 1.x layout"
            )
        if prefix + name in seen:
            raise RuntimeError(f"{what} keys {seen[prefix + name]} and {key} both map to {name}")
        seen[prefix + name] = key
        out[key] = prefix + name
    return out


def to_ldm(
    unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module
) -> dict[str, torch.Tensor]:
    """The three models' tensors under SD 1.x's original key names and shapes."""
    out: dict[str, torch.Tensor] = {}
    parts = (
        (unet, unet_rules(dict(unet.config)), UNET_PREFIX, "UNet"),
        (vae, vae_rules(dict(vae.config)), VAE_PREFIX, "VAE"),
    )
    for model, rules, prefix, what in parts:
        state = model.state_dict()
        for key, name in key_map(list(state), rules, prefix, what).items():
            tensor = state[key].detach().cpu().contiguous()
            if name.endswith(_VAE_CONV_1X1) and tensor.dim() == 2:
                tensor = tensor[:, :, None, None].contiguous()
            out[name] = tensor
    for key, tensor in text_encoder.state_dict().items():
        out[_text_name(key)] = tensor.detach().cpu().contiguous()
    positions = text_encoder.config.max_position_embeddings  # SD 1.x files carry the position ids
    out[TEXT_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(positions)[None]
    return out


def _text_name(key: str) -> str:
    # transformers ≥ 5.6 dropped CLIPTextModel's `text_model.` level; the LDM layout keeps it.
    return TEXT_PREFIX + (key if key.startswith("text_model.") else f"text_model.{key}")


def from_ldm(
    state: dict[str, torch.Tensor], unet: torch.nn.Module, vae: torch.nn.Module,
    text_encoder: torch.nn.Module,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:  # fmt: skip
    """The inverse of to_ldm: state dicts for models of these configs (UNet, VAE, text encoder)."""
    unet_map = key_map(list(unet.state_dict()), unet_rules(dict(unet.config)), UNET_PREFIX, "UNet")
    vae_map = key_map(list(vae.state_dict()), vae_rules(dict(vae.config)), VAE_PREFIX, "VAE")
    unet_sd = {key: state[name] for key, name in unet_map.items()}
    vae_sd = {}
    for key, name in vae_map.items():
        tensor = state[name]
        vae_sd[key] = tensor[:, :, 0, 0] if name.endswith(_VAE_CONV_1X1) else tensor
    text_sd = {key: state[_text_name(key)] for key in text_encoder.state_dict()}
    return unet_sd, vae_sd, text_sd


def check_sd1(
    unet: torch.nn.Module, vae: torch.nn.Module | None, text_encoder: torch.nn.Module
) -> None:
    """Refuse (one line) a base the SD 1.x layout cannot hold: no VAE, another text encoder or UNet."""
    if vae is None:
        raise UserError(
            "--single-file needs a latent Stable Diffusion base with a VAE; this base is capsearch's "
            "pixel-space model (load the pipeline folder with capsearch.models.load.load_pipeline)"
        )
    if type(text_encoder).__name__ != "CLIPTextModel":
        raise UserError(
            f"--single-file writes SD 1.x's CLIP text encoder; this base has {type(text_encoder).__name__}"
        )
    unet_rules(dict(unet.config))
    vae_rules(dict(vae.config))


def write_single_file(
    path: Path, unet: torch.nn.Module, vae: torch.nn.Module | None, text_encoder: torch.nn.Module
) -> Path:
    """Write the merged UNet with the base's VAE and text encoder as one SD 1.x safetensors file."""
    check_sd1(unet, vae, text_encoder)
    state = to_ldm(unet, vae, text_encoder)
    path = Path(path)
    safetensors.torch.save_file(state, str(path), metadata={"format": "pt"})
    return path
