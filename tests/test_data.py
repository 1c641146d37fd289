"""Dataset loading, corrupt-image handling, `data check` and the `data` CLI's error lines."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from capsearch.cli import main
from capsearch.datasets.folder import ImageCaptionDataset, check_dataset, load_images, read_metadata
from capsearch.errors import UserError
from capsearch.worlds.phantom import write_phantom_dataset


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "phantom"
    write_phantom_dataset(out, patients=12, size=32, seed=2)
    return out


def _write_jsonl(folder: Path, records: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _png(path: Path, size: tuple[int, int] = (20, 20), mode: str = "L", value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 0, 0)).save(path)


def test_dataset_items(phantom_dir: Path) -> None:
    records = read_metadata(phantom_dir)
    dataset = ImageCaptionDataset(phantom_dir, split="train", size=16)
    assert len(dataset) == sum(r["split"] == "train" for r in records) > 0
    item = dataset[0]
    assert item["pixel_values"].shape == (1, 16, 16) and item["pixel_values"].dtype == torch.float32
    assert -1.0 <= float(item["pixel_values"].min()) < float(item["pixel_values"].max()) <= 1.0
    assert item["text"] == dataset.captions[0] == dataset.records[0]["text"] and item["index"] == 0
    assert len(ImageCaptionDataset(phantom_dir, split=None)) == len(records)
    held_out = ImageCaptionDataset(phantom_dir, split="test")
    assert all(r["split"] == "test" for r in held_out.records)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (4, 1, 16, 16) and len(batch["text"]) == 4


def test_pixels_match_the_file(phantom_dir: Path) -> None:
    dataset = ImageCaptionDataset(phantom_dir, split="train", size=32)
    raw = np.asarray(Image.open(dataset.path(1)), dtype=np.float32)
    assert torch.allclose(
        dataset[1]["pixel_values"][0], torch.from_numpy(raw / 127.5 - 1), atol=1e-6
    )


def test_load_images(phantom_dir: Path) -> None:
    images = load_images(phantom_dir, "validate", 8)
    assert images.shape == (len(ImageCaptionDataset(phantom_dir, "validate")), 1, 8, 8)


def test_metadata_csv_folder_with_any_images(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", (40, 20), mode="RGB")  # colour, not square: cropped and converted
    _png(tmp_path / "sub" / "b.jpg", (64, 64))
    (tmp_path / "metadata.csv").write_text(
        "file_name,text,findings,dup_group\na.png,Small left effusion.,effusion,\n"
        "sub/b.jpg,No acute process.,,3\n"
    )
    records = read_metadata(tmp_path)
    assert records[0]["findings"] == ["effusion"] and records[1]["dup_group"] == 3
    dataset = ImageCaptionDataset(tmp_path, split="train", size=8)  # no split column: all train
    assert len(dataset) == 2 and dataset[0]["pixel_values"].shape == (1, 8, 8)


def test_corrupt_image_is_skipped_and_counted(phantom_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(phantom_dir, copy)
    dataset = ImageCaptionDataset(copy, split="train", size=16)
    bad = dataset.records[2]["file_name"]
    (copy / bad).write_bytes(b"this is not a png")
    dataset = ImageCaptionDataset(copy, split="train", size=16)
    with pytest.warns(UserWarning, match="unreadable image"):
        items = [dataset[i] for i in range(len(dataset))]
    assert dataset.skipped == 1 and bad in dataset.bad_files
    assert items[2]["index"] == 3  # the next readable item stands in
    with pytest.warns(UserWarning):
        assert len(load_images(copy, "train", 16)) == len(dataset) - 1

    records, problems = check_dataset(copy)
    assert records == len(read_metadata(copy))
    assert [(p.kind, p.item) for p in problems] == [("corrupt image", bad)]


def test_all_unreadable_is_a_user_error(tmp_path: Path) -> None:
    _write_jsonl(tmp_path, [{"file_name": "gone.png", "text": "x"}])
    with pytest.warns(UserWarning):
        with pytest.raises(UserError, match="no readable image"):
            ImageCaptionDataset(tmp_path)[0]


def test_missing_folder_or_metadata(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        ImageCaptionDataset(tmp_path / "nowhere")
    with pytest.raises(UserError, match="no metadata"):
        read_metadata(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png"}\n')
    with pytest.raises(UserError, match="'text'"):
        read_metadata(tmp_path)
    (tmp_path / "metadata.jsonl").write_text("not json\n")
    with pytest.raises(UserError, match=":1:"):
        read_metadata(tmp_path)


def test_check_finds_every_kind_of_problem(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for name in ("a.png", "b.png", "c.png"):
        _png(tmp_path / name)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    _write_jsonl(
        tmp_path,
        [
            {"file_name": "a.png", "text": "Normal.", "patient_id": "1", "split": "train"},
            {"file_name": "a.png", "text": "Normal.", "patient_id": "1", "split": "train"},
            {"file_name": "b.png", "text": "  ", "patient_id": "2", "split": "train"},
            {"file_name": "c.png", "text": "Effusion.", "patient_id": "2", "split": "test"},
            {"file_name": "missing.png", "text": "Normal.", "patient_id": "3", "split": "test"},
            {"file_name": "broken.png", "text": "Normal.", "patient_id": "4", "split": "test"},
        ],
    )
    _, problems = check_dataset(tmp_path)
    found = {(p.kind, p.item) for p in problems}
    assert found == {
        ("duplicate file name", "a.png"),
        ("empty caption", "b.png"),
        ("missing image", "missing.png"),
        ("corrupt image", "broken.png"),
        ("patient leakage", "2"),
    }
    assert main(["data", "check", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    for kind, item in found:
        assert kind in out and item in out


def test_check_clean_phantom_exits_0(phantom_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "check", str(phantom_dir)]) == 0
    records = len(read_metadata(phantom_dir))
    assert f"{records} records, no problems found" in " ".join(capsys.readouterr().out.split())


def test_cli_writes_a_phantom_dataset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Every flag reaches the world: the folder is the one the library writes with those settings."""
    out = tmp_path / "ph"
    argv = ["--patients", "4", "--size", "32", "--seed", "2", "--dup-fraction", "0.5",
            "--dup-copies", "3", "--held-out-images", "2"]  # fmt: skip
    assert main(["data", "phantom", "--out", str(out), *argv]) == 0
    records = read_metadata(out)
    splits = {s: sum(r["split"] == s for r in records) for s in ("train", "validate", "test")}
    text = capsys.readouterr().out
    assert f"wrote {len(records)} images of 4 patients" in text
    assert (
        f"splits: train {splits['train']}, validate {splits['validate']}, test {splits['test']}"
        in text
    )
    assert splits["validate"] >= 2 and splits["test"] >= 2  # --held-out-images
    groups = [r["dup_group"] for r in records if r["dup_group"] is not None]
    assert groups and all(groups.count(g) == 3 for g in groups)  # --dup-copies
    assert f"{len(set(groups))} images x 3 copies" in text
    train_patients = {r["patient_id"] for r in records if r["split"] == "train"}
    assert len(train_patients) <= 4 < len({r["patient_id"] for r in records})  # held-out ones added
    assert all(Image.open(out / r["file_name"]).size == (32, 32) for r in records)  # --size
    direct = write_phantom_dataset(tmp_path / "direct", patients=4, size=32, seed=2,
                                   dup_fraction=0.5, dup_copies=3, held_out_images=2)  # fmt: skip
    assert read_metadata(direct.parent) == records  # --seed and --dup-fraction too
    assert len(list((out / "images").glob("*.png"))) == len(records)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["data", "phantom", "--out", "{tmp}/x", "--size", "50"], "--size"),
        (["data", "phantom", "--out", "{tmp}/x", "--dup-fraction", "2"], "--dup-fraction"),
        (["data", "phantom", "--out", "{tmp}/x", "--patients", "0"], "--patients"),
        (["data", "check", "{tmp}/nowhere"], "does not exist"),
        (["data", "check", "{tmp}"], "no metadata"),
        (["data", "mimic", "--root", "{tmp}/nowhere", "--out", "{tmp}/m"], "does not exist"),
    ],
)
def test_cli_user_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str], message: str
) -> None:
    code = main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("capsearch: error:") and message in err
    assert "Traceback" not in err


BOM = "\ufeff"


@pytest.mark.parametrize("name", ["metadata.csv", "metadata.jsonl"])
def test_a_byte_order_mark_is_read_past(tmp_path: Path, capsys, name: str) -> None:
    """Spreadsheet programs start a CSV with a UTF-8 byte-order mark (and some editors a JSONL): it
    works everywhere, as if it were not there — data check, the loader, and run's checks."""
    from capsearch.config import spec_from_dict
    from capsearch.search.inputs import check_data_folder

    rows = [(f"images/{s}{i}.png", f"finding {i % 2}", s)
            for s, n in (("train", 2), ("validate", 8), ("test", 8)) for i in range(n)]  # fmt: skip
    for file_name, _, _ in rows:
        _png(tmp_path / file_name)
    if name.endswith(".csv"):
        text = "file_name,text,split\n" + "".join(f"{f},{t},{s}\n" for f, t, s in rows)
    else:
        text = "".join(
            json.dumps({"file_name": f, "text": t, "split": s}) + "\n" for f, t, s in rows
        )
    (tmp_path / name).write_text(BOM + text, encoding="utf-8")
    records = read_metadata(tmp_path)
    assert records[0]["file_name"] == "images/train0.png" and len(records) == len(rows)
    assert len(ImageCaptionDataset(tmp_path, split="train", size=8)) == 2
    assert main(["data", "check", str(tmp_path)]) == 0
    assert "18 records, no problems found" in " ".join(capsys.readouterr().out.split())
    spec = spec_from_dict({
        "model": "tiny:random", "data": {"path": str(tmp_path)},
        "evaluate": {"n_prompts": 2, "n_per_prompt": 1},
        "space": {"groups": [{"name": "a", "units": "mid_block", "methods": {"full": {}}}]},
    })  # fmt: skip
    check_data_folder(spec, tmp_path)  # what `run` reads before its first trial


def test_metadata_csv_beside_the_same_jsonl_is_fine(tmp_path: Path) -> None:
    """Both files listing the same records (an empty CSV split is train, as a missing one): read from
    metadata.jsonl, nothing said."""
    _write_jsonl(tmp_path, [{"file_name": "a.png", "text": "x", "patient_id": 7},
                            {"file_name": "b.png", "text": "y", "split": "test"}])  # fmt: skip
    (tmp_path / "metadata.csv").write_text("file_name,text,split\na.png,x,\nb.png,y,test\n")
    assert read_metadata(tmp_path)[0]["patient_id"] == 7  # the JSONL's own record
    (tmp_path / "metadata.csv").write_text("file_name,text,split\na.png,x,\nb.png,y,validate\n")
    with pytest.raises(UserError, match=r"record 2: split 'test' vs 'validate'"):
        read_metadata(tmp_path)
    (tmp_path / "metadata.csv").write_text("file_name,text\na.png,x\n")
    with pytest.raises(UserError, match=r"they differ \(2 vs 1 records\)"):
        read_metadata(tmp_path)
    (tmp_path / "metadata.csv").write_text("name,caption\na.png,x\n")
    with pytest.raises(
        UserError, match=r"has both metadata\.jsonl and metadata\.csv, and \S*metadata\.csv lacks"
    ):
        read_metadata(tmp_path)


def test_empty_split_values_are_train_everywhere(tmp_path: Path) -> None:
    """An empty CSV split cell is train, as a missing split is (in_split: the rule every reader uses)."""
    from capsearch.datasets.folder import in_split

    _png(tmp_path / "a.png")
    (tmp_path / "metadata.csv").write_text("file_name,text,split\na.png,x,\n")
    records = read_metadata(tmp_path)
    assert in_split(records[0], "train") and len(ImageCaptionDataset(tmp_path, split="train")) == 1
