"""A finalist trained again from its record (capsearch.search.retrain): a retraining the final stage was killed
in goes on from its last checkpoint, to the same weights as one never cut short."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import capsearch.search.retrain as retrain_mod
import capsearch.training.books as books_mod
from capsearch.errors import UserError
from capsearch.search.records import TrialRecord
from capsearch.search.retrain import PLAN_FILE, RETRAIN_DIR, retrain_delta
from capsearch.worlds.phantom import write_phantom_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    write_phantom_dataset(root, patients=8, size=32, seed=7)
    return root


def record_in(folder) -> TrialRecord:
    return TrialRecord(
        dir=str(folder), trial=folder.name, number=int(folder.name[1:]), model="tiny:random",
        method_spec=[{"method": "lora", "units": "*:*_attn", "rank": 2}],
        train={"steps": 6, "batch_size": 4, "lr": 1e-3, "checkpoint_every": 3},
        steps=6, final_loss=None,
    )  # fmt: skip


def cut_short(record: TrialRecord, data, dest, monkeypatch) -> None:
    """Retrain until its first checkpoint is on disk, then stop as a killed stage would."""
    original = books_mod._save_checkpoint

    def save_then_stop(*args, **kwargs):
        original(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(books_mod, "_save_checkpoint", save_then_stop)
    with pytest.raises(UserError, match="ended stopped"):
        retrain_delta(record, data, dest)
    monkeypatch.setattr(books_mod, "_save_checkpoint", original)
    state = json.loads((dest / RETRAIN_DIR / "checkpoint" / "state.json").read_text())
    assert state["step"] == 3 and not (dest / "delta").exists()


def resumes_seen(monkeypatch) -> list[bool]:
    seen, real = [], retrain_mod.finetune

    def spy(*args, resume=False, **kwargs):
        seen.append(resume)
        return real(*args, resume=resume, **kwargs)

    monkeypatch.setattr(retrain_mod, "finetune", spy)  # the name the retraining calls
    return seen


def test_a_cut_short_retraining_goes_on_from_its_checkpoint_bit_for_bit(
    data, tmp_path, monkeypatch
):
    record = record_in(tmp_path / "t004")
    straight = retrain_delta(record, data, tmp_path / "straight")
    assert straight["steps"] == 6

    cut_short(record, data, tmp_path / "t004", monkeypatch)
    seen = resumes_seen(monkeypatch)
    again = retrain_delta(record, data)
    assert seen == [True]  # went on from step 3
    assert again["steps"] == 6 and again["final_loss"] == straight["final_loss"]
    assert again["went_on_from_step"] == 3 and "went_on_from_step" not in straight
    a = load_file(tmp_path / "straight" / "delta" / "delta.safetensors")
    b = load_file(tmp_path / "t004" / "delta" / "delta.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_of_another_training_is_not_gone_on_from(data, tmp_path, monkeypatch):
    record = record_in(tmp_path / "t005")
    cut_short(record, data, tmp_path / "t005", monkeypatch)
    seen = resumes_seen(monkeypatch)
    other = retrain_delta(record, data, seed=11)  # final.train_seeds: another training seed
    assert seen == [False] and other["steps"] == 6 and other["seed"] == 11
    plan = json.loads((tmp_path / "t005" / RETRAIN_DIR / PLAN_FILE).read_text())
    assert plan["train"]["seed"] == 11

    (tmp_path / "t005" / "delta").rename(tmp_path / "t005" / "delta.seed11")
    cut_short(record, data, tmp_path / "t005", monkeypatch)
    (tmp_path / "t005" / RETRAIN_DIR / PLAN_FILE).write_text("{not json")  # a damaged plan
    seen.clear()
    assert retrain_delta(record, data)["steps"] == 6 and seen == [False]
