"""How a trial is named for people: the paper's names of the baselines, short texts of a searched
trial's methods and mitigations, and the YAML snippet that reproduces it.

Shared by report.md, the plots, the search statistics, the model card and the terminal's tables.
"""

from __future__ import annotations

from typing import Any

import yaml

from capsearch.search.records import TrialRecord
from capsearch.search.space import base_mitigations

# The paper's names (Dutt et al. 2024, Tables 1-2) for the baseline methods and mitigations.
PAPER_NAMES = {
    "freeze": "Freeze",
    "full": "Full FT",
    "attention": "Attn Tuning",
    "difffit": "DiffFit",
    "svdiff": "SV-DIFF",
    "rwa": "RWA",
    "threshold": "Threshold Mitigation",
}


def display_name(record: TrialRecord) -> str:
    """A trial's name for tables: the paper's name for a baseline, the group methods otherwise."""
    if record.baseline:
        method, _, mitigation = record.baseline.partition("+")
        name = PAPER_NAMES.get(method, method)
        return f"{name} + {PAPER_NAMES.get(mitigation, mitigation)}" if mitigation else name
    return method_summary(record)


def method_summary(record: TrialRecord) -> str:
    """Short text of a trial's method spec and mitigations, e.g. `attn_up=lora(rank=4) · rwa(k=2)`."""
    if record.groups is not None:  # {group: "lora(rank=4)" | "frozen"}
        parts = [f"{g}={m}" for g, m in record.groups.items() if m not in ("frozen", "freeze")]
    else:
        parts = []
        for entry in record.method_spec or []:
            hyper = {k: v for k, v in entry.items() if k not in ("method", "units")}
            text = ",".join(f"{k}={_short(v)}" for k, v in hyper.items())
            units = "/".join(entry.get("units", []))
            parts.append(f"{units}={entry['method']}" + (f"({text})" if text else ""))
    text = " ".join(parts) or "all frozen"
    for m in trial_mitigations(record):
        hyper = ",".join(f"{k}={_short(v)}" for k, v in m.items() if k != "name")
        text += f" · {m['name']}" + (f"({hyper})" if hyper else "")
    if "lr" in record.params:
        text += f" · lr={_short(record.params['lr'])}"
    return text


def trial_mitigations(record: TrialRecord) -> list[dict[str, Any]]:
    """Every mitigation a trial trained with, caption dropout first (records of either version)."""
    # Version 2 keeps caption dropout in its own field; version 1 has it among the mitigations.
    train = record.train or {}
    return base_mitigations(train.get("caption_dropout") or 0.0, train.get("mitigations", []))


def compact_name(record: TrialRecord) -> str:
    """A one-line name for terminal tables: the paper's name, or method counts, mitigation, lr."""
    if record.baseline or record.groups is None:
        return display_name(record)
    methods = [m.split("(")[0] for m in record.groups.values() if m not in ("frozen", "freeze")]
    counts = {m: methods.count(m) for m in dict.fromkeys(methods)}
    text = " ".join(f"{m}×{n}" if n > 1 else m for m, n in counts.items()) or "all frozen"
    text += "".join(f" +{m['name']}" for m in trial_mitigations(record))
    lr = record.params.get("lr")
    return text + (f" lr {_short(lr)}" if lr is not None else "")


def best_config_yaml(record: TrialRecord) -> str:
    """The YAML snippet that reproduces a trial: method spec, training settings, mitigations."""
    train = dict(record.train or {})
    mitigations = train.pop("mitigations", record.mitigations or [])
    snippet = {"methods": record.method_spec or [], "train": train, "mitigations": mitigations}
    return yaml.safe_dump(snippet, sort_keys=False, default_flow_style=None, width=100)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return "/".join(map(str, value))
    return str(value)
