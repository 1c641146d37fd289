"""Export one trial of a run: its delta, its method spec, a merged diffusers UNet and a model card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from capsearch.errors import UserError
from capsearch.report import best_config_yaml, display_name, final_view
from capsearch.runs import CORRUPT, best_trial, corrupt_error, load_trials, read_run_spec

# What an export copies from the trial folder besides its delta, where the trial has it.
EXTRAS = ("metrics.json", "samples.png", "final/metrics.json", "final/samples.png")


def select_trial(records: list[dict[str, Any]], which: str = "best") -> dict[str, Any]:
    """The trial named `which`: best (highest final-stage reward, else search reward), tNNN, NNN, or a baseline."""
    if not records:
        raise UserError("the run has no finished trials yet")
    if which == "best":
        best = best_trial(records)
        if best is None:
            raise UserError("no trial of this run finished successfully; nothing to export")
        return best
    digits = which[1:] if which.startswith("t") else which
    for record in records:
        if which in (Path(record.get("dir", "")).name, record.get("baseline")):
            return record
        if digits.isdigit() and int(digits) == record.get("number"):
            return record
    names = ", ".join(Path(r.get("dir", "")).name for r in records)
    raise UserError(f"no trial {which!r} in this run (trials: {names}; or best)")


def export_trial(run_dir: Path, out: Path, which: str = "best") -> Path:
    """Write delta/, method_spec.yaml, a merged `unet/` folder and README.md for one trial."""
    from capsearch.delta import load_delta, merge
    from capsearch.models import load_pipeline

    run_dir, out = Path(run_dir), Path(out)
    spec = read_run_spec(run_dir)
    record = select_trial(load_trials(run_dir), which)
    name = Path(record["dir"]).name
    if record.get("status") == CORRUPT:
        raise UserError(record["error"])
    if record.get("status") != "ok":
        raise UserError(f"trial {name} did not finish successfully ({record.get('status')})")
    delta = Path(record["dir"]) / "delta"
    if not (delta / "delta.safetensors").is_file():
        raise UserError(f"trial {name} has no delta ({delta} is missing)")
    if out.exists() and not out.is_dir():
        raise UserError(f"export folder {out} is a file; choose a new folder")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"export folder {out} is not empty; choose a new one")
    extras = [e for e in EXTRAS if (Path(record["dir"]) / e).is_file()]
    for extra in (e for e in extras if e.endswith(".json")):  # a damaged copy is not exported
        try:
            json.loads((Path(record["dir"]) / extra).read_text())
        except (OSError, ValueError):
            path = Path(record["dir"]) / extra
            raise UserError(corrupt_error(path, "or delete it to export without it")) from None
    pipe = load_pipeline(spec.model)
    unet = load_delta(pipe.unet, delta)  # a delta it cannot read: one line, before --out is made
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(delta, out / "delta")
    (out / "method_spec.yaml").write_text(
        f"# trial {name} of {run_dir}\n# base model: {spec.model}\n" + best_config_yaml(record)
    )
    for extra in extras:
        (out / extra).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(record["dir"]) / extra, out / extra)
    merge(unet).save_pretrained(out / "unet", safe_serialization=True)
    (out / "README.md").write_text(model_card(record, spec.model, name))
    return out


def model_card(record: dict[str, Any], base_model: str, name: str) -> str:
    """A model card (Hugging Face README.md) with the trial's method, settings and metrics."""
    final = record.get("final")
    view = final_view(record) if final else record
    metrics, intervals = view.get("metrics", {}), view.get("intervals") or {}
    where = (
        f"the final re-evaluation ({final.get('split')} split, sampling seed {final.get('seed')}, "
        "on images the search never scored)"
        if final
        else "the search's evaluation (no final re-evaluation: the numbers it was selected on)"
    )
    front = {
        "library_name": "diffusers",
        "base_model": base_model,
        "tags": ["capsearch", "text-to-image", "chest-x-ray", "memorisation-mitigation"],
    }
    from capsearch.metrics.table import METRICS

    lines = []
    for metric in METRICS:  # the metric table's rows (capsearch.metrics.table)
        label, key, fmt = metric.label, metric.name, metric.fmt
        value = metrics.get(key) if metric.card else None
        if value is None:
            continue
        ci = intervals.get(key)
        shown = f"[{format(ci[0], fmt)}, {format(ci[1], fmt)}]" if ci else "–"
        lines.append(f"| {label} | {format(value, fmt)} | {shown} |")
    if view.get("reward") is not None:
        lines.append(f"| reward ↑ | {view['reward']:.3f} | – |")
    table = "\n".join(lines)
    settings = json.dumps(record.get("train", {}), indent=2, default=str)
    return f"""---
{yaml.safe_dump(front, sort_keys=False).strip()}
---

# {display_name(record)} — capsearch trial {name}

A UNet fine-tuned from `{base_model}` by capsearch, which searches which parts of a text-to-image
diffusion UNet to train so that it learns chest X-rays without memorising its training images
(Dutt et al., ICML 2024, "Capacity Control is an Effective Memorization Mitigation Mechanism in
Text-Conditional Diffusion Models"). Only the UNet changed; text encoder, tokenizer, scheduler (and
VAE) are the base model's.

## Files

- `unet/` — the merged UNet: `UNet2DConditionModel.from_pretrained("unet")`, then use it in place
  of the base pipeline's UNet.
- `delta/` — only the trained tensors and the method spec (`capsearch.delta.load_delta` applies them
  to the base UNet).
- `method_spec.yaml` — the method per unit group, training settings and mitigations.
- `metrics.json`, `samples.png` — the trial's evaluation during the search; `final/` — its final
  re-evaluation, if it was a finalist.

## Evaluation

From {where}; 95% intervals resample or delete whole prompts (capsearch docs/metrics.md).

| metric | value | 95% interval |
|---|---:|---:|
{table}

Evaluated on {record.get("trainable", 0):,} trainable of {record.get("total", 0):,} UNet parameters.
The metrics come from capsearch's evaluation of this trial (settings in `metrics.json`); they are
not comparable across feature extractors or data sets.

## Training settings

```json
{settings}
```

## Limitations

Fine-tuned generative models can reproduce training images. The extraction attack and AMD above
estimate that risk on the training data; they do not prove its absence. Do not share samples of a
model trained on patient data without the data owner's approval.
"""
