"""The MIMIC-CXR-JPG adapter on a miniature fake tree of the official layout."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest
from PIL import Image

from capsearch.cli import main
from capsearch.datasets.folder import ImageCaptionDataset, read_metadata
from capsearch.datasets.mimic import report_text, write_mimic_metadata
from capsearch.errors import UserError

REPORT_WITH_IMPRESSION = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough

 FINDINGS:
 There is no focal consolidation.  No pneumothorax.

 IMPRESSION:
 Small left pleural effusion.
 No pneumothorax.
"""
REPORT_FINDINGS_ONLY = """                                 FINAL REPORT
 INDICATION:  Shortness of breath.

 FINDINGS:  The heart is mildly enlarged.  The lungs are clear.
"""
REPORT_WITHOUT_SECTIONS = """FINAL REPORT
 Wet read only, see prior.
"""

# (subject, study, dicom, view, split, report)
IMAGES = [
    ("10000032", "50414267", "d1pa", "PA", "train", REPORT_WITH_IMPRESSION),
    ("10000032", "50414267", "d2lat", "LATERAL", "train", REPORT_WITH_IMPRESSION),
    ("10000032", "53189527", "d3ap", "AP", "train", REPORT_FINDINGS_ONLY),
    ("11000011", "56699142", "d4pa", "PA", "test", REPORT_WITH_IMPRESSION),
    ("11000011", "57375967", "d5pa", "PA", "validate", REPORT_WITHOUT_SECTIONS),
]


def _make_tree(root: Path, reports_root: Path | None = None, gz: bool = False) -> Path:
    reports_root = reports_root or root
    meta = ["dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows"]
    split = ["dicom_id,study_id,subject_id,split"]
    for subject, study, dicom, view, part, report in IMAGES:
        folder = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("L", (48, 40), 90).save(folder / f"{dicom}.jpg")
        text_file = reports_root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt"
        text_file.parent.mkdir(parents=True, exist_ok=True)
        text_file.write_text(report)
        meta.append(f"{dicom},{subject},{study},CHEST,{view},40")
        split.append(f"{dicom},{study},{subject},{part}")
    for name, lines in (
        ("mimic-cxr-2.0.0-metadata.csv", meta),
        ("mimic-cxr-2.0.0-split.csv", split),
    ):
        text = "\n".join(lines) + "\n"
        if gz:
            with gzip.open(root / f"{name}.gz", "wt") as handle:
                handle.write(text)
        else:
            (root / name).write_text(text)
    return root


def test_report_text_prefers_impression_then_findings() -> None:
    assert report_text(REPORT_WITH_IMPRESSION) == "Small left pleural effusion. No pneumothorax."
    assert report_text(REPORT_FINDINGS_ONLY) == "The heart is mildly enlarged. The lungs are clear."
    assert report_text(REPORT_WITHOUT_SECTIONS) == ""


def test_adapter_keeps_frontal_views_with_splits_and_captions(tmp_path: Path) -> None:
    root = _make_tree(tmp_path / "mimic")
    result = write_mimic_metadata(root, tmp_path / "out")
    records = {r["dicom_id"]: r for r in read_metadata(tmp_path / "out")}
    assert set(records) == {
        "d1pa",
        "d3ap",
        "d4pa",
    }  # lateral dropped; d5 has no IMPRESSION/FINDINGS
    assert result.written == 3 and result.skipped["not a frontal view"] == 1
    assert result.skipped["report has no IMPRESSION or FINDINGS"] == 1
    assert records["d1pa"]["split"] == "train" and records["d4pa"]["split"] == "test"
    assert records["d1pa"]["text"] == "Small left pleural effusion. No pneumothorax."
    assert records["d1pa"]["findings"] == ["effusion"]
    assert records["d3ap"]["text"].startswith("The heart is mildly enlarged")  # FINDINGS fallback
    assert records["d3ap"]["findings"] == ["cardiomegaly"] and records["d3ap"]["view"] == "AP"
    assert records["d1pa"]["patient_id"] == "10000032" and records["d1pa"]["study_id"] == "50414267"
    assert Path(records["d1pa"]["file_name"]).is_absolute()

    dataset = ImageCaptionDataset(tmp_path / "out", split="train", size=16)
    assert len(dataset) == 2 and dataset[0]["pixel_values"].shape == (1, 16, 16)


def test_separate_report_root_and_gzipped_tables(tmp_path: Path) -> None:
    root = _make_tree(tmp_path / "jpg", reports_root=tmp_path / "reports", gz=True)
    with pytest.raises(UserError, match="no usable frontal image"):
        write_mimic_metadata(root, tmp_path / "out")  # reports are not under the image root
    result = write_mimic_metadata(root, tmp_path / "out", reports=tmp_path / "reports")
    assert result.written == 3 and dict(result.splits) == {"train": 2, "test": 1}


def test_missing_images_and_tables(tmp_path: Path) -> None:
    root = _make_tree(tmp_path / "mimic")
    shutil.rmtree(root / "files" / "p11")
    (root / "files" / "p11").mkdir()
    result = write_mimic_metadata(root, tmp_path / "out")
    assert result.written == 2 and result.skipped["image file missing"] == 2
    (root / "mimic-cxr-2.0.0-split.csv").unlink()
    with pytest.raises(UserError, match="split.csv"):
        write_mimic_metadata(root, tmp_path / "out")


def test_cli_mimic(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--root's images, --out's metadata.jsonl, --reports' captions: the records the library writes."""
    root = _make_tree(tmp_path / "mimic")
    assert main(["data", "mimic", "--root", str(root), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "wrote 3 frontal images" in out and "not a frontal view" in out
    assert "splits: test 1, train 2" in out and "left out 1: report has no IMPRESSION" in out
    records = read_metadata(tmp_path / "out")
    assert all(r["dup_group"] is None for r in records)
    assert sorted(Path(r["file_name"]).stem for r in records) == ["d1pa", "d3ap", "d4pa"]
    assert all(Path(r["file_name"]).is_relative_to(root / "files") for r in records)
    write_mimic_metadata(root, tmp_path / "direct")
    assert read_metadata(tmp_path / "direct") == records
    assert main(["data", "check", str(tmp_path / "out")]) == 0
    jpg = _make_tree(tmp_path / "jpg", reports_root=tmp_path / "reports")
    argv = ["data", "mimic", "--root", str(jpg), "--out", str(tmp_path / "sep")]
    assert main([*argv, "--reports", str(tmp_path / "reports")]) == 0
    separate = read_metadata(tmp_path / "sep")
    assert [r["text"] for r in separate] == [r["text"] for r in records]
