"""Draw docs/img/corpus_families.png: ten pictures of each family of the broad pretraining corpus.

Run: .venv/bin/python experiments/make_corpus_grid.py [--out docs/img/corpus_families.png] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from capsearch.worlds.corpus import FAMILIES


def grid(seed: int, per_family: int = 10, scale: int = 2) -> np.ndarray:
    """One row of `per_family` 32-px pictures per family, 2 px gaps, as uint8."""
    rows = []
    for k, render in enumerate(FAMILIES.values()):
        rng = np.random.default_rng([seed, k])
        tiles = [np.pad(render(rng, 32)[0], 1, constant_values=1.0) for _ in range(per_family)]
        rows.append(np.concatenate(tiles, axis=1))
    image = np.concatenate(rows, axis=0)
    return np.kron(np.rint((image + 1) * 127.5).astype(np.uint8), np.ones((scale, scale), np.uint8))


def main() -> None:
    """Write the grid."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/img/corpus_families.png"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    Image.fromarray(grid(args.seed), mode="L").save(args.out, optimize=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
