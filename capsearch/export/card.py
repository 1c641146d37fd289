"""The model card (README.md) of an export: base model, method per unit group, data, metrics, memorisation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from capsearch.config import Spec
from capsearch.metrics.table import BY_NAME, METRICS, Metric, column_metrics
from capsearch.reporting.describe import display_name
from capsearch.reporting.report import final_view
from capsearch.search.choice import POOLED, final_choice, pooled_bound, pooled_counts
from capsearch.search.records import Evaluation, SeedMean, TrialRecord

# PhysioNet's credentialed licence covers MIMIC-CXR: data, and models that can reproduce it, stay
# among people who signed the same agreement.
MIMIC_TERMS = (
    "MIMIC-CXR is credentialed-access data: its PhysioNet Credentialed Health Data Use Agreement "
    "forbids sharing the data with anyone who has not signed it, and a model that can reproduce its "
    "training images shares them. Share this model (and its samples) only with people credentialed "
    "under the same agreement, for example through PhysioNet, whatever the memorisation numbers below "
    "say: they estimate the risk, they do not rule it out."
)


def is_mimic(path: str | Path) -> bool:
    """Whether a data folder holds MIMIC-CXR (`capsearch data mimic` writes dicom_id into each record)."""
    path = Path(path).expanduser()
    if "mimic" in str(path).lower():
        return True
    try:
        with (path / "metadata.jsonl").open(encoding="utf-8") as handle:
            first = next((line for line in handle if line.strip()), "")
        return "dicom_id" in json.loads(first)
    except (OSError, ValueError, TypeError):
        return False


def data_name(spec: Spec | None) -> tuple[str, bool]:
    """The training data's name for the card (never its images) and whether it is MIMIC-CXR."""
    if spec is None:
        return "not recorded", False
    if spec.data.phantom is not None:
        p = spec.data.phantom
        return (
            f"capsearch phantom chest X-rays: procedurally generated, {p.patients} synthetic "
            f"patients at {p.size} px, seed {p.seed} (no patient data)",
            False,
        )
    folder = Path(spec.data.path).name or spec.data.path
    if is_mimic(spec.data.path):
        return (
            f"MIMIC-CXR-JPG (PhysioNet), frontal views captioned with their reports' IMPRESSION or "
            f"FINDINGS, imported with `capsearch data mimic` (folder `{folder}`)",
            True,
        )
    return f"the image-caption folder `{folder}` (metadata.jsonl / metadata.csv)", False


def _group_rows(record: TrialRecord, spec: Spec | None) -> list[str]:
    groups = record.groups
    if groups:
        units = {g.name: ", ".join(g.units) for g in spec.space.groups} if spec else {}
        rows = [f"| {g} | {units.get(g, '–')} | {m} |" for g, m in groups.items()]
        return ["| unit group | units | method |", "|---|---|---|", *rows]
    rows = []
    for entry in record.method_spec or []:
        hyper = {k: v for k, v in entry.items() if k not in ("method", "units")}
        units = entry.get("units", "*")
        units = ", ".join(units) if isinstance(units, list) else units
        rows.append(f"| {units} | {entry['method']} | {json.dumps(hyper) if hyper else '–'} |")
    return ["| units | method | settings |", "|---|---|---|", *(rows or ["| – | freeze | – |"])]


def _interval(intervals: dict, key: str, fmt: str) -> str:
    ci = intervals.get(key)
    return f" (95% interval {format(ci[0], fmt)}–{format(ci[1], fmt)})" if ci else ""


def memorisation_lines(view: TrialRecord, settings: dict[str, Any]) -> list[str]:
    """The extraction attack's count and AMD, as sentences with their intervals."""
    metrics, intervals = view.metrics, view.intervals
    lines = []
    if metrics.get("extracted") is not None:
        attack = ""
        if settings.get("attack_prompts"):
            attack = (
                f" generating {settings.get('extraction_n', '?')} images for each of "
                f"{settings['attack_prompts']} training captions"
            )
        lines.append(
            f"- Extraction attack (Carlini et al. 2023){attack}: **{metrics['extracted']:.0f} "
            f"training image(s) extracted**{_interval(intervals, 'extracted', '.1f')}."
        )
    else:
        lines.append("- Extraction attack: not run in this evaluation.")
    if metrics.get("amd") is not None:
        ref = metrics.get("amd_heldout")
        against = (
            f"; held-out real images score {ref:.3f} (an AMD below theirs means samples sit closer "
            "to the training images than new images of the same kind do)"
            if ref is not None
            else ""
        )
        lines.append(
            f"- AMD (mean cosine distance of each sample to its nearest training image in feature "
            f"space, higher is safer): **{metrics['amd']:.3f}**"
            f"{_interval(intervals, 'amd', '.3f')}{against}."
        )
    return lines


def _seed(settings: dict[str, Any] | None, key: str) -> str:
    value = (settings or {}).get(key)
    return "not recorded" if value is None else str(value)


def _split_and_seed(settings: dict[str, Any] | None) -> str:
    """`validate split, sampling seed 0` of an evaluation's settings (an older record: not recorded)."""
    split, seed = (settings or {}).get("split"), (settings or {}).get("seed")
    if split is None or seed is None:
        return "a split and sampling seed the record does not hold"
    return f"{split} split, sampling seed {seed}"


def _with_interval(run: Evaluation, metric: Metric) -> str:
    value = run.value(metric.name)
    if value is None:
        return "–"
    ci = run.intervals.get(metric.name)
    text = format(value, metric.fmt)
    return text + (f" [{format(ci[0], metric.fmt)}, {format(ci[1], metric.fmt)}]" if ci else "")


def seed_lines(record: TrialRecord) -> list[str]:
    """The card's "Seeds": the exported training's seed, the evaluation's split and sampling seed, and
    the other training seeds the final stage evaluated before the choice, each seed's metrics with
    their 95% intervals and the extraction bound pooled over them."""
    final, own = record.final, _seed(record.train, "seed")
    searched = _split_and_seed(record.evaluate)
    lines = [f"- Training seed of these weights: {own} (`train.seed`)."]
    if final is None:
        return lines + [f"- Evaluated once, by the search: {searched}."]
    lines.append(f"- Evaluated by the final stage on the {final.split} split with sampling seed "
                 f"{final.seed} (the search evaluated it on the {searched}).")  # fmt: skip
    if not final.seeds:
        return lines
    others = ", ".join(str(s.train_seed) for s in final.seeds)
    lines.append(f"- Also trained on training seed(s) {others} (`final.train_seeds`) and evaluated the "
                 "same way before it was chosen; those weights are not in this export.")  # fmt: skip
    runs: list[Evaluation] = [final, *final.seeds]
    shown = [m for m in (*column_metrics(), BY_NAME[POOLED])
             if any(r.value(m.name) is not None for r in runs)]  # fmt: skip
    header = ["training seed", *(m.label for m in shown), "reward ↑"]
    rows = [[f"{own} (exported)" if r is final else str(r.train_seed),
             *(_with_interval(r, m) for m in shown), _fmt(r.reward)] for r in runs]  # fmt: skip
    lines += ["", "Each seed's final evaluation, values with their 95% intervals:", "",
              "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
              *("| " + " | ".join(row) + " |" for row in rows)]  # fmt: skip
    counts = pooled_counts(runs)
    if counts is not None:
        lines += ["", f"Pooled over the {len(runs)} trainings: {counts[0]} of {counts[1]} attacked "
                  "captions yielded an extraction; one-sided 95% Wilson upper bound on the extraction "
                  f"rate {pooled_bound(runs):.3f}."]  # fmt: skip
    return lines


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def model_card(
    record: TrialRecord,
    base_model: str,
    name: str,
    *,
    spec: Spec | None = None,
    files: list[str] | None = None,
    settings: dict[str, Any] | None = None,
) -> str:
    """A model card (Hugging Face README.md) with the trial's methods, data, metrics and memorisation."""
    final = record.final
    view = final_view(record) if final is not None else record
    metrics, intervals = view.metrics, view.intervals
    where = (
        f"the final re-evaluation ({final.split} split, sampling seed {final.seed}, "
        "on images the search never scored)"
        if final is not None
        else "the search's evaluation (no final re-evaluation: the numbers it was selected on)"
    )
    pooled = final_choice(final) if final is not None else None
    if isinstance(pooled, SeedMean):  # final.train_seeds: chosen on the mean over trainings
        where += (
            f"; it was chosen on its final reward averaged over {pooled.n_seeds} training seeds "
            f"({_fmt(pooled.reward)}), and these numbers are those of the exported training"
        )
    data, mimic = data_name(spec)
    front = {
        "library_name": "diffusers",
        "base_model": base_model,
        "tags": ["capsearch", "text-to-image", "chest-x-ray", "memorisation-mitigation"],
    }
    if mimic:
        front["license"] = "other"
        front["license_name"] = "physionet-credentialed-health-data-license-1.5.0"
    rows = []
    for metric in METRICS:  # the metric table's rows (capsearch.metrics.table)
        value = metrics.get(metric.name) if metric.card else None
        if value is None:
            continue
        ci = intervals.get(metric.name)
        shown = f"[{format(ci[0], metric.fmt)}, {format(ci[1], metric.fmt)}]" if ci else "–"
        rows.append(f"| {metric.label} | {format(value, metric.fmt)} | {shown} |")
    if view.reward is not None:
        rows.append(f"| reward ↑ | {view.reward:.3f} | – |")
    trained = ""
    if record.total:
        trained = (
            f"Evaluated on {record.trainable or 0:,} trainable of {record.total:,} UNet "
            "parameters.\n"
        )
    file_lines = "\n".join(f"- {line}" for line in files or [])
    terms = f"\n## Data-use terms\n\n{MIMIC_TERMS}\n" if mimic else ""
    return f"""---
{yaml.safe_dump(front, sort_keys=False).strip()}
---

# {display_name(record)} — capsearch trial {name}

A UNet fine-tuned from `{base_model}` by capsearch, which searches which parts of a text-to-image
diffusion UNet to train so that it learns chest X-rays without memorising its training images
(Dutt et al., ICML 2024, "Capacity Control is an Effective Memorization Mitigation Mechanism in
Text-Conditional Diffusion Models"). Only the UNet changed; text encoder, tokenizer, scheduler (and
VAE) are the base model's.

- Base model: `{base_model}`
- Training data: {data}
{terms}
## Method per unit group

{chr(10).join(_group_rows(record, spec))}

`method_spec.yaml` holds every entry with its hyper-parameters, the training settings and mitigations.

## Files

EXPORT stands for this folder.

{file_lines}

## Evaluation

From {where}; 95% intervals resample or delete whole prompts (capsearch docs/metrics.md).

| metric | value | 95% interval |
|---|---:|---:|
{chr(10).join(rows)}

{trained}The metrics come from capsearch's evaluation of this trial (settings in `metrics.json`); they are
not comparable across feature extractors or data sets.

## Memorisation

{chr(10).join(memorisation_lines(view, settings or {}))}

## Seeds

{chr(10).join(seed_lines(record))}

## Training settings

```json
{json.dumps(record.train or {}, indent=2, default=str)}
```

## Limitations

Fine-tuned generative models can reproduce training images. The extraction attack and AMD above
estimate that risk on the training data; they do not prove its absence. Do not share samples of a
model trained on patient data without the data owner's approval.
"""
