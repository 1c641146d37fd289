"""Bad inputs across every command: each is exit code 2 and one clean stderr line naming the culprit.

One table of cases; each case builds its input under tmp_path and returns the argv of
`capsearch.cli.main`. The error line must match the case's regex (it names the YAML key path, the
file, the folder or the flag and its allowed range), nothing may print a traceback, and a case that
points at an existing run folder must leave that folder exactly as it was. docs/reliability.md
lists the table.
No case trains or samples: each fails before any work starts (models are `tiny:random`, built from
its config without weights).
"""

from __future__ import annotations

import json
import os
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from PIL import Image

from capsearch.cli import main

MINIMAL = {
    "model": "tiny:random",
    "space": {
        "groups": [
            {"name": "a", "units": "mid_block.attentions", "methods": {"frozen": {}, "full": {}}}
        ]
    },
}


# --- builders -------------------------------------------------------------------------------


def spec_with(**changes) -> dict:
    """MINIMAL with top-level keys replaced (None removes a key)."""
    data = json.loads(json.dumps(MINIMAL))
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return data


def write_spec(tmp: Path, data: dict | str | bytes, name: str = "spec.yaml") -> Path:
    path = tmp / name
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def png(path: Path, size: int = 32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (size, size), 128).save(path)


def data_folder(tmp: Path, rows: list[dict] | None = None, name: str = "data") -> Path:
    """An image folder with metadata.jsonl: by default two readable train images."""
    root = tmp / name
    root.mkdir()
    if rows is None:
        rows = [{"file_name": f"images/{i}.png", "text": "no acute process"} for i in range(2)]
        for row in rows:
            png(root / row["file_name"])
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def make_run(
    tmp: Path, name: str = "run", trials: bool = True, delta: bool = False, seed: int = 0
) -> Path:
    """A run folder as a search makes it (spec.yaml), with an ok baseline and an errored trial
    (with `delta`, the ok one has a delta checkpoint); `seed`: its seed in a report over seeds."""
    from capsearch.config import load_spec
    from capsearch.search.runs import prepare_run_dir, trial_dir, write_json

    spec = spec_with(baselines={"methods": ["freeze"]}, data={"phantom": {"seed": seed}})
    spec_path = write_spec(tmp, spec, f"{name}.yaml")
    run = prepare_run_dir(load_spec(spec_path), tmp / name, resume=False)
    if trials:
        for number, status, baseline in ((0, "ok", "freeze"), (1, "error", None)):
            folder = trial_dir(run, number)
            folder.mkdir(parents=True)
            record = {"trial": folder.name, "number": number, "baseline": baseline,
                      "status": status, "params": {}, "method_spec": [], "train": {},
                      "metrics": {"fid": 100.0, "amd": 0.1}, "reward": -1.0}  # fmt: skip
            if status == "error":
                record["error"] = "RuntimeError: out of memory"
            write_json(folder / "result.json", record)
        if delta:
            make_delta(trial_dir(run, 0))
    return run


def make_delta(tmp: Path, name: str = "delta", block_out_channels: tuple | None = None) -> Path:
    """A real delta checkpoint (DiffFit on every unit) of the tiny UNet, or of one of other widths."""
    from diffusers import UNet2DConditionModel

    from capsearch.methods import apply_methods
    from capsearch.models.delta import save_delta
    from capsearch.models.tiny import TINY_UNET_CONFIG

    config = dict(TINY_UNET_CONFIG)
    if block_out_channels is not None:
        config["block_out_channels"] = block_out_channels
    unet = UNet2DConditionModel(**config)
    applied = apply_methods(unet, {"method": "difffit", "units": "*"})
    return save_delta(unet, tmp / name, applied=applied)


def sample_argv(tmp: Path, *extra: str) -> list[str]:
    return ["sample", "--model", "tiny:random", "--prompt", "no acute process",
            "--out", str(tmp / "grid.png"), *extra]  # fmt: skip


def train_argv(tmp: Path, data: Path | None, *extra: str, out: Path | None = None) -> list[str]:
    data = data if data is not None else data_folder(tmp)
    return ["train", "--model", "tiny:random", "--data", str(data),
            "--out", str(out or tmp / "out"), *extra]  # fmt: skip


def eval_argv(tmp: Path, data: Path | None, *extra: str) -> list[str]:
    data = data if data is not None else data_folder(tmp)
    return ["eval", "--model", "tiny:random", "--data", str(data),
            "--out", str(tmp / "eval"), *extra]  # fmt: skip


def validate(tmp: Path, data: dict | str | bytes, *extra: str) -> list[str]:
    return ["validate", str(write_spec(tmp, data)), *extra]


def mimic_root(tmp: Path, metadata_header: str) -> Path:
    root = tmp / "mimic"
    root.mkdir()
    (root / "mimic-cxr-2.0.0-metadata.csv").write_text(metadata_header + "\n")
    (root / "mimic-cxr-2.0.0-split.csv").write_text("dicom_id,subject_id,study_id,split\n")
    return root


def corrupt_png_data(tmp: Path) -> Path:
    root = data_folder(tmp, [{"file_name": "images/0.png", "text": "no acute process"}])
    (root / "images").mkdir()
    (root / "images" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 8)
    return root


def broken_jsonl(tmp: Path) -> Path:
    root = data_folder(tmp)
    with (root / "metadata.jsonl").open("a") as handle:
        handle.write('{"file_name": "images/2.png", "text": \n')
    return root


def csv_data(tmp: Path) -> Path:
    root = tmp / "data"
    root.mkdir()
    png(root / "0.png")
    (root / "metadata.csv").write_text("image,caption\n0.png,no acute process\n")
    return root


def extends_cycle(tmp: Path) -> list[str]:
    write_spec(tmp, {"extends": "b.yaml", **MINIMAL}, "a.yaml")
    write_spec(tmp, {"extends": "a.yaml"}, "b.yaml")
    return ["validate", str(tmp / "a.yaml")]


def corrupt_delta(tmp: Path) -> Path:
    delta = make_delta(tmp)
    (delta / "delta.safetensors").write_bytes(b"\xff" * 64)
    return delta


def foreign_out(tmp: Path) -> list[str]:
    (tmp / "busy").mkdir()
    (tmp / "busy" / "notes.txt").write_text("mine")
    return ["data", "phantom", "--out", str(tmp / "busy"), "--patients", "2", "--size", "32"]


def plain_folder(tmp: Path, name: str = "folder") -> Path:
    """A folder holding one text file: not a run, a dataset, a delta, a model or a MIMIC root."""
    folder = tmp / name
    folder.mkdir()
    (folder / "notes.txt").write_text("not a run")
    return folder


def broken_run_spec(tmp: Path) -> Path:
    run = make_run(tmp)
    (run / "spec.yaml").write_text("space: [unclosed\n")
    return run


def export_into_non_empty(tmp: Path) -> list[str]:
    run = make_run(tmp, delta=True)
    (tmp / "exp").mkdir()
    (tmp / "exp" / "keep.txt").write_text("mine")
    return ["export", str(run), "--trial", "t000", "--out", str(tmp / "exp")]


def model_without_unet(tmp: Path) -> Path:
    folder = tmp / "model"
    folder.mkdir()
    (folder / "notes.txt").write_text("no model here")
    return folder


def model_empty_unet(tmp: Path) -> Path:
    folder = tmp / "model"
    for sub in ("unet", "text_encoder", "tokenizer", "scheduler"):
        (folder / sub).mkdir(parents=True)
    return folder


def metadata_text(tmp: Path, name: str, text: str | bytes, folder: str = "data") -> Path:
    """A dataset folder holding one metadata file with exactly this text (images: two PNGs)."""
    root = tmp / folder
    root.mkdir(exist_ok=True)
    for i in range(2):
        png(root / "images" / f"{i}.png")
    path = root / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return root


def csv_beside_jsonl(tmp: Path) -> Path:
    """metadata.jsonl and a metadata.csv that names the second image's caption otherwise."""
    root = data_folder(tmp)
    (root / "metadata.csv").write_text(
        "file_name,text\nimages/0.png,no acute process\nimages/1.png,small left effusion\n"
    )
    return root


def listed(
    tmp: Path, train: int = 4, validate: int = 8, test: int = 8, split: str | None = None
) -> Path:
    """A data folder whose metadata.jsonl lists images per split with two captions each (the images
    are not written: what `run` checks before its run folder reads no image); `split`: one more
    record of that split."""
    root = tmp / "data"
    root.mkdir()
    rows = [{"file_name": f"images/{s}{i}.png", "text": f"finding {i % 2}", "split": s}
            for s, n in (("train", train), ("validate", validate), ("test", test)) for i in range(n)]  # fmt: skip
    if split is not None:
        rows.append({"file_name": "images/odd.png", "text": "finding 0", "split": split})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def data_spec(root: Path, **changes) -> dict:
    """MINIMAL on a data folder, evaluating 2 prompts × 1 sample (its references need 8 images)."""
    return spec_with(data={"path": str(root)}, evaluate={"n_prompts": 2, "n_per_prompt": 1},
                     **changes)  # fmt: skip


def run_on(tmp: Path, spec: dict, *extra: str) -> list[str]:
    return ["run", str(write_spec(tmp, spec)), "--out", str(tmp / "r"), *extra]


def trials_without_spec(tmp: Path) -> list[str]:
    run = make_run(tmp)
    (run / "spec.yaml").unlink()
    return ["run", str(tmp / "run.yaml"), "--out", str(run)]


def spec_beside_itself(tmp: Path) -> list[str]:
    """`--out` the folder that holds the spec file run is given (and nothing else)."""
    (tmp / "mine").mkdir()
    return ["run", str(write_spec(tmp / "mine", MINIMAL)), "--out", str(tmp / "mine")]


def leftover_with_notes(tmp: Path) -> list[str]:
    """A folder a refused run left (its spec.yaml, no trial), into which a file of the user's went."""
    run = make_run(tmp, trials=False)
    (run / "notes.txt").write_text("mine")
    return ["run", str(tmp / "run.yaml"), "--out", str(run)]


# Settings a baseline trains with that its plan refuses (warm-up longer than its own steps).
SHORT_BASELINE = {"train": {"warmup_steps": 10},
                  "space": {"groups": [{"name": "all", "units": "*", "methods": {"frozen": {}, "full": {}}}]},
                  "baselines": {"methods": ["full"], "train": {"full": {"steps": 5}}}}  # fmt: skip
SHORT_SEARCH = {"train": {"warmup_steps": 10},
                "space": {**MINIMAL["space"], "steps": [5, 20]}}  # fmt: skip


# --- the table ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """A bad input: id, builder (tmp_path → argv), the error line's regex, a watched run folder."""

    id: str
    build: Callable[[Path], list[str]]
    error: str
    watch: tuple[
        str, ...
    ] = ()  # run folders under tmp_path that the command must leave as they are


def seeds(tmp: Path, same_seed: bool = False) -> list[str]:
    """`report` over two runs (seeds 0 and 1, or 0 twice)."""
    second = make_run(tmp, "run2", seed=0 if same_seed else 1)
    return ["report", str(make_run(tmp, "run")), str(second)]


CASES = [
    # spec YAML (validate, run)
    Case("spec-yaml-syntax", lambda t: validate(t, "space:\n  groups: [\n    {name: a\n"),
         r"spec\.yaml:? line \d+: invalid YAML"),
    Case("spec-binary-file", lambda t: validate(t, b"\x89PNG\r\n\x1a\n\x00\xff\xfe binary"),
         r"cannot read \S*spec\.yaml: 'utf-8' codec can't decode"),
    Case("spec-missing-file", lambda t: ["validate", str(t / "nothere.yaml")],
         r"spec file \S*nothere\.yaml does not exist"),
    Case("spec-top-level-list", lambda t: validate(t, "- model: tiny\n"),
         r"spec\.yaml: the top level must be a mapping"),
    Case("spec-unknown-key", lambda t: validate(t, spec_with(modle="tiny")),
         r"spec\.yaml: modle: unknown key \(allowed: .*\bmodel\b"),
    Case("spec-unknown-hyper-parameter",
         lambda t: validate(t, spec_with(space={"groups": [{"name": "a", "units": "mid_block",
                                                            "methods": {"lora": {"rnk": 4}}}]})),
         r"space\.groups\[0\]\.methods\.lora\.rnk: unknown hyper-parameter 'rnk'.*rank"),
    Case("spec-wrong-type", lambda t: validate(t, spec_with(search={"num_samples": "four"})),
         r"search\.num_samples: Input should be a valid integer, got 'four'"),
    Case("spec-reversed-range",
         lambda t: validate(t, spec_with(space={"groups": [{"name": "a", "units": "mid_block",
                                                            "methods": {"lora": {"rank": [8, 2]}}}]})),
         r"space\.groups\[0\]\.methods\.lora\.rank: low \(8\) must be below high \(2\)"),
    Case("spec-removed-key",
         lambda t: validate(t, spec_with(evaluate={"fid_reference": "train"})),
         r"evaluate: fid_reference was removed"),
    Case("spec-missing-section", lambda t: validate(t, spec_with(space=None)),
         r"spec\.yaml: space: missing \(required\)"),
    Case("spec-constraint-on-unknown-metric",
         lambda t: validate(t, spec_with(objective={"constraints": {"extracted_images": 0}})),
         r"objective\.constraints: .*unknown constrained metric 'extracted_images'; choose from .*\bextracted\b"),
    Case("spec-final-train-seed-is-the-trials-own",
         lambda t: validate(t, spec_with(final={"train_seeds": [1, 0]})),
         r"final\.train_seeds: \[1, 0\] must be distinct and differ from train\.seed \(0\)"),
    Case("spec-out-of-range", lambda t: validate(t, spec_with(train={"caption_dropout": 1.5})),
         r"train\.caption_dropout: Input should be less than or equal to 1"),
    Case("spec-set-without-equals",
         lambda t: validate(t, MINIMAL, "--set", "search.num_samples"),
         r"--set 'search\.num_samples': expected KEY=VALUE"),
    Case("spec-set-bad-index",
         lambda t: validate(t, MINIMAL, "--set", "space.groups[3].name=b"),
         r"--set space\.groups\[3\]\.name: there is no 3"),
    Case("spec-set-bad-value",
         lambda t: validate(t, MINIMAL, "--set", "search.num_samples=-1"),
         r"search\.num_samples: Input should be greater than or equal to 0"),
    Case("spec-extends-cycle", extends_cycle, r"a\.yaml: extends loops back to itself"),
    Case("spec-extends-missing-parent",
         lambda t: validate(t, {"extends": "parent.yaml", **MINIMAL}),
         r"spec\.yaml: extends: \S*parent\.yaml does not exist"),
    Case("spec-units-match-nothing",
         lambda t: validate(t, spec_with(space={"groups": [{"name": "a", "units": "mid_blok",
                                                            "methods": {"full": {}}}]})),
         r"space\.groups\[0\]\.units: unit pattern 'mid_blok' matches no unit.*mid_block"),
    Case("spec-baseline-no-group",
         lambda t: validate(t, spec_with(baselines={"methods": ["svdiff"]})),
         r"baselines\.methods\[0\]: no group of space\.groups allows 'svdiff'"),
    Case("spec-data-path-and-phantom",
         lambda t: validate(t, spec_with(data={"path": "x", "phantom": {}})),
         r"data: give exactly one of phantom or path"),
    # the second pass (values that validate but cannot work, names that leave runs/, duplicate keys)
    Case("spec-duplicate-key", lambda t: validate(t, "model: tiny:random\ntrain: {steps: 6}\ntrain: {steps: 6000}\n"),
         r"spec\.yaml: line 3: invalid YAML: duplicate key 'train' \(first given on line 2\)"),
    Case("spec-duplicate-nested-key", lambda t: validate(t, "model: tiny:random\ntrain:\n  steps: 6\n  steps: 7\n"),
         r"line 4: invalid YAML: duplicate key 'steps' \(first given on line 3\)"),
    Case("spec-name-leaves-runs", lambda t: validate(t, spec_with(name="../../escaped")),
         r"name: must be one folder name: .*got '\.\./\.\./escaped'"),
    Case("spec-name-with-slash", lambda t: validate(t, spec_with(name="a/b")), r"name: must be one folder name"),
    Case("spec-name-empty", lambda t: validate(t, spec_with(name="")), r"name: must be one folder name"),
    Case("spec-model-empty", lambda t: validate(t, spec_with(model="")), r"model: String should have at least 1 character"),
    Case("spec-lr-infinite", lambda t: validate(t, spec_with(train={"lr": float("inf")})),
         r"train\.lr: Input should be a finite number"),
    Case("spec-lr-nan", lambda t: validate(t, "model: tiny:random\ntrain: {lr: .nan}\n"),
         r"train\.lr: Input should be a finite number"),
    Case("spec-unknown-lr-schedule", lambda t: validate(t, spec_with(train={"lr_schedule": "cosine_to_zero"})),
         r"train\.lr_schedule: unknown schedule 'cosine_to_zero'; choose one of linear, cosine"),
    Case("spec-warmup-longer-than-run", lambda t: validate(t, spec_with(train={"steps": 10, "warmup_steps": 50})),
         r"train\.warmup_steps: 50 warm-up steps are longer than the run \(10 steps\)"),
    Case("spec-search-seed-too-large", lambda t: validate(t, spec_with(search={"seed": 2**32})),
         r"search\.seed: Input should be less than or equal to 4294967295"),
    Case("run-out-is-a-file",
         lambda t: ["run", str(write_spec(t, MINIMAL)), "--out", str(write_spec(t, "x", "o.txt"))],
         r"--out \S*o\.txt is a file, not a run folder; choose a folder"),
    Case("run-out-under-a-file",
         lambda t: ["run", str(write_spec(t, MINIMAL)), "--out", str(write_spec(t, "x", "o.txt") / "run")],
         r"--out \S*o\.txt/run: \S*o\.txt is a file, not a folder"),
    Case("sample-steps-beyond-the-schedule", lambda t: sample_argv(t, "--steps", "1000000000"),
         r"--steps must be at most the model's 1000 training timesteps, got 1000000000"),
    Case("sample-guidance-nan", lambda t: sample_argv(t, "--guidance", "nan"),
         r"--guidance must be a finite number, got nan"),
    Case("run-spec-unknown-key",
         lambda t: ["run", str(write_spec(t, spec_with(serch={}))), "--out", str(t / "r")],
         r"spec\.yaml: serch: unknown key"),
    Case("run-missing-model",
         lambda t: ["run", str(write_spec(t, spec_with(model=str(t / "no-model")))),
                    "--out", str(t / "r")],
         r"model '\S*no-model' not found"),
    Case("run-missing-data-path",
         lambda t: ["run", str(write_spec(t, spec_with(data={"path": str(t / "no-data")}))),
                    "--out", str(t / "r")],
         r"dataset folder \S*no-data does not exist"),
    # data folders and metadata
    Case("check-missing-folder", lambda t: ["data", "check", str(t / "nothere")],
         r"dataset folder \S*nothere does not exist"),
    Case("check-no-metadata", lambda t: ["data", "check", str(plain_folder(t))],
         r"dataset folder \S*folder has no metadata\.jsonl or metadata\.csv"),
    Case("check-broken-json-line", lambda t: ["data", "check", str(broken_jsonl(t))],
         r"metadata\.jsonl:3: not a JSON object"),
    Case("check-csv-missing-columns", lambda t: ["data", "check", str(csv_data(t))],
         r"metadata\.csv lacks column\(s\) file_name, text \(its header: image, caption\)"),
    Case("check-file-not-folder",
         lambda t: ["data", "check", str(data_folder(t) / "metadata.jsonl")],
         r"\S*metadata\.jsonl is a file; give the dataset folder"),
    Case("train-missing-image",
         lambda t: train_argv(t, data_folder(t, [{"file_name": "images/gone.png", "text": "x"}])),
         r"no readable training images in \S*data: 1 unreadable file\(s\), e\.g\. images/gone\.png "
         r"\(.*No such file"),
    Case("train-corrupt-png", lambda t: train_argv(t, corrupt_png_data(t)),
         r"no readable training images in \S*data: 1 unreadable file\(s\), e\.g\. images/0\.png"),
    Case("train-no-train-split",
         lambda t: train_argv(t, data_folder(t, [{"file_name": "images/0.png", "text": "x",
                                                  "split": "validate"}])),
         r"\S*data has no training images \(no record of split 'train'\)"),
    Case("train-missing-data", lambda t: train_argv(t, t / "nothere"),
         r"data folder \S*nothere does not exist"),
    Case("train-no-metadata", lambda t: train_argv(t, plain_folder(t)),
         r"\S*folder has no metadata\.jsonl or metadata\.csv"),
    Case("scorer-missing-data",
         lambda t: ["pretrain", "scorer", "--data", str(t / "nothere"), "--out", str(t / "s")],
         r"phantom dataset folder \S*nothere does not exist"),
    Case("scorer-no-metadata",
         lambda t: ["pretrain", "scorer", "--data", str(plain_folder(t)), "--out", str(t / "s")],
         r"\S*folder is not a phantom dataset \(no metadata\.jsonl\)"),
    Case("scorer-epochs-zero",
         lambda t: ["pretrain", "scorer", "--data", str(data_folder(t)), "--out", str(t / "s"),
                    "--epochs", "0"],
         r"--epochs must be at least 1, got 0"),
    Case("scorer-size",
         lambda t: ["pretrain", "scorer", "--data", str(data_folder(t)), "--out", str(t / "s"),
                    "--size", "4"],
         r"--size must be at least 8, got 4"),
    Case("scorer-too-few-images",
         lambda t: ["pretrain", "scorer", "--data", str(data_folder(t)), "--out", str(t / "s")],
         r"\S*data has too few images to train the scorer \(2 train, 0 held out\)"),
    Case("scorer-out-is-file",
         lambda t: ["pretrain", "scorer", "--data", str(data_folder(t)),
                    "--out", str(write_spec(t, "x", "s.txt"))],
         r"--out \S*s\.txt exists and is not a folder"),
    Case("eval-missing-data", lambda t: eval_argv(t, t / "nothere"),
         r"data folder \S*nothere does not exist"),
    Case("eval-n-prompts-one", lambda t: eval_argv(t, None, "--n-prompts", "1"),
         r"eval\.n_prompts: Input should be greater than or equal to 2"),
    Case("eval-no-metadata", lambda t: eval_argv(t, plain_folder(t)),
         r"dataset folder \S*folder has no metadata\.jsonl or metadata\.csv"),
    Case("eval-out-is-file",
         lambda t: ["eval", "--model", "tiny:random", "--data", str(data_folder(t)),
                    "--out", str(write_spec(t, "x", "e.txt"))],
         r"--out \S*e\.txt exists and is not a folder"),
    Case("eval-missing-delta", lambda t: eval_argv(t, None, "--delta", str(t / "nodelta")),
         r"delta folder \S*nodelta does not exist"),
    # data phantom / mimic arguments
    Case("phantom-patients-zero",
         lambda t: ["data", "phantom", "--out", str(t / "p"), "--patients", "0"],
         r"--patients must be at least 1, got 0"),
    Case("phantom-dup-fraction",
         lambda t: ["data", "phantom", "--out", str(t / "p"), "--dup-fraction", "1.5"],
         r"--dup-fraction must be between 0 and 1, got 1\.5"),
    Case("phantom-size", lambda t: ["data", "phantom", "--out", str(t / "p"), "--size", "48"],
         r"--size must be one of 32, 64, 128, got 48"),
    Case("phantom-dup-copies",
         lambda t: ["data", "phantom", "--out", str(t / "p"), "--dup-copies", "0"],
         r"--dup-copies must be at least 1, got 0"),
    Case("phantom-out-not-ours", foreign_out, r"output folder \S*busy holds other files"),
    Case("mimic-missing-root",
         lambda t: ["data", "mimic", "--root", str(t / "nothere"), "--out", str(t / "m")],
         r"MIMIC-CXR-JPG root \S*nothere does not exist"),
    Case("mimic-missing-reports",
         lambda t: ["data", "mimic", "--root", str(mimic_root(t, "dicom_id,subject_id,study_id")),
                    "--out", str(t / "m"), "--reports", str(t / "noreports")],
         r"report folder \S*noreports does not exist"),
    Case("mimic-not-a-root",
         lambda t: ["data", "mimic", "--root", str(plain_folder(t)), "--out", str(t / "m")],
         r"has no mimic-cxr-2\.0\.0-metadata\.csv"),
    Case("mimic-csv-missing-columns",
         lambda t: ["data", "mimic", "--root", str(mimic_root(t, "dicom_id,subject_id,study_id")),
                    "--out", str(t / "m")],
         r"mimic-cxr-2\.0\.0-metadata\.csv lacks column\(s\) ViewPosition"),
    # pretrain shapes arguments
    Case("shapes-negative-steps",
         lambda t: ["pretrain", "shapes", "--out", str(t / "s"), "--steps", "-5"],
         r"--steps must be at least 1, got -5"),
    Case("shapes-zero-lr", lambda t: ["pretrain", "shapes", "--out", str(t / "s"), "--lr", "0"],
         r"--lr must be positive, got 0\.0"),
    Case("shapes-ema-decay",
         lambda t: ["pretrain", "shapes", "--out", str(t / "s"), "--ema-decay", "1.5"],
         r"--ema-decay must be in \[0, 1\), got 1\.5"),
    Case("shapes-negative-minutes",
         lambda t: ["pretrain", "shapes", "--out", str(t / "s"), "--minutes", "-2"],
         r"--minutes must be positive, got -2\.0"),
    Case("shapes-zero-checkpoint-every",
         lambda t: ["pretrain", "shapes", "--out", str(t / "s"), "--checkpoint-every", "0"],
         r"--checkpoint-every must be at least 1, got 0"),
    Case("shapes-out-is-file",
         lambda t: ["pretrain", "shapes", "--out", str(write_spec(t, "x", "s.txt"))],
         r"--out \S*s\.txt exists and is not a folder"),
    # sample: arguments, models, deltas
    Case("sample-n-zero", lambda t: sample_argv(t, "--n", "0"), r"--n must be at least 1, got 0"),
    Case("sample-n-not-a-number", lambda t: sample_argv(t, "--n", "four"),
         r"^capsearch sample: error: argument --n: invalid int value: 'four'"),
    Case("sample-negative-steps", lambda t: sample_argv(t, "--steps", "-3"),
         r"--steps must be at least 1, got -3"),
    Case("sample-out-is-folder",
         lambda t: ["sample", "--model", "tiny:random", "--prompt", "x", "--out", str(t)],
         r"--out \S+ is a folder; give the PNG file to write"),
    Case("sample-unknown-scheduler", lambda t: sample_argv(t, "--scheduler", "warp"),
         r"scheduler 'warp'.*ddim"),
    Case("sample-missing-model",
         lambda t: ["sample", "--model", "/does/not/exist", "--prompt", "x",
                    "--out", str(t / "g.png")],
         r"model '/does/not/exist' not found"),
    Case("sample-model-without-unet",
         lambda t: ["sample", "--model", str(model_without_unet(t)), "--prompt", "x",
                    "--out", str(t / "g.png")],
         r"model folder \S*model has no unet/ subfolder"),
    Case("sample-model-empty-parts",
         lambda t: ["sample", "--model", str(model_empty_unet(t)), "--prompt", "x",
                    "--out", str(t / "g.png")],
         r"cannot load model from \S*model"),
    Case("sample-missing-delta", lambda t: sample_argv(t, "--delta", str(t / "nodelta")),
         r"delta folder \S*nodelta does not exist"),
    Case("sample-corrupt-delta", lambda t: sample_argv(t, "--delta", str(corrupt_delta(t))),
         r"cannot read \S*delta\.safetensors"),
    Case("sample-delta-other-unet",
         lambda t: sample_argv(t, "--delta", str(make_delta(t, block_out_channels=(16, 32, 48, 64)))),
         r"delta \S*delta was trained on a UNet with block_out_channels=\[16, 32, 48, 64\]"),
    Case("sample-delta-not-a-delta", lambda t: sample_argv(t, "--delta", str(plain_folder(t))),
         r"\S*folder is not a capsearch delta: spec\.json is missing"),
    # methods, units
    Case("methods-missing-model", lambda t: ["methods", "--model", "/does/not/exist"],
         r"model '/does/not/exist' not found"),
    Case("methods-units-match-nothing", lambda t: ["methods", "--model", "tiny", "--units", "nope"],
         r"unit pattern 'nope' matches no unit"),
    Case("units-missing-model", lambda t: ["units", "--model", str(t / "nomodel")],
         r"model '\S*nomodel' not found"),
    Case("units-select-nothing", lambda t: ["units", "--select", "mid_blok"],
         r"unit pattern 'mid_blok' matches no unit.*mid_block"),
    Case("units-backwards-range", lambda t: ["units", "--select", "down_blocks.3-1"],
         r"unit pattern 'down_blocks\.3-1': range 3-1 runs backwards"),
    # train arguments
    Case("train-unknown-method", lambda t: train_argv(t, None, "--method", "lorax"),
         r"unknown method 'lorax'; known methods: .*lora"),
    Case("train-param-without-equals",
         lambda t: train_argv(t, None, "--method", "lora", "--param", "rank"),
         r"--param 'rank': expected KEY=VALUE"),
    Case("train-param-unknown-key",
         lambda t: train_argv(t, None, "--method", "lora", "--param", "rnk=4"),
         r"unknown hyper-parameter 'rnk' for method 'lora'"),
    Case("train-param-wrong-type",
         lambda t: train_argv(t, None, "--method", "lora", "--param", "rank=big"),
         r"lora.*rank must be an integer, got 'big'"),
    Case("train-negative-steps", lambda t: train_argv(t, None, "--steps", "-3"),
         r"train\.steps: Input should be greater than or equal to 1"),
    Case("train-caption-dropout", lambda t: train_argv(t, None, "--caption-dropout", "1.5"),
         r"train\.caption_dropout: Input should be less than or equal to 1"),
    Case("train-mitigation-without-equals", lambda t: train_argv(t, None, "--mitigation", "rwa:k"),
         r"--mitigation 'rwa:k': expected KEY=VALUE"),
    Case("train-unknown-mitigation", lambda t: train_argv(t, None, "--mitigation", "blur"),
         r"unknown mitigation 'blur'"),
    Case("train-units-match-nothing", lambda t: train_argv(t, None, "--units", "nope"),
         r"unit pattern 'nope' matches no unit"),
    Case("train-spec-bad-json",
         lambda t: train_argv(t, None, "--spec", str(write_spec(t, "[{method", "m.json"))),
         r"method spec \S*m\.json is not valid JSON"),
    Case("train-spec-not-a-list",
         lambda t: train_argv(t, None, "--spec", str(write_spec(t, "42", "m.json"))),
         r"method spec \S*m\.json: a method spec is a mapping or a list of mappings, got 42"),
    Case("train-spec-entry-without-method",
         lambda t: train_argv(t, None, "--spec", str(write_spec(t, '[{"units": "*"}]', "m.json"))),
         r"method spec \S*m\.json: method entry 0 has no 'method' key"),
    Case("train-out-is-file",
         lambda t: train_argv(t, None, out=write_spec(t, "x", "o.txt")),
         r"--out \S*o\.txt exists and is not a folder"),
    Case("train-spec-missing", lambda t: train_argv(t, None, "--spec", str(t / "nospec.json")),
         r"method spec file \S*nospec\.json does not exist"),
    # data folders: what every command that reads one refuses (data check, train, run, validate)
    Case("check-empty-jsonl", lambda t: ["data", "check", str(metadata_text(t, "metadata.jsonl", ""))],
         r"data/metadata\.jsonl holds no records \(it is empty\)"),
    Case("check-blank-jsonl",
         lambda t: ["data", "check", str(metadata_text(t, "metadata.jsonl", "\n  \n\n"))],
         r"data/metadata\.jsonl holds no records \(it is empty\)"),
    Case("check-empty-csv", lambda t: ["data", "check", str(metadata_text(t, "metadata.csv", ""))],
         r"data/metadata\.csv holds no records \(it is empty\): write a header row file_name,text"),
    Case("check-csv-header-only",
         lambda t: ["data", "check", str(metadata_text(t, "metadata.csv", "file_name,text\n"))],
         r"data/metadata\.csv holds no records \(only its header\)"),
    Case("check-unknown-split-jsonl",
         lambda t: ["data", "check", str(data_folder(t, [
             {"file_name": "a.png", "text": "x", "split": "train"},
             {"file_name": "b.png", "text": "y", "split": "val"}]))],
         r"data/metadata\.jsonl:2: unknown split 'val' \(did you mean 'validate'\?\); use train, validate, test"),
    Case("check-unknown-split-csv",
         lambda t: ["data", "check", str(metadata_text(
             t, "metadata.csv", "file_name,text,split\nimages/0.png,x,\nimages/1.png,y,Train\n"))],
         r"data/metadata\.csv:3: unknown split 'Train' \(did you mean 'train'\?\)"),
    Case("check-split-not-text",
         lambda t: ["data", "check", str(data_folder(t, [{"file_name": "a.png", "text": "x", "split": 1}]))],
         r"data/metadata\.jsonl:1: split 1 is not text; use train, validate, test"),
    Case("check-csv-and-jsonl-differ", lambda t: ["data", "check", str(csv_beside_jsonl(t))],
         r"dataset folder \S*data has both metadata\.jsonl and metadata\.csv and they differ "
         r"\(record 2: text 'no acute process' vs 'small left effusion'\); capsearch reads metadata\.jsonl"),
    Case("check-csv-with-semicolons",
         lambda t: ["data", "check", str(metadata_text(t, "metadata.csv", "file_name;text\nimages/0.png;x\n"))],
         r"lacks column\(s\) file_name, text \(its header: file_name;text\); save it with commas"),
    Case("train-unknown-split",
         lambda t: train_argv(t, data_folder(t, [{"file_name": "a.png", "text": "x", "split": "valid"}])),
         r"data/metadata\.jsonl:1: unknown split 'valid' \(did you mean 'validate'\?\)"),
    Case("train-empty-metadata", lambda t: train_argv(t, metadata_text(t, "metadata.csv", "")),
         r"data/metadata\.csv holds no records \(it is empty\)"),
    Case("eval-no-validate-split", lambda t: eval_argv(t, None),
         r"\S*data has no 'validate' images: FID needs held-out patients"),
    Case("eval-unknown-split",
         lambda t: eval_argv(t, data_folder(t, [{"file_name": "a.png", "text": "x", "split": "VALIDATE"}])),
         r"data/metadata\.jsonl:1: unknown split 'VALIDATE' \(did you mean 'validate'\?\)"),
    Case("run-data-unknown-split", lambda t: run_on(t, data_spec(listed(t, split="holdout"))),
         r"data/metadata\.jsonl:21: unknown split 'holdout'; use train, validate, test"),
    Case("run-data-empty-metadata",
         lambda t: run_on(t, data_spec(metadata_text(t, "metadata.jsonl", ""))),
         r"data/metadata\.jsonl holds no records \(it is empty\)"),
    Case("run-data-csv-and-jsonl-differ", lambda t: run_on(t, data_spec(csv_beside_jsonl(t))),
         r"has both metadata\.jsonl and metadata\.csv and they differ"),
    Case("run-data-no-train-split", lambda t: run_on(t, data_spec(listed(t, train=0))),
         r"\S*data has no training images \(no record of split 'train'\)"),
    Case("run-data-no-validate-split", lambda t: run_on(t, data_spec(listed(t, validate=0))),
         r"\S*data has no 'validate' images: FID needs held-out patients"),
    Case("run-data-small-reference", lambda t: run_on(t, data_spec(listed(t, validate=3))),
         r"the validate reference of \S*data lists 3 images, fewer than evaluate\.reference_ratio × samples = 8"),
    Case("run-data-no-test-split-for-the-final-stage", lambda t: run_on(t, data_spec(listed(t, test=0))),
         r"\S*data has no 'test' images"),
    Case("spec-data-unknown-split", lambda t: validate(t, data_spec(listed(t, split="dev"))),
         r"data/metadata\.jsonl:21: unknown split 'dev'"),
    Case("spec-data-small-reference", lambda t: validate(t, data_spec(listed(t, validate=3))),
         r"the validate reference of \S*data lists 3 images"),
    # what run refuses before its run folder is written, and validate the same way
    Case("run-more-cpus-than-here", lambda t: run_on(t, spec_with(resources={"cpu": 4096})),
         r"resources\.cpu: a trial asks for 4096 but this machine has \d+ \(without --address the "
         r"search starts Ray here\); lower it or join a bigger cluster with --address"),
    Case("run-more-gpus-than-here", lambda t: run_on(t, spec_with(resources={"gpu": 1000})),
         r"resources\.gpu: a trial asks for 1000 but this machine has \d+"),
    Case("spec-more-gpus-than-here", lambda t: validate(t, spec_with(resources={"gpu": 1000})),
         r"resources\.gpu: a trial asks for 1000 but this machine has \d+"),
    Case("spec-address-unreachable",
         lambda t: validate(t, MINIMAL, "--address", "127.0.0.1:9"),
         r"cannot reach a Ray cluster at 127\.0\.0\.1:9"),
    Case("run-baseline-plan-fails", lambda t: run_on(t, spec_with(**SHORT_BASELINE)),
         r"baselines: the trial of baseline 'full' fails: train\.warmup_steps: 10 warm-up steps are "
         r"longer than the run \(5 steps\)"),
    Case("spec-baseline-plan-fails", lambda t: validate(t, spec_with(**SHORT_BASELINE)),
         r"baselines: the trial of baseline 'full' fails: train\.warmup_steps"),
    Case("spec-space-steps-below-warmup", lambda t: validate(t, spec_with(**SHORT_SEARCH)),
         r"space\.steps: a trial of 5 steps fails: train\.warmup_steps: 10 warm-up steps are longer"),
    Case("run-out-holds-other-files",
         lambda t: ["run", str(write_spec(t, MINIMAL)), "--out", str(plain_folder(t, "run"))],
         r"--out \S*run holds other files \(notes\.txt\) and no search; choose a new or empty folder",
         watch=("run",)),
    Case("run-out-holds-a-spec-of-ones-own", spec_beside_itself,
         r"--out \S*mine holds a spec\.yaml that no search wrote \(a spec file of your own\?\) and no "
         r"search; choose a new or empty folder", watch=("mine",)),
    Case("run-out-leftover-with-other-files", leftover_with_notes,
         r"--out \S*run holds other files \(notes\.txt\) and no search", watch=("run",)),
    Case("run-out-trials-without-spec", trials_without_spec,
         r"\S*run holds trials but no spec\.yaml: restore the spec it was started with", watch=("run",)),
    # run folders: run, status, report, export
    Case("run-existing-run",
         lambda t: ["run", str(t / "run.yaml"), "--out", str(make_run(t))],
         r"already holds a search; finish it with --resume", watch=("run",)),
    Case("run-retry-errors-without-resume",
         lambda t: ["run", str(t / "run.yaml"), "--out", str(make_run(t)), "--retry-errors"],
         r"--retry-errors runs failed trials of an existing run again: add --resume",
         watch=("run",)),
    Case("run-resume-no-spec",
         lambda t: ["run", str(write_spec(t, MINIMAL)), "--out", str(plain_folder(t, "run")),
                    "--resume"],
         r"nothing to resume: \S*run holds no search \(spec\.yaml is missing\)", watch=("run",)),
    Case("run-resume-other-spec",
         lambda t: ["run", str(t / "run.yaml"), "--out", str(make_run(t)), "--resume",
                    "--set", "search.num_samples=3"],
         r"the spec differs from the one \S*run was started with \(at search\.num_samples\)",
         watch=("run",)),
    Case("run-resume-nothing",
         lambda t: ["run", str(write_spec(t, MINIMAL, "tiny.yaml")), "--resume"],
         r"nothing to resume: no runs/tiny folder; pass --out"),
    Case("run-unreachable-address",
         lambda t: ["run", str(write_spec(t, MINIMAL)), "--out", str(t / "r"),
                    "--address", "127.0.0.1:9"],
         r"cannot reach a Ray cluster at 127\.0\.0\.1:9"),
    Case("status-not-a-run", lambda t: ["status", str(plain_folder(t, "run"))],
         r"\S*run is not a capsearch run folder \(no spec\.yaml\)", watch=("run",)),
    Case("status-missing-folder", lambda t: ["status", str(t / "nothere")],
         r"run folder \S*nothere does not exist"),
    Case("status-file-not-folder", lambda t: ["status", str(write_spec(t, MINIMAL))],
         r"\S*spec\.yaml is a file, not a capsearch run folder"),
    Case("status-broken-spec", lambda t: ["status", str(broken_run_spec(t))],
         r"run/spec\.yaml:? line \d+: invalid YAML", watch=("run",)),
    Case("report-not-a-run", lambda t: ["report", str(plain_folder(t, "run"))],
         r"\S*run is not a capsearch run folder \(no spec\.yaml\)", watch=("run",)),
    Case("report-two-runs-no-out", seeds,
         r"2 runs make one report over seeds: give its folder with --out DIR",
         watch=("run", "run2")),
    Case("report-seeds-same-baseline",
         lambda t: seeds(t, same_seed=True) + ["--out", str(t / "seeds")],
         r"runs \S*run and \S*run2 both hold baseline 'freeze' for seed 0", watch=("run", "run2")),
    Case("report-out-is-file",
         lambda t: seeds(t) + ["--out", str(write_spec(t, "x", "r.txt"))],
         r"--out \S*r\.txt exists and is not a folder", watch=("run", "run2")),
    Case("export-unknown-trial",
         lambda t: ["export", str(make_run(t)), "--trial", "t999", "--out", str(t / "e")],
         r"no trial 't999' in this run \(trials: t000, t001; or best\)", watch=("run",)),
    Case("export-not-a-run",
         lambda t: ["export", str(plain_folder(t, "run")), "--out", str(t / "e")],
         r"\S*run is not a capsearch run folder \(no spec\.yaml\)", watch=("run",)),
    Case("export-failed-trial",
         lambda t: ["export", str(make_run(t)), "--trial", "t001", "--out", str(t / "e")],
         r"trial t001 did not finish successfully \(error\)", watch=("run",)),
    Case("export-no-trials",
         lambda t: ["export", str(make_run(t, trials=False)), "--out", str(t / "e")],
         r"the run has no finished trials yet", watch=("run",)),
    Case("export-out-not-empty", export_into_non_empty,
         r"export folder \S*exp is not empty; choose a new one", watch=("run",)),
    Case("export-out-is-file",
         lambda t: ["export", str(make_run(t, delta=True)), "--trial", "t000",
                    "--out", str(write_spec(t, "x", "e.txt"))],
         r"export folder \S*e\.txt is a file; choose a new folder", watch=("run",)),
    Case("export-into-its-own-trial",
         lambda t: ["export", str(make_run(t, delta=True)), "--trial", "t000",
                    "--out", str(t / "run" / "trials" / "t000" / "delta" / "exported")],
         r"export folder \S*exported is inside the run folder \S*run; choose one outside it", watch=("run",)),
    Case("export-out-under-a-file",
         lambda t: ["export", str(make_run(t, delta=True)), "--trial", "t000",
                    "--out", str(write_spec(t, "x", "e.txt") / "exp")],
         r"export folder \S*e\.txt/exp: \S*e\.txt is a file, not a folder", watch=("run",)),
]  # fmt: skip


def snapshot(folder: Path) -> dict[str, tuple]:
    """Relative path → (size, mtime) of every file and folder under `folder`."""
    out = {}
    for path in sorted(folder.rglob("*")):
        info = path.stat()
        out[str(path.relative_to(folder))] = (path.is_dir(), info.st_size, info.st_mtime_ns)
    return out


@pytest.fixture
def warnings_to_stderr(monkeypatch):
    """Warnings printed on stderr as the command line prints them (pytest only records them)."""

    def show(message, category, filename, lineno, file=None, line=None):
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        monkeypatch.setattr(warnings, "showwarning", show)
        yield


def test_the_table_is_large_and_covers_every_command():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 40
    prefixes = {
        "data phantom": "phantom-", "data mimic": "mimic-", "data check": "check-",
        "pretrain shapes": "shapes-", "pretrain scorer": "scorer-", "sample": "sample-",
        "methods": "methods-", "units": "units-", "train": "train-", "eval": "eval-",
        "run": "run-", "validate": "spec-", "status": "status-", "report": "report-",
        "export": "export-",
    }  # fmt: skip
    for command, prefix in prefixes.items():
        assert any(i.startswith(prefix) for i in ids), command


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_one_clean_line(case, tmp_path, monkeypatch, capsys, warnings_to_stderr):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # nothing a command writes by default lands in the checkout
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # validate checks this machine's resources
    argv = case.build(tmp_path)
    runs = {name: snapshot(tmp_path / name) for name in case.watch}
    everything = snapshot(tmp_path)
    capsys.readouterr()  # what building the input printed
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, f"exit {code}\nstdout:\n{out}\nstderr:\n{err}"
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"stderr is not one line:\n{err}"
    assert "Traceback" not in err and "Traceback" not in out
    assert lines[0].startswith(("capsearch: error: ", "capsearch ")), lines[0]
    assert re.search(case.error, lines[0]), lines[0]
    for name, before in runs.items():
        assert snapshot(tmp_path / name) == before, f"the run folder {name} changed"
    after = snapshot(tmp_path)  # nothing written anywhere: the command failed before any work
    assert after == everything, sorted(set(after.items()) ^ set(everything.items()))


def test_validate_accepts_a_spec_whose_model_folder_is_not_here(tmp_path, capsys):
    """A spec may name a model folder that exists on the cluster it is meant for: a note, exit 0."""
    missing = tmp_path / "cluster" / "stable-diffusion-v1-5"
    spec = write_spec(tmp_path, spec_with(model=str(missing)))
    assert main(["validate", str(spec)]) == 0
    out, err = capsys.readouterr()
    assert "valid spec" in out and err == ""
    note = [line for line in out.splitlines() if "note:" in line]
    assert len(note) == 1 and str(missing) in note[0] and "not available here" in note[0]


# What `run` refuses before its first trial, `validate` refuses with the same line (one code path:
# capsearch.search.inputs.check_inputs and capsearch.search.cluster.check_resources).
SHARED = {
    "more-gpus-than-here": lambda t: spec_with(resources={"gpu": 1000}),
    "more-cpus-than-here": lambda t: spec_with(resources={"cpu": 4096}),
    "baseline-plan-fails": lambda t: spec_with(**SHORT_BASELINE),
    "space-steps-below-warmup": lambda t: spec_with(**SHORT_SEARCH),
    "data-unknown-split": lambda t: data_spec(listed(t, split="dev")),
    "data-no-validate-split": lambda t: data_spec(listed(t, validate=0)),
    "data-small-reference": lambda t: data_spec(listed(t, validate=3)),
    "units-match-nothing": lambda t: spec_with(space={"groups": [
        {"name": "a", "units": "mid_blok", "methods": {"full": {}}}]}),
    "search-reuse-not-a-run": lambda t: spec_with(search={"reuse": [str(plain_folder(t, "old"))]}),
}  # fmt: skip


@pytest.mark.parametrize("name", list(SHARED))
def test_validate_refuses_what_run_refuses_with_the_same_line(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    spec = write_spec(tmp_path, SHARED[name](tmp_path))
    lines = {}
    for command in (["validate", str(spec)], ["run", str(spec), "--out", str(tmp_path / "r")]):
        assert main(command) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1, err
        lines[command[0]] = err[0]
    assert lines["validate"] == lines["run"]
    assert not (tmp_path / "r").exists()


def test_validate_leaves_resources_to_the_cluster_ray_address_names(tmp_path, monkeypatch, capsys):
    """With RAY_ADDRESS set (a cluster for `run --address auto`), validate does not judge this
    machine's resources: a note, exit 0."""
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert main(["validate", str(write_spec(tmp_path, spec_with(resources={"gpu": 1000})))]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "note: resources not checked: RAY_ADDRESS names a cluster (10.0.0.1:6379)" in out


def test_validate_notes_a_data_folder_that_is_not_here(tmp_path, capsys):
    """As a model folder: a spec may name the data folder of the machine it is meant for."""
    spec = write_spec(tmp_path, data_spec(tmp_path / "cluster" / "data"))
    assert main(["validate", str(spec)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"note: data folder {tmp_path / 'cluster' / 'data'} is not here" in out


# --- places Ray, a run or any command cannot write to: one line before any work, nothing written ------

NOT_WRITABLE = r"cannot be written \(\S*locked is not writable\); choose a folder you can write to"


def _run_locked(t: Path, where: str) -> tuple[list[str], str]:
    argv = ["run", str(write_spec(t, MINIMAL)), "--out", str(t / "run")]
    if where == "out":
        return argv[:-1] + [str(t / "locked" / "run")], rf"--out \S*locked/run {NOT_WRITABLE}"
    if where == "home":
        os.environ["HOME"] = str(t / "locked")  # restored by the test's monkeypatch
        return argv, (r"cannot start Ray here: it saves a new token in \S*locked/\.ray/auth_token, "
                      r"and \S*locked/\.ray cannot be written \(\S*locked is not writable\) "
                      r"\(HOME=\S*locked\); set HOME to a folder you can write to")  # fmt: skip
    os.environ["RAY_TMPDIR"] = str(t / "locked")
    return argv, (r"cannot start Ray here: its temp folder \S*locked/ray cannot be written "
                  r"\(\S*locked is not writable\); set RAY_TMPDIR to a folder you can write to")  # fmt: skip


def _report_in_place(t: Path) -> tuple[list[str], str]:
    make_run(t, name="locked")
    return ["report", str(t / "locked")], (
        r"\S*locked is not writable: the report is written into the run folder; give --out DIR"
    )


# What needs to write into tmp/locked: argv and the error line's regex (built before it is locked).
LOCKED = {
    "run-out": lambda t: _run_locked(t, "out"),
    "run-home": lambda t: _run_locked(t, "home"),
    "run-ray-temp": lambda t: _run_locked(t, "ray-temp"),
    "train": lambda t: (train_argv(t, None, out=t / "locked" / "o"), rf"--out \S*locked/o {NOT_WRITABLE}"),
    "eval": lambda t: (["eval", "--model", "tiny:random", "--data", str(data_folder(t)),
                        "--out", str(t / "locked" / "e")], rf"--out \S*locked/e {NOT_WRITABLE}"),
    "sample": lambda t: (sample_argv(t)[:-1] + [str(t / "locked" / "g.png")],
                         rf"--out \S*locked/g\.png {NOT_WRITABLE}"),
    "pretrain-shapes": lambda t: (["pretrain", "shapes", "--out", str(t / "locked" / "s")],
                                  rf"--out \S*locked/s {NOT_WRITABLE}"),
    "pretrain-scorer": lambda t: (["pretrain", "scorer", "--data", str(data_folder(t)),
                                   "--out", str(t / "locked" / "s")], rf"--out \S*locked/s {NOT_WRITABLE}"),
    "export": lambda t: (["export", str(make_run(t, delta=True)), "--trial", "t000",
                          "--out", str(t / "locked" / "x")], rf"--out \S*locked/x {NOT_WRITABLE}"),
    "report": _report_in_place,
    "report-out": lambda t: (["report", str(make_run(t)), "--out", str(t / "locked" / "r")],
                             rf"--out \S*locked/r {NOT_WRITABLE}"),
    "mimic": lambda t: (["data", "mimic", "--root", str(mimic_root(t, "dicom_id,subject_id,study_id")),
                         "--out", str(t / "locked" / "m")], rf"--out \S*locked/m {NOT_WRITABLE}"),
}  # fmt: skip


def _locked(name: str, tmp_path: Path, monkeypatch) -> tuple[list[str], Path, str]:
    """argv of the LOCKED case, its folder to lock and its error's regex; Ray may not start."""
    import capsearch.search.cluster as cluster

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started")

    monkeypatch.setattr(cluster.ray, "init", no_ray)
    monkeypatch.chdir(tmp_path)
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "raytmp"))  # not a shared /tmp/ray
    monkeypatch.setenv("HOME", os.environ.get("HOME", str(tmp_path)))  # restored after the test
    locked = tmp_path / "locked"
    argv, error = LOCKED[name](tmp_path)
    locked.mkdir(exist_ok=True)
    return argv, locked, error


def _refused_before_any_work(argv: list[str], tmp_path: Path, error: str, capsys) -> None:
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert re.search(error, err[0]), err[0]
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through a folder's permissions")
@pytest.mark.parametrize("name", list(LOCKED))
def test_an_unwritable_place_is_one_line_before_any_work(name, tmp_path, monkeypatch, capsys):
    argv, locked, error = _locked(name, tmp_path, monkeypatch)
    locked.chmod(0o555)
    try:
        _refused_before_any_work(argv, tmp_path, error, capsys)
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("name", list(LOCKED))
def test_an_unwritable_place_as_the_check_sees_it(name, tmp_path, monkeypatch, capsys):
    """The same, for any user (root too): the folder reads as not writable to os.access."""
    argv, locked, error = _locked(name, tmp_path, monkeypatch)
    access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode, **kw: Path(p) != locked and access(p, mode, **kw)
    )
    _refused_before_any_work(argv, tmp_path, error, capsys)
