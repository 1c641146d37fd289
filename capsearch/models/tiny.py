"""Architecture of the tiny Stable-Diffusion-shaped model (same diffusers/transformers classes as SD v1.5)."""

from __future__ import annotations

import torch

# Block names mirror SD v1.5 (down_blocks.i.{resnets,attentions}.j, mid_block, up_blocks.i...), but attention
# sits only at the two lowest resolutions: on 2 CPU cores attention over 32x32 tokens costs several times
# the rest of a training step (measured, see docs/models.md).
TINY_UNET_CONFIG: dict = {
    "sample_size": 32,
    "in_channels": 1,
    "out_channels": 1,
    "down_block_types": (
        "DownBlock2D",
        "DownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
    ),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    "block_out_channels": (32, 64, 96, 128),
    "layers_per_block": 2,
    "norm_num_groups": 16,
    "cross_attention_dim": 128,
    "attention_head_dim": 4,
    "transformer_layers_per_block": 1,
}

TINY_TEXT_CONFIG: dict = {
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "projection_dim": 128,
}

TINY_SCHEDULER_CONFIG: dict = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    "clip_sample": True,
}

# Stable Diffusion v1.5's UNet shapes (from its published unet/config.json), used to report method sizes and
# to exercise the real-model code paths without weights.
SD15_UNET_CONFIG: dict = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}


def build_tiny_unet(seed: int = 0):
    """A randomly initialised tiny UNet2DConditionModel (for tests and pretraining)."""
    # lazy: diffusers' heavy modules load only on this path
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**TINY_UNET_CONFIG)
