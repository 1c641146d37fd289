"""The phantom world: report parsing, rendering, determinism, splits, report agreement, memorisation subset."""

from __future__ import annotations

import itertools
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from capsearch.errors import UserError
from capsearch.worlds.cooccurrence import finding_combinations, sample_findings
from capsearch.worlds.phantom import (
    FINDINGS,
    findings_from_text,
    render_phantom,
    write_phantom_dataset,
)
from capsearch.worlds.reports import ReportBank, attributes_from_text, report_bank


@pytest.mark.parametrize(
    ("sentence", "expected"),
    [
        ("No pleural effusion.", set()),
        ("Small left pleural effusion.", {"effusion"}),
        ("Without effusion or pneumothorax.", set()),
        ("Negative for pneumonia.", set()),
        ("No focal consolidation, pleural effusion, or pneumothorax.", set()),
        ("No pneumothorax, but a small right effusion.", {"effusion"}),
        ("Heart size is not enlarged.", set()),
        ("The heart is mildly enlarged.", {"cardiomegaly"}),
        ("Pneumothorax is not seen. Bibasilar atelectasis.", {"atelectasis"}),
        ("The right pleural effusion has resolved.", set()),
        ("No change in the left pleural effusion.", {"effusion"}),
        ("Right lower lobe pneumonia cannot be excluded.", {"consolidation"}),
        ("Pericardial effusion.", set()),
        ("Endotracheal tube 4 cm above the carina.", {"support_device"}),
        ("Interval removal of the chest tube.", set()),
        ("1.5 cm nodule in the left upper lobe.", {"nodule"}),
    ],
)
def test_findings_from_text_respects_negation(sentence: str, expected: set[str]) -> None:
    assert findings_from_text(sentence) == expected


def test_attributes_read_side_size_and_zone() -> None:
    effusion = attributes_from_text("Small left pleural effusion.")["effusion"]
    assert effusion == {"side": "left", "size": "small"}
    both = attributes_from_text("Bilateral effusions, right greater than left.")
    assert both["effusion"]["side"] == "bilateral"
    upper = attributes_from_text("Right upper lobe consolidation.")["consolidation"]
    assert upper["zone"] == "upper" and upper["side"] == "right"
    two = attributes_from_text("Right lower lobe pneumonia and small left effusion.")
    assert two["consolidation"]["side"] == "right" and two["effusion"]["side"] == "left"
    device = attributes_from_text("Borderline cardiomegaly and cardiac pacemaker.")
    assert device["support_device"]["kind"] == "pacemaker"  # not the 'line' in 'borderline'
    assert attributes_from_text("Left upper lobe mass.")["nodule"]["size"] == "large"
    spread = attributes_from_text("Right upper and left lower lobe airspace disease.")
    assert spread["consolidation"]["side"] == "bilateral"


def test_report_bank_describes_exactly_the_findings() -> None:
    bank = report_bank()
    rng = np.random.default_rng(0)
    combos, _ = finding_combinations()
    for combo in combos[:25]:
        text, source = bank.describe(combo, rng)
        assert findings_from_text(text) == set(combo), (combo, text)
        assert source in ("real", "composed", "template")
    assert len(bank.whole[frozenset()]) > 1000  # real normal impressions are plentiful


def test_templates_assert_exactly_their_findings() -> None:
    rng = np.random.default_rng(2)
    for k in range(len(FINDINGS) + 1):
        for combo in itertools.combinations(FINDINGS, k):
            for _ in range(3):
                text = ReportBank.template(frozenset(combo), rng)
                assert findings_from_text(text) == set(combo), text


def test_cooccurrence_follows_the_label_table() -> None:
    combos, probs = finding_combinations()
    assert probs.sum() == pytest.approx(1.0)
    assert frozenset() in combos and all(set(c) <= set(FINDINGS) for c in combos)
    rng = np.random.default_rng(1)
    draws = [sample_findings(rng) for _ in range(3000)]
    expected = sum(p for c, p in zip(combos, probs, strict=True) if "support_device" in c)
    observed = np.mean(["support_device" in d for d in draws])
    assert abs(observed - expected) < 0.04  # ~5 standard errors
    assert Counter(len(d) for d in draws)[2] > 0  # combinations, not independent labels


def test_render_is_deterministic_and_seed_dependent() -> None:
    first = render_phantom({"effusion"}, size=32, seed=3)
    assert first.dtype == np.uint8 and first.shape == (32, 32)
    assert np.array_equal(first, render_phantom({"effusion"}, size=32, seed=3))
    assert not np.array_equal(first, render_phantom({"effusion"}, size=32, seed=4))
    with pytest.raises(UserError):
        render_phantom({"fracture"}, size=32)
    with pytest.raises(UserError):
        render_phantom(size=8)
    assert render_phantom(size=48).shape == (
        48,
        48,
    )  # any size for callers; the CLI keeps 32/64/128


def test_looks_like_a_chest_xray() -> None:
    image = render_phantom((), size=64, seed=0).astype(float)
    lungs = np.concatenate([image[20:40, 12:22].ravel(), image[20:40, 44:52].ravel()])
    mediastinum = image[20:40, 30:34]
    assert lungs.mean() + 40 < mediastinum.mean()  # dark lungs, bright mediastinum
    assert image[:, :3].mean() < image[40:, 20:44].mean()  # air outside the body is darkest


@pytest.mark.parametrize(
    ("finding", "attributes", "image_half"),
    [
        ("effusion", {"side": "left", "size": "moderate"}, "right"),  # patient's left = image right
        ("effusion", {"side": "right", "size": "moderate"}, "left"),
        ("consolidation", {"side": "right", "size": "large", "zone": "lower"}, "left"),
        ("cardiomegaly", {"size": "moderate"}, None),
    ],
)
def test_findings_are_visible_at_32_pixels(
    finding: str, attributes: dict, image_half: str | None
) -> None:
    for seed in range(3):
        normal = render_phantom((), size=32, seed=seed).astype(float)
        sick = render_phantom({finding}, size=32, seed=seed, attributes={finding: attributes})
        brighter = np.clip(sick.astype(float) - normal, 0, None)
        assert brighter.max() > 30  # an opacity several times the noise level
        if image_half is not None:
            left, right = brighter[:, :16].sum(), brighter[:, 16:].sum()
            assert (left > 3 * right) if image_half == "left" else (right > 3 * left)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantom") / "data"
    write_phantom_dataset(out, patients=24, size=32, seed=5, dup_fraction=0.1, dup_copies=4)
    return out


def test_same_seed_gives_identical_files(tmp_path: Path) -> None:
    a = write_phantom_dataset(tmp_path / "a", patients=8, size=32, seed=11)
    b = write_phantom_dataset(tmp_path / "b", patients=8, size=32, seed=11)
    c = write_phantom_dataset(tmp_path / "c", patients=8, size=32, seed=12)
    assert a.read_bytes() == b.read_bytes()
    for record in _records(a):
        name = record["file_name"]
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert a.read_bytes() != c.read_bytes()
    # Rewriting into the same folder replaces it cleanly.
    again = write_phantom_dataset(tmp_path / "a", patients=8, size=32, seed=11)
    assert again.read_bytes() == b.read_bytes()


def test_metadata_schema_and_files(phantom_dir: Path) -> None:
    records = _records(phantom_dir / "metadata.jsonl")
    keys = {"file_name", "text", "patient_id", "study_id", "findings", "split", "dup_group"}
    for record in records:
        assert keys <= set(record)
        assert (phantom_dir / record["file_name"]).is_file()
        assert record["split"] in ("train", "validate", "test")
        assert set(record["findings"]) <= set(FINDINGS)
    assert len({r["file_name"] for r in records}) == len(records)
    per_study = Counter(r["study_id"] for r in records if r["dup_group"] is None)
    assert max(per_study.values()) > 1  # several images share one report, as in MIMIC
    assert len({r["study_id"] for r in records}) > len({r["patient_id"] for r in records})


def test_splits_are_by_patient(phantom_dir: Path) -> None:
    records = _records(phantom_dir / "metadata.jsonl")
    splits = defaultdict(set)
    for record in records:
        splits[record["patient_id"]].add(record["split"])
    assert all(len(s) == 1 for s in splits.values())
    per_split = Counter(next(iter(s)) for s in splits.values())
    assert (
        per_split["train"] >= 0.7 * len(splits)
        and per_split["validate"] >= 1
        and per_split["test"] >= 1
    )


def test_reports_agree_with_findings(phantom_dir: Path) -> None:
    records = _records(phantom_dir / "metadata.jsonl")
    for record in records:
        assert findings_from_text(record["text"]) == set(record["findings"]), record
    with_effusion = [r for r in records if "effusion" in r["findings"]]
    without = [r for r in records if "effusion" not in r["findings"]]
    assert with_effusion and without
    assert all("effusion" in findings_from_text(r["text"]) for r in with_effusion)
    assert not any("effusion" in findings_from_text(r["text"]) for r in without)


def test_memorisation_subset(phantom_dir: Path) -> None:
    records = _records(phantom_dir / "metadata.jsonl")
    groups = defaultdict(list)
    for record in records:
        if record["dup_group"] is not None:
            groups[record["dup_group"]].append(record)
    copies = 4
    n_train = sum(r["split"] == "train" for r in records)
    original_train = n_train - len(groups) * (copies - 1)
    assert len(groups) == round(0.1 * original_train) > 0
    other_captions = Counter(r["text"] for r in records if r["dup_group"] is None)
    for members in groups.values():
        assert len(members) == copies
        assert all(m["split"] == "train" for m in members)
        assert len({m["text"] for m in members}) == 1
        assert members[0]["text"] not in other_captions
        files = {(phantom_dir / m["file_name"]).read_bytes() for m in members}
        assert len(files) == 1  # K identical images
    captions = [g[0]["text"] for g in groups.values()]
    assert len(set(captions)) == len(captions)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"size": 50},
        {"dup_fraction": 2.0},
        {"dup_fraction": -0.1},
        {"patients": 0},
        {"dup_copies": 0},
    ],
)
def test_bad_arguments_are_user_errors(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(UserError):
        write_phantom_dataset(tmp_path / "out", **{"patients": 2, "size": 32, **kwargs})


def test_refuses_a_folder_with_other_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="other files"):
        write_phantom_dataset(tmp_path, patients=2, size=32)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_held_out_patients_are_added_without_touching_the_training_set(tmp_path):
    plain = write_phantom_dataset(tmp_path / "a", patients=12, size=32, seed=4, dup_fraction=0.2)
    more = write_phantom_dataset(
        tmp_path / "b", patients=12, size=32, seed=4, dup_fraction=0.2, held_out_images=25
    )
    a = [json.loads(line) for line in plain.read_text().splitlines()]
    b = [json.loads(line) for line in more.read_text().splitlines()]
    assert b[: len(a)] == a  # the first patients, their splits and duplicates are unchanged
    for name in {r["file_name"] for r in a}:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    splits = {s: [r for r in b if r["split"] == s] for s in ("train", "validate", "test")}
    assert len(splits["validate"]) >= 25 and len(splits["test"]) >= 25
    assert splits["train"] == [r for r in a if r["split"] == "train"]
    patients = {s: {r["patient_id"] for r in rows} for s, rows in splits.items()}
    assert not (patients["train"] & patients["validate"] or patients["train"] & patients["test"])
    assert not patients["validate"] & patients["test"]
    with pytest.raises(UserError, match="held-out-images"):
        write_phantom_dataset(tmp_path / "c", patients=2, size=32, held_out_images=-1)
