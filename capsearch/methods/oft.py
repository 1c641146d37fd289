"""OFT (Qiu et al. 2023, "Controlling Text-to-Image Diffusion by Orthogonal Finetuning"), via peft.

The weight is multiplied by a block-diagonal orthogonal matrix R (Cayley transform of a skew-symmetric
matrix Q per block): W' = W·R over the input dimension (in·kh·kw for convs). Q starts at 0, so R = I.
Each block of size b has b(b−1)/2 parameters.

Left out, within the chosen units:
- k×k convolutions with k > 1: peft 0.21's OFT Conv2d rotates the *input* through unfold (stride 1,
  no padding) and F.fold, which sums overlapping patches, so even R = I changes the output (measured
  on the tiny UNet: max |Δ| ≈ 0.5 at init). Linear layers and 1×1 convs (proj_in/proj_out, shortcuts)
  are exact.
- modules whose input size is not a multiple of `block_size` (peft would silently change the block
  size for them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from capsearch.errors import UserError
from capsearch.methods._peft import inject
from capsearch.methods.base import MethodConfig, register_method
from capsearch.units import Unit


def fits(module: torch.nn.Module, block_size: int) -> bool:
    """Whether OFT adapts this module exactly: a Linear or 1×1 conv whose input splits into blocks."""
    if isinstance(module, torch.nn.Conv2d):
        if tuple(module.kernel_size) != (1, 1) or module.groups != 1:
            return False
        return module.in_channels % block_size == 0
    return isinstance(module, torch.nn.Linear) and module.in_features % block_size == 0


@dataclass
class OFT(MethodConfig):
    """Block size b of the orthogonal rotation, constrained variant, and block dropout."""

    block_size: int = 32
    coft: bool = False  # constrained OFT: keep R within eps of I
    eps: float = 6e-5
    dropout: float = 0.0  # multiplicative dropout of whole blocks

    def __post_init__(self) -> None:
        if self.block_size < 2:
            raise UserError(f"oft.block_size must be at least 2, got {self.block_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"oft.dropout must be in [0, 1), got {self.dropout}")


@register_method("oft", OFT, example_units="*:*_attn")
def apply(unet: torch.nn.Module, units: Sequence[Unit], cfg: OFT) -> list[str]:
    """Inject OFT into the units' Linear and 1×1 conv modules that fit; return the rotation names."""
    # lazy: peft loads only when its methods are applied
    from peft import OFTConfig

    def make(targets: str) -> OFTConfig:
        return OFTConfig(
            r=0,
            oft_block_size=cfg.block_size,
            coft=cfg.coft,
            eps=cfg.eps,
            module_dropout=cfg.dropout,
            target_modules=targets,
        )

    return inject(unet, units, make, "oft", accepts=lambda module: fits(module, cfg.block_size))
