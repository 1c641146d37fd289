"""What a fine-tune feeds its UNet besides noise: latents and text states, encoded once, not every step.

Only the UNet trains (Dutt et al. 2024 eq. 1): the text encoder's states of a caption and the VAE's
posterior of a training image are the same at every step. With `train.cache_encodings` (default on):

- text states are kept per caption string, in a table bounded in entries and bytes (least recently used
  out first). Only captions that recur are stored: the training captions (after fixed RWA) and the
  empty caption of caption dropout. A caption a mitigation writes afresh per draw (per-draw RWA) is
  encoded when drawn and not stored, so it cannot crowd the recurring ones out;
- with a VAE, every training image is encoded once at set-up, in chunks of the batch size, and each
  step draws its latents from the stored posterior N(mean, std²) with the very call that
  `latent_dist.sample()` makes (`torch.randn` of the batch's shape on the global RNG), so the random
  stream is the one per-step encoding draws;
- a pixel-space model's images move to the training device once (pinned, asynchronous on CUDA).

Memory on the training device: two latent tensors per training image (SD v1.5 at 512 px: 2 × 64 KiB in
fp32, 1.3 GB for 10,000 images) and the text table's bound.

What differs from encoding every step is rounding only: a convolution's result can depend on the batch
it runs in (on CPU, a 1×1 convolution takes another path for another batch size: 4e-7 in a latent
measured between batches of 16 and 4), so set-up encodes in chunks of exactly the batch size, the
shape per-step encoding runs at. Where a backend rounds by position in the batch too, an image's
latent can still differ in the last bits from its per-step encoding. Text states of missing captions
are likewise encoded at the batch's size.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Sequence

import torch

MAX_CAPTIONS = 4096  # text-state entries at most ...
MAX_TEXT_BYTES = 512 * 2**20  # ... and bytes at most (SD v1.5: 77 × 768 fp32 = 231 KiB an entry)


def encode_latents(pipe, x: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] as the UNet's input: VAE latents (a posterior draw), or the pixels themselves."""
    vae = pipe.vae
    if vae is None:
        return x
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    latents = vae.encode(x.to(vae.dtype)).latent_dist.sample(generator=None)
    return latents * vae.config.scaling_factor


def to_device(x: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None):
    """A host tensor on `device`: from pinned memory without waiting on CUDA, a plain copy elsewhere."""
    cuda = device.type == "cuda" and x.device.type == "cpu"
    return (x.pin_memory() if cuda else x).to(device, dtype, non_blocking=cuda)


def host_draw(draw, *args, to: tuple, **kwargs) -> torch.Tensor:
    """`draw(*args, **kwargs)` (a torch factory on a CPU generator), then `.to(*to)`: drawn straight
    into pinned memory and sent without waiting when `to` names a CUDA device; the same numbers."""
    cuda = torch.device(to[0]).type == "cuda"
    return draw(*args, pin_memory=cuda, **kwargs).to(*to, non_blocking=cuda)


class TextStates:
    """Text-encoder states of a batch of captions, the recurring ones looked up (module docstring)."""

    def __init__(
        self,
        pipe,
        recurring: Collection[str] = (),
        max_entries: int = MAX_CAPTIONS,
        max_bytes: int = MAX_TEXT_BYTES,
    ) -> None:
        self.pipe, self.recurring = pipe, frozenset(recurring)
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.table: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.encoded = 0  # captions run through the text encoder, for tests and benchmarks

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """States [B, L, D] of `texts`, as `pipe.encode_prompts(texts)` gives them."""
        missing = list(dict.fromkeys(t for t in texts if t not in self.table))
        fresh = {}
        if missing:
            # Run at the batch's shape (the missing ones repeated): per-step encoding's rounding.
            self.encoded += len(missing)
            padded = [missing[j % len(missing)] for j in range(len(texts))]
            fresh = dict(zip(missing, self.pipe.encode_prompts(padded)))
        rows = [self.table[t] if t in self.table else fresh[t] for t in texts]
        for t in dict.fromkeys(texts):
            if t in self.table:
                self.table.move_to_end(t)
            elif t in self.recurring:
                self.table[t] = fresh[t].clone()  # its own storage, not a view of the whole batch
        self._bound()
        return torch.stack(rows)

    def _bound(self) -> None:
        if not self.table:
            return
        row = next(iter(self.table.values()))
        limit = min(self.max_entries, self.max_bytes // max(1, row.numel() * row.element_size()))
        while len(self.table) > limit:
            self.table.popitem(last=False)


class TrainingInputs:
    """A fine-tune's UNet inputs by training record: latents x0 and text states (module docstring)."""

    def __init__(
        self, pipe, images: torch.Tensor, chunk: int, cache: bool, recurring: Collection[str] = ()
    ) -> None:
        self.pipe, self.images, self.device = pipe, images, pipe.device
        self.text = TextStates(pipe, recurring) if cache else None
        self.mean = self.std = None
        if cache and pipe.vae is None:
            self.images = to_device(images, self.device)
        elif cache:
            self.mean, self.std = _posteriors(pipe, images, chunk)

    def states(self, texts: Sequence[str]) -> torch.Tensor:
        """Text-encoder states [B, L, D] of a batch's captions (after the caption mitigations)."""
        return self.text(texts) if self.text is not None else self.pipe.encode_prompts(texts)

    def latents(self, idx: list[int]) -> torch.Tensor:
        """x0 of training records `idx`: a fresh posterior draw with a VAE, else the pixels."""
        if self.mean is None:
            return encode_latents(self.pipe, self.images[idx].to(self.device))
        mean, std = self.mean[idx], self.std[idx]
        # DiagonalGaussianDistribution.sample(generator=None): mean + std · N(0, 1) of the global RNG
        eps = torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)
        return (mean + std * eps) * self.pipe.vae.config.scaling_factor


@torch.no_grad()
def _posteriors(pipe, images: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of the VAE posterior of every image, encoded `chunk` at a time."""
    vae, means, stds, n = pipe.vae, [], [], len(images)
    for start in range(0, n, chunk):
        # The last chunk topped up from the first images: every encode has a training batch's shape,
        # the shape whose rounding per-step encoding has (a batch of one rounds otherwise on CPU).
        x = to_device(images[[(start + j) % n for j in range(chunk)]], pipe.device)
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        dist, keep = vae.encode(x.to(vae.dtype)).latent_dist, min(chunk, n - start)
        means.append(dist.mean[:keep])
        stds.append(dist.std[:keep])
    return torch.cat(means), torch.cat(stds)
