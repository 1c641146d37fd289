"""Training-data extraction attack (Carlini et al. 2023, "Extracting Training Data from Diffusion Models")."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from capsearch.errors import UserError
from capsearch.metrics.context import Computed, EvalContext, Measured
from capsearch.metrics.intervals import wilson_interval, wilson_upper
from capsearch.progress import rich_bar

# Defaults, scaled down for CPU (docs/metrics.md compares them with the paper and the authors' code):
# Carlini et al. generate 500 images per prompt and ask for a clique of ≥ 10 within tiled ℓ2 0.15;
# MemControl's code generates 50 per prompt and asks for a connected group of ≥ 3.
# 0.15 suits photographs; homogeneous images sit closer: a novel 32-px phantom lies 0.056 (minimum) to
# 0.10 (median) from its nearest training phantom (2,000 patients, docs/metrics.md), so the phantom
# world uses 0.04 (measure any dataset with novelty_floor).
DEFAULT_N_PER_PROMPT = 32
DEFAULT_MIN_CLIQUE = 3
DEFAULT_THRESHOLD = 0.15
DEFAULT_TILES = 4
PHANTOM_THRESHOLD = 0.04
# The one-sided level of the extraction rate's upper bound (the `extraction_bound` metric).
BOUND_LEVEL = 0.95
# Bron–Kerbosch is exponential in the worst case; stop enumerating one prompt's cliques after this many.
MAX_CLIQUES_PER_PROMPT = 10_000

ImageGenerator = Callable[[list[str], int, int], torch.Tensor]


@dataclass
class ExtractionResult:
    """Outcome of an extraction attack."""

    count: int  # distinct training images extracted
    extracted: list[tuple[str, int, int]]  # (prompt, train_index, generated_image_index)
    settings: dict = field(default_factory=dict)


def _tiles(images: torch.Tensor, tiles: int) -> torch.Tensor:
    """[N, C, H, W] in [-1, 1] → [tiles², N, C·h·w] in [0, 1] (non-overlapping tiles, row-major)."""
    n, c, h, w = images.shape
    if h % tiles or w % tiles:
        raise UserError(f"image size {h}x{w} is not divisible into {tiles}x{tiles} tiles")
    th, tw = h // tiles, w // tiles
    x = (images.float() + 1.0) / 2.0
    x = x.reshape(n, c, tiles, th, tiles, tw).permute(2, 4, 0, 1, 3, 5)
    return x.reshape(tiles * tiles, n, c * th * tw).contiguous()


def tiled_distance(a: torch.Tensor, b: torch.Tensor, tiles: int = DEFAULT_TILES) -> torch.Tensor:
    """Pairwise tiled ℓ2 distance [N, M]: max over tiles of the per-pixel-normalised ℓ2 (images in [-1, 1])."""
    ta, tb = _tiles(a, tiles), _tiles(b, tiles)
    dim = ta.shape[-1]
    # Carlini et al. 2023, Sec. 4.2: ℓ2(a, b) = sqrt(Σ (a_i − b_i)² / d) on [0, 1] pixels, taken per tile,
    # and the maximum over corresponding tiles, so a shared uniform background cannot hide a difference.
    d = torch.cdist(ta, tb, compute_mode="donot_use_mm_for_euclid_dist") / dim**0.5
    return d.amax(dim=0)


def _match_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """RGB generations against grayscale training images (or the reverse) are compared in grayscale."""
    if images.shape[1] == channels:
        return images
    if channels == 1:
        return images.mean(dim=1, keepdim=True)
    return images.mean(dim=1, keepdim=True).expand(-1, channels, -1, -1)


def _resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize to the comparison size (antialiased bilinear)."""
    if tuple(images.shape[-2:]) == size:
        return images
    return F.interpolate(
        images.float(), size=size, mode="bilinear", antialias=True, align_corners=False
    )


def novelty_floor(
    train_images: torch.Tensor,
    heldout_images: torch.Tensor,
    quantile: float = 0.01,
    tiles: int = DEFAULT_TILES,
) -> float:
    """The q-quantile of held-out images' tiled distance to their nearest training image (a safe threshold lies below)."""
    if not 0.0 <= quantile <= 1.0:
        raise UserError(f"quantile must be between 0 and 1, got {quantile}")
    if len(train_images) == 0 or len(heldout_images) == 0:
        raise UserError("novelty_floor needs training and held-out images")
    dist, _ = _nearest_training(heldout_images.detach().float().cpu(), train_images, tiles)
    return float(torch.quantile(dist, quantile))


def prompt_cliques(
    images: torch.Tensor,
    threshold: float = DEFAULT_THRESHOLD,
    min_clique: int = DEFAULT_MIN_CLIQUE,
    tiles: int = DEFAULT_TILES,
    max_cliques: int = MAX_CLIQUES_PER_PROMPT,
) -> tuple[list[tuple[list[int], int]], bool]:
    """Maximal cliques (≥ min_clique) of one prompt's generations under the tiled threshold, each with its medoid."""
    import networkx as nx  # lazy: networkx loads in ~0.3 s and only the attack's cliques need it

    dist = tiled_distance(images, images, tiles)
    close = (dist <= threshold).cpu()
    close.fill_diagonal_(False)
    graph = nx.Graph()
    graph.add_nodes_from(range(len(images)))
    rows, cols = torch.nonzero(torch.triu(close, diagonal=1), as_tuple=True)
    graph.add_edges_from(zip(rows.tolist(), cols.tolist(), strict=True))
    found, capped = [], False
    # Carlini et al. look for cliques, not connected components: a chain of pairwise-close images can
    # drift across the threshold, while every member of a clique is within it of every other.
    for n_seen, clique in enumerate(nx.find_cliques(graph)):
        if n_seen >= max_cliques:
            capped = True
            break
        if len(clique) >= min_clique:
            members = sorted(clique)
            sub = dist[members][:, members]
            medoid = members[int(sub.sum(dim=1).argmin())]
            found.append((members, medoid))
    return found, capped


def _pipeline_generator(pipe, steps: int, guidance: float, batch_size: int) -> ImageGenerator:
    """A `(prompts, n_per_prompt, seed) -> images` callable backed by capsearch.models.sampling.generate."""
    from capsearch.models.sampling import generate  # lazy: diffusers takes seconds to import

    def run(prompts: list[str], n_per_prompt: int, seed: int) -> torch.Tensor:
        return generate(
            pipe,
            prompts,
            n_per_prompt=n_per_prompt,
            steps=steps,
            guidance=guidance,
            seed=seed,
            batch_size=batch_size,
            scheduler="ddim",
        )

    return run


def _nearest_training(
    medoids: torch.Tensor, train_images: torch.Tensor, tiles: int, block: int = 2048
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiled distance and index of each medoid's nearest training image (training set read in blocks)."""
    best = torch.full((len(medoids),), float("inf"))
    best_idx = torch.full((len(medoids),), -1, dtype=torch.long)
    size = tuple(medoids.shape[-2:])
    for start in range(0, len(train_images), block):
        chunk = train_images[start : start + block]
        chunk = (
            (chunk if torch.is_tensor(chunk) else torch.stack(list(chunk))).detach().float().cpu()
        )
        chunk = _match_channels(chunk, medoids.shape[1])
        d = tiled_distance(medoids, _resize(chunk, size), tiles)
        value, idx = d.min(dim=1)
        better = value < best
        best[better] = value[better]
        best_idx[better] = idx[better] + start
    return best, best_idx


def extraction_attack(
    generator: ImageGenerator | object,
    prompts: Sequence[str],
    train_images: torch.Tensor | Sequence[torch.Tensor],
    n_per_prompt: int = DEFAULT_N_PER_PROMPT,
    threshold: float = DEFAULT_THRESHOLD,
    min_clique: int = DEFAULT_MIN_CLIQUE,
    tiles: int = DEFAULT_TILES,
    steps: int = 25,
    guidance: float = 3.0,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = False,
) -> ExtractionResult:
    """Generate n images per prompt, find cliques of near-identical ones and match their medoids to training images."""
    prompts = list(prompts)
    if not prompts:
        raise UserError("extraction attack needs at least one prompt")
    if n_per_prompt < 2 or min_clique < 2:
        raise UserError("extraction attack needs n_per_prompt ≥ 2 and min_clique ≥ 2")
    if min_clique > n_per_prompt:
        raise UserError(f"min_clique ({min_clique}) cannot exceed n_per_prompt ({n_per_prompt})")
    # Training images: a tensor, or any sequence whose slices are tensors (read block by block, so a large
    # real-world training set need not sit in memory at full resolution).
    if not (hasattr(train_images, "__len__") and hasattr(train_images, "__getitem__")):
        raise UserError(
            "train_images must be a [N, C, H, W] tensor or a sliceable sequence of images"
        )
    if len(train_images) == 0 or (torch.is_tensor(train_images) and train_images.ndim != 4):
        shape = tuple(train_images.shape) if torch.is_tensor(train_images) else len(train_images)
        raise UserError(f"train_images must be a non-empty [N, C, H, W] tensor, got {shape}")
    if hasattr(generator, "unet"):
        generate = _pipeline_generator(generator, steps, guidance, batch_size)
    elif callable(generator):
        generate = generator
    else:
        raise UserError(
            "generator must be a Pipeline or a callable (prompts, n_per_prompt, seed) -> images"
        )

    started = time.perf_counter()
    per_call = max(1, batch_size // n_per_prompt)
    candidates: list[tuple[int, int, torch.Tensor]] = []  # (prompt index, generated index, medoid)
    n_cliques, capped_prompts = 0, 0
    bar = rich_bar(progress, len(prompts), "extraction attack")
    for p0 in range(0, len(prompts), per_call):
        chunk = prompts[p0 : p0 + per_call]
        # One seed per chunk of prompts: the attack is deterministic for a given seed and batch size.
        images = generate(chunk, n_per_prompt, seed + p0)
        if images.shape[0] != len(chunk) * n_per_prompt:
            raise UserError(
                f"generator returned {images.shape[0]} images, expected {len(chunk) * n_per_prompt}"
            )
        images = images.detach().float().cpu()
        for j in range(len(chunk)):
            own = images[j * n_per_prompt : (j + 1) * n_per_prompt]
            cliques, capped = prompt_cliques(own, threshold, min_clique, tiles)
            capped_prompts += int(capped)
            n_cliques += len(cliques)
            for _members, medoid in cliques:
                candidates.append((p0 + j, (p0 + j) * n_per_prompt + medoid, own[medoid]))
        if bar is not None:
            bar.advance(bar.task_ids[0], len(chunk))
    if bar is not None:
        bar.stop()

    extracted: list[tuple[str, int, int]] = []
    if candidates:
        medoids = torch.stack([c[2] for c in candidates])
        dist, idx = _nearest_training(medoids, train_images, tiles)
        seen: set[tuple[int, int]] = set()
        for (p, gen_index, _), d, t in zip(candidates, dist.tolist(), idx.tolist(), strict=True):
            # Overlapping maximal cliques can share a medoid's training image: count each pair once.
            if d <= threshold and (p, t) not in seen:
                seen.add((p, t))
                extracted.append((prompts[p], t, gen_index))
    settings = {
        "n_prompts": len(prompts),
        "n_per_prompt": n_per_prompt,
        "n_generated": len(prompts) * n_per_prompt,
        "threshold": threshold,
        "min_clique": min_clique,
        "tiles": tiles,
        "steps": steps,
        "guidance": guidance,
        "seed": seed,
        "n_cliques": n_cliques,
        "prompts_with_capped_cliques": capped_prompts,
        "seconds": round(time.perf_counter() - started, 3),
    }
    return ExtractionResult(len({t for _, t, _ in extracted}), extracted, settings)


def extraction_interval(result: ExtractionResult, level: float = 0.95) -> tuple[int, float, float]:
    """(prompts with an extraction, low, high): Wilson interval on that count out of the attacked prompts."""
    if not isinstance(result, ExtractionResult):
        raise UserError(f"expected an ExtractionResult, got {type(result).__name__}")
    attacked = int(result.settings["n_prompts"])
    hit = len({prompt for prompt, _, _ in result.extracted})
    low, high = wilson_interval(hit, attacked, level)
    return hit, low * attacked, high * attacked


def extracted_images(ctx: EvalContext) -> Computed:
    """Distinct training images the attack extracted, with the attacked prompts' Wilson interval."""
    ext = ctx.extraction
    if ext is None:
        return None  # nothing attacked
    # Wilson interval on the attacked prompts that yield an extraction, in images (one training
    # image per memorised prompt): attacked prompts are the unit, never generated images.
    extra = {
        "capped_prompts": int(ext.settings.get("prompts_with_capped_cliques", 0)),
        "extracted_pairs": [list(e) for e in ext.extracted],
    }
    return Measured(ext.count, extraction_interval(ext)[1:], extra)


def extracted_fraction(ctx: EvalContext) -> Computed:
    """Images extracted per attacked prompt (the reward's extraction term)."""
    if ctx.extraction is None:
        return None
    return Measured(ctx.extraction.count / len(ctx.attack_prompts))


def extraction_bound_of(ctx: EvalContext) -> Computed:
    """The one-sided 95% Wilson upper bound on the extraction rate: attacked captions with an extraction
    out of the attacked captions, both recorded beside it (`extracted_captions`, `attacked`) so that
    evaluations of one trial on several training seeds can be pooled (capsearch.search.choice)."""
    ext = ctx.extraction
    if ext is None:
        return None
    hits = len({prompt for prompt, _, _ in ext.extracted})
    attacked = int(ext.settings["n_prompts"])
    extra = {"attacked": attacked, "extracted_captions": hits}
    return Measured(wilson_upper(hits, attacked, BOUND_LEVEL), None, extra)
