"""The mid-training probe: a cheap, memorisation-aware signal for early stopping (ASHA).

Held-out diffusion loss alone ranks trials by how fast they fit, and the trials with the most capacity
lower it fastest: an early stopper on it favours capacity, against the thesis being searched (Dutt et
al. 2024: more capacity, more memorisation). The probe adds two memorisation signals, each measured on
fixed batches with fixed noise and timesteps, so that every probe of every trial is comparable:

- the generalisation gap the fine-tune has opened: on a fixed batch of training images and one of
  held-out images, paired by noise and timestep, `gap = (L_held − L_train) / L_held`, minus the same
  quantity of the base model before training (two different image sets never have exactly equal
  losses); a model that fits its training images better than unseen ones of the same domain is
  learning them, not the domain;
- the denoising-strength ratio (Wen et al. 2024) of the data set's memorised (duplicated) captions
  against other training captions at a fixed noisy latent: memorised prompts pull harder on the
  text-conditional prediction.

The score ASHA minimises is

    probe_score = L_held · (1 + max(0, gap)) · max(1, strength_ratio)

which is the held-out loss when nothing is memorised and grows with either sign of memorisation.

With `train.probe_own_captions: N` > 0 a third, opt-in signal joins them: the own-image share. Each
probe samples N of the memorised captions (a seeded choice, fixed for the run) OWN_SAMPLES times each,
from the same initial noise at every probe (DDIM, OWN_STEPS steps, guidance 1, as the evaluation's
attack samples), and `own_share` is the share of those samples whose nearest training image in tiled
ℓ2 (the attack's distance) is the caption's own image (capsearch.metrics.nearest_own, on the probe's
samples). A model that copies nothing lands on its own image only by chance, `own_chance`: the
caption's copies' share of the training images, averaged over the chosen captions. The score becomes

    probe_score = L_held · (1 + max(0, gap)) · max(1, strength_ratio)
                  · (1 + max(0, own_share − own_chance) / (1 − own_chance))

The factor is 1 at or below chance and 2 when every sample lands on its own image, linear between:
the excess over chance, as a share of the room above chance. It is bounded like the gap's factor, so
a noisy probe (a few dozen samples) cannot swamp the quality term; a ratio to chance
(max(1, own_share / chance)) would not be: with 10 copies among 400 images one lucky hit in 32
samples would already multiply the score by 1.25, and full copying by 40. The sampling draws its
noise from its own seeded generators; the global torch RNG is saved and restored around it, so a run
with the signal trains bit-identically to one without. With N = 0 (the default) nothing is sampled and
the score is exactly the two-signal one above.
"""

from __future__ import annotations

import random
import warnings

import torch
import torch.nn.functional as F

from capsearch.datasets.folder import ImageCaptionDataset
from capsearch.errors import UserError
from capsearch.metrics.denoising import threshold_scores
from capsearch.metrics.extraction import DEFAULT_TILES, _nearest_training
from capsearch.models.sampling import generate

PROBE_IMAGES = 32  # images per fixed probe batch (held-out and training)
PROBE_PROMPTS = 8  # memorised and other captions for the strength ratio
OWN_SAMPLES = 4  # samples per memorised caption for the own-image share
OWN_STEPS = 10  # DDIM steps of those samples (the evaluation's default is 20)
OWN_GUIDANCE = 1.0  # as the attack samples: guidance buries copies under texture (docs/metrics.md)


def diffusion_target(pipe, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to predict under the scheduler's prediction type."""
    kind = pipe.scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return pipe.scheduler.get_velocity(x0, noise, t)
    raise UserError(f"unsupported scheduler prediction_type {kind!r}")


def own_factor(own_share: float, chance: float) -> float:
    """1 + the own-image share's excess over chance, as a share of the room above it (1 to 2)."""
    if chance >= 1.0:  # every training image is the caption's own: the share tells nothing
        return 1.0
    return 1.0 + max(0.0, own_share - chance) / (1.0 - chance)


def probe_score(
    heldout_loss: float,
    gap: float | None,
    strength_ratio: float | None,
    own_share: float | None = None,
    own_chance: float = 0.0,
) -> float:
    """The early-stopping score: held-out loss inflated by the opened gap and the strength ratio, and
    by the own-image share above chance where it was measured (train.probe_own_captions)."""
    score = heldout_loss * (1.0 + max(0.0, gap or 0.0))
    score = score * max(1.0, strength_ratio if strength_ratio is not None else 1.0)
    if own_share is None:
        return score
    return score * own_factor(own_share, own_chance)


def own_share(
    samples: torch.Tensor, owners: list[str], images: torch.Tensor, captions: list[str]
) -> float:
    """The share of samples whose nearest training image (tiled ℓ2) carries the sample's caption."""
    _, nearest = _nearest_training(samples.detach().float().cpu(), images, DEFAULT_TILES)
    hits = [captions[i] == owner for owner, i in zip(owners, nearest.tolist(), strict=True)]
    return sum(hits) / len(hits)


class Probe:
    """Fixed probe batches of one fine-tune; calling it measures the current UNet."""

    def __init__(self, pipe, root, images, captions, groups, size: int, seed: int,
                 own_captions: int = 0) -> None:  # fmt: skip
        g = torch.Generator().manual_seed(seed)
        held = ImageCaptionDataset(root, split="validate", size=size)
        imgs = [
            t for t in (held.load(i) for i in range(min(len(held), PROBE_IMAGES))) if t is not None
        ]
        self.held = torch.stack(imgs) if imgs else None
        self.held_caps = held.captions[: len(imgs)]
        # Distinct training images (one per duplicated group), in a seeded order.
        first: dict[object, int] = {}
        for i, (caption, group) in enumerate(zip(captions, groups)):
            first.setdefault(caption if group is not None else i, i)
        order = torch.randperm(len(first), generator=g).tolist()
        picked = [list(first.values())[j] for j in order][: len(imgs)]
        self.train = images[picked] if picked else None
        self.train_caps = [captions[i] for i in picked]
        n = min(len(imgs), len(picked))
        if n:
            shape = (n, *pipe.latent_shape)
            self.noise = torch.randn(shape, generator=g)
            self.t = torch.randint(50, 950, (n,), generator=g)
            self.held, self.held_caps = self.held[:n], self.held_caps[:n]
            self.train, self.train_caps = self.train[:n], self.train_caps[:n]
        else:
            self.held = self.train = None
        self.mem = sorted({c for c, gr in zip(captions, groups) if gr is not None})[:PROBE_PROMPTS]
        self.other = sorted({c for c, gr in zip(captions, groups) if gr is None})[:PROBE_PROMPTS]
        self.z = torch.randn((PROBE_PROMPTS, *pipe.latent_shape), generator=g)
        self.base_gap: float | None = None
        self._choose_own(images, captions, groups, own_captions, seed)

    def _choose_own(self, images, captions, groups, n: int, seed: int) -> None:
        """The own-image share's fixed captions (n memorised ones, a seeded choice) and chance level."""
        memorised = sorted({c for c, gr in zip(captions, groups) if gr is not None})
        self.own = random.Random(seed).sample(memorised, min(n, len(memorised)))
        self.own_seed = seed  # the samples' initial noise: the same at every probe of the run
        self.images, self.captions = images, list(captions)
        self.own_chance = (
            sum(self.captions.count(c) for c in self.own) / (len(self.own) * len(self.captions))
            if self.own
            else 0.0
        )
        if n and not self.own:
            warnings.warn(
                "train.probe_own_captions is set but the training data has no memorised "
                "(duplicated) captions: the probe records no own_share",
                stacklevel=3,
            )

    def _loss(self, pipe, latents_of, x: torch.Tensor, caps: list[str]) -> float:
        x0 = latents_of(x.to(pipe.device))
        noise, t = self.noise.to(x0), self.t.to(x0.device)
        noisy = pipe.scheduler.add_noise(x0, noise, t)
        pred = pipe.unet(noisy, t, encoder_hidden_states=pipe.encode_prompts(caps)).sample
        return F.mse_loss(pred.float(), diffusion_target(pipe, x0, noise, t).float()).item()

    def _own_share(self, pipe) -> float:
        """Sample the fixed memorised captions from the fixed noise; the share nearest their own image.

        The global torch RNG (and the device's) is saved and restored around the sampling: the training
        stream never sees it.
        """
        cuda = [pipe.device] if pipe.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            samples = generate(pipe, self.own, n_per_prompt=OWN_SAMPLES, steps=OWN_STEPS,
                               guidance=OWN_GUIDANCE, seed=self.own_seed)  # fmt: skip
        owners = [c for c in self.own for _ in range(OWN_SAMPLES)]
        return own_share(samples, owners, self.images, self.captions)

    def _strength(self, pipe, prompts: list[str], uncond: torch.Tensor) -> float:
        t = torch.tensor(int(pipe.scheduler.config.num_train_timesteps * 0.8), device=pipe.device)
        z = self.z[: len(prompts)].to(pipe.device, pipe.dtype)
        return threshold_scores(pipe.unet, z, t, pipe.encode_prompts(prompts), uncond).mean().item()

    @torch.no_grad()
    def measure_base(self, pipe, latents_of) -> None:
        """Measure the base model's gap once, before any training step (or resumed state)."""
        if self.held is not None and self.base_gap is None:
            out = self(
                pipe, latents_of, own=False
            )  # the own-image share is not compared with the base
            self.base_gap = out["raw_gap"]

    @torch.no_grad()
    def __call__(self, pipe, latents_of, own: bool = True) -> dict:
        """Held-out and training loss, the opened gap, the strength ratio, the own-image share (with
        own captions) and the probe score."""
        unet = pipe.unet
        was = unet.training
        unet.eval()
        out: dict = {}
        try:
            if self.held is not None:
                held = self._loss(pipe, latents_of, self.held, self.held_caps)
                train = self._loss(pipe, latents_of, self.train, self.train_caps)
                out.update(heldout_loss=held, train_loss=train)
                out["raw_gap"] = (held - train) / max(held, 1e-12)
                if self.base_gap is not None:
                    out["loss_gap"] = out["raw_gap"] - self.base_gap
            if self.mem and self.other:
                uncond = pipe.encode_prompts([""])
                mem, other = (
                    self._strength(pipe, self.mem, uncond),
                    self._strength(pipe, self.other, uncond),
                )
                out.update(strength_memorised=mem, strength_other=other)
                out["strength_ratio"] = mem / max(other, 1e-12)
            if own and self.own:
                out.update(own_share=self._own_share(pipe), own_chance=self.own_chance)
            if "heldout_loss" in out:
                out["probe_score"] = probe_score(
                    out["heldout_loss"], out.get("loss_gap"), out.get("strength_ratio"),
                    out.get("own_share"), out.get("own_chance", 0.0),
                )  # fmt: skip
        finally:
            unet.train(was)
        return out
