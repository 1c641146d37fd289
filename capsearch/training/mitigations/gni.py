"""GNI: Gaussian noise added to the text embeddings of the captions (Somepalli et al. 2023b)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from capsearch.training.mitigations.base import EMBEDDING, MitigationConfig, register_mitigation

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class GNI(MitigationConfig):
    """Noise of standard deviation sigma on every text state of a kept caption."""

    sigma: float


@register_mitigation("gni", GNI, stage=EMBEDDING)
def apply(
    cfg: GNI, states: torch.Tensor, dropped: list[bool], generator: torch.Generator
) -> tuple[torch.Tensor, int]:
    """Noise on the states of the captions that were not dropped; how many were noised."""
    import torch  # lazy: the settings parse mitigation lists while the command line starts

    noise = torch.randn(states.shape, generator=generator, dtype=states.dtype).to(states.device)
    # A dropped caption stays the exact empty-prompt embedding that guidance samples with.
    kept = torch.tensor([not d for d in dropped], device=states.device)
    noise = noise * kept.view(-1, *[1] * (states.dim() - 1)).to(states.dtype)
    return states + cfg.sigma * noise, int(kept.sum())
