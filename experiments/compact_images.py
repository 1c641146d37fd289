"""Re-encode committed images the way the code now writes them (capsearch.figures).

A grey image (a sample grid, docs/img's phantoms) becomes one grey channel with GREY_LEVELS levels, a
colour one (a plot) a palette PNG; a memorised-captions grid (capsearch.metrics.memorised_grid) also
keeps only its first rows, as many as fit in MAX_TILES tiles, as the code now draws it. Rewriting a file already
compact changes nothing.

Run: .venv/bin/python experiments/compact_images.py FILE [FILE ...]
     (e.g. `git ls-files -z '*.png' | xargs -0 .venv/bin/python experiments/compact_images.py`)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from capsearch.figures import save_image
from capsearch.metrics.memorised_grid import MAX_TILES, MEMORISED_GRID


def is_grey(image: Image.Image) -> bool:
    """Whether every pixel has R = G = B."""
    if image.mode in ("L", "LA", "1", "I", "I;16"):
        return True
    rgb = np.asarray(image.convert("RGB"))
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


def runs(filled: np.ndarray) -> list[tuple[int, int]]:
    """The (start, end) of each run of True."""
    edges = np.diff(np.r_[0, filled.astype(int), 0])
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def first_rows(image: Image.Image, max_tiles: int) -> Image.Image:
    """The grid cut below its first rows of tiles, as many as fit in `max_tiles` tiles, the bottom
    margin kept; as is if it has no more."""
    grey = np.asarray(image.convert("L"))
    # tiles cover ~90% of a grid's width (and of a row of tiles' height), caption text far less
    bands = runs((grey < 255).mean(axis=1) > 0.6)
    heights = {bottom - top for top, bottom in bands}
    pitches = set(np.diff([top for top, _ in bands]).tolist()) or {0}
    if max(heights) - min(heights) > 2 or max(pitches) - min(pitches) > 2:
        raise ValueError(f"rows of tiles of heights {heights}, {pitches} apart: not a grid")
    in_bands = np.concatenate([grey[top:bottom] for top, bottom in bands])
    columns = runs((in_bands < 255).mean(axis=0) > 0.6)
    rows = max(1, max_tiles // len(columns))
    if len(bands) <= rows:
        return image
    bottom = bands[rows - 1][1]
    inked = np.flatnonzero((grey[bottom:] < 255).any(axis=1))  # the next row's caption, first
    cut = bottom + min(grey.shape[0] - bands[-1][1], inked[0] if len(inked) else grey.shape[0])
    return image.crop((0, 0, image.width, cut))


def compact_file(path: Path) -> tuple[int, int]:
    """Rewrite one image compactly; its sizes in bytes before and after."""
    before = path.stat().st_size
    with Image.open(path) as opened:
        image = opened.copy()
    if path.name == MEMORISED_GRID:
        image = first_rows(image, MAX_TILES)
    save_image(image, path, grey=is_grey(image))
    return before, path.stat().st_size


def main() -> None:
    """Rewrite each file given, and print the sizes."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args()
    total_before = total_after = 0
    for path in args.files:
        before, after = compact_file(path)
        total_before += before
        total_after += after
        print(f"{before:>9} -> {after:>8}  {path}")
    print(f"{total_before:>9} -> {total_after:>8}  in all ({len(args.files)} files)")


if __name__ == "__main__":
    main()
