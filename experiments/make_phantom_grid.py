"""Draw docs/img/phantoms.png: phantom chest X-rays with their reports, at 128 px and at 32 px.

Run: .venv/bin/python experiments/make_phantom_grid.py [--out docs/img/phantoms.png] [--seed 0]
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from capsearch.figures import save_figure
from capsearch.worlds.anatomy import sample_anatomy
from capsearch.worlds.phantom import render_phantom
from capsearch.worlds.reports import attributes_from_text, report_bank

PANELS: list[tuple[str, ...]] = [
    (),
    ("cardiomegaly",),
    ("effusion",),
    ("pneumothorax",),
    ("consolidation",),
    ("nodule",),
    ("atelectasis",),
    ("support_device",),
    ("effusion", "support_device"),
    ("cardiomegaly", "effusion"),
    ("atelectasis", "consolidation"),
    ("cardiomegaly", "support_device"),
]


def main() -> None:
    """Render one phantom per finding combination, with its report as the caption."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs/img/phantoms.png"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    bank = report_bank()
    columns = 4
    rows = len(PANELS) // columns
    fig, axes = plt.subplots(rows + 1, columns, figsize=(2.6 * columns, 3.25 * rows + 2.6))
    small = []
    for k, findings in enumerate(PANELS):
        rng = np.random.default_rng([args.seed, k])
        text, _ = bank.describe(frozenset(findings), rng)
        anatomy = sample_anatomy(rng)
        kwargs = {"anatomy": anatomy, "attributes": attributes_from_text(text), "seed": k}
        image = render_phantom(findings, size=128, **kwargs)
        if 1 <= k <= columns:
            small.append((findings, render_phantom(findings, size=32, **kwargs)))
        ax = axes[k // columns, k % columns]
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        label = ", ".join(findings) or "normal"
        ax.set_title(f"{label}\n" + textwrap.fill(text, 34), fontsize=6.5, loc="left")
        ax.axis("off")
    for j, (findings, image) in enumerate(small):
        ax = axes[rows, j]
        ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(f"{', '.join(findings)} at 32 px", fontsize=7, loc="left")
        ax.axis("off")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, args.out, dpi=110, grey=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
