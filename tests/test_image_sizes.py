"""Images stay small: what the code writes into run folders and reports, and what is committed, is
under capsearch.figures.MAX_IMAGE_BYTES; Markdown links to images point to files that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from capsearch.figures import MAX_IMAGE_BYTES

ROOT = Path(__file__).resolve().parents[1]
IMAGE = re.compile(r"\.(png|jpe?g|gif|webp|svg)$", re.IGNORECASE)
IMAGE_LINK = re.compile(r"\]\(([^)\s]+\.(?:png|jpe?g|gif|webp|svg))(?:\s+\"[^\"]*\")?\)", re.I)
CAPTION = "Comparison: 2010-02-09, accession 68256-0011. Stable cardiomegaly without acute disease."


def _noise(n: int):
    """n 32-px images of uniform noise in [-1, 1]: the grid a PNG compresses worst."""
    import torch

    return torch.rand(n, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_a_sample_grid_of_noise_stays_under_the_limit(tmp_path):
    from capsearch.models.sampling import save_grid

    path = tmp_path / "samples.png"
    save_grid(_noise(32), path, nrow=8, captions=[CAPTION] * 32)  # as evaluate writes samples.png
    assert 10_000 < path.stat().st_size < MAX_IMAGE_BYTES


def test_a_memorised_grid_of_20_captions_fits_with_every_caption_extracted_first(
    tmp_path, monkeypatch
):
    from capsearch.metrics.context import EvalContext
    from capsearch.metrics.memorised_grid import MAX_TILES, save_memorised_grid

    prompts = [f"{CAPTION} ({i})" for i in range(20)]  # the paper runs' 20, 16 attack samples each
    ctx = EvalContext.__new__(EvalContext)
    ctx.memorised_images, ctx.memorised_prompts, ctx.attack_n = _noise(20 * 16), prompts, 16
    ctx.train_images, ctx.train_records = _noise(20), [{"text": p} for p in prompts]
    import capsearch.metrics.memorised_grid as grid_mod
    from capsearch.models.sampling import save_grid

    seen = {}
    monkeypatch.setattr(grid_mod, "save_grid",
                        lambda tiles, path, nrow, captions: seen.update(nrow=nrow, captions=captions)
                        or save_grid(tiles, path, nrow=nrow, captions=captions))  # fmt: skip
    path = tmp_path / "memorised.png"
    extracted = {prompts[5], prompts[12]}
    assert save_memorised_grid(ctx, extracted, path) == path
    assert 10_000 < path.stat().st_size < MAX_IMAGE_BYTES
    rows = [c for c in seen["captions"] if c.startswith("train")]
    assert seen["nrow"] == 3 and len(rows) == 20 == MAX_TILES // 3  # every caption, 2 samples each
    assert rows[:2] == [f"train [extracted]: {prompts[5]}", f"train [extracted]: {prompts[12]}"]
    assert rows[2] == f"train: {prompts[0]}"

    from PIL import Image

    with Image.open(path) as grid:  # rows of 3 tiles, 1.6 + 0.5 inches each at 110 dpi
        assert round(grid.height / (2.1 * 110)) == 20


def test_a_report_plot_stays_under_the_limit_and_keeps_its_colours(tmp_path):
    from PIL import Image

    from capsearch.reporting.plots import front_plot

    kinds = ["baseline"] * 5 + ["searched"] * 14 + ["winner"]
    points = [
        {"label": f"t{i:03d}", "kind": kind, "extracted": i % 7, "fid": 60.0 + 9 * i,
         "intervals": {"fid": [50.0 + 9 * i, 75.0 + 9 * i], "extracted": [0, i % 7 + 3]}}
        for i, kind in enumerate(kinds)
    ]  # fmt: skip
    path = front_plot([("search stage", points), ("final stage", points[::2])], tmp_path / "f.png")
    assert 10_000 < path.stat().st_size < MAX_IMAGE_BYTES
    with Image.open(path) as plot:
        colours = {rgb for _, rgb in plot.convert("RGB").getcolors(256)}
    assert (255, 255, 255) in colours and (0, 0, 0) in colours


def test_a_grey_figure_is_written_as_one_grey_channel_with_white_and_black_kept(tmp_path):
    import numpy as np
    from PIL import Image

    from capsearch.figures import GREY_LEVELS, save_image

    ramp = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (4, 1))).convert("RGBA")
    save_image(ramp, tmp_path / "ramp.png", grey=True)
    with Image.open(tmp_path / "ramp.png") as back:
        values = np.asarray(back)
        assert back.mode == "L" and len(np.unique(values)) == GREY_LEVELS
    assert values[0, 0] == 0 and values[0, -1] == 255
    assert np.abs(values[0].astype(int) - np.arange(256)).max() <= 255 / (GREY_LEVELS - 1) / 2 + 1


def _files(*folders: str, pattern: str = "*") -> list[Path]:
    return sorted(p for f in folders for p in (ROOT / f).rglob(pattern) if p.is_file())


COMMITTED_IMAGES = [p for p in _files("experiments/results", "docs") if IMAGE.search(p.name)]
MARKDOWN = [ROOT / "README.md", *_files("docs", "experiments", pattern="*.md")]


def test_the_committed_images_are_found():
    assert len(COMMITTED_IMAGES) > 10 and len(MARKDOWN) > 10


def test_no_committed_image_is_over_the_limit():
    sizes = {str(p.relative_to(ROOT)): p.stat().st_size for p in COMMITTED_IMAGES}
    big = {name: size for name, size in sizes.items() if size >= MAX_IMAGE_BYTES}
    assert not big, f"over {MAX_IMAGE_BYTES} bytes (experiments/compact_images.py): {big}"


@pytest.mark.parametrize("markdown", MARKDOWN, ids=[str(p.relative_to(ROOT)) for p in MARKDOWN])
def test_markdown_links_to_images_point_to_files(markdown):
    targets = IMAGE_LINK.findall(markdown.read_text(encoding="utf-8"))
    missing = [t for t in targets if "://" not in t and not (markdown.parent / t).is_file()]
    assert not missing, f"{markdown.relative_to(ROOT)} links to missing images: {missing}"
