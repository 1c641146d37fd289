"""Score one model as the paper does: FID, image-text score, AMD, extracted images, denoising strength.

Every metric comes with a 95% interval (docs/metrics.md, "Intervals"): generated samples are grouped by
prompt, and an interval resamples or deletes whole prompts, never single generated images (duplicated
images would form cliques in the attack and shrink FID's covariance). FID and KID are measured against
held-out real images (`split`, never the training set: copying training images would lower a
training-set FID), with a reference at least `reference_ratio` times the generated sample count, and
with the noise floor of that reference beside them: FID between two disjoint sets of real held-out
images of the generated set's size, what FID looks like when nothing is wrong.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from capsearch.errors import UserError

HELD_OUT_SPLITS = ("validate", "test")


@dataclass
class EvalConfig:
    """Sample counts and sampler settings of one evaluation (recorded in metrics.json)."""

    n_prompts: int = 24  # held-out prompts for FID / KID / AMD / image-text score
    n_per_prompt: int = 4
    steps: int = 20
    guidance: float = 3.0
    seed: int = 0
    extraction_prompts: int = 8  # memorised captions first, then other training captions
    extraction_n: int = 16
    extraction_threshold: float | None = None  # None: the world's default (docs/metrics.md)
    # Guidance of the attack's samples (None: `guidance`). A model fine-tuned without caption dropout
    # keeps its base's unconditional prediction, and guidance then buries its copies under texture:
    # docs/metrics.md measured 9 of 9 memorised images extracted at guidance 1, 2 at 3, 0 at 7.5.
    extraction_guidance: float | None = None
    min_clique: int = 3
    strength_prompts: int = 8
    strength_n: int = 2
    extractor: str = (
        "auto"  # auto: phantom scorer in pixel space (tiny), torchxrayvision DenseNet for latent SD
    )
    # Held-out split for the prompts and the FID/KID reference: validate while searching, test in the
    # final re-evaluation (select on one split, report on another).
    split: str = "validate"
    reference_ratio: float = 4.0  # reference images per generated sample, at least
    bootstrap: int = 1000  # prompt resamplings per bootstrap interval
    noise_floor_repeats: int = 20
    batch_size: int = 64
    cache_dir: str | None = None

    def check(self) -> None:
        """Reject impossible values with one line naming the field."""
        for name in ("n_per_prompt", "steps", "extraction_n", "strength_n", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"eval.{name} must be at least 1, got {getattr(self, name)}")
        if self.n_prompts < 2:
            raise UserError(
                f"eval.n_prompts must be at least 2 (intervals resample prompts), got {self.n_prompts}"
            )
        if self.extraction_n < self.min_clique:
            raise UserError("eval.extraction_n must be at least eval.min_clique")
        if self.split not in HELD_OUT_SPLITS:
            raise UserError(
                f"eval.split must be a held-out split ({' or '.join(HELD_OUT_SPLITS)}), got "
                f"{self.split!r}: FID against training images rewards copying them"
            )
        if self.reference_ratio < 1:
            raise UserError(f"eval.reference_ratio must be at least 1, got {self.reference_ratio}")
        if self.bootstrap < 100 or self.noise_floor_repeats < 2:
            raise UserError("eval.bootstrap must be at least 100 and eval.noise_floor_repeats 2")

    @property
    def samples(self) -> int:
        """Generated samples compared with the reference."""
        return self.n_prompts * self.n_per_prompt


def _scorers(pipe, name: str):
    """(feature extractor, image-text scorer, world) for a pipeline."""
    from capsearch.features import get_extractor, resolve_extractor

    name = resolve_extractor(name, pipe)
    extractor = get_extractor(name)
    if name == "phantom":
        return extractor, extractor.scorer, "phantom"
    return extractor, get_extractor("biovil-t"), "real"


def _pick(records: list[dict], n: int, seed: int) -> list[str]:
    texts = sorted({r["text"] for r in records if r.get("text")})
    random.Random(seed).shuffle(texts)
    return texts[:n]


def _interval(low: float, high: float) -> list[float]:
    return [float(low), float(high)]


def scalar_metrics(metrics: dict) -> dict[str, float]:
    """The finite-or-not numbers of an evaluation's metrics (no intervals, settings or lists)."""
    return {
        k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def evaluate(
    pipe,
    data_root,
    config: EvalConfig | None = None,
    out_dir: Path | None = None,
    progress: bool = False,
) -> dict:
    """Evaluate a pipeline against a dataset folder; write metrics.json and samples.png to out_dir."""
    from capsearch.data import load_images, read_metadata
    from capsearch.features import cached_features
    from capsearch.metrics import (
        PHANTOM_THRESHOLD,
        alignment_scores,
        extraction_attack,
        nearest_train,
    )
    from capsearch.metrics.denoising import denoising_strength_per_prompt
    from capsearch.metrics.extraction import DEFAULT_THRESHOLD
    from capsearch.metrics.fid import frechet_distance_to
    from capsearch.metrics.intervals import (
        cluster_bootstrap,
        cluster_bootstrap_ratio,
        extraction_interval,
        jackknife_interval,
        noise_floor,
    )
    from capsearch.metrics.kid import kernel_inception_distance_to
    from capsearch.sample import generate, save_grid

    config = config or EvalConfig()
    config.check()
    root = Path(data_root)
    t0 = time.time()
    extractor, text_scorer, world = _scorers(pipe, config.extractor)
    records = read_metadata(root)
    train = [r for r in records if r.get("split", "train") == "train"]
    held = [r for r in records if r.get("split") == config.split]
    if not held:
        raise UserError(
            f"{root} has no {config.split!r} images: FID needs held-out patients "
            f"(the {config.split} split of metadata), never the training images"
        )
    prompts = _pick(held, config.n_prompts, config.seed)
    if len(prompts) < 2:
        raise UserError(f"the {config.split} split of {root} has fewer than 2 distinct captions")
    size = pipe.unet.config.sample_size * (8 if pipe.vae is not None else 1)
    cache = Path(config.cache_dir) if config.cache_dir else root / ".capsearch_cache"
    rng_seed = config.seed + 10_007  # resampling streams, apart from the sampling seed

    def log(msg: str) -> None:
        if progress:
            print(f"  eval: {msg} ({time.time() - t0:.0f} s)", flush=True)

    ref_feats = cached_features(extractor, root, cache, split=config.split)
    n_gen = len(prompts) * config.n_per_prompt
    need = math.ceil(config.reference_ratio * n_gen)
    if len(ref_feats) < need:
        raise UserError(
            f"the {config.split} reference of {root} holds {len(ref_feats)} images, fewer than "
            f"evaluate.reference_ratio × samples = {need}: add held-out images (phantom data: "
            "data.phantom.held_out_images) or generate fewer samples"
        )
    gen = generate(
        pipe,
        prompts,
        config.n_per_prompt,
        config.steps,
        config.guidance,
        config.seed,
        config.batch_size,
    )
    gen_prompts = [p for p in prompts for _ in range(config.n_per_prompt)]
    clusters = np.repeat(np.arange(len(prompts)), config.n_per_prompt)
    log(f"{len(gen)} samples generated")
    gen_feats = extractor.features(gen)
    train_feats = cached_features(extractor, root, cache, split="train")

    # The reference's statistics are computed once for the estimate and all jackknife replicates.
    fid, fid_low, fid_high = jackknife_interval(frechet_distance_to(ref_feats), gen_feats, clusters)
    kid, kid_low, kid_high = jackknife_interval(
        kernel_inception_distance_to(ref_feats), gen_feats, clusters
    )
    nearest = nearest_train(gen_feats, train_feats)[0][:, 0].double().numpy()
    aligned = alignment_scores(gen, gen_prompts, text_scorer).double().numpy()
    # Real held-out images' own distance to the training set, at the generated sample count: the AMD
    # a model that learnt the domain without copying would reach (the reward's reference, capsearch.reward).
    pick = np.random.default_rng(rng_seed).choice(len(ref_feats), size=n_gen, replace=False)
    heldout_nearest = nearest_train(ref_feats[pick], train_feats)[0][:, 0].double().numpy()
    metrics: dict = {
        "fid": fid,
        "kid": kid,
        "amd": float(nearest.mean()),
        "amd_heldout": float(heldout_nearest.mean()),
        "alignment": float(aligned.mean()),
    }
    intervals: dict[str, list[float]] = {
        "fid": _interval(fid_low, fid_high),
        "kid": _interval(kid_low, kid_high),
        "amd": _interval(
            *cluster_bootstrap(nearest, clusters, n_boot=config.bootstrap, seed=rng_seed)
        ),
        "alignment": _interval(
            *cluster_bootstrap(aligned, clusters, n_boot=config.bootstrap, seed=rng_seed)
        ),
    }
    # The floor mirrors the comparison: n real images against the rest of the reference.
    floor = noise_floor(
        ref_feats,
        n_gen,
        repeats=config.noise_floor_repeats,
        seed=rng_seed,
        reference_n=len(ref_feats) - n_gen,
    )
    log("FID, KID, AMD, image-text score done")
    memorised = sorted({r["text"] for r in train if r.get("dup_group") is not None})
    memorised_set = set(memorised)
    others = [t for t in _pick(train, 10**9, config.seed + 1) if t not in memorised_set]
    attack_prompts = (memorised + others)[: config.extraction_prompts]
    threshold = config.extraction_threshold or (
        PHANTOM_THRESHOLD if world == "phantom" else DEFAULT_THRESHOLD
    )
    attack_guidance = (
        config.guidance if config.extraction_guidance is None else config.extraction_guidance
    )
    attack_settings: dict = {}
    if attack_prompts:
        train_images = load_images(root, "train", size)
        ext = extraction_attack(
            pipe,
            attack_prompts,
            train_images,
            n_per_prompt=config.extraction_n,
            threshold=threshold,
            min_clique=config.min_clique,
            steps=config.steps,
            guidance=attack_guidance,
            seed=config.seed,
            batch_size=config.batch_size,
        )
        metrics["extracted"] = ext.count
        metrics["extracted_fraction"] = ext.count / len(attack_prompts)
        metrics["capped_prompts"] = int(ext.settings.get("prompts_with_capped_cliques", 0))
        # Wilson interval on the attacked prompts that yield an extraction, in images (one training
        # image per memorised prompt): attacked prompts are the unit, never generated images.
        intervals["extracted"] = _interval(*extraction_interval(ext)[1:])
        metrics["extracted_pairs"] = [list(e) for e in ext.extracted]
        attack_settings = {"attack_prompts": len(attack_prompts)}
        log(f"extraction attack: {ext.count} extracted from {len(attack_prompts)} prompts")
    if memorised and others:
        sp = denoising_strength_per_prompt
        kw = dict(
            steps=config.steps,
            n=config.strength_n,
            guidance=config.guidance,
            seed=config.seed,
            batch_size=config.batch_size,
        )
        s_mem = sp(pipe, memorised[: config.strength_prompts], **kw).double().numpy()
        s_other = sp(pipe, others[: config.strength_prompts], **kw).double().numpy()
        metrics.update(
            strength_memorised=float(s_mem.mean()),
            strength_other=float(s_other.mean()),
            strength_ratio=float(s_mem.mean() / max(s_other.mean(), 1e-12)),
        )
        if len(s_mem) > 1 and len(s_other) > 1:
            intervals["strength_ratio"] = _interval(
                *cluster_bootstrap_ratio(s_mem, s_other, n_boot=config.bootstrap, seed=rng_seed)
            )
        log("denoising strength done")
    metrics["intervals"] = intervals
    metrics["noise_floor"] = floor
    metrics["settings"] = {
        **asdict(config),
        "world": world,
        "extractor": extractor.name,
        "extraction_threshold": threshold,
        "extraction_guidance": attack_guidance,
        "prompts": len(prompts),
        "samples": len(gen),
        "memorised_prompts": len(memorised),
        "reference_images": len(ref_feats),
        "train_images": len(train_feats),
        **attack_settings,
        "seconds": round(time.time() - t0, 1),
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "metrics.json.tmp"
        tmp.write_text(json.dumps(metrics, indent=2))
        tmp.replace(out / "metrics.json")
        save_grid(gen[:32], out / "samples.png", nrow=8, captions=gen_prompts[:32])
    return metrics
