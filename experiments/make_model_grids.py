"""Sample grids of the shipped tiny base for docs/models.md: shape prompts (its world) and phantom prompts.

Usage: python experiments/make_model_grids.py
"""

from __future__ import annotations

from pathlib import Path

from capsearch.models.load import load_pipeline
from capsearch.models.sampling import generate, save_grid

SHAPES = [
    "a large bright circle in the centre on a black background",
    "a pair of medium light soft ellipses on both sides on a dark background",
    "a small dark square at the top left on a light background",
    "a medium bright ring on the right on a background of horizontal stripes",
    "a large bright soft blob at the bottom on a mottled background",
    "a tiny black cross at the top right on a grey background",
]
PHANTOM = [
    "No acute cardiopulmonary abnormality.",
    "Small left pleural effusion.",
    "Cardiomegaly. No pneumothorax.",
    "Right upper lobe consolidation.",
]


def main() -> None:
    out = Path("docs/img")
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline("tiny")
    for name, prompts in (("base_shapes.png", SHAPES), ("base_phantom_prompts.png", PHANTOM)):
        images = generate(pipe, prompts, n_per_prompt=4, steps=25, guidance=3.0, seed=0)
        save_grid(images, out / name, nrow=8, captions=[p for p in prompts for _ in range(4)])
        print(f"wrote {out / name}")


if __name__ == "__main__":
    main()
