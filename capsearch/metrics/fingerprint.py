"""A content hash of a module's weights: the key of every feature cache (capsearch.metrics.features)."""

from __future__ import annotations

import hashlib

import torch


def weights_fingerprint(module: torch.nn.Module, extra: str = "") -> str:
    """SHA-256 over a module's parameter and buffer bytes (plus any extra configuration text)."""
    digest = hashlib.sha256(extra.encode())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(
            tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()
