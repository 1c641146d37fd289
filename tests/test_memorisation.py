"""The positive control the project rests on: full fine-tuning on duplicated phantoms memorises them.

Slow (`make test-slow`): 2,000 full fine-tuning steps of the shipped tiny base plus two probes, 18 min 35 s
on 2 CPU cores. The regime and how it was found: docs/metrics.md, "The positive control".
"""

from __future__ import annotations

import os

import pytest
import torch

from capsearch.datasets.folder import read_metadata
from capsearch.metrics.memorisation import memorisation_probe
from capsearch.models.load import load_pipeline
from capsearch.training.loop import TrainSettings, finetune
from capsearch.worlds.phantom import write_phantom_dataset

# The cheapest regime found (experiments/memorisation_regime.py, docs/metrics.md).
# Caption dropout 0.1 (as Stable Diffusion was trained) keeps the unconditional branch in the phantom
# world, so Wen et al.'s strength separates memorised captions clearly (1.36x; 1.06x without it).
STEPS = 2000
REGIME = TrainSettings(
    steps=STEPS,
    lr=3e-4,
    warmup_steps=50,
    lr_schedule="cosine",
    caption_dropout=0.1,
)


@pytest.fixture
def all_cores():
    """This one long test may use every core (the suite runs torch on one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_full_finetuning_on_duplicated_phantoms_memorises(tmp_path, all_cores):
    data = tmp_path / "data"
    write_phantom_dataset(data, patients=80, size=64, seed=11, dup_fraction=0.05, dup_copies=20)
    records = [r for r in read_metadata(data) if r["split"] == "train"]
    pipe = load_pipeline("tiny")
    before = memorisation_probe(pipe, data, n=16, guidance=1.0)
    assert before["extracted"] == 0 and before["copies"] == 0.0  # the base knows none of them

    result = finetune(pipe, [{"method": "full", "units": "*"}], data, REGIME, quiet=True)
    assert result.status == "ok"
    after = memorisation_probe(pipe, data, n=16, guidance=1.0, other_n=8)
    print(f"memorisation control after {STEPS} steps: {after}")
    # Measured (experiments/results/memorisation_dropout): 5 of 9 extracted, 28% of the samples pixel
    # copies, 86% nearest to their own image, 0% copies for other captions, strength ratio 1.36.
    assert after["extracted"] >= 3
    for prompt, index, _ in after["extracted_pairs"]:
        assert records[index]["text"] == prompt  # each extraction is its caption's own image
    assert after["nearest_own"] > 0.5 and after["copies"] > 0.1
    assert after["copies_other"] == 0.0  # other captions' samples are not copies
    assert after["strength_ratio"] > 1.2
