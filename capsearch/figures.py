"""Compact PNGs: every image the code writes into a run folder or a report stays under MAX_IMAGE_BYTES.

Matplotlib writes RGBA at 8 bits a channel. A sample grid is grey (a grey colour map, black captions on
white), so it is stored as one grey channel with its levels rounded to GREY_LEVELS (the eye does not
tell 32 levels from 256 at these sizes; PNG compresses the rounded tiles about twice as well); a plot is
stored with an adaptive palette of at most 256 colours (its lines, markers and anti-aliased edges use a
few hundred). Both are written with `optimize=True` (zlib at its highest level).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import IO, Any

from PIL import Image

MAX_IMAGE_BYTES = 150_000  # tests/test_image_sizes.py holds written and committed images to it
GREY_LEVELS = 32
PALETTE_COLOURS = 256


def compact(image: Image.Image, grey: bool) -> Image.Image:
    """The image as written: grey levels rounded to GREY_LEVELS (0 and 255 kept), else a palette."""
    if grey:
        step = 255 / (GREY_LEVELS - 1)
        return image.convert("L").point([round(round(v / step) * step) for v in range(256)])
    # median cut: exact when the image has at most PALETTE_COLOURS colours
    return image.convert("RGB").quantize(PALETTE_COLOURS, dither=Image.Dither.NONE)


def save_image(image: Image.Image, path: Path | str | IO[bytes], grey: bool) -> None:
    """Write `image` as a compact PNG to a path or a binary file object."""
    compact(image, grey).save(path, format="PNG", optimize=True)


def save_figure(fig: Any, path: Path | str | IO[bytes], dpi: int, grey: bool = False) -> None:
    """Write a matplotlib figure as a compact PNG (grey=True for a figure drawn only in greys)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    buffer.seek(0)
    with Image.open(buffer) as image:
        save_image(image, path, grey)
