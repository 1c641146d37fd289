"""The broad pretraining corpus: several captioned image families, mixed in fixed proportions.

The shipped tiny base learnt only the shapes world; a base meant to adapt to chest X-rays with few
parameters should have seen many kinds of pictures, radiographs among them, as Stable Diffusion saw LAION
(which holds some X-rays). Chest films are a small share and come from the pretraining part of the report
bank and lung masks (capsearch.worlds.partition), on random streams no phantom world uses.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from capsearch.worlds.pictures import render_glyph, render_scene, render_texture
from capsearch.worlds.radiographs import render_body_part, render_chest
from capsearch.worlds.shapes import render_shapes

Family = Callable[[np.random.Generator, int], tuple[np.ndarray, str]]
FAMILIES: dict[str, Family] = {
    "shapes": render_shapes,
    "textures": render_texture,
    "scenes": render_scene,
    "glyphs": render_glyph,
    "radiographs": render_body_part,
    "chest": render_chest,
}
# Share of each family in the corpus (sums to 1); chest films are the small share a web corpus has.
MIXTURE: dict[str, float] = {
    "shapes": 0.25,
    "textures": 0.15,
    "scenes": 0.15,
    "glyphs": 0.15,
    "radiographs": 0.22,
    "chest": 0.08,
}
CHUNK = 1000
# First word of every corpus seed sequence [tag, seed, chunk, family + 1]: phantom worlds seed with 2- or
# 3-word sequences ([seed, stream] or [seed, stream, index]), never 4 words ending in a non-zero word.
_CORPUS_TAG = 0x636F7270


def family_counts(n: int) -> dict[str, int]:
    """Images per family among n: the mixture's shares, rounded by largest remainder (sum n)."""
    exact = {name: n * share for name, share in MIXTURE.items()}
    counts = {name: int(v) for name, v in exact.items()}
    by_remainder = sorted(MIXTURE, key=lambda name: (-(exact[name] - counts[name]), name))
    for name in by_remainder[: n - sum(counts.values())]:
        counts[name] += 1
    return counts


def corpus_chunk(n: int, size: int, seed: int, chunk: int) -> tuple[np.ndarray, list[str]]:
    """Chunk `chunk` of a corpus (n ≤ CHUNK images, family by family): images [n, size, size], captions."""
    images = np.empty((n, size, size), np.float32)
    captions: list[str] = []
    for number, (name, count) in enumerate(family_counts(n).items(), start=1):
        rng = np.random.default_rng([_CORPUS_TAG, seed, chunk, number])
        for _ in range(count):
            images[len(captions)], caption = FAMILIES[name](rng, size)
            captions.append(caption)
    return images, captions


def corpus_families(n: int) -> list[str]:
    """The family of each image of an n-image corpus, in the order make_corpus returns them."""
    out: list[str] = []
    for start in range(0, n, CHUNK):
        out += [name for name, c in family_counts(min(CHUNK, n - start)).items() for _ in range(c)]
    return out


def make_corpus(n: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Render n corpus images deterministically for a seed, in chunks of CHUNK (as pretraining does)."""
    parts = [
        corpus_chunk(min(CHUNK, n - s), size, seed, k) for k, s in enumerate(range(0, n, CHUNK))
    ]
    images = (
        np.concatenate([p[0] for p in parts]) if parts else np.empty((0, size, size), np.float32)
    )
    return images, [c for p in parts for c in p[1]]
