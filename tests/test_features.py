"""Feature extractors (same classes as the real models, random weights) and the on-disk feature cache."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from capsearch.errors import UserError
from capsearch.metrics.features import (
    BioViLT,
    FeatureExtractor,
    PhantomFeatures,
    XRVDenseNetFeatures,
    cached_features,
    get_extractor,
    load_biovil_t,
    load_xrv_densenet,
    resolve_extractor,
    weights_fingerprint,
)
from capsearch.metrics.scorer import PhantomScorer


def _images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --- torchxrayvision -----------------------------------------------------------------------------------


def test_xrv_densenet_features_code_path():
    import torchxrayvision as xrv

    torch.manual_seed(0)
    model = xrv.models.DenseNet(weights=None)
    seen = {}
    original = model.features2

    def spy(x: torch.Tensor) -> torch.Tensor:
        seen["shape"], seen["min"], seen["max"] = tuple(x.shape), float(x.min()), float(x.max())
        return original(x)

    model.features2 = spy
    extractor = XRVDenseNetFeatures(model=model)
    assert isinstance(extractor, FeatureExtractor)
    images = _images(2)
    images[0, 0, 0, 0], images[1, 0, 0, 0] = -1.0, 1.0
    feats = extractor.features(images)
    assert feats.shape == (2, 1024) and feats.dtype == torch.float32
    assert (feats >= 0).all()  # features2 pools after a ReLU
    assert seen["shape"] == (2, 1, 224, 224)
    # torchxrayvision's normalisation: [-1024, 1024] (resizing may overshoot the range slightly).
    assert -1100 < seen["min"] < -900 and 900 < seen["max"] < 1100
    assert len(extractor.fingerprint) == 64


def test_xrv_weights_missing_or_corrupt_is_a_user_error(tmp_path: Path):
    with pytest.raises(UserError, match="download https://.*mimic_ch"):
        load_xrv_densenet(cache_dir=tmp_path)
    (tmp_path / "mimic_ch-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt").write_bytes(
        b"not a model"
    )
    with pytest.raises(UserError, match="cannot load"):
        load_xrv_densenet(cache_dir=tmp_path)


# --- BioViL-T ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_biovil(tmp_path_factory) -> BioViLT:
    from health_multimodal.image.model.model import ImageModel
    from health_multimodal.image.model.types import ImageEncoderType
    from health_multimodal.text import CXRBertConfig, CXRBertModel, CXRBertTokenizer

    folder = tmp_path_factory.mktemp("cxrbert")
    words = "[PAD] [UNK] [CLS] [SEP] [MASK] no acute findings large left pleural effusion".split()
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    torch.manual_seed(0)
    # The multi-image encoder and ViT pooler BioViL-T uses, over a ResNet-18 trunk to keep the test fast.
    image_model = ImageModel(
        img_encoder_type=ImageEncoderType.RESNET18_MULTI_IMAGE, joint_feature_size=128
    )
    tokenizer = CXRBertTokenizer.from_pretrained(str(folder))
    config = CXRBertConfig(
        vocab_size=len(words),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        projection_size=128,
    )
    return BioViLT(image_model, tokenizer, CXRBertModel(config))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # timm, imported by hi-ml
def test_biovil_t_code_path(tiny_biovil: BioViLT):
    images = _images(2, size=64)
    prepared = tiny_biovil._prepare(images)
    assert prepared.shape == (2, 3, 448, 448)
    assert float(prepared.min()) >= -0.05 and float(prepared.max()) <= 1.05
    feats = tiny_biovil.features(images)
    assert feats.shape == (2, 128)
    assert torch.allclose(feats.norm(dim=1), torch.ones(2), atol=1e-5)
    prompts = ["no acute findings.", "large left pleural effusion"]
    text = tiny_biovil.text_features(prompts)
    assert text.shape == (2, 128) and torch.allclose(text.norm(dim=1), torch.ones(2), atol=1e-5)
    scores = tiny_biovil.score(images, prompts)
    assert scores.shape == (2,)
    assert torch.allclose(scores, (feats * text).sum(dim=1), atol=1e-5)
    assert (scores.abs() <= 1 + 1e-5).all()


def test_biovil_t_missing_weights_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("CAPSEARCH_BIOVIL_DIR", raising=False)
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(tmp_path))
    with pytest.raises(UserError, match="biovil_t_image_model_proj_size_128.pt not found"):
        load_biovil_t()
    (tmp_path / "biovil_t_image_model_proj_size_128.pt").write_bytes(b"truncated")
    with pytest.raises(UserError, match="cannot load BioViL-T image weights"):
        load_biovil_t(cache_dir=tmp_path)


# --- phantom scorer features ------------------------------------------------------------------------------


def test_phantom_features_and_fingerprint():
    torch.manual_seed(0)
    scorer = PhantomScorer(["a", "b", "c"])
    extractor = PhantomFeatures(scorer)
    assert isinstance(extractor, FeatureExtractor)
    feats = extractor.features(_images(5, size=64), batch_size=2)
    assert feats.shape == (5, scorer.feature_dim) and feats.dtype == torch.float32
    before = extractor.fingerprint
    assert PhantomFeatures(scorer).fingerprint == before
    with torch.no_grad():
        scorer.head.bias += 1
    assert PhantomFeatures(scorer).fingerprint != before


def test_scorer_fingerprint_is_its_config_and_weights_digest():
    torch.manual_seed(0)
    scorer = PhantomScorer(["a", "b", "c"])
    # The digest feature caches were keyed on before the scorer shared weights_fingerprint.
    digest = hashlib.sha256(json.dumps(scorer.config, sort_keys=True).encode())
    for name, tensor in sorted(scorer.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    assert scorer.fingerprint() == digest.hexdigest()
    config = json.dumps(scorer.config, sort_keys=True)
    assert scorer.fingerprint() == weights_fingerprint(scorer, config)


def test_auto_extractor_is_the_phantom_scorer_in_pixel_space(tmp_path: Path):
    assert resolve_extractor("xrv", "tiny") == "xrv"
    assert resolve_extractor("phantom", "stable-diffusion-v1-5/stable-diffusion-v1-5") == "phantom"
    assert resolve_extractor("auto", "tiny") == "phantom"
    assert resolve_extractor("auto", "tiny:random") == "phantom"
    # a hub id is SD-style, with a VAE
    assert resolve_extractor("auto", "stable-diffusion-v1-5/stable-diffusion-v1-5") == "xrv"
    (tmp_path / "unet").mkdir()
    assert resolve_extractor("auto", str(tmp_path)) == "phantom"
    (tmp_path / "vae").mkdir()
    assert resolve_extractor("auto", tmp_path) == "xrv"
    assert resolve_extractor("auto", SimpleNamespace(vae=None)) == "phantom"
    assert resolve_extractor("auto", SimpleNamespace(vae=torch.nn.Identity())) == "xrv"


def test_get_extractor_rejects_unknown_names():
    with pytest.raises(UserError, match="unknown feature extractor"):
        get_extractor("inception")


# --- cache ---------------------------------------------------------------------------------------------


class _CountingExtractor:
    """Mean and std of each image, counting how many images it has seen."""

    name = "counting/test"
    input_size = 32

    def __init__(self, fingerprint: str = "v1") -> None:
        self.fingerprint = fingerprint
        self.seen = 0

    def features(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        self.seen += len(images)
        return torch.stack([images.mean(dim=(1, 2, 3)), images.std(dim=(1, 2, 3))], dim=1)


def test_cached_features_for_tensors(tmp_path: Path):
    images = _images(6)
    extractor = _CountingExtractor()
    first = cached_features(extractor, images, tmp_path)
    assert extractor.seen == 6
    again = cached_features(extractor, images.clone(), tmp_path)
    assert extractor.seen == 6 and torch.equal(first, again)  # served from disk
    cached_features(extractor, _images(6, seed=1), tmp_path)
    assert extractor.seen == 12  # other pixels, other key
    cached_features(_CountingExtractor("v2"), images, tmp_path)
    assert len(list(tmp_path.glob("counting_test-*.safetensors"))) == 3
    assert not list(tmp_path.glob("*.tmp"))
    # A damaged cache file is recomputed, not trusted.
    for path in tmp_path.glob("*.safetensors"):
        path.write_bytes(b"garbage")
    assert torch.equal(cached_features(extractor, images, tmp_path), first)
    assert extractor.seen == 18


def test_cached_features_for_a_dataset_folder(tmp_path: Path):
    from capsearch.datasets.folder import load_images
    from capsearch.worlds.phantom import write_phantom_dataset

    root = tmp_path / "data"
    write_phantom_dataset(root, patients=6, size=32, seed=3)
    extractor = _CountingExtractor()
    cache = root / ".cache"  # a cache inside the dataset folder must not change the dataset's key
    feats = cached_features(extractor, root, cache, split="train")
    expected = extractor.features(load_images(root, "train", 32))
    assert torch.allclose(feats, expected)
    seen = extractor.seen
    cached_features(extractor, root, cache, split="train")
    assert extractor.seen == seen
    cached_features(extractor, root, cache, split="test")
    assert extractor.seen > seen  # another split, another key
    seen = extractor.seen
    # Touching an image (new mtime) invalidates the entry.
    image = next((root / "images").glob("*.png"))
    stamp = time.time() + 10
    os.utime(image, (stamp, stamp))
    cached_features(extractor, root, cache, split="train")
    assert extractor.seen > seen
    with pytest.raises(UserError, match="does not exist"):
        cached_features(extractor, tmp_path / "missing", cache)
