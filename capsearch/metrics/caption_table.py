"""The attack's captions one by one: per attacked caption, how near its samples came to the training set.

Written by `capsearch.metrics.evaluate` as memorisation.csv beside memorised.png, one row per caption the
extraction attack sampled, in the attack's order (every memorised caption, then the others):

- `caption`, `memorised` (true for a caption of the data set's duplicated images, `dup_group` set);
- `train_file`, `train_row`: its training image, the first training row with that caption (file name
  from the metadata, index among the training split's rows in file order: the index of
  `extracted_pairs`), and `caption_rows`, how many training rows carry the caption (a memorised image's
  copies; a study's views);
- `attack_seed`: the evaluation's attack seed (`evaluate.seed`; the attack samples each batch of
  prompts from it plus the index of the batch's first prompt), and `samples`, the attack's samples of
  the caption (`evaluate.extraction_n`);
- `best_distance`: the tiled ℓ2 distance (Carlini et al. 2023) from the caption's nearest sample to its
  nearest training image, and `best_nn_ratio`: that sample's nearest-neighbour ratio (Gu et al. 2023,
  copies of one image counted once: capsearch.metrics.neighbours);
- `own_share`: the share of the caption's samples whose nearest training image is its own (the
  `nearest_own` metric per caption; empty for a caption that is not memorised);
- `extracted`: whether the attack found a clique of near-identical samples whose medoid lies within
  the threshold of a training image (the caption is in `extracted_pairs`).

Weighted by `samples`, the memorised rows' `own_share` averages to `nearest_own`.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from capsearch.atomic import atomic_write
from capsearch.metrics.context import EvalContext
from capsearch.metrics.nearest_own import own_nearest
from capsearch.metrics.neighbours import memorised_neighbours

CAPTION_TABLE = "memorisation.csv"
COLUMNS = ("caption", "memorised", "train_file", "train_row", "caption_rows", "attack_seed",
           "samples", "best_distance", "best_nn_ratio", "own_share", "extracted")  # fmt: skip


def _number(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def caption_rows(ctx: EvalContext) -> list[dict[str, str]] | None:
    """The table's rows as text, in the attack's order; None when no attack ran, or when unreadable
    training images leave rows and images out of line."""
    if ctx.extraction is None or ctx.train_images is None:
        return None
    if len(ctx.train_images) != len(ctx.train_records):
        return None
    extracted = {prompt for prompt, _, _ in ctx.extraction.extracted}
    memorised = set(ctx.memorised)
    rows_of: dict[str, list[int]] = {}
    for i, record in enumerate(ctx.train_records):
        rows_of.setdefault(record["text"], []).append(i)
    kept = memorised_neighbours(ctx)
    own = own_nearest(ctx) if kept is not None else None
    position = {prompt: j for j, prompt in enumerate(ctx.memorised_prompts)}
    n = ctx.attack_n
    seed = ctx.settings.seed if ctx.settings is not None else ""
    out = []
    for prompt in ctx.attack_prompts:
        share = None
        if prompt in position and kept is not None:
            j = position[prompt]
            neighbours = kept.part(j * n, (j + 1) * n)
            share = float(own[j * n : (j + 1) * n].mean())
        else:
            neighbours = ctx.other_neighbours.get(prompt)
        best = int(neighbours.distance.argmin()) if neighbours is not None else None
        rows = rows_of.get(prompt, [])
        out.append({
            "caption": prompt,
            "memorised": str(prompt in memorised).lower(),
            "train_file": ctx.train_records[rows[0]]["file_name"] if rows else "",
            "train_row": str(rows[0]) if rows else "",
            "caption_rows": str(len(rows)),
            "attack_seed": str(seed),
            "samples": str(n),
            "best_distance": _number(None if best is None else neighbours.distance[best]),
            "best_nn_ratio": _number(None if best is None else neighbours.ratio()[best]),
            "own_share": _number(share if prompt in memorised else None),
            "extracted": str(prompt in extracted).lower(),
        })  # fmt: skip
    return out


def save_caption_table(ctx: EvalContext, path: Path) -> Path | None:
    """Write the table atomically (capsearch.atomic); None (nothing written) where `caption_rows` is."""
    rows = caption_rows(ctx)
    if rows is None:
        return None
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write(path, buffer.getvalue())
