"""Loss-based membership inference: can training images be told from held-out ones by their loss?

A model that memorised its training images predicts their noise better than that of unseen images of
the same domain. The attack of Carlini et al. 2023 ("Extracting training data from diffusion models",
Sec. 6) and Matsumoto et al. 2023 ("Membership inference attacks against diffusion models") thresholds
the diffusion loss of an image under its own caption, ‖ε − ε_θ(x_t, t, c)‖² (the training objective).
The metric is the AUC of that attack: the probability that a random training image (member) has a
lower loss than a random held-out image (non-member), ties counting ½. It is 0.5 for a model that
generalises and 1 when every member's loss is below every non-member's; lower is better.

Losses are measured at fixed timesteps early in the forward process, where both papers found the loss
most telling (t ≈ 100 of 1,000), with noise drawn from the evaluation seed; member i and non-member i
share their noise, so the value is deterministic given the seed. A duplicated training image counts
once. The interval resamples members and non-members apart (each image is a unit). Cost: 2 · images ·
timesteps UNet forward passes, a few batches.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from capsearch.datasets.folder import ImageCaptionDataset
from capsearch.errors import UserError
from capsearch.metrics.context import Computed, EvalContext, Measured, image_size
from capsearch.metrics.intervals import two_sample_bootstrap

MEMBERSHIP_IMAGES = 32  # members and non-members each
# Timesteps as fractions of the scheduler's num_train_timesteps (50, 100, 200, 300 of 1,000).
TIMESTEP_FRACTIONS = (0.05, 0.1, 0.2, 0.3)


def membership_auc_of(member_losses: Sequence[float], nonmember_losses: Sequence[float]) -> float:
    """P(non-member loss > member loss) + ½ P(tie): the Mann–Whitney U of the two samples over m·n."""
    members = np.asarray(member_losses, np.float64)
    others = np.asarray(nonmember_losses, np.float64)
    if members.ndim != 1 or others.ndim != 1 or not len(members) or not len(others):
        raise UserError("membership AUC needs a non-empty 1-D list of losses on each side")
    values, inverse, counts = np.unique(
        np.concatenate([members, others]), return_inverse=True, return_counts=True
    )
    # Average 1-based rank of each distinct value (tied values share the mean of their ranks).
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse.reshape(-1)]
    n = len(others)
    u = ranks[len(members) :].sum() - n * (n + 1) / 2.0  # pairs a non-member's loss is above
    return float(u / (len(members) * n))


def _distinct(records: list[dict]) -> list[int]:
    """Indices of the records with distinct images: the first copy of each duplicated group."""
    first: dict[object, int] = {}
    for i, r in enumerate(records):
        group = r.get("dup_group")
        first.setdefault(("group", group) if group is not None else ("record", i), i)
    return list(first.values())


def _pick_images(
    data: ImageCaptionDataset, indices: list[int], n: int, rng: random.Random
) -> tuple[list[torch.Tensor], list[str]]:
    """Up to n readable images of `indices` in a seeded order, with their captions."""
    order = list(indices)
    rng.shuffle(order)
    images, captions = [], []
    for i in order:
        if len(images) == n:
            break
        image = data.load(i)
        if image is not None:
            images.append(image)
            captions.append(data.captions[i])
    return images, captions


def _latents(pipe, x: torch.Tensor) -> torch.Tensor:
    """The UNet's input of pixels in [-1, 1]: pixels, or the VAE posterior's mean (not a draw)."""
    vae = pipe.vae
    if vae is None:
        return x
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    return vae.encode(x.to(vae.dtype)).latent_dist.mean * vae.config.scaling_factor


def _target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet was trained to predict: ε, or the velocity under v-prediction."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    raise UserError(f"unsupported scheduler prediction_type {kind!r}")


@torch.no_grad()
def diffusion_losses(
    pipe,
    images: torch.Tensor,
    captions: list[str],
    timesteps: Sequence[int],
    noise: torch.Tensor,
    batch_size: int = 64,
) -> torch.Tensor:
    """Each image's diffusion loss under its caption [N], mean over timesteps; noise [N, T, C, H, W]."""
    device, dtype = pipe.device, pipe.dtype
    x0 = _latents(pipe, images.to(device)).to(dtype)
    states = pipe.encode_prompts(captions)
    k = len(timesteps)
    rows = [(i, j) for i in range(len(images)) for j in range(k)]  # (image, timestep) pairs
    losses = torch.zeros(len(images), k, dtype=torch.float64)
    was = pipe.unet.training
    pipe.unet.eval()
    try:
        for start in range(0, len(rows), batch_size):
            img, step = (torch.tensor(c) for c in zip(*rows[start : start + batch_size]))
            t = torch.tensor(timesteps)[step].to(device)
            eps = noise[img, step].to(device, dtype)
            noisy = pipe.scheduler.add_noise(x0[img], eps, t)
            pred = pipe.unet(noisy, t, encoder_hidden_states=states[img]).sample
            target = _target(pipe.scheduler, x0[img], eps, t)
            mse = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
            losses[img, step] = mse.double().cpu()
    finally:
        pipe.unet.train(was)
    return losses.mean(dim=1)


def membership_losses(
    pipe, root, split: str, seed: int, n: int = MEMBERSHIP_IMAGES, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Diffusion losses of n distinct training images and n images of a held-out split (seeded)."""
    train = ImageCaptionDataset(root, split="train", size=image_size(pipe))
    held = ImageCaptionDataset(root, split=split, size=image_size(pipe))
    rng = random.Random(f"membership:{seed}")
    members, member_caps = _pick_images(train, _distinct(train.records), n, rng)
    others, other_caps = _pick_images(held, list(range(len(held))), n, rng)
    n = min(len(members), len(others))
    if n == 0:
        return torch.zeros(0), torch.zeros(0)
    steps = pipe.scheduler.config.num_train_timesteps
    timesteps = [int(f * steps) for f in TIMESTEP_FRACTIONS]
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, len(timesteps), *pipe.latent_shape), generator=g)
    return (
        diffusion_losses(
            pipe, torch.stack(members[:n]), member_caps[:n], timesteps, noise, batch_size
        ),
        diffusion_losses(
            pipe, torch.stack(others[:n]), other_caps[:n], timesteps, noise, batch_size
        ),
    )


def membership_auc(ctx: EvalContext) -> Computed:
    """The loss attack's AUC on training against held-out images, with the two mean losses beside it."""
    c = ctx.settings
    members, others = membership_losses(
        ctx.pipe, ctx.root, c.split, c.seed, batch_size=c.batch_size
    )
    if len(members) < 2:
        return None  # too few images on one side to tell anything
    m, o = members.numpy(), others.numpy()
    interval = two_sample_bootstrap(m, o, membership_auc_of, n_boot=ctx.bootstrap, seed=ctx.seed)
    extra = {"membership_loss_train": float(m.mean()), "membership_loss_heldout": float(o.mean())}
    return Measured(membership_auc_of(m, o), interval, extra)
