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
from pathlib import Path
from typing import Any

import numpy as np

from capsearch.errors import UserError
from capsearch.settings import EvalSettings


def _scorers(pipe, name: str):
    """(feature extractor, image-text scorer, world) for a pipeline."""
    from capsearch.metrics.features import get_extractor, resolve_extractor

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


def _recording(pipe, config: EvalSettings, guidance: float, memorised: set[str], ctx) -> Any:
    """The attack's sampler and the list it keeps the memorised captions' images in, for table hooks.

    It samples exactly as the attack does with a pipeline (capsearch.metrics.extraction), so the attack's
    result is the same; only the memorised captions' images are kept (the others can be many).
    """
    import torch

    from capsearch.metrics.extraction import _pipeline_generator

    sample = _pipeline_generator(pipe, config.steps, guidance, config.batch_size)
    kept: list[torch.Tensor] = []

    def run(prompts: list[str], n_per_prompt: int, seed: int) -> torch.Tensor:
        images = sample(prompts, n_per_prompt, seed)
        for j, prompt in enumerate(prompts):
            if prompt in memorised:
                kept.append(
                    images[j * n_per_prompt : (j + 1) * n_per_prompt].detach().float().cpu()
                )
                ctx.memorised_prompts.append(prompt)
        return images

    return run, kept


def scalar_metrics(metrics: dict) -> dict[str, float]:
    """The finite-or-not numbers of an evaluation's metrics (no intervals, settings or lists)."""
    return {
        k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def evaluate(
    pipe,
    data_root,
    config: EvalSettings | None = None,
    out_dir: Path | None = None,
    progress: bool = False,
) -> dict:
    """Evaluate a pipeline against a dataset folder; write metrics.json and samples.png to out_dir."""
    import torch

    from capsearch.atomic import atomic_target
    from capsearch.datasets.folder import load_images, read_metadata
    from capsearch.faults import maybe_fail
    from capsearch.metrics import (
        PHANTOM_THRESHOLD,
        alignment_scores,
        extraction_attack,
        nearest_train,
    )
    from capsearch.metrics.context import EvalContext
    from capsearch.metrics.denoising import denoising_strength_per_prompt
    from capsearch.metrics.extraction import DEFAULT_THRESHOLD
    from capsearch.metrics.features import cached_features
    from capsearch.metrics.fid import frechet_distance_to
    from capsearch.metrics.intervals import (
        cluster_bootstrap,
        cluster_bootstrap_ratio,
        extraction_interval,
        jackknife_interval,
        noise_floor,
        prompt_clusters,
    )
    from capsearch.metrics.kid import kernel_inception_distance_to
    from capsearch.metrics.memorised_grid import MEMORISED_GRID, save_memorised_grid
    from capsearch.metrics.table import METRICS
    from capsearch.models.sampling import generate, save_grid

    config = config or EvalSettings()
    if config.split == "train":  # settings built without validation (model_construct) land here
        raise UserError(
            "eval.split must be a held-out split: FID against training images rewards copying"
        )
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
    clusters = prompt_clusters(len(prompts), config.n_per_prompt)
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
    # a model that learnt the domain without copying would reach (the reward's reference, capsearch.search.reward).
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
    ctx = EvalContext(
        root=root,
        world=world,
        seed=rng_seed,
        bootstrap=config.bootstrap,
        prompts=prompts,
        gen=gen,
        clusters=clusters,
        gen_feats=gen_feats,
        ref_feats=ref_feats,
        train_feats=train_feats,
        train_records=train,
        threshold=threshold,
        attack_prompts=attack_prompts,
        attack_n=config.extraction_n,
    )
    attack_settings: dict = {}
    if attack_prompts:
        ctx.train_images = load_images(root, "train", size)
        recording, kept = _recording(pipe, config, attack_guidance, memorised_set, ctx)
        ext = extraction_attack(
            recording,
            attack_prompts,
            ctx.train_images,
            n_per_prompt=config.extraction_n,
            threshold=threshold,
            min_clique=config.min_clique,
            steps=config.steps,
            guidance=attack_guidance,
            seed=config.seed,
            batch_size=config.batch_size,
        )
        ctx.memorised_images = torch.cat(kept) if kept else None  # once, after the attack
        metrics["extracted"] = ext.count
        metrics["extracted_fraction"] = ext.count / len(attack_prompts)
        metrics["capped_prompts"] = int(ext.settings.get("prompts_with_capped_cliques", 0))
        # Wilson interval on the attacked prompts that yield an extraction, in images (one training
        # image per memorised prompt): attacked prompts are the unit, never generated images.
        intervals["extracted"] = _interval(*extraction_interval(ext)[1:])
        metrics["extracted_pairs"] = [list(e) for e in ext.extracted]
        attack_settings = {"attack_prompts": len(attack_prompts)}
        log(f"extraction attack: {ext.count} extracted from {len(attack_prompts)} prompts")
    for metric in METRICS:  # metrics computed through the table (capsearch.metrics.table)
        computed = metric.compute(ctx) if metric.compute is not None else None
        if computed is not None:
            metrics[metric.name] = computed[0]
            if computed[1] is not None:
                intervals[metric.name] = _interval(*computed[1])
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
        **config.model_dump(),
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
        with atomic_target(out / "metrics.json") as tmp:
            tmp.write_text(json.dumps(metrics, indent=2))
            maybe_fail(out.name, "metrics")  # tests only: an injected fault (capsearch.faults)
        save_grid(gen[:32], out / "samples.png", nrow=8, captions=gen_prompts[:32])
        extracted = {pair[0] for pair in metrics.get("extracted_pairs", [])}
        save_memorised_grid(ctx, extracted, out / MEMORISED_GRID)
    return metrics
