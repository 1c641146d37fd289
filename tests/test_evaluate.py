"""End-to-end evaluation of one model, its CLI, and the Freeze-vs-fine-tuned control."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import phantom_data

from capsearch.datasets.folder import read_metadata
from capsearch.metrics.evaluate import EvalSettings, evaluate
from capsearch.metrics.stages import attack_captions
from capsearch.models.load import load_pipeline
from capsearch.worlds.phantom import write_phantom_dataset

SMALL = EvalSettings(
    n_prompts=3,
    n_per_prompt=2,
    steps=2,
    extraction_prompts=2,
    extraction_n=3,
    strength_prompts=2,
    strength_n=1,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return phantom_data(tmp_path_factory, seed=5, held_out_images=30)


def test_evaluate_writes_every_metric_with_settings(data, tmp_path):
    m = evaluate(load_pipeline("tiny:random"), data, SMALL, out_dir=tmp_path)
    for key in (
        "fid",
        "amd",
        "alignment",
        "extracted",
        "strength_memorised",
        "strength_other",
        "strength_ratio",
    ):
        assert key in m
    assert m["fid"] > 0 and 0 <= m["alignment"] <= 1 and m["amd"] >= 0
    # every metric with a 95% interval around it, and the reference's own noise floor
    for key in ("fid", "kid", "amd", "alignment", "extracted", "strength_ratio"):
        low, high = m["intervals"][key]
        assert low <= m[key] <= high, key
    assert m["intervals"]["fid"][1] > m["intervals"]["fid"][0]  # 3 prompts: a real spread
    floor = m["noise_floor"]
    assert floor["n"] == 6 and floor["fid"]["low"] <= floor["fid"]["mean"] <= floor["fid"]["high"]
    assert 0 < m["amd_heldout"] <= 2 and m["capped_prompts"] == 0
    # the attack's counts beside its one-sided bound, for pooling over training seeds
    from capsearch.datasets.folder import read_metadata
    from capsearch.metrics.intervals import wilson_upper

    memorised = {r["text"] for r in read_metadata(data)
                 if r["split"] == "train" and r["dup_group"] is not None}  # fmt: skip
    assert len(memorised) == 7 > SMALL.extraction_prompts  # every memorised caption is attacked
    assert m["attacked"] == 7 and 0 <= m["extracted_captions"] <= 7
    assert m["extraction_bound"] == wilson_upper(m["extracted_captions"], 7)
    # computed through the metric table from the attack's samples of memorised captions
    assert 0 <= m["nearest_own"] <= 1
    # its own pass over the model: training against held-out images by their diffusion loss
    low, high = m["intervals"]["membership_auc"]
    assert 0 <= low <= m["membership_auc"] <= high <= 1 and m["membership_loss_train"] > 0
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["settings"]["split"] == "validate" and saved["settings"]["reference_images"] >= 24
    assert saved["settings"]["samples"] == 6 and saved["settings"]["world"] == "phantom"
    assert (
        saved["settings"]["extraction_guidance"] == SMALL.guidance
    )  # unset: the sampling guidance
    assert (tmp_path / "samples.png").stat().st_size > 1000
    assert (tmp_path / "memorised.png").stat().st_size > 1000  # training image | attack samples
    # Gu et al.'s ratio on the same samples, and the attack's captions one by one beside the grid
    assert 0 <= m["nn_ratio"] <= 1 and m["intervals"]["nn_ratio"][0] <= m["nn_ratio"]
    with open(tmp_path / "memorisation.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == saved["settings"]["attack_prompts"] == 7  # every memorised caption
    assert all(r["memorised"] == "true" for r in rows)
    extracted = {r["caption"] for r in rows if r["extracted"] == "true"}
    assert extracted == {pair[0] for pair in m["extracted_pairs"]}


def test_memorised_grid_puts_each_captions_training_image_before_its_samples(tmp_path, monkeypatch):
    import torch

    import capsearch.metrics.memorised_grid as grid
    from capsearch.metrics.context import EvalContext
    from capsearch.metrics.memorised_grid import save_memorised_grid

    train = torch.arange(4).float().view(4, 1, 1, 1).expand(4, 1, 2, 2) / 10
    records = [{"text": t} for t in ("a", "mem one", "b", "mem two")]
    samples = torch.full((6, 1, 2, 2), -1.0)  # 3 attack samples per memorised caption
    ctx = EvalContext.__new__(EvalContext)
    ctx.memorised_images, ctx.memorised_prompts = samples, ["mem one", "mem two"]
    ctx.train_images, ctx.train_records, ctx.attack_n = train, records, 3
    seen = {}
    monkeypatch.setattr(
        grid,
        "save_grid",
        lambda images, path, nrow, captions: seen.update(
            images=images, nrow=nrow, captions=captions
        ),
    )
    assert save_memorised_grid(ctx, {"mem two"}, tmp_path / "m.png", per_caption=2) is not None
    assert seen["nrow"] == 3 and len(seen["images"]) == 6
    # the extracted caption's row first
    assert torch.equal(seen["images"][0], train[3]) and torch.equal(seen["images"][3], train[1])
    assert (
        seen["captions"][0] == "train [extracted]: mem two"
        and seen["captions"][3] == "train: mem one"
    )
    ctx.memorised_images = None
    assert save_memorised_grid(ctx, set(), tmp_path / "n.png") is None


def test_the_attack_covers_every_memorised_caption_and_others_fill_up_to_the_total():
    memorised, others = ["m1", "m2", "m3"], ["o1", "o2", "o3", "o4"]
    assert attack_captions(memorised, others, 5) == ["m1", "m2", "m3", "o1", "o2"]
    assert attack_captions(memorised, others, 3) == ["m1", "m2", "m3"]
    # fewer than the memorised captions: all of them still, and no other
    assert attack_captions(memorised, others, 2) == ["m1", "m2", "m3"]
    assert attack_captions(memorised, others, 0) == ["m1", "m2", "m3"]
    assert attack_captions(memorised, others, 99) == memorised + others
    assert attack_captions([], others, 2) == ["o1", "o2"]
    # up to the total, the rule is the old truncation of memorised + others
    for total in range(len(memorised), 9):
        assert attack_captions(memorised, others, total) == (memorised + others)[:total]


def test_the_attack_samples_at_its_own_guidance(data, monkeypatch):
    import capsearch.metrics.stages as stages

    seen = []
    real = stages.extraction_attack

    def spy(*args, **kwargs):
        seen.append(kwargs["guidance"])
        return real(*args, **kwargs)

    monkeypatch.setattr(stages, "extraction_attack", spy)
    config = SMALL.model_copy(update=dict(extraction_guidance=1.0))
    m = evaluate(load_pipeline("tiny:random"), data, config)
    assert seen == [1.0] and m["settings"]["extraction_guidance"] == 1.0
    assert m["settings"]["guidance"] == 3.0


def test_a_metric_is_one_row_and_only_the_stages_its_rows_need_run(data, monkeypatch):
    """A row with its own pass over the model reaches metrics.json; a stage no row needs is skipped."""
    import torch

    import capsearch.metrics.evaluate as evaluation
    import capsearch.metrics.stages as stages
    from capsearch.metrics.context import MODEL, Measured
    from capsearch.metrics.table import BY_NAME, Metric

    @torch.no_grad()
    def own_pass(ctx):
        # a pass of its own: the UNet's mean output on zeros, at one timestep
        x = torch.zeros(1, *ctx.pipe.latent_shape)
        out = ctx.pipe.unet(x, 10, encoder_hidden_states=ctx.pipe.encode_prompts([""])).sample
        return Measured(float(out.abs().mean()), (0.0, 1e9), {"unet_probe_steps": 1})

    probe = Metric(
        "unet_probe", "UNet probe", "probe", ".3f", None, compute=own_pass, needs=(MODEL,)
    )
    rows = (BY_NAME["fid"], BY_NAME["extracted"], probe)  # nothing needs the strength pass
    monkeypatch.setattr(evaluation, "METRICS", rows)
    monkeypatch.setattr(stages, "denoising_strength_per_prompt", lambda *a, **k: pytest.fail("ran"))
    m = evaluation.evaluate(load_pipeline("tiny:random"), data, SMALL)
    assert m["unet_probe"] > 0 and m["unet_probe_steps"] == 1
    assert set(m["intervals"]) == {"fid", "extracted", "unet_probe"}
    assert "strength_ratio" not in m and "kid" not in m and "extracted" in m


def test_eval_cli(data, tmp_path, capsys, monkeypatch):
    """Each flag lands in metrics.json's settings, and in the counts of what the evaluation did."""
    import capsearch.models.load as load
    from capsearch.cli import main

    loaded = []
    monkeypatch.setattr(
        load, "load_pipeline", lambda spec: loaded.append(spec) or load_pipeline(spec)
    )

    flags = {"n_prompts": 2, "n_per_prompt": 2, "steps": 2, "extraction_prompts": 1,
             "extraction_n": 3, "strength_prompts": 1, "strength_n": 1, "seed": 4, "guidance": 2.5}  # fmt: skip
    argv = [x for k, v in flags.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    out = tmp_path / "e"
    rc = main(["eval", "--model", "tiny:random", "--data", str(data), "--out", str(out), *argv])
    assert rc == 0 and loaded == ["tiny:random"] and (out / "samples.png").exists()
    saved = json.loads((out / "metrics.json").read_text())
    settings = saved["settings"]
    assert {k: settings[k] for k in flags} == flags
    assert settings["extraction_guidance"] == 2.5  # none given: the attack samples at --guidance
    # --extraction-prompts 1 with 7 memorised captions: every memorised caption, no other one
    train = [r for r in read_metadata(data) if (r.get("split") or "train") == "train"]
    memorised = {r["text"] for r in train if r.get("dup_group") is not None}
    assert len(memorised) == 7
    assert (
        settings["prompts"] == 2
        and settings["samples"] == 2 * 2
        and settings["attack_prompts"] == len(memorised)
    )
    assert "strength_ratio" in saved and "extracted" in saved
    text = capsys.readouterr().out  # progress lines, then the metrics as indented JSON
    printed = json.loads(text[text.index("{\n") : text.index("\n}\n") + 2])
    assert printed["fid"] == pytest.approx(saved["fid"], abs=1e-4)
    _eval_cli_applies_the_delta(data, tmp_path, monkeypatch, capsys)
    assert main(["eval", "--data", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert main(["eval", "--data", str(data), "--out", str(tmp_path), "--n-prompts", "0"]) == 2


def _eval_cli_applies_the_delta(data, tmp_path, monkeypatch, capsys):
    """`--delta`: the UNet evaluated carries the delta's tensors (the evaluation itself stubbed)."""
    import torch
    from safetensors.torch import load_file

    import capsearch.metrics.evaluate as evaluate_module
    from capsearch.cli import main
    from capsearch.methods import apply_methods
    from capsearch.models.delta import save_delta

    unet = load_pipeline("tiny:random").unet
    applied = apply_methods(unet, [{"method": "bitfit", "units": "mid_block"}])
    with torch.no_grad():
        for p in unet.parameters():
            if p.requires_grad:
                p.add_(1.0)
    save_delta(unet, tmp_path / "delta", applied=applied, base_model="tiny:random")
    evaluated = []

    def stub(pipe, root, config, out_dir=None, progress=False):
        evaluated.append((dict(pipe.unet.named_parameters()), root, config.n_prompts, out_dir))
        return {"fid": 1.0}

    monkeypatch.setattr(evaluate_module, "evaluate", stub)
    out = tmp_path / "with_delta"
    argv = ["eval", "--model", "tiny:random", "--delta", str(tmp_path / "delta"), "--data",
            str(data), "--out", str(out), "--n-prompts", "3", "--n-per-prompt", "2"]  # fmt: skip
    assert main(argv) == 0
    ((params, root, n_prompts, out_dir),) = evaluated
    assert (root, n_prompts, out_dir) == (data, 3, out)
    tensors = load_file(tmp_path / "delta" / "delta.safetensors")
    base = dict(load_pipeline("tiny:random").unet.named_parameters())
    assert tensors and all(torch.equal(params[n], t) for n, t in tensors.items())
    assert all(not torch.equal(params[n], base[n]) for n in tensors)  # not the base's
    capsys.readouterr()


def test_fid_reference_is_held_out_and_large_enough(data, tmp_path):
    from capsearch.errors import UserError

    pipe = load_pipeline("tiny:random")
    from capsearch.settings import EvalSettings

    with pytest.raises(UserError, match="split: Input should be 'validate' or 'test'"):
        EvalSettings.parse({**SMALL.model_dump(), "split": "train"}, "eval")
    with pytest.raises(UserError, match="held-out split"):  # even past validation
        evaluate(pipe, data, SMALL.model_copy(update=dict(split="train")))
    with pytest.raises(UserError, match="reference_ratio"):  # 30 images < 10 × 6 samples
        evaluate(pipe, data, SMALL.model_copy(update=dict(reference_ratio=10.0)))
    bare = tmp_path / "bare"
    write_phantom_dataset(bare, patients=2, size=32, seed=1)  # too few patients to hold any out
    with pytest.raises(UserError, match="no 'validate' images"):
        evaluate(pipe, bare, SMALL)


@pytest.mark.slow
def test_freeze_scores_worse_fid_than_full_finetune(tmp_path):
    """Control: the shapes-pretrained base is far from X-rays until it is fine-tuned on them."""
    from capsearch.training.loop import TrainSettings, finetune

    root = tmp_path / "data"
    write_phantom_dataset(root, patients=120, size=64, seed=1, held_out_images=256)
    cfg = EvalSettings(
        n_prompts=16, n_per_prompt=4, extraction_prompts=2, extraction_n=4, strength_prompts=2
    )
    frozen = evaluate(load_pipeline("tiny"), root, cfg)
    pipe = load_pipeline("tiny")
    finetune(
        pipe,
        [{"method": "full", "units": "*"}],
        root,
        TrainSettings(steps=200, lr=1e-4),
        quiet=True,
    )
    tuned = evaluate(pipe, root, cfg)
    assert tuned["fid"] < 0.5 * frozen["fid"]
