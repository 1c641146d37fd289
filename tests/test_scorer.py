"""Phantom scorer: architecture, AUROC, agreement score, save/load, training, and the shipped weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from capsearch.errors import UserError
from capsearch.metrics.scorer import (
    SCORER_DIR,
    PhantomScorer,
    auroc,
    finding_agreement,
    load_scorer,
    save_scorer,
    train_scorer,
)
from capsearch.worlds.phantom import FINDINGS, write_phantom_dataset

SHIPPED = (SCORER_DIR / "scorer.safetensors").is_file()


def test_architecture_and_inputs():
    torch.manual_seed(0)
    model = PhantomScorer(FINDINGS)
    n_params = sum(p.numel() for p in model.parameters())
    assert 100_000 <= n_params <= 300_000
    small = torch.rand(3, 1, 32, 32) * 2 - 1
    large = torch.rand(3, 1, 64, 64) * 2 - 1
    assert model.features(small).shape == (3, model.feature_dim)
    assert (model.features(small) >= 0).all()
    assert model.probabilities(large).shape == (3, len(FINDINGS))
    # Other sizes are resized as capsearch.datasets.folder resizes (antialiased bicubic); RGB is averaged to gray.
    resized = torch.nn.functional.interpolate(large, size=32, mode="bicubic", antialias=True)
    resized = resized.clamp(-1, 1)
    assert torch.allclose(model.features(large), model.features(resized), atol=1e-6)
    assert torch.allclose(
        model.features(small.expand(-1, 3, -1, -1)), model.features(small), atol=1e-6
    )
    with pytest.raises(UserError):
        model.features(torch.zeros(32, 32))


def test_auroc_matches_torchmetrics_with_ties():
    from torchmetrics.functional.classification import binary_auroc

    gen = torch.Generator().manual_seed(1)
    labels = (torch.rand(300, generator=gen) < 0.3).long()
    scores = torch.round((labels + torch.randn(300, generator=gen)) * 2) / 2  # many ties
    assert auroc(scores, labels) == pytest.approx(float(binary_auroc(scores, labels)), abs=1e-6)
    assert auroc(torch.tensor([0.1, 0.9]), torch.tensor([0, 1])) == 1.0
    assert auroc(torch.tensor([0.5, 0.5]), torch.tensor([0, 1])) == 0.5
    assert auroc(torch.rand(5), torch.zeros(5)) != auroc(torch.rand(5), torch.zeros(5))  # NaN


def test_finding_agreement_is_jaccard():
    predicted = [set(), {"effusion"}, {"effusion", "nodule"}, {"nodule"}]
    named = [set(), {"effusion"}, {"effusion"}, set()]
    assert finding_agreement(predicted, named).tolist() == [1.0, 1.0, 0.5, 0.0]


def test_save_load_roundtrip_and_errors(tmp_path: Path):
    torch.manual_seed(2)
    model = PhantomScorer(FINDINGS).eval()
    save_scorer(model, tmp_path, {"note": "test"})
    loaded = load_scorer(tmp_path)
    images = torch.rand(4, 1, 32, 32) * 2 - 1
    # Weights travel as float16: the reloaded model reads images like the original, up to rounding.
    assert torch.allclose(loaded.features(images), model.features(images), rtol=1e-2, atol=1e-3)
    assert next(loaded.parameters()).dtype == torch.float32
    assert loaded.report["note"] == "test"
    assert load_scorer(tmp_path / "scorer.safetensors").fingerprint() == loaded.fingerprint()
    meta = json.loads((tmp_path / "scorer.json").read_text())
    meta["sha256"] = "0" * 64
    (tmp_path / "scorer.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="sha256"):
        load_scorer(tmp_path)
    with pytest.raises(UserError, match="capsearch pretrain scorer"):
        load_scorer(tmp_path / "nowhere")
    (tmp_path / "scorer.json").write_text('{"config": {"findings": []}}')
    with pytest.raises(UserError, match="not a phantom scorer description"):
        load_scorer(tmp_path)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantoms") / "data"
    write_phantom_dataset(root, patients=60, size=64, seed=7)
    return root


def test_train_scorer_writes_a_loadable_model(phantoms: Path, tmp_path: Path):
    report = train_scorer(
        phantoms, tmp_path / "out", epochs=2, size=32, seed=0, progress=False, batch_size=16
    )
    assert set(report["auroc"]) == set(FINDINGS)
    assert report["config"]["findings"] == list(FINDINGS)
    assert report["n_train"] > report["n_eval"] > 0 and report["eval_split"] == "test"
    assert len(report["epoch_losses"]) == 2 and "train_scorer(" in report["command"]
    model = load_scorer(tmp_path / "out")
    assert model.findings == tuple(FINDINGS)
    with pytest.raises(UserError, match="not a phantom dataset"):
        train_scorer(tmp_path / "empty", tmp_path / "out2", epochs=1, progress=False)


@pytest.mark.skipif(
    not SHIPPED, reason="no shipped phantom scorer (run `capsearch pretrain scorer`)"
)
def test_shipped_scorer_was_trained_on_this_phantom_world(recwarn):
    from capsearch.metrics.scorer import phantom_world_digest

    model = load_scorer()  # warns when the world it was trained on is not the one rendered now
    assert model.report["world_sha256"] == phantom_world_digest()
    assert not [w for w in recwarn if "another version of the phantom world" in str(w.message)]


@pytest.mark.skipif(
    not SHIPPED, reason="no shipped phantom scorer (run `capsearch pretrain scorer`)"
)
def test_shipped_scorer_reads_fresh_phantoms(phantoms: Path):
    from capsearch.datasets.folder import ImageCaptionDataset
    from capsearch.metrics.scorer import evaluate_scorer

    model = load_scorer()
    assert model.report["auroc_macro"] > 0.8  # its own held-out split, recorded at training time
    data = ImageCaptionDataset(phantoms, split=None, size=64)
    images = torch.stack([data.load(i) for i in range(len(data))])
    labels = torch.tensor([[float(f in r["findings"]) for f in FINDINGS] for r in data.records])
    # Patients it never saw (another seed), at 64 px: still well above chance.
    fresh = evaluate_scorer(model, images, labels)
    assert fresh["auroc_macro"] > 0.75
    agreement = float(model.score(images, data.captions).mean())
    assert agreement == pytest.approx(fresh["agreement_real"], abs=1e-4)
    assert agreement > 0.5
    shuffled = float(model.score(images, data.captions[1:] + data.captions[:1]).mean())
    assert shuffled < agreement


def test_cli_pretrain_scorer_passes_each_flag(tmp_path: Path, monkeypatch, capsys):
    """Each flag of `capsearch pretrain scorer` reaches train_scorer (tested above, for real)."""
    import capsearch.metrics.scorer as scorer
    from capsearch.cli import main

    calls = []
    monkeypatch.setattr(scorer, "train_scorer",
                        lambda *args, **kwargs: calls.append((args, kwargs)) or {"auroc": 0.75})  # fmt: skip
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    argv = ["pretrain", "scorer", "--data", str(data), "--out", str(out), "--epochs", "3",
            "--size", "16", "--seed", "4"]  # fmt: skip
    assert main(argv) == 0
    assert calls == [((data, out), {"epochs": 3, "size": 16, "seed": 4, "progress": True})]
    assert capsys.readouterr().out == f"wrote {out}: held-out AUROC 0.75\n"
