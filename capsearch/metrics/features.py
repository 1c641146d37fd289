"""Image feature extractors for FID and AMD, and an on-disk cache of training-set features."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from capsearch.datasets.folder import in_split, load_images, metadata_path, read_metadata
from capsearch.errors import UserError
from capsearch.metrics.fingerprint import weights_fingerprint
from capsearch.metrics.scorer import load_scorer
from capsearch.models.load import TINY_MODELS

XRV_WEIGHTS = "densenet121-res224-mimic_ch"
BIOVIL_T_HUB_ID = "microsoft/BiomedVLP-BioViL-T"
BIOVIL_T_REVISION = "v1.0"
BIOVIL_T_IMAGE_WEIGHTS = "biovil_t_image_model_proj_size_128.pt"


@runtime_checkable
class FeatureExtractor(Protocol):
    """Maps images [N, 1, H, W] in [-1, 1] to float32 features [N, D]."""

    name: str
    fingerprint: str

    def features(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Float32 features [N, D] on the CPU."""
        ...


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] → [N, 1, H, W] float (RGB generations are averaged to one channel)."""
    if images.ndim != 4:
        raise UserError(f"feature extractors expect images [N, C, H, W], got {tuple(images.shape)}")
    x = images.float()
    return x if x.shape[1] == 1 else x.mean(dim=1, keepdim=True)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Square resize with antialiasing (a no-op at the right size)."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def _device_of(module: torch.nn.Module) -> torch.device:
    """Device of a module's first parameter."""
    return next(module.parameters()).device


# --- torchxrayvision DenseNet-121 (real world FID / AMD) ---------------------------------------------


def xrv_weights_path(weights: str = XRV_WEIGHTS, cache_dir: str | Path | None = None) -> Path:
    """Where torchxrayvision keeps the named weights (its cache: ~/.torchxrayvision/models_data/)."""
    import torchxrayvision as xrv  # lazy: heavy, real world only

    if weights not in xrv.models.model_urls:
        raise UserError(f"unknown torchxrayvision weights {weights!r}")
    folder = Path(cache_dir).expanduser() if cache_dir else Path(xrv.utils.get_cache_dir())
    return folder / os.path.basename(xrv.models.model_urls[weights]["weights_url"])


def load_xrv_densenet(
    weights: str = XRV_WEIGHTS, cache_dir: str | Path | None = None
) -> torch.nn.Module:
    """torchxrayvision's DenseNet-121 from its local weight cache; missing weights → one-line UserError."""
    import torchxrayvision as xrv  # lazy: heavy, real world only

    path = xrv_weights_path(weights, cache_dir)
    if not path.is_file():
        url = xrv.models.model_urls[weights]["weights_url"]
        raise UserError(
            f"torchxrayvision weights {weights} not found at {path}; download {url} to that path"
        )
    try:
        model = xrv.models.DenseNet(weights=weights, cache_dir=str(path.parent))
    except Exception as exc:  # torch.load of a corrupt or partial file raises many types
        raise UserError(
            f"cannot load torchxrayvision weights {path}: {type(exc).__name__}: {exc}"
        ) from None
    return model.eval()


class XRVDenseNetFeatures:
    """1,024-d `features2` (ReLU + global average pool) of torchxrayvision's DenseNet-121 at 224 px."""

    input_size = 224

    def __init__(self, model: torch.nn.Module | None = None, weights: str = XRV_WEIGHTS) -> None:
        self.model = (model if model is not None else load_xrv_densenet(weights)).eval()
        self.name = (
            f"xrv-{weights}"
            if model is None
            else f"xrv-{getattr(model, 'weights', None) or 'custom'}"
        )
        self.fingerprint = weights_fingerprint(self.model, self.name)

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """DenseNet features [N, 1024] of images in [-1, 1]."""
        device, out = _device_of(self.model), []
        for i in range(0, len(images), batch_size):
            # torchxrayvision's normalisation maps pixel range [0, max] to [-1024, 1024]; ours is [-1, 1].
            x = _resize(_grayscale(images[i : i + batch_size]), self.input_size) * 1024.0
            out.append(self.model.features2(x.to(device)).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, 1024)


# --- BioViL-T (real world image-text score) -------------------------------------------------------------


def _biovil_image_weights(cache_dir: str | Path | None) -> Path:
    """The BioViL-T image checkpoint: in cache_dir, $CAPSEARCH_BIOVIL_DIR, or hi-ml's temp-folder download."""
    folders = [
        Path(p).expanduser() for p in (cache_dir, os.environ.get("CAPSEARCH_BIOVIL_DIR")) if p
    ]
    folders.append(Path(tempfile.gettempdir()))
    for folder in folders:
        if (folder / BIOVIL_T_IMAGE_WEIGHTS).is_file():
            return folder / BIOVIL_T_IMAGE_WEIGHTS
    from health_multimodal.image.model import pretrained  # lazy: heavy, real world only

    raise UserError(
        f"BioViL-T image weights {BIOVIL_T_IMAGE_WEIGHTS} not found in {', '.join(map(str, folders))}; "
        f"download {pretrained.BIOVIL_T_IMAGE_WEIGHTS_URL} into one of them"
    )


def load_biovil_t(cache_dir: str | Path | None = None):
    """BioViL-T image model, tokenizer and text model from local caches; anything missing → one-line UserError."""
    from health_multimodal.image.model.model import ImageModel  # lazy: heavy, real world only
    from health_multimodal.image.model.pretrained import JOINT_FEATURE_SIZE  # lazy: as above
    from health_multimodal.image.model.types import ImageEncoderType  # lazy: as above
    from health_multimodal.text import CXRBertModel, CXRBertTokenizer  # lazy: as above

    weights = _biovil_image_weights(cache_dir)
    try:
        image_model = ImageModel(
            img_encoder_type=ImageEncoderType.RESNET50_MULTI_IMAGE,
            joint_feature_size=JOINT_FEATURE_SIZE,
            pretrained_model_path=weights,
        )
    except Exception as exc:
        raise UserError(
            f"cannot load BioViL-T image weights {weights}: {type(exc).__name__}: {exc}"
        ) from None
    try:
        kwargs = {"revision": BIOVIL_T_REVISION, "local_files_only": True}
        tokenizer = CXRBertTokenizer.from_pretrained(BIOVIL_T_HUB_ID, **kwargs)
        text_model = CXRBertModel.from_pretrained(BIOVIL_T_HUB_ID, **kwargs)
    except OSError:
        raise UserError(
            f"BioViL-T text model {BIOVIL_T_HUB_ID} (revision {BIOVIL_T_REVISION}) is not in the local Hugging "
            f"Face cache; run `huggingface-cli download {BIOVIL_T_HUB_ID} --revision {BIOVIL_T_REVISION}` on a "
            "machine with internet and copy the cache here"
        ) from None
    return image_model.eval(), tokenizer, text_model.eval()


class BioViLT:
    """BioViL-T: L2-normalised 128-d joint-space image embeddings, and image-text cosine similarity."""

    # hi-ml's inference transform: resize the short side to 512, centre-crop 448, [0, 1], 3 channels.
    resize, input_size = 512, 448

    def __init__(
        self,
        image_model: torch.nn.Module | None = None,
        tokenizer: object | None = None,
        text_model: torch.nn.Module | None = None,
    ) -> None:
        if image_model is None or tokenizer is None or text_model is None:
            image_model, tokenizer, text_model = load_biovil_t()
        self.image_model, self.tokenizer, self.text_model = (
            image_model.eval(),
            tokenizer,
            text_model.eval(),
        )
        self.name = "biovil-t"
        self.fingerprint = weights_fingerprint(self.image_model, self.name)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images → BioViL-T input [N, 3, 448, 448] in [0, 1]."""
        x = _resize((_grayscale(images) + 1.0) / 2.0, self.resize)
        offset = (self.resize - self.input_size) // 2
        x = x[..., offset : offset + self.input_size, offset : offset + self.input_size]
        return x.expand(-1, 3, -1, -1).to(_device_of(self.image_model))

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Unit-norm projected global image embeddings [N, 128]."""
        out = []
        for i in range(0, len(images), batch_size):
            emb = self.image_model(
                self._prepare(images[i : i + batch_size])
            ).projected_global_embedding
            out.append(F.normalize(emb.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, 128)

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit-norm projected text embeddings [N, 128] (CXR-BERT [CLS] projection)."""
        # As hi-ml's TextInferenceEngine (whose batch_encode_plus call newer transformers removed): strip
        # final punctuation, pad to the longest prompt, project the [CLS] token.
        texts = [p.rstrip("!?.") for p in prompts]
        max_len = self.text_model.config.max_position_embeddings
        tokens = self.tokenizer(
            texts, padding="longest", truncation=True, max_length=max_len, return_tensors="pt"
        )
        device = _device_of(self.text_model)
        emb = self.text_model.get_projected_text_embeddings(
            input_ids=tokens["input_ids"].to(device),
            attention_mask=tokens["attention_mask"].to(device),
            normalize_embeddings=True,
        )
        return emb.float().cpu()

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Per-sample cosine similarity [N] between each image and its prompt in BioViL-T's joint space."""
        return (self.features(images) * self.text_features(prompts)).sum(dim=-1)


# --- phantom scorer (phantom world FID / AMD) ---------------------------------------------------------


class PhantomFeatures:
    """Penultimate features of the phantom scorer (capsearch.metrics.scorer)."""

    def __init__(self, scorer: torch.nn.Module | None = None) -> None:
        self.scorer = scorer if scorer is not None else load_scorer()
        self.input_size = self.scorer.size
        self.name = "phantom-scorer"
        self.fingerprint = self.scorer.fingerprint()

    def features(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Scorer features [N, D] of images in [-1, 1]."""
        return self.scorer.features(images, batch_size=batch_size)


EXTRACTORS = {"xrv": XRVDenseNetFeatures, "biovil-t": BioViLT, "phantom": PhantomFeatures}


def get_extractor(name: str) -> FeatureExtractor:
    """A feature extractor by name: 'phantom' (phantom world), 'xrv' (real world FID/AMD) or 'biovil-t'."""
    if name not in EXTRACTORS:
        raise UserError(
            f"unknown feature extractor {name!r}; choose one of {', '.join(EXTRACTORS)}"
        )
    return EXTRACTORS[name]()


def resolve_extractor(name: str, model: str | Path | Any) -> str:
    """The extractor a name means: "auto" is the phantom scorer for a pixel-space model, xrv otherwise.

    `model` is a loaded pipeline (pixel space: no VAE) or a model as `load_pipeline` takes it (pixel
    space: a tiny model or a folder without vae/; a hub id is SD-style, with a VAE).
    """
    if name != "auto":
        return name
    if isinstance(model, (str, Path)):
        folder = Path(model).expanduser()
        pixel_space = model in TINY_MODELS or (folder.is_dir() and not (folder / "vae").is_dir())
    else:
        pixel_space = model.vae is None
    return "phantom" if pixel_space else "xrv"


# --- on-disk cache --------------------------------------------------------------------------------------


def _source_digest(source: torch.Tensor | Path, split: str, size: int) -> str:
    """Hash of a tensor's bytes, or of a dataset folder's metadata and image files (name, size, mtime)."""
    digest = hashlib.sha256()
    if torch.is_tensor(source):
        x = source.detach().cpu().float().contiguous()
        digest.update(json.dumps(list(x.shape)).encode())
        digest.update(x.numpy().tobytes())
        return digest.hexdigest()
    root = Path(source)
    meta = metadata_path(root)
    digest.update(f"{split}:{size}:".encode())
    digest.update(meta.read_bytes())
    # Image bytes are represented by (name, byte size, mtime) of each image the split lists: reading every
    # byte of a 100k-image dataset on each call would cost more than the extraction the cache saves. Only
    # listed files count, so a cache folder inside the dataset does not change the key.
    for record in read_metadata(root):
        if in_split(record, split):
            path = root / record["file_name"]
            stat = path.stat() if path.is_file() else None
            entry = f"{stat.st_size}:{stat.st_mtime_ns}" if stat else "missing"
            digest.update(f"{record['file_name']}:{entry}\n".encode())
    return digest.hexdigest()


def cached_features(
    extractor: FeatureExtractor,
    images_or_dataset_root: torch.Tensor | Path | str,
    cache_dir: Path | str,
    split: str = "train",
    size: int | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """Features of a tensor of images or a dataset split, computed once and cached under a content hash."""
    source = images_or_dataset_root
    if not torch.is_tensor(source):
        source = Path(source)
        if not source.is_dir():
            raise UserError(f"dataset folder {source} does not exist")
    size = int(size or getattr(extractor, "input_size", 64))
    key = hashlib.sha256(
        f"{extractor.fingerprint}:{_source_digest(source, split, size)}".encode()
    ).hexdigest()
    safe_name = re.sub(r"[^A-Za-z0-9_.-]+", "_", extractor.name)
    cache_dir = Path(cache_dir)
    path = cache_dir / f"{safe_name}-{key[:24]}.safetensors"
    if path.is_file():
        try:
            return load_file(str(path))["features"]
        except Exception:  # a truncated or foreign file: recompute and overwrite it
            pass
    if torch.is_tensor(source):
        images = source
    else:
        images = load_images(source, split, size)
    feats = extractor.features(images, batch_size=batch_size).float().contiguous()
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a reader never sees a half-written file (parallel trials share the cache).
    with tempfile.NamedTemporaryFile(dir=cache_dir, suffix=".tmp", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        save_file(
            {"features": feats}, str(tmp_path), metadata={"extractor": extractor.name, "key": key}
        )
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)
    return feats
