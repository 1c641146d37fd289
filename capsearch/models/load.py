"""Load a text-to-image diffusion pipeline: the shipped tiny base, a random tiny one, or a Stable Diffusion
1.x/2.x diffusers folder from disk or from the local Hugging Face cache (never from the network)."""

from __future__ import annotations

import json
import re
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from capsearch.errors import UserError
from capsearch.models.tiny import TINY_SCHEDULER_CONFIG, TINY_TEXT_CONFIG, build_tiny_unet
from capsearch.models.tokenizer import learn_bpe, load_clip_tokenizer, write_clip_vocabulary
from capsearch.worlds.shapes import make_shapes

ASSETS = Path(__file__).parents[1] / "assets"
TINY_BASE = ASSETS / "tiny_base"
TINY_BROAD = ASSETS / "tiny_broad"
TOKENIZER_DIR = ASSETS / "tokenizer"
# The shipped tiny bases by name, and the command each was built with (its capsearch.json has the rest):
# `tiny` pretrained on the shapes world; `tiny-broad` on the broad corpus (docs/models.md).
SHIPPED = {"tiny": TINY_BASE, "tiny-broad": TINY_BROAD}
REBUILD = {
    "tiny": "capsearch pretrain shapes --out capsearch/assets/tiny_base",
    "tiny-broad": "capsearch pretrain shapes --corpus broad --out capsearch/assets/tiny_broad "
    "(docs/results.md, 'The second world')",
}
# The tiny models `load_pipeline` knows by name: pixel space, without a VAE.
TINY_MODELS = ("tiny", "tiny-broad", "tiny:random")
# SD v1.5 on the Hub: runwayml's repository was removed; this maintained copy holds the same files.
SD15_HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# Hub ids of the same weights: whichever of them is cached serves a request for the other.
HUB_ALIASES = {"runwayml/stable-diffusion-v1-5": SD15_HUB_ID}
# What load_folder reads: `hf download` fetches only these (a hub repo may also hold single-file
# checkpoints, .bin and fp16 copies and a safety checker, tens of GB that capsearch never opens).
HUB_FILES = (
    "*.json",
    "*.txt",
    "text_encoder/model.safetensors",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
)


@dataclass
class Pipeline:
    """The parts of a Stable-Diffusion-style model that capsearch trains, samples and scores."""

    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    scheduler: object
    vae: torch.nn.Module | None = None
    spec: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        """Device of the UNet's parameters."""
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the UNet's parameters."""
        return next(self.unet.parameters()).dtype

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """Shape (C, H, W) of one sample in the UNet's space (pixels for tiny, latents for SD)."""
        cfg = self.unet.config
        return (cfg.in_channels, cfg.sample_size, cfg.sample_size)

    def to(self, device: torch.device | str) -> Pipeline:
        """Move every module to a device."""
        for module in (self.text_encoder, self.unet, self.vae):
            if module is not None:
                module.to(device)
        return self

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids padded to the tokenizer's maximum length."""
        return self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text-encoder hidden states [B, L, D]; "" gives the unconditional embedding."""
        ids = self.tokenize(prompts).to(self.text_encoder.device)
        return self.text_encoder(ids)[0].to(self.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Samples in [-1, 1]: pixels as they are, latents through the VAE."""
        if self.vae is None:
            return latents.clamp(-1, 1)
        images = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        return images.clamp(-1, 1)

    def save(self, out: Path, half: bool = False) -> Path:
        """Write a diffusers-style folder (unet/, text_encoder/, tokenizer/, scheduler/); half stores fp16."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for module, sub in ((self.unet, "unet"), (self.text_encoder, "text_encoder")):
            dtype = next(module.parameters()).dtype
            module.to(torch.float16 if half else dtype).save_pretrained(
                out / sub, safe_serialization=True
            )
            module.to(dtype)
        self.tokenizer.save_pretrained(out / "tokenizer")
        self.scheduler.save_pretrained(out / "scheduler")
        if self.vae is not None:
            self.vae.save_pretrained(out / "vae", safe_serialization=True)
        index = {"_class_name": "StableDiffusionPipeline", "_capsearch": True}
        (out / "model_index.json").write_text(json.dumps(index, indent=2))
        return out


def caption_corpus(n_shapes: int = 20000) -> list[str]:
    """Texts the tokenizer's BPE merges are learnt on: shape-world captions and radiology reports."""
    _, captions = make_shapes(n_shapes, size=8, seed=123)
    return captions + iu_impressions()


def iu_impressions() -> list[str]:
    """IMPRESSION texts of the Indiana University chest X-ray reports that torchxrayvision ships."""
    # lazy: torchxrayvision loads only where its data or weights are read
    import torchxrayvision

    path = Path(torchxrayvision.__file__).parent / "data" / "NLMCXR_reports.tgz"
    texts = []
    pattern = re.compile(r'<AbstractText Label="IMPRESSION">(.*?)</AbstractText>', re.S)
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.endswith(".xml"):
                m = pattern.search(tar.extractfile(member).read().decode("utf-8", "replace"))
                if m and m.group(1).strip():
                    texts.append(" ".join(m.group(1).split()))
    return texts


def build_tokenizer(out: Path = TOKENIZER_DIR, num_merges: int = 3000) -> Path:
    """Learn the tiny model's BPE vocabulary from capsearch's corpora and write it in CLIP's format."""
    return write_clip_vocabulary(out, learn_bpe(caption_corpus(), num_merges=num_merges))


def tiny_random(seed: int = 0) -> Pipeline:
    """The tiny architecture with random weights (same classes as SD v1.5), for tests."""
    # lazy: diffusers' heavy modules load only on this path
    from diffusers import DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = load_clip_tokenizer(TOKENIZER_DIR)
    torch.manual_seed(seed)
    text_cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_TEXT_CONFIG,
    )
    text_encoder = CLIPTextModel(text_cfg)
    unet = build_tiny_unet(seed)
    scheduler = DDPMScheduler(**TINY_SCHEDULER_CONFIG)
    text_encoder.requires_grad_(False).eval()
    return Pipeline(tokenizer, text_encoder, unet, scheduler, None, spec="tiny:random")


def resolve_folder(spec: str) -> Path:
    """A local diffusers folder, or a hub id already in the local Hugging Face cache."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "unet").is_dir():
            raise UserError(
                f"model folder {path} has no unet/ subfolder (expected a diffusers pipeline folder)"
            )
        return path
    if path.exists():
        raise UserError(f"model path {path} is not a folder")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        return _cached_hub_folder(spec)
    raise UserError(
        f"model {spec!r} not found: give 'tiny', 'tiny:random', a diffusers folder or a hub id"
    )


def hub_names(spec: str) -> list[str]:
    """A hub id, then the other ids of the same weights (HUB_ALIASES, either way)."""
    same = {**HUB_ALIASES, **{new: old for old, new in HUB_ALIASES.items()}}
    return [spec, same[spec]] if spec in same else [spec]


def download_command(hub_id: str) -> str:
    """The `hf download` line (huggingface_hub's CLI) that fetches what capsearch loads of a hub id."""
    return f"hf download {hub_id} " + " ".join(f'--include "{p}"' for p in HUB_FILES)


def _cached_hub_folder(spec: str) -> Path:
    """The snapshot folder of a hub id (or of an alias of it) in the local Hugging Face cache."""
    # lazy: the hub client loads only for a model named by hub id
    from huggingface_hub import constants, snapshot_download

    for name in hub_names(spec):
        try:
            folder = Path(snapshot_download(name, local_files_only=True))
        except Exception:  # not cached (huggingface_hub raises several kinds): try the next name
            continue
        if name != spec:
            warnings.warn(
                f"model {spec!r}: using the cached {name!r} (the same weights)", stacklevel=3
            )
        return folder
    maintained = HUB_ALIASES.get(spec, spec)
    renamed = f" (now {maintained!r} on the Hub)" if maintained != spec else ""
    raise UserError(
        f"model {spec!r}{renamed} is not in the local Hugging Face cache; on a machine with internet "
        f"run `{download_command(maintained)}`, then copy the folder "
        f"models--{maintained.replace('/', '--')} of its cache into {constants.HF_HUB_CACHE} here "
        "(HF_HUB_CACHE), or pass a local diffusers folder"
    )


def load_folder(path: Path, spec: str = "") -> Pipeline:
    """Load a diffusers-style folder: SD 1.x/2.x (with VAE; ε- or v-prediction, as its scheduler config
    says) or a saved tiny pipeline (pixel space)."""
    # lazy: diffusers' heavy modules load only on this path
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    tlog.disable_progress_bar()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    path = Path(path)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(path / "tokenizer"))
        text_encoder = CLIPTextModel.from_pretrained(
            str(path / "text_encoder"), use_safetensors=True, torch_dtype=torch.float32
        )
        unet = UNet2DConditionModel.from_pretrained(
            str(path / "unet"), use_safetensors=True, torch_dtype=torch.float32
        )
        scheduler = DDPMScheduler.from_pretrained(str(path / "scheduler"))
        vae = None
        if (path / "vae").is_dir():
            vae = AutoencoderKL.from_pretrained(str(path / "vae"), use_safetensors=True)
            vae.requires_grad_(False).eval()
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load model from {path}: {first}") from None
    text_encoder.requires_grad_(False).eval()
    meta_path = path / "capsearch.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return Pipeline(
        tokenizer, text_encoder, unet, scheduler, vae, spec=spec or str(path), meta=meta
    )


def load_pipeline(spec: str = "tiny") -> Pipeline:
    """Load `tiny`, `tiny-broad`, `tiny:random`, a local diffusers folder or a cached hub id; missing → one-line UserError."""
    if spec == "tiny:random":
        return tiny_random()
    if spec in SHIPPED:
        folder = SHIPPED[spec]
        if not (folder / "unet").is_dir():
            raise UserError(
                f"the {spec} base model is missing from {folder}; build it with `{REBUILD[spec]}`"
            )
        return load_folder(folder, spec=spec)
    return load_folder(resolve_folder(spec), spec=spec)
