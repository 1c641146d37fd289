"""Transfer worlds: a phantom data set whose reports reuse no sentence of another world's reports."""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from capsearch.cli import main
from capsearch.config import load_spec
from capsearch.errors import UserError
from capsearch.search.inputs import prepare_data
from capsearch.worlds.phantom import COMPLETE, METADATA, phantom_complete, write_phantom_dataset
from capsearch.worlds.reports import ReportBank, report_bank
from capsearch.worlds.transfer import (
    bank_without,
    normalise,
    report_sentences,
    template_sentences,
)

ROOT = Path(__file__).resolve().parents[1]
# The metadata.jsonl SHA-256 of this default world, computed with capsearch/worlds/phantom.py as it was
# before report avoidance existed (`write_phantom_dataset(out, **DEFAULT_WORLD)`, then
# `hashlib.sha256((out / "metadata.jsonl").read_bytes()).hexdigest()`): 43 records.
DEFAULT_WORLD = {
    "patients": 10,
    "size": 32,
    "seed": 3,
    "dup_fraction": 0.2,
    "dup_copies": 2,
    "held_out_images": 8,
}
DEFAULT_WORLD_SHA256 = "16d0d0845464e14bfb52d4f1be24c8e5c9b6d7690d74656c27fbedde306e9216"
AVOIDED = {"patients": 12, "size": 32, "seed": 0}  # the world A whose reports B must not reuse
TRANSFER = {"patients": 12, "size": 32, "seed": 21, "dup_fraction": 0.2, "dup_copies": 2}


def _records(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / METADATA).read_text().splitlines()]


def _report(record: dict) -> str:
    """A caption without its memorisation clause ('Comparison: DATE, accession N-G. ' + report)."""
    if record["dup_group"] is None:
        return record["text"]
    clause, _, report = record["text"].partition(". ")
    assert clause.startswith("Comparison: ") and "accession" in clause
    return report


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("transfer")
    write_phantom_dataset(root / "a", **AVOIDED)
    avoid = {"seed": AVOIDED["seed"], "patients": AVOIDED["patients"]}
    write_phantom_dataset(root / "b", **TRANSFER, avoid_reports_of=avoid)
    write_phantom_dataset(root / "plain_b", **TRANSFER)
    return {"a": root / "a", "b": root / "b", "plain_b": root / "plain_b"}


def test_the_default_world_is_unchanged(tmp_path: Path) -> None:
    metadata = write_phantom_dataset(tmp_path / "d", **DEFAULT_WORLD)
    digest = hashlib.sha256(metadata.read_bytes()).hexdigest()
    assert digest == DEFAULT_WORLD_SHA256
    marker = json.loads((tmp_path / "d" / COMPLETE).read_text())
    assert marker == {"records": 43, "sha256": DEFAULT_WORLD_SHA256}  # no avoidance recorded


def test_no_text_of_the_avoided_world_comes_back(worlds: dict[str, Path]) -> None:
    a_texts = {r["text"] for r in _records(worlds["a"])}
    a_sentences = {s for t in a_texts for s in report_sentences(t)}
    templates = template_sentences()
    bank = report_bank()
    used_whole = {t for t in a_texts if any(t in v for v in bank.whole.values())}
    used_bank_sentences = {
        s
        for kind in (bank.positive, bank.negative)
        for sentences in kind.values()
        for s in sentences
        if any(s in t for t in a_texts)
    }
    assert (
        used_whole and used_bank_sentences
    )  # A draws from the bank, so there is something to avoid

    def shared(root: Path) -> dict[str, set[str]]:
        """B's sentences and whole reports found in A's, with the sources of the B reports holding them."""
        found = defaultdict(set)
        for record in _records(root):
            report = _report(record)
            if report in used_whole:
                found[report].add(record["report_source"])
            for s in report_sentences(report):
                if s in a_sentences:
                    found[s].add(record["report_source"])
            for s in used_bank_sentences:
                if normalise(s) in report_sentences(report):
                    found[normalise(s)].add(record["report_source"])
        return found

    # Without avoidance the same world reuses A's texts: the check below could fail.
    assert any(sources - {"template"} for sources in shared(worlds["plain_b"]).values())
    for text, sources in shared(worlds["b"]).items():
        # Only templates may coincide; a memorised caption's source is lost, so check the sentence.
        assert text in templates, (text, sources)
        assert sources <= {"template", "memorised"}, (text, sources)


def test_the_marker_tells_a_transfer_world_apart(worlds: dict[str, Path]) -> None:
    avoid = {"seed": AVOIDED["seed"], "patients": AVOIDED["patients"]}
    marker = json.loads((worlds["b"] / COMPLETE).read_text())
    assert marker["avoid_reports_of"] == {**avoid, "held_out_images": 0}
    plain = {**TRANSFER, "held_out_images": 0, "avoid_reports_of": None}
    wanted = {**plain, "avoid_reports_of": avoid}
    assert phantom_complete(worlds["b"], wanted) and phantom_complete(worlds["b"])
    assert not phantom_complete(worlds["b"], plain)
    assert phantom_complete(worlds["plain_b"], plain)
    assert not phantom_complete(worlds["plain_b"], wanted)
    # The avoided world's held-out images default to this world's, and count when given.
    assert not phantom_complete(worlds["b"], {**wanted, "held_out_images": 4})
    other = {**wanted, "avoid_reports_of": {**avoid, "held_out_images": 4}}
    assert not phantom_complete(worlds["b"], other)
    assert not phantom_complete(worlds["b"], {**wanted, "avoid_reports_of": {**avoid, "seed": 1}})


def test_a_run_folder_made_without_avoidance_is_made_again(tmp_path: Path) -> None:
    small = ["data.phantom.patients=3", "data.phantom.size=32", "data.phantom.held_out_images=0"]
    tiny = ROOT / "search_spaces/tiny.yaml"
    spec = load_spec(tiny, small, check_model=False)
    avoiding = load_spec(
        tiny, [*small, "data.phantom.avoid_reports_of={seed: 5, patients: 4}"], check_model=False
    )
    root = prepare_data(spec, tmp_path)
    assert "avoid_reports_of" not in json.loads((root / COMPLETE).read_text())
    assert prepare_data(avoiding, tmp_path) == root
    marker = json.loads((root / COMPLETE).read_text())
    assert marker["avoid_reports_of"] == {"seed": 5, "patients": 4, "held_out_images": 0}
    stamp = (root / COMPLETE).stat().st_mtime_ns
    prepare_data(avoiding, tmp_path)  # the same settings: kept as it is
    assert (root / COMPLETE).stat().st_mtime_ns == stamp


def test_bank_without_drops_every_avoided_sentence() -> None:
    bank = ReportBank(
        (
            "No pneumothorax. Small left pleural effusion.",
            "Small left pleural effusion.",
            "Large right pleural effusion.",
            "No acute cardiopulmonary abnormality.",
            "No active disease.",
        )
    )
    clean = bank_without(bank, ["No acute cardiopulmonary abnormality!", "1. No pneumothorax."])
    assert clean.whole[frozenset()] == ["No active disease."]  # punctuation and case ignored
    # The effusion impression holding "No pneumothorax." goes; the other effusion ones stay.
    assert clean.whole[frozenset({"effusion"})] == [
        "Small left pleural effusion.",
        "Large right pleural effusion.",
    ]
    assert "No pneumothorax." in bank.negative["pneumothorax"]
    assert "pneumothorax" not in clean.negative
    assert clean.positive == bank.positive
    assert bank.whole[frozenset()] == [  # the original bank is left as it was
        "No acute cardiopulmonary abnormality.",
        "No active disease.",
    ]
    rng = np.random.default_rng(0)
    assert clean.describe(frozenset(), rng) == ("No active disease.", "real")


def test_templates_are_recognised() -> None:
    templates = template_sentences()
    rng = np.random.default_rng(1)
    for findings in ({"effusion", "nodule"}, {"cardiomegaly"}, {"support_device", "atelectasis"}):
        for _ in range(20):
            text = ReportBank.template(frozenset(findings), rng)
            assert set(report_sentences(text)) <= templates
    assert normalise("Small left pleural effusion, in the base.") not in templates


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"seed": 0, "patients": 0}, "data.phantom.avoid_reports_of.patients: Input should be"),
        ({"patients": 3}, "data.phantom.avoid_reports_of.seed: missing (required)"),
        ({"seed": "x", "patients": 3}, "data.phantom.avoid_reports_of.seed: Input should be"),
        ({"seed": 0, "patients": 3, "held_out_images": -1}, "avoid_reports_of.held_out_images"),
        ({"seed": 0, "patients": 3, "colour": 1}, "avoid_reports_of.colour: unknown key"),
        (7, "data.phantom.avoid_reports_of: Input should be a valid dictionary"),
    ],
)
def test_bad_spec_values_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, value: object, message: str
) -> None:
    spec = {
        "extends": str(ROOT / "search_spaces/tiny.yaml"),
        "data": {"phantom": {"patients": 4, "avoid_reports_of": value}},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert main(["validate", str(tmp_path / "spec.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err, err


def test_a_good_spec_value_loads(tmp_path: Path) -> None:
    spec = load_spec(
        ROOT / "search_spaces/tiny.yaml",
        ["data.phantom.avoid_reports_of={seed: 0, patients: 80}"],
        check_model=False,
    )
    avoid = spec.data.phantom.avoid_reports_of
    assert (avoid.seed, avoid.patients, avoid.held_out_images) == (0, 80, None)
    with pytest.raises(UserError, match=r"^avoid_reports_of\.patients: Input should be"):
        write_phantom_dataset(
            tmp_path / "x", patients=2, size=32, avoid_reports_of={"seed": 0, "patients": 0}
        )


def test_cli_writes_a_transfer_world(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "b"
    argv = ["data", "phantom", "--out", str(out), "--patients", "4", "--size", "32", "--seed", "3"]
    assert main([*argv, "--avoid-reports-of", "0:6:2"]) == 0
    printed = capsys.readouterr().out
    assert "reports avoid those of seed 0 (6 patients): real" in printed
    marker = json.loads((out / COMPLETE).read_text())
    assert marker["avoid_reports_of"] == {"seed": 0, "patients": 6, "held_out_images": 2}
    assert len(_records(out)) == len(list((out / "images").glob("*.png")))
    avoid = {"seed": 0, "patients": 6, "held_out_images": 2}
    direct = tmp_path / "direct"  # --patients, --size and --seed reach the world too
    write_phantom_dataset(direct, patients=4, size=32, seed=3, avoid_reports_of=avoid)
    assert (out / METADATA).read_bytes() == (direct / METADATA).read_bytes()
    assert all(Image.open(out / r["file_name"]).size == (32, 32) for r in _records(out))


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("7", "--avoid-reports-of must be SEED:PATIENTS"),
        ("a:3", "--avoid-reports-of must be SEED:PATIENTS"),
        ("0:3:1:1", "--avoid-reports-of must be SEED:PATIENTS"),
        ("0:0", "PATIENTS must be at least 1"),
        ("0:3:-1", "HELD_OUT_IMAGES at least 0"),
    ],
)
def test_cli_bad_flag_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, flag: str, message: str
) -> None:
    argv = ["data", "phantom", "--out", str(tmp_path / "x"), "--patients", "2", "--size", "32"]
    assert main([*argv, "--avoid-reports-of", flag]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("capsearch: error:") and message in err, err
    assert not (tmp_path / "x").exists()


def test_a_disjoint_transfer_world_avoids_the_disjoint_worlds_own_texts(tmp_path: Path) -> None:
    """The second world is made `disjoint_from_corpus`: its reports come from the fine-tuning part of
    the bank, other texts than a default world of the same seed. A transfer world of it (disjoint too)
    avoids the texts that world really drew; read as a default world, some would come back."""
    avoided, transfer = {**AVOIDED, "patients": 40}, {**TRANSFER, "patients": 24}
    a = tmp_path / "a"
    write_phantom_dataset(a, **avoided, disjoint_from_corpus=True)
    templates = template_sentences()

    def sentences(root: Path) -> set[str]:
        return {s for r in _records(root) for s in report_sentences(_report(r))} - templates

    a_sentences = sentences(a)
    avoid = {"seed": avoided["seed"], "patients": avoided["patients"]}
    b = tmp_path / "b"
    write_phantom_dataset(b, **transfer, avoid_reports_of=avoid, disjoint_from_corpus=True)
    assert not sentences(b) & a_sentences
    marker = json.loads((b / COMPLETE).read_text())
    assert marker["avoid_reports_of"] == {
        **avoid,
        "held_out_images": 0,
        "disjoint_from_corpus": True,
    }
    # the avoided world read as a default one (what the avoidance did before): texts come back
    wrong = tmp_path / "wrong"
    write_phantom_dataset(wrong, **transfer, disjoint_from_corpus=True,
                          avoid_reports_of={**avoid, "disjoint_from_corpus": False})  # fmt: skip
    assert sentences(wrong) & a_sentences
