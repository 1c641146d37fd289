"""Export one trial of a run: a complete pipeline folder, its delta, LoRA files, an SD checkpoint, a card.

EXPORT/                       the base pipeline with the trial's merged UNet (docs/export.md)
EXPORT/unet/                  the merged UNet
EXPORT/delta/                 only the trained tensors and the method entries
EXPORT/pytorch_lora_weights.safetensors, EXPORT/<name>_lora.safetensors    --lora (LoRA trials)
EXPORT/<name>.safetensors     --single-file: SD 1.x original layout (A1111, ComfyUI)
EXPORT/method_spec.yaml, README.md (model card), metrics.json, final/
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capsearch.errors import UserError
from capsearch.export.card import data_name, model_card
from capsearch.export.lora import MERGED_ONLY, lora_only_error, write_lora_files
from capsearch.export.pipeline import base_folder, components_of, write_pipeline_folder
from capsearch.export.single_file import check_sd1, write_single_file
from capsearch.methods import Applied
from capsearch.models.delta import load_delta, merge, read_spec
from capsearch.models.load import load_pipeline
from capsearch.reporting.describe import best_config_yaml
from capsearch.search.constraints import Constraints
from capsearch.search.records import CORRUPT, TrialRecord
from capsearch.search.runs import best_trial, corrupt_error, load_trials, read_run_spec

__all__ = ["Export", "export_trial", "model_card", "select_trial"]

# What an export copies from the trial folder besides its delta, where the trial has it.
EXTRAS = ("metrics.json", "samples.png", "final/metrics.json", "final/samples.png")
# Generated images stay out of a MIMIC-CXR export: a memorising model's samples are its training images.
IMAGES = ("samples.png", "final/samples.png")


@dataclass
class Export:
    """What export_trial wrote: one line per file (what it is, how to load it) and notes."""

    out: Path
    lines: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def select_trial(
    records: list[TrialRecord], which: str = "best", constraints: Constraints | None = None
) -> TrialRecord:
    """The trial named `which`: best (highest final-stage reward, else search reward, those within the
    spec's constraints first), tNNN, NNN, or a baseline."""
    if not records:
        raise UserError("the run has no finished trials yet")
    if which == "best":
        best = best_trial(records, constraints)
        if best is None:
            raise UserError("no trial of this run finished successfully; nothing to export")
        return best
    digits = which[1:] if which.startswith("t") else which
    for record in records:
        if which in (record.folder.name, record.baseline):
            return record
        if digits.isdigit() and int(digits) == record.number:
            return record
    names = ", ".join(r.folder.name for r in records)
    raise UserError(f"no trial {which!r} in this run (trials: {names}; or best)")


def _checked_extras(trial: Path, mimic: bool) -> list[str]:
    extras = [e for e in EXTRAS if (trial / e).is_file() and not (mimic and e in IMAGES)]
    for extra in (e for e in extras if e.endswith(".json")):  # a damaged copy is not exported
        try:
            json.loads((trial / extra).read_text())
        except (OSError, ValueError):
            raise UserError(
                corrupt_error(trial / extra, "or delete it to export without it")
            ) from None
    return extras


def _attack_settings(trial: Path, final: bool) -> dict[str, Any]:
    """The evaluation settings (attack size) beside the metrics the card shows."""
    path = trial / ("final/metrics.json" if final else "metrics.json")
    try:
        return json.loads(path.read_text()).get("settings") or {}
    except (OSError, ValueError, AttributeError):
        return {}


def export_trial(
    run_dir: Path, out: Path, which: str = "best", *, lora: bool = False, single_file: bool = False
) -> Export:
    """Write one trial as a pipeline folder with delta/, method spec and card; LoRA files and one SD
    checkpoint on request. Every check runs before `out` is made."""
    run_dir, out = Path(run_dir), Path(out)
    spec = read_run_spec(run_dir)
    record = select_trial(load_trials(run_dir), which, spec.objective.constraints)
    name, trial = record.folder.name, record.folder
    if record.status == CORRUPT:
        raise UserError(record.error or f"trial {name} is corrupt")
    if record.status != "ok":
        raise UserError(f"trial {name} did not finish successfully ({record.status})")
    delta = trial / "delta"
    if not (delta / "delta.safetensors").is_file():
        raise UserError(f"trial {name} has no delta ({delta} is missing)")
    if out.exists() and not out.is_dir():
        raise UserError(f"export folder {out} is a file; choose a new folder")
    parent = next((p for p in out.resolve().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UserError(f"export folder {out}: {parent} is a file, not a folder")
    if out.resolve().is_relative_to(run_dir.resolve()):
        # an export inside the run would copy the trial into itself, and the run folder is the search's
        raise UserError(
            f"export folder {out} is inside the run folder {run_dir}; choose one outside it"
        )
    if out.exists() and any(out.iterdir()):
        raise UserError(f"export folder {out} is not empty; choose a new one")
    _, mimic = data_name(spec)
    extras = _checked_extras(trial, mimic)
    entries = read_spec(delta)["methods"]
    if lora and lora_only_error(entries):
        raise UserError(f"trial {name}: {lora_only_error(entries)}")
    pipe = load_pipeline(spec.model)  # a missing base: one line naming what to download
    base = base_folder(spec.model)
    if base is not None:
        components_of(base)  # a base without the components its index names: one line
    if single_file:
        check_sd1(pipe.unet, pipe.vae, pipe.text_encoder)  # pixel-space, SD 2.x, SDXL: one line
    unet = load_delta(pipe.unet, delta)  # a delta it cannot read: one line, before --out is made

    out.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^\w.-]+", "_", f"capsearch_{spec.name}_{name}")
    result = Export(out=out)
    files: list[str] = []

    def wrote(path: str, what: str, code: str = "", where: str = "") -> None:
        """One printed line (real paths) and one card line (EXPORT for this folder) per file."""
        extra = [where] if where else []
        printed = extra + ([code.format(root=out)] if code else [])
        carded = extra + ([f"`{code.format(root='EXPORT')}`"] if code else [])
        result.lines.append(
            f"{out}/{path}  {what}" + (": " + "; ".join(printed) if printed else "")
        )
        shown = f"`{path}`" if path else "this folder"
        files.append(f"{shown} — {what}" + (": " + "; ".join(carded) if carded else ""))

    if lora:
        applied = Applied(names=[], entries=entries, rates={})
        lora_files = write_lora_files(unet, out, applied, f"{stem}_lora.safetensors")
    merged = merge(unet)
    folder = write_pipeline_folder(out, merged, pipe, base)
    source = f"from {base}" if base is not None else "written from the random base"
    if folder.latent:
        wrote("", "pipeline folder", 'StableDiffusionPipeline.from_pretrained("{root}")')
    else:
        wrote("", "pipeline folder", 'capsearch.models.load.load_pipeline("{root}")')
    result.lines[-1] += f"  ({folder.placed()} {source})"
    wrote("unet/", "merged UNet", 'UNet2DConditionModel.from_pretrained("{root}/unet")')
    shutil.copytree(delta, out / "delta")
    wrote(
        "delta/",
        "trained tensors only",
        'capsearch.models.delta.load_delta(base_unet, "{root}/delta")',
    )
    if lora:
        model = spec.model.replace("{", "{{").replace("}", "}}")  # `how` is formatted below
        if folder.latent:
            how = f'StableDiffusionPipeline.from_pretrained("{model}")'
            how += '.load_lora_weights("{root}")'
        else:
            how = f'capsearch.models.load.load_pipeline("{model}").unet'
            how += '.load_lora_adapter("{root}", prefix="unet", use_safetensors=True)'
        wrote(lora_files[0].name, "diffusers LoRA, into the BASE pipeline", how)
        where = "ComfyUI models/loras/, A1111 models/Lora/, with the base model loaded"
        wrote(lora_files[1].name, "kohya LoRA", where=where)
    if single_file:
        path = write_single_file(out / f"{stem}.safetensors", merged, pipe.vae, pipe.text_encoder)
        code = (
            f'StableDiffusionPipeline.from_single_file("{{root}}/{path.name}", config="{{root}}")'
        )
        where = "A1111 models/Stable-diffusion/, ComfyUI models/checkpoints/"
        wrote(path.name, "SD 1.x checkpoint", code, where)
    (out / "method_spec.yaml").write_text(
        f"# trial {name} of {run_dir}\n# base model: {spec.model}\n" + best_config_yaml(record)
    )
    wrote("method_spec.yaml", "the method per unit group, training settings and mitigations")
    for extra in extras:
        (out / extra).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(trial / extra, out / extra)
    if extras:
        wrote(", ".join(extras), "the trial's evaluation records")
    settings = _attack_settings(trial, record.final is not None)
    card = model_card(record, spec.model, name, spec=spec, files=files, settings=settings)
    (out / "README.md").write_text(card)
    result.lines.append(f"{out}/README.md  model card: base, methods, data, metrics, memorisation")
    merged_only = sorted({e["method"] for e in entries} & set(MERGED_ONLY))
    if merged_only:
        result.notes.append(
            f"{', '.join(merged_only)}: no diffusers loader reads these adapters; exported as merged "
            "weights only (the pipeline folder, unet/)"
        )
    elif not lora and lora_only_error(entries) is None:
        result.notes.append("a LoRA trial: add --lora for diffusers and kohya LoRA files")
    if mimic:
        result.notes.append(
            "MIMIC-CXR: share only under its PhysioNet credentialed data-use agreement (README.md); "
            "sample images were left out"
        )
    return result
