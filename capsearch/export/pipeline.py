"""A complete pipeline folder around a merged UNet: the base's other components, hard-linked or copied.

Stable Diffusion bases (a diffusers folder or a hub id in the local cache) get the components that their
model_index.json names, so `DiffusionPipeline.from_pretrained(EXPORT)` loads the base pipeline with the
trial's UNet. Files are hard-linked where the export and the base share a filesystem: no disk space is
spent and, unlike symlinks, a hard link keeps working when the cache is moved, cleaned or the export is
copied elsewhere. Across filesystems (or where links are refused) they are copied. capsearch's pixel-space
tiny bases have no VAE and load with `capsearch.models.load.load_pipeline(EXPORT)`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from capsearch.errors import UserError
from capsearch.models.load import SHIPPED, TINY_MODELS, resolve_folder

if TYPE_CHECKING:
    import torch

    from capsearch.models.load import Pipeline

# Weight formats a component folder may also hold; where it has safetensors, the rest is left behind.
_OTHER_WEIGHTS = (".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx", ".pb")
# Root files of a capsearch pipeline folder besides the components (load_folder reads capsearch.json).
_ROOT_FILES = ("model_index.json", "capsearch.json")


@dataclass
class PipelineFolder:
    """What write_pipeline_folder placed: the components and how their files got there."""

    components: list[str]
    how: Counter = field(
        default_factory=Counter
    )  # "hard-linked" / "copied" / "written": file counts
    latent: bool = True  # a Stable Diffusion pipeline (with VAE), else capsearch's pixel-space tiny

    def placed(self) -> str:
        """How the base's files got into the export, in words."""
        parts = [f"{n} {how}" for how, n in sorted(self.how.items())]
        return ", ".join(parts) if parts else "nothing placed"


def base_folder(spec: str) -> Path | None:
    """The base model's folder on disk (None for `tiny:random`, which exists only in memory)."""
    if spec in SHIPPED:
        return SHIPPED[spec]
    if spec in TINY_MODELS:
        return None
    return resolve_folder(spec)


def components_of(folder: Path) -> list[str]:
    """The component folders a pipeline folder's model_index.json names (all subfolders for capsearch's)."""
    index_path = folder / "model_index.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        raise UserError(
            f"base model folder {folder} has no readable model_index.json; cannot build a pipeline "
            "folder from it"
        ) from None
    named = [k for k, v in index.items() if isinstance(v, list) and v and v[0] is not None]
    if not named and index.get("_capsearch"):
        named = sorted(p.name for p in folder.iterdir() if p.is_dir())
    missing = [name for name in named if not (folder / name).is_dir()]
    if missing:
        raise UserError(
            f"base model folder {folder} lacks {', '.join(missing)} (named in its model_index.json); "
            "download the complete model to export a pipeline folder"
        )
    return [name for name in named if name != "unet"]


def _place(source: Path, target: Path, how: Counter) -> None:
    """Hard-link one file (its resolved blob: hub caches hold symlinks), else copy it."""
    real = source.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(real, target)
        how["hard-linked"] += 1
    except OSError:  # EXDEV (another filesystem), EPERM (links refused): copy
        shutil.copy2(real, target)
        how["copied"] += 1


def _component_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() or p.is_symlink())
    if any(p.suffix == ".safetensors" for p in files):
        files = [p for p in files if p.suffix not in _OTHER_WEIGHTS]
    return files


def write_pipeline_folder(
    out: Path, merged_unet: torch.nn.Module, pipe: Pipeline, base: Path | None
) -> PipelineFolder:
    """Write `unet/` (the merged UNet) and the base's other components and index into `out`."""
    out = Path(out)
    result = PipelineFolder(components=["unet"], latent=pipe.vae is not None)
    if base is None:  # tiny:random: the same random base, written from memory as Pipeline.save does
        merged_unet.save_pretrained(out / "unet", safe_serialization=True)
        pipe.text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
        pipe.tokenizer.save_pretrained(out / "tokenizer")
        pipe.scheduler.save_pretrained(out / "scheduler")
        index = {"_class_name": "StableDiffusionPipeline", "_capsearch": True}
        (out / "model_index.json").write_text(json.dumps(index, indent=2))
        result.components += ["text_encoder", "tokenizer", "scheduler"]
        result.how["written"] += 3
        return result
    components = components_of(base)  # a broken base fails here, before anything is written
    merged_unet.save_pretrained(out / "unet", safe_serialization=True)
    for name in components:
        for source in _component_files(base / name):
            _place(source, out / name / source.relative_to(base / name), result.how)
    for name in _ROOT_FILES:  # small, and edited by hand at times: copied, never linked
        if (base / name).is_file():
            shutil.copy2((base / name).resolve(), out / name)
    result.components += components
    return result
