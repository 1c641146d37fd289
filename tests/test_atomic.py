"""Atomic writes and generated data's completeness marker: nothing half-written is read back as valid."""

from __future__ import annotations

import errno
import json
import os

import pytest

import capsearch.atomic as atomic
from capsearch.atomic import atomic_target, atomic_write


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    atomic_write(path, '{"fid": 1}')
    monkeypatch.setattr(atomic.os, "fsync", _full_disk)
    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, '{"fid": 2, "much": "more"}')
    assert json.loads(path.read_text()) == {"fid": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_writer_failing_part_way_leaves_nothing_new(tmp_path):
    path = tmp_path / "delta.safetensors"
    with pytest.raises(RuntimeError), atomic_target(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_run_records_deltas_and_training_results_go_through_the_atomic_writer(
    tmp_path, monkeypatch
):
    from capsearch.methods import apply_methods
    from capsearch.models.delta import save_delta
    from capsearch.models.load import load_pipeline
    from capsearch.search.runs import write_json

    monkeypatch.setattr(atomic.os, "fsync", _full_disk)
    with pytest.raises(OSError):
        write_json(tmp_path / "result.json", {"status": "ok"})
    unet = load_pipeline("tiny:random").unet
    applied = apply_methods(unet, [{"method": "difffit", "units": ["mid_block.attentions"]}])
    with pytest.raises(OSError):
        save_delta(unet, tmp_path / "delta", applied=applied)
    assert not (tmp_path / "result.json").exists()
    assert list((tmp_path / "delta").iterdir()) == []  # no half a delta to load later


def test_a_cut_short_phantom_generation_is_made_again(tmp_path):
    from capsearch.config import spec_from_dict
    from capsearch.search.inputs import prepare_data
    from capsearch.worlds.phantom import COMPLETE, METADATA, phantom_complete

    spec = spec_from_dict(
        {
            "model": "tiny:random",
            "data": {"phantom": {"patients": 6, "size": 32, "held_out_images": 4}},
            "space": {
                "groups": [
                    {
                        "name": "a",
                        "units": "mid_block.attentions",
                        "methods": {"frozen": {}, "full": {}},
                    }
                ]
            },  # fmt: skip
        }
    )
    root = prepare_data(spec, tmp_path)
    assert phantom_complete(root)
    whole = (root / METADATA).read_bytes()
    (root / METADATA).write_bytes(whole[: len(whole) // 2])  # a kill while it was written
    assert not phantom_complete(root)
    assert prepare_data(spec, tmp_path) == root and (root / METADATA).read_bytes() == whole
    (root / COMPLETE).unlink()  # killed before the marker: the images may be incomplete
    assert not phantom_complete(root)
    mtime = os.stat(root / METADATA).st_mtime_ns
    prepare_data(spec, tmp_path)
    assert phantom_complete(root) and os.stat(root / METADATA).st_mtime_ns >= mtime
