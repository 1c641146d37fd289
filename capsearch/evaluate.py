"""Score one model as the paper does: FID, image-text score, AMD, extracted images, denoising strength."""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from capsearch.errors import UserError


@dataclass
class EvalConfig:
    """Sample counts and sampler settings of one evaluation (recorded in metrics.json)."""

    n_prompts: int = 24  # held-out prompts for FID / AMD / image-text score
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
    fid_reference: str = "train"
    prompt_split: str = "test"
    batch_size: int = 64
    cache_dir: str | None = None

    def check(self) -> None:
        """Reject impossible values with one line naming the field."""
        for name in (
            "n_prompts",
            "n_per_prompt",
            "steps",
            "extraction_n",
            "strength_n",
            "batch_size",
        ):
            if getattr(self, name) < 1:
                raise UserError(f"eval.{name} must be at least 1, got {getattr(self, name)}")
        if self.extraction_n < self.min_clique:
            raise UserError("eval.extraction_n must be at least eval.min_clique")


def _scorers(pipe, name: str):
    """(feature extractor, image-text scorer, world) for a pipeline."""
    from capsearch.features import get_extractor

    if name == "auto":
        name = "phantom" if pipe.vae is None else "xrv"
    extractor = get_extractor(name)
    if name == "phantom":
        return extractor, extractor.scorer, "phantom"
    return extractor, get_extractor("biovil-t"), "real"


def _pick(records: list[dict], n: int, seed: int) -> list[str]:
    texts = sorted({r["text"] for r in records if r.get("text")})
    random.Random(seed).shuffle(texts)
    return texts[:n]


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
        alignment_score,
        amd,
        extraction_attack,
        frechet_distance,
    )
    from capsearch.metrics.denoising import denoising_strength_per_prompt
    from capsearch.metrics.extraction import DEFAULT_THRESHOLD
    from capsearch.sample import generate, save_grid

    config = config or EvalConfig()
    config.check()
    root = Path(data_root)
    t0 = time.time()
    extractor, text_scorer, world = _scorers(pipe, config.extractor)
    records = read_metadata(root)
    train = [r for r in records if r.get("split", "train") == "train"]
    held = [r for r in records if r.get("split") == config.prompt_split] or train
    prompts = _pick(held, config.n_prompts, config.seed)
    size = pipe.unet.config.sample_size * (8 if pipe.vae is not None else 1)
    cache = Path(config.cache_dir) if config.cache_dir else root / ".capsearch_cache"

    def log(msg: str) -> None:
        if progress:
            print(f"  eval: {msg} ({time.time() - t0:.0f} s)", flush=True)

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
    log(f"{len(gen)} samples generated")
    gen_feats = extractor.features(gen)
    ref_feats = cached_features(extractor, root, cache, split=config.fid_reference)
    train_feats = (
        ref_feats
        if config.fid_reference == "train"
        else cached_features(extractor, root, cache, split="train")
    )
    metrics: dict = {
        "fid": frechet_distance(ref_feats, gen_feats),
        "amd": amd(gen_feats, train_feats),
        "alignment": alignment_score(gen, gen_prompts, text_scorer),
    }
    log("FID, AMD, image-text score done")
    memorised = sorted({r["text"] for r in train if r.get("dup_group") is not None})
    memorised_set = set(memorised)
    others = [t for t in _pick(train, 10**9, config.seed + 1) if t not in memorised_set]
    attack_prompts = (memorised + others)[: config.extraction_prompts]
    train_images = load_images(root, "train", size)
    threshold = config.extraction_threshold or (
        PHANTOM_THRESHOLD if world == "phantom" else DEFAULT_THRESHOLD
    )
    attack_guidance = (
        config.guidance if config.extraction_guidance is None else config.extraction_guidance
    )
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
    metrics["extracted_fraction"] = ext.count / max(len(attack_prompts), 1)
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
        s_mem = float(sp(pipe, memorised[: config.strength_prompts], **kw).mean())
        s_other = float(sp(pipe, others[: config.strength_prompts], **kw).mean())
        metrics.update(
            strength_memorised=s_mem,
            strength_other=s_other,
            strength_ratio=s_mem / max(s_other, 1e-12),
        )
        log("denoising strength done")
    metrics["settings"] = {
        **asdict(config),
        "world": world,
        "extractor": extractor.name,
        "extraction_threshold": threshold,
        "extraction_guidance": attack_guidance,
        "prompts": len(prompts),
        "samples": len(gen),
        "attack_prompts": len(attack_prompts),
        "memorised_prompts": len(memorised),
        "reference_images": len(ref_feats),
        "seconds": round(time.time() - t0, 1),
    }
    metrics["extracted_pairs"] = [list(e) for e in ext.extracted]
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        save_grid(gen[:32], out / "samples.png", nrow=8, captions=gen_prompts[:32])
    return metrics
