"""The broad pretraining corpus: its families, its mixture, its disjointness from fine-tuning worlds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from capsearch.cli import main
from capsearch.config import PhantomData
from capsearch.errors import UserError
from capsearch.models.load import load_pipeline
from capsearch.training.pretrain import corpus_pool, pretrain_shapes, shapes_pool
from capsearch.worlds import radiographs
from capsearch.worlds.corpus import (
    FAMILIES,
    MIXTURE,
    corpus_chunk,
    corpus_families,
    family_counts,
    make_corpus,
)
from capsearch.worlds.partition import (
    PRETRAIN_SHARE,
    bank_part,
    masks_of,
    sentence_part,
    text_part,
)
from capsearch.worlds.patients import plan_patient
from capsearch.worlds.phantom import (
    COMPLETE,
    METADATA,
    phantom_complete,
    render_phantom,
    write_phantom_dataset,
)
from capsearch.worlds.reports import ReportBank, report_bank
from capsearch.worlds.shapes import make_shapes
from capsearch.worlds.transfer import report_sentences, template_sentences

DISJOINT_WORLD = {"patients": 14, "size": 32, "seed": 5, "dup_fraction": 0.2, "dup_copies": 2}


def _bank_sentences(bank: ReportBank) -> set[str]:
    """Every normalised sentence a bank can put into a report, its templates' included."""
    texts = [t for ts in bank.whole.values() for t in ts]
    texts += [
        s for name in ("positive", "negative") for ss in getattr(bank, name).values() for s in ss
    ]
    return {s for t in texts for s in report_sentences(t)} | template_sentences()


def _records(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / METADATA).read_text().splitlines()]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_draws_deterministic_grey_images_with_captions(family: str) -> None:
    render = FAMILIES[family]
    first = [render(np.random.default_rng([9, k]), 32) for k in range(6)]
    again = [render(np.random.default_rng([9, k]), 32) for k in range(6)]
    for (image, caption), (image2, caption2) in zip(first, again, strict=True):
        assert image.shape == (32, 32) and image.dtype == np.float32
        assert -1.0 <= image.min() and image.max() <= 1.0
        assert image.std() > 0.02, "a blank picture"
        assert caption.strip() and caption == caption2
        np.testing.assert_array_equal(image, image2)
    assert len({c for _, c in first}) > 1 or family == "chest", "every caption alike"
    assert not np.array_equal(first[0][0], first[1][0])


def test_corpus_matches_the_shapes_pool_layout() -> None:
    images, captions = corpus_pool("broad", 30, 32, seed=1)
    shapes, _ = shapes_pool(30, 32, seed=1)
    assert images.shape == shapes.shape == (30, 1, 32, 32) and images.dtype == shapes.dtype
    assert len(captions) == 30 and all(captions)
    again, captions2 = make_corpus(30, 32, seed=1)
    np.testing.assert_array_equal(images[:, 0].numpy(), again)
    assert captions == captions2
    other, _ = make_corpus(30, 32, seed=2)
    assert not np.array_equal(again, other)
    # The shapes pool is still what the shipped base was pretrained on: chunk k seeded seed·10⁶+k.
    np.testing.assert_array_equal(shapes[:, 0].numpy(), make_shapes(30, 32, seed=1_000_000)[0])


def test_mixture_shares_and_family_order() -> None:
    assert sum(MIXTURE.values()) == pytest.approx(1.0) and set(MIXTURE) == set(FAMILIES)
    assert 0.05 <= MIXTURE["chest"] <= 0.1
    for n in (1, 7, 20, 999, 1000, 2345):
        counts = family_counts(n)
        assert sum(counts.values()) == n
        assert all(abs(counts[f] - n * MIXTURE[f]) < 1 for f in MIXTURE)
    families = corpus_families(2345)
    for f, share in MIXTURE.items():
        assert abs(families.count(f) - 2345 * share) <= 3  # one rounding per chunk of 1,000
    _, captions = corpus_chunk(40, 32, seed=0, chunk=0)
    for family, caption in zip(corpus_families(40), captions, strict=True):
        if family == "radiographs":
            assert " radiograph of the " in caption
        if family in ("shapes", "textures", "scenes", "glyphs"):
            assert "radiograph" not in caption.lower()


def test_report_sentences_split_into_two_parts_with_templates_in_finetune() -> None:
    templates = template_sentences()
    assert all(sentence_part(s) == "finetune" for s in templates)
    sentences = {s for ts in report_bank().whole.values() for t in ts for s in report_sentences(t)}
    hashed = [s for s in sentences if s not in templates]
    share = np.mean([sentence_part(s) == "pretrain" for s in hashed])
    assert abs(share - PRETRAIN_SHARE) < 0.06, share
    assert sentence_part("No pneumothorax.") == sentence_part("no  PNEUMOTHORAX")  # normalised
    pre, fine = bank_part("pretrain"), bank_part("finetune")
    assert pre.whole[frozenset()] and fine.whole[frozenset()]
    assert all(text_part(t) == "pretrain" for ts in pre.whole.values() for t in ts)
    pre_sentences = _bank_sentences(pre) - template_sentences()
    assert pre_sentences and not pre_sentences & _bank_sentences(fine)


def test_lung_masks_split_into_two_parts() -> None:
    pre, fine = set(masks_of("pretrain")), set(masks_of("finetune"))
    assert pre and fine and not pre & fine
    anatomy, _ = plan_patient(3, seed=0, bank=bank_part("finetune"), masks=masks_of("finetune"))
    assert anatomy.mask_index in fine


@pytest.fixture(scope="module")
def corpus_radiographs() -> dict[str, list]:
    """Chest films (with the anatomy each was drawn from) and body-part films of the corpus."""
    anatomies: list = []
    sample = radiographs.sample_anatomy

    def record(rng, masks=None):
        anatomies.append(sample(rng, masks))
        return anatomies[-1]

    radiographs.sample_anatomy = record  # type: ignore[assignment]
    try:
        chest = [radiographs.render_chest(np.random.default_rng([1, k]), 32) for k in range(60)]
    finally:
        radiographs.sample_anatomy = sample  # type: ignore[assignment]
    rng = np.random.default_rng(4)
    body = [radiographs.render_body_part(rng, 32) for _ in range(400)]
    return {"chest": chest, "anatomies": anatomies, "body": body}


@pytest.fixture(scope="module")
def disjoint_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("disjoint")
    write_phantom_dataset(root, **DISJOINT_WORLD, disjoint_from_corpus=True)
    return root


def test_corpus_text_never_appears_in_a_disjoint_world(corpus_radiographs, disjoint_world) -> None:
    corpus = {
        s
        for _, c in corpus_radiographs["chest"] + corpus_radiographs["body"]
        for s in report_sentences(c)
    }
    # Every sentence any disjoint world could ever write, not only this one's.
    assert not corpus & _bank_sentences(bank_part("finetune"))
    records = _records(disjoint_world)
    world = {s for r in records for s in report_sentences(r["text"]) if r["dup_group"] is None}
    assert world and not world & corpus
    assert all(sentence_part(s) == "finetune" for s in world)
    # Chest film texts are real reports of the pretraining part, never templates.
    for _, caption in corpus_radiographs["chest"]:
        report = caption.split("view. ", 1)[-1]
        assert text_part(report) == "pretrain"


def test_corpus_patients_are_not_fine_tuning_patients(corpus_radiographs, disjoint_world) -> None:
    anatomies = corpus_radiographs["anatomies"]
    assert len(anatomies) == 60 and {a.mask_index for a in anatomies} <= set(masks_of("pretrain"))
    corpus_images = np.stack([image for image, _ in corpus_radiographs["chest"]])
    for seed in (0, 1):  # default worlds (every lung mask) on their own streams: no image in common
        for index in range(6):
            anatomy, studies = plan_patient(index, seed)
            assert anatomy not in anatomies
            study = studies[0]
            pixels = render_phantom(
                study.findings,
                32,
                anatomy=anatomy,
                attributes=study.attributes,
                view=study.views[0],
                lesion_seed=study.lesion_seed,
                acquisition_seed=study.acquisition_seeds[0],
            )
            image = pixels.astype(np.float32) / 127.5 - 1
            assert np.abs(corpus_images - image).reshape(60, -1).max(1).min() > 0.05


def test_disjoint_is_recorded_and_off_by_default(disjoint_world, tmp_path: Path) -> None:
    marker = json.loads((disjoint_world / COMPLETE).read_text())
    assert marker["disjoint_from_corpus"] is True
    assert phantom_complete(disjoint_world, {**DISJOINT_WORLD, "disjoint_from_corpus": True})
    assert not phantom_complete(disjoint_world, DISJOINT_WORLD)
    assert PhantomData().disjoint_from_corpus is False
    plain = tmp_path / "plain"
    write_phantom_dataset(plain, **DISJOINT_WORLD)
    assert "disjoint_from_corpus" not in json.loads((plain / COMPLETE).read_text())
    assert [r["text"] for r in _records(plain)] != [r["text"] for r in _records(disjoint_world)]
    cli = tmp_path / "cli"
    argv = ["data", "phantom", "--out", str(cli), "--patients", "14", "--size", "32", "--seed", "5"]
    assert (
        main([*argv, "--dup-fraction", "0.2", "--dup-copies", "2", "--disjoint-from-corpus"]) == 0
    )
    assert (cli / METADATA).read_bytes() == (disjoint_world / METADATA).read_bytes()


def test_toy_broad_pretraining_resumes_in_chunks_and_loads(tmp_path: Path, one_thread) -> None:
    out = tmp_path / "base"
    settings = {"batch_size": 2, "pool_size": 20, "checkpoint_every": 100, "progress": False}
    first = pretrain_shapes(out, steps=3, corpus="broad", time_limit=1e-9, **settings)
    assert first["steps"] == 1 and first["corpus"] == "broad"
    meta = pretrain_shapes(out, steps=3, corpus="broad", **settings)
    assert meta["steps"] == 3 and meta["corpus"] == meta["world"] == "broad"
    assert json.loads((out / "capsearch.json").read_text())["corpus"] == "broad"
    pipe = load_pipeline(str(out))
    ids = pipe.tokenize(["AP radiograph of the left knee. Large knee joint effusion."])
    with torch.no_grad():
        states = pipe.text_encoder(ids)[0]
    assert torch.isfinite(states).all()
    with pytest.raises(UserError, match="broad corpus"):
        pretrain_shapes(out, steps=4, corpus="shapes", **settings)
    with pytest.raises(UserError, match="unknown corpus"):
        pretrain_shapes(tmp_path / "other", steps=1, corpus="laion", **settings)


def test_cli_pretrain_shapes_passes_each_flag(tmp_path: Path, monkeypatch, capsys) -> None:
    """Each flag of `capsearch pretrain shapes` reaches pretrain_shapes, as the value it means
    (--minutes as a budget in seconds); a real pretraining here would take tens of seconds."""
    import capsearch.training.pretrain as pretrain

    calls = []

    def fake(out, **kwargs):
        calls.append((out, kwargs))
        return {"steps": kwargs["steps"], "final_loss_ema": 0.5, "train_seconds": 1.0}

    monkeypatch.setattr(pretrain, "pretrain_shapes", fake)
    out = tmp_path / "base"
    argv = ["pretrain", "shapes", "--out", str(out), "--steps", "7", "--batch-size", "3",
            "--lr", "2e-4", "--pool-size", "11", "--seed", "5", "--ema-decay", "0.9",
            "--workers", "2", "--corpus", "broad", "--minutes", "1.5", "--time-limit", "30",
            "--checkpoint-every", "4"]  # fmt: skip
    assert main(argv) == 0
    assert calls == [(out, {"steps": 7, "batch_size": 3, "lr": 2e-4, "pool_size": 11,
                            "device": "cpu", "seed": 5, "ema_decay": 0.9, "workers": 2,
                            "checkpoint_every": 4, "time_limit": 30.0, "time_budget": 90.0, "corpus": "broad"})]  # fmt: skip
    assert capsys.readouterr().out == f"wrote {out} (7 steps, final loss 0.5, 1.0 s)\n"
