"""The passes of one evaluation over the model: samples → attack → strength, each filling the context.

`prepare` reads the data set and the held-out reference once; then each stage a metric of the table
needs (capsearch.metrics.table, `needs`) runs in the order of `context.STAGES`, and the metrics are
computed from what the stages left in the `EvalContext`. Every pass samples from its own seed, so a
stage's result does not depend on which stages ran before it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from capsearch.datasets.folder import in_split, load_images, read_metadata
from capsearch.errors import UserError
from capsearch.metrics.context import ATTACK, SAMPLES, STRENGTH, EvalContext, image_size
from capsearch.metrics.denoising import denoising_strength_per_prompt
from capsearch.metrics.extraction import (
    DEFAULT_THRESHOLD,
    PHANTOM_THRESHOLD,
    _pipeline_generator,
    extraction_attack,
)
from capsearch.metrics.features import cached_features, get_extractor, resolve_extractor
from capsearch.metrics.intervals import prompt_clusters
from capsearch.metrics.neighbours import nearest_two
from capsearch.metrics.reference import noise_floor
from capsearch.models.sampling import generate
from capsearch.settings import EvalSettings


def _scorers(pipe, name: str) -> tuple[Any, Any, str]:
    """(feature extractor, image-text scorer, world) for a pipeline."""
    name = resolve_extractor(name, pipe)
    extractor = get_extractor(name)
    if name == "phantom":
        return extractor, extractor.scorer, "phantom"
    return extractor, get_extractor("biovil-t"), "real"


def _pick(records: list[dict], n: int, seed: int) -> list[str]:
    texts = sorted({r["text"] for r in records if r.get("text")})
    random.Random(seed).shuffle(texts)
    return texts[:n]


def heldout_prompts(records: list[dict], root: Path, config: EvalSettings) -> list[str]:
    """The prompts of an evaluation from its held-out split (config.split) of a data set's records;
    one line if that split cannot serve: no records, fewer than 2 captions, or fewer images listed
    than the FID/KID reference needs (`eval` checks this before the model loads, `run` before it
    writes its run folder)."""
    held = [r for r in records if in_split(r, config.split)]
    if not held:
        raise UserError(
            f"{root} has no {config.split!r} images: FID needs held-out patients "
            f"(the {config.split} split of metadata), never the training images"
        )
    prompts = _pick(held, config.n_prompts, config.seed)
    if len(prompts) < 2:
        raise UserError(f"the {config.split} split of {root} has fewer than 2 distinct captions")
    check_reference(root, config, len(held), len(prompts), "lists")
    return prompts


def check_reference(root: Path, config: EvalSettings, have: int, prompts: int, verb: str) -> None:
    """One line if `have` reference images are fewer than reference_ratio × the samples compared."""
    need = math.ceil(config.reference_ratio * prompts * config.n_per_prompt)
    if have < need:
        raise UserError(
            f"the {config.split} reference of {root} {verb} {have} images, fewer than "
            f"evaluate.reference_ratio × samples = {need}: add held-out images (phantom data: "
            "data.phantom.held_out_images) or generate fewer samples"
        )


def attack_captions(memorised: list[str], others: list[str], total: int) -> list[str]:
    """The attack's prompts: every memorised caption, then other training captions until there are
    `total` (`evaluate.extraction_prompts`); none of the others when the memorised ones reach it."""
    return memorised + others[: max(0, total - len(memorised))]


def prepare(pipe, data_root: Path | str, config: EvalSettings) -> EvalContext:
    """The context before any pass: prompts, held-out reference features, the attack's prompts."""
    if config.split == "train":  # settings built without validation (model_construct) land here
        raise UserError(
            "eval.split must be a held-out split: FID against training images rewards copying"
        )
    root = Path(data_root)
    extractor, text_scorer, world = _scorers(pipe, config.extractor)
    records = read_metadata(root)
    train = [r for r in records if in_split(r, "train")]
    prompts = heldout_prompts(records, root, config)
    cache = Path(config.cache_dir) if config.cache_dir else root / ".capsearch_cache"
    ref_feats = cached_features(extractor, root, cache, split=config.split)
    check_reference(root, config, len(ref_feats), len(prompts), "holds")  # the readable ones
    memorised = sorted({r["text"] for r in train if r.get("dup_group") is not None})
    memorised_set = set(memorised)
    others = [t for t in _pick(train, 10**9, config.seed + 1) if t not in memorised_set]
    guidance = config.guidance if config.extraction_guidance is None else config.extraction_guidance
    return EvalContext(
        root=root,
        world=world,
        seed=config.seed + 10_007,  # resampling streams, apart from the sampling seed
        bootstrap=config.bootstrap,
        prompts=prompts,
        ref_feats=ref_feats,
        train_records=train,
        threshold=config.extraction_threshold
        or (PHANTOM_THRESHOLD if world == "phantom" else DEFAULT_THRESHOLD),
        attack_prompts=attack_captions(memorised, others, config.extraction_prompts),
        attack_n=config.extraction_n,
        pipe=pipe,
        settings=config,
        extractor=extractor,
        text_scorer=text_scorer,
        cache=cache,
        memorised=memorised,
        others=others,
        attack_guidance=guidance,
    )


def samples(pipe, ctx: EvalContext) -> str:
    """Quality samples of the held-out prompts, their features, the training set's and the noise floor."""
    c = ctx.settings
    ctx.gen = generate(pipe, ctx.prompts, c.n_per_prompt, c.steps, c.guidance, c.seed, c.batch_size)
    ctx.gen_prompts = [p for p in ctx.prompts for _ in range(c.n_per_prompt)]
    ctx.clusters = prompt_clusters(len(ctx.prompts), c.n_per_prompt)
    ctx.gen_feats = ctx.extractor.features(ctx.gen)
    ctx.train_feats = cached_features(ctx.extractor, ctx.root, ctx.cache, split="train")
    # The floor mirrors the comparison: n real images against the rest of the reference.
    n_gen = len(ctx.gen)
    ctx.noise_floor = noise_floor(
        ctx.ref_feats,
        n_gen,
        repeats=c.noise_floor_repeats,
        seed=ctx.seed,
        reference_n=len(ctx.ref_feats) - n_gen,
    )
    return f"{n_gen} samples generated"


def _recording(pipe, ctx: EvalContext) -> tuple[Callable, list[torch.Tensor]]:
    """The attack's sampler and the list it keeps the memorised captions' images in, for the metrics.

    It samples exactly as the attack does with a pipeline (capsearch.metrics.extraction), so the attack's
    result is the same; only the memorised captions' images are kept (the others can be many): of the
    other captions' images it keeps their nearest training images (`ctx.other_neighbours`, for the
    per-caption table of capsearch.metrics.caption_table).
    """
    c = ctx.settings
    sample = _pipeline_generator(pipe, c.steps, ctx.attack_guidance, c.batch_size)
    memorised = set(ctx.memorised)
    kept: list[torch.Tensor] = []
    groups_of: dict[int, torch.Tensor] = {}  # the training set's copy groups, hashed once

    def run(prompts: list[str], n_per_prompt: int, seed: int) -> torch.Tensor:
        images = sample(prompts, n_per_prompt, seed)
        others = []
        for j, prompt in enumerate(prompts):
            own = images[j * n_per_prompt : (j + 1) * n_per_prompt].detach().float().cpu()
            if prompt in memorised:
                kept.append(own)
                ctx.memorised_prompts.append(prompt)
            else:
                others.append((prompt, own))
        if others:  # one pass over the training set for the batch's other captions
            found = nearest_two(
                torch.cat([own for _, own in others]), ctx.train_images, groups_of=groups_of
            )
            for k, (prompt, _) in enumerate(others):
                ctx.other_neighbours[prompt] = found.part(k * n_per_prompt, (k + 1) * n_per_prompt)
        return images

    return run, kept


def attack(pipe, ctx: EvalContext) -> str:
    """The extraction attack (Carlini et al. 2023) on every memorised caption, then other ones."""
    if not ctx.attack_prompts:
        return "no prompts to attack"
    c = ctx.settings
    ctx.train_images = load_images(ctx.root, "train", image_size(pipe))
    recording, kept = _recording(pipe, ctx)
    ctx.extraction = extraction_attack(
        recording,
        ctx.attack_prompts,
        ctx.train_images,
        n_per_prompt=c.extraction_n,
        threshold=ctx.threshold,
        min_clique=c.min_clique,
        steps=c.steps,
        guidance=ctx.attack_guidance,
        seed=c.seed,
        batch_size=c.batch_size,
    )
    ctx.memorised_images = torch.cat(kept) if kept else None  # once, after the attack
    count = ctx.extraction.count
    return f"extraction attack: {count} extracted from {len(ctx.attack_prompts)} prompts"


def strength(pipe, ctx: EvalContext) -> str:
    """Wen et al.'s denoising strength of memorised captions and as many other training captions."""
    if not (ctx.memorised and ctx.others):
        return "no memorised captions to compare"
    c = ctx.settings
    kw = dict(
        steps=c.steps, n=c.strength_n, guidance=c.guidance, seed=c.seed, batch_size=c.batch_size
    )
    n = c.strength_prompts
    ctx.strength_memorised = (
        denoising_strength_per_prompt(pipe, ctx.memorised[:n], **kw).double().numpy()
    )
    ctx.strength_other = denoising_strength_per_prompt(pipe, ctx.others[:n], **kw).double().numpy()
    return "denoising strength done"


# Each shared pass by its stage name (capsearch.metrics.context.STAGES gives their order).
PASSES: dict[str, Callable[[Any, EvalContext], str]] = {
    SAMPLES: samples,
    ATTACK: attack,
    STRENGTH: strength,
}
