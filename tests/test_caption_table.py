"""The per-caption memorisation table: one row per attacked caption, as the attack and the metrics saw it."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import pytest
import torch

import capsearch.metrics.stages as stages
from capsearch.datasets.folder import in_split, load_images, read_metadata
from capsearch.metrics.caption_table import CAPTION_TABLE, COLUMNS, save_caption_table
from capsearch.metrics.context import EvalContext
from capsearch.metrics.extraction import PHANTOM_THRESHOLD, tiled_distance
from capsearch.metrics.nearest_own import nearest_own_share
from capsearch.settings import EvalSettings
from capsearch.worlds.phantom import write_phantom_dataset

N = 4  # attack samples per caption
SETTINGS = EvalSettings(extraction_prompts=9, extraction_n=N, min_clique=3, batch_size=16, seed=7)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Phantom data with a memorisation subset: 7 captions whose images are stored 3 times."""
    root = tmp_path_factory.mktemp("table") / "data"
    write_phantom_dataset(root, patients=16, size=32, seed=0, dup_fraction=0.2, dup_copies=3)
    return root


def _attacked(data, monkeypatch):
    """The attack stage run with a stub sampler: some captions copy their training image (all of
    their samples, or half), the rest draw noise; returns the context and the images drawn."""
    train_records = [r for r in read_metadata(data) if in_split(r, "train")]
    train = load_images(data, "train", 32)
    memorised = sorted({r["text"] for r in train_records if r.get("dup_group") is not None})
    others = sorted({r["text"] for r in train_records if r.get("dup_group") is None})
    assert len(memorised) == 7
    first = {}
    for i, r in enumerate(train_records):
        first.setdefault(r["text"], i)
    # copies: 3 memorised captions and one other; half copies: one memorised caption
    copied = {memorised[0], memorised[2], memorised[5], others[1]}
    half = memorised[3]
    drawn: dict[str, torch.Tensor] = {}

    def sampler(prompts, n_per_prompt, seed):
        g = torch.Generator().manual_seed(seed)
        out = []
        for prompt in prompts:
            noise = torch.rand(n_per_prompt, 1, 32, 32, generator=g) * 2 - 1
            own = train[first[prompt]].expand(n_per_prompt, -1, -1, -1)
            images = own + 0.004 * noise if prompt in copied else noise
            if prompt == half:
                images = torch.cat([own[:2] + 0.004 * noise[:2], noise[2:]])
            drawn[prompt] = images.clamp(-1, 1)
            out.append(drawn[prompt])
        return torch.cat(out)

    monkeypatch.setattr(stages, "_pipeline_generator", lambda *args: sampler)
    # 9 prompts: the 7 memorised captions, then others[1] and others[0]
    ctx = EvalContext(
        root=data, world="phantom", seed=3, bootstrap=200, train_records=train_records,
        threshold=PHANTOM_THRESHOLD, attack_n=N, settings=SETTINGS, memorised=memorised,
        others=[others[1], others[0], *others[2:]], attack_guidance=1.0,
    )  # fmt: skip
    ctx.attack_prompts = stages.attack_captions(memorised, ctx.others, SETTINGS.extraction_prompts)
    pipe = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(sample_size=32)), vae=None)
    stages.attack(pipe, ctx)
    return ctx, drawn, copied, train, first


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_the_table_holds_the_attacks_extractions_and_the_own_image_share(
    data, tmp_path, monkeypatch
):
    ctx, drawn, copied, train, first = _attacked(data, monkeypatch)
    path = save_caption_table(ctx, tmp_path / CAPTION_TABLE)
    assert path == tmp_path / CAPTION_TABLE and [p.name for p in tmp_path.iterdir()] == [
        CAPTION_TABLE
    ]  # written atomically: no temporary file left beside it
    with open(path, newline="") as f:
        assert tuple(next(csv.reader(f))) == COLUMNS
    rows = _read(path)
    assert [r["caption"] for r in rows] == ctx.attack_prompts and len(rows) == 9
    # the captions marked extracted are exactly those the attack extracted: the copied ones
    marked = {r["caption"] for r in rows if r["extracted"] == "true"}
    assert marked == {prompt for prompt, _, _ in ctx.extraction.extracted} == copied
    memorised = set(ctx.memorised)
    assert {r["caption"] for r in rows if r["memorised"] == "true"} == memorised
    assert sum(r["memorised"] == "false" for r in rows) == 2
    records = ctx.train_records
    for r in rows:
        row = first[r["caption"]]
        assert r["train_row"] == str(row) and r["train_file"] == records[row]["file_name"]
        assert r["caption_rows"] == str(sum(x["text"] == r["caption"] for x in records))
        if r["caption"] in memorised:
            assert r["caption_rows"] == "3"  # the image's 3 copies
        assert r["attack_seed"] == "7" and r["samples"] == str(N)
        # brute force: every sample against every training image
        d = tiled_distance(drawn[r["caption"]], train)
        best = d.min(dim=1).values.argmin()
        nearest = int(d[best].argmin())
        distinct = [k for k in range(len(train)) if not torch.equal(train[k], train[nearest])]
        assert float(r["best_distance"]) == pytest.approx(float(d[best].min()), abs=1e-6)
        ratio = float(d[best].min()) / float(d[best, distinct].min())
        assert float(r["best_nn_ratio"]) == pytest.approx(ratio, abs=1e-5)
        if r["caption"] in copied:
            assert float(r["best_nn_ratio"]) < 1 / 3
        own = [k for k, x in enumerate(records) if x["text"] == r["caption"]]
        share = float((d.argmin(dim=1)[:, None] == torch.tensor(own)).any(dim=1).float().mean())
        assert r["own_share"] == (repr(share) if r["caption"] in memorised else "")
    shares = {r["caption"]: float(r["own_share"]) for r in rows if r["memorised"] == "true"}
    assert shares[ctx.memorised[0]] == 1.0 and shares[ctx.memorised[3]] >= 0.5
    # weighted by their samples, the memorised rows' shares average to the nearest_own metric
    weighted = sum(shares[p] * N for p in shares) / (N * len(shares))
    assert weighted == pytest.approx(nearest_own_share(ctx).value, abs=1e-12)
    assert 0 < weighted < 1


def test_no_table_without_an_attack(data, tmp_path, monkeypatch):
    ctx, *_ = _attacked(data, monkeypatch)
    ctx.extraction = None
    assert save_caption_table(ctx, tmp_path / CAPTION_TABLE) is None
    assert not (tmp_path / CAPTION_TABLE).exists()
