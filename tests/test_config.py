"""Search specs: the shipped specs validate; every kind of mistake is one line naming its YAML path."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from capsearch.cli import main
from capsearch.config import apply_overrides, deep_merge, load_spec, resolve_extends
from capsearch.errors import UserError
from capsearch.search.coverage import check_units

ROOT = Path(__file__).resolve().parents[1]

MINIMAL = {
    "model": "tiny:random",
    "space": {
        "groups": [
            {
                "name": "attn",
                "units": "*:*_attn",
                "methods": {"frozen": {}, "lora": {"rank": [2, 8]}},
            },
            {"name": "mid", "units": "mid_block.resnets", "methods": {"frozen": {}, "difffit": {}}},
        ]
    },
}


def write(tmp_path: Path, data: dict, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def validate_error(tmp_path: Path, data: dict, capsys) -> str:
    """Run `capsearch validate` on data; assert exit 2 and one stderr line; return that line."""
    code = main(["validate", str(write(tmp_path, data))])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def modified(**changes) -> dict:
    data = yaml.safe_load(yaml.safe_dump(MINIMAL))
    for key, value in changes.items():
        data = apply_overrides(
            data, [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}"]
        )
    return data


@pytest.mark.parametrize(
    "path",
    [
        "search_spaces/tiny.yaml",
        "search_spaces/tiny_safe.yaml",
        "search_spaces/unet.yaml",
        "experiments/paper_table1.yaml",
        "experiments/paper_table2.yaml",
    ],
)
def test_shipped_specs_validate(path, capsys, monkeypatch):
    import capsearch.search.cluster as cluster

    # checked as on the machine each is written for (unet.yaml: a GPU node of a cluster)
    monkeypatch.setattr(cluster, "local_resources", lambda: {"CPU": 64.0, "GPU": 8.0})
    assert main(["validate", str(ROOT / path)]) == 0
    out = capsys.readouterr().out
    spec = load_spec(ROOT / path, check_model=False)  # the file given is the one described
    assert out.startswith(f"{ROOT / path}: valid spec {spec.name!r} (model {spec.model})\n")
    baselines = ", ".join(b.name for b in spec.baseline_points) or "none"
    assert f"  baselines: {baselines}; searched trials: {spec.search.num_samples}\n" in out
    assert "groups cover" in out


def test_tiny_baselines_are_the_paper_methods_on_the_whole_unet():
    spec = load_spec(ROOT / "search_spaces/tiny.yaml")
    names = [b.name for b in spec.baseline_points]
    assert names == ["freeze", "full", "attention", "difffit", "svdiff"]
    coverage = check_units(spec)
    assert coverage["grouped_units"] == coverage["units"]  # so "full" really is full fine-tuning


def test_unet_spec_checks_units_against_sd15_shapes():
    spec = load_spec(ROOT / "search_spaces/unet.yaml")
    coverage = check_units(spec)
    assert coverage["parameters"] > 800_000_000  # SD v1.5's UNet, built on the meta device
    assert spec.evaluate.extractor == "xrv" and spec.train.size == 512


def test_one_settings_class_per_stage():
    """The spec's train/evaluate sections are the classes the stages take: no twins to drift apart."""
    from capsearch.config import Spec
    from capsearch.settings import EvalSettings, TrainSettings

    assert Spec.model_fields["train"].annotation is TrainSettings
    assert Spec.model_fields["evaluate"].annotation is EvalSettings
    spec = load_spec(ROOT / "search_spaces/tiny.yaml")
    assert isinstance(spec.train, TrainSettings) and isinstance(spec.evaluate, EvalSettings)
    with pytest.raises(
        UserError, match=r"^train\.steps: Input should be greater than or equal to 1"
    ):
        TrainSettings.parse({"steps": 0}, "train")


@pytest.mark.parametrize(
    "data, expected",
    [
        ({**MINIMAL, "modle": "tiny"}, "modle: unknown key (allowed: extends, name,"),
        (modified(**{"search.sampler_x": 1}), "search.sampler_x: unknown key (allowed: sampler,"),
        (
            modified(**{"space.groups[1].methods.difffit": {"gama": 1.0}}),
            "space.groups[1].methods.difffit.gama: unknown hyper-parameter 'gama'",
        ),
        (
            modified(**{"space.groups[0].methods.lora": {"rnk": [2, 4]}}),
            "space.groups[0].methods.lora.rnk: unknown hyper-parameter",
        ),
        (
            modified(**{"space.groups[1].colour": "red"}),
            "space.groups[1].colour: unknown key (allowed: name, units, methods)",
        ),
        (modified(**{"data.phantom.patiens": 3}), "data.phantom.patiens: unknown key"),
    ],
)
def test_unknown_keys_name_their_path(tmp_path, capsys, data, expected):
    assert expected in validate_error(tmp_path, data, capsys)


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"train.steps": "many"}, "train.steps: Input should be a valid integer"),
        ({"train.lr": True}, "train.lr:"),
        (
            {"search.sampler": "grid"},
            "search.sampler: Input should be 'tpe', 'nsga2', 'gp' or 'random'",
        ),
        ({"space.groups[0].methods.lora.rank": [2.5, 8]}, "space.groups[0].methods.lora.rank"),
        ({"space.groups[0].methods.lora.rank": [8, 2]}, "low (8) must be below high (2)"),
        ({"space.lr": [0.0, 1.0e-3]}, "space.lr: a log range needs low > 0"),
        ({"space.mitigations": {"rwa": {"k": 1.5}}}, "space.mitigations.rwa.k: must be an integer"),
        (
            {"space.mitigations": {"rwa": {"p": [0.5, 1.5]}}},
            "space.mitigations.rwa: mitigation rwa: p",
        ),
        ({"objective.pareto": ["fid", "beauty"]}, "objective.pareto: unknown objective 'beauty'"),
    ],
)
def test_wrong_types_and_values_name_their_path(tmp_path, capsys, change, expected):
    assert expected in validate_error(tmp_path, modified(**change), capsys)


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"space.groups[0].methods": {}}, "space.groups[0].methods: empty choice"),
        ({"space.groups": []}, "space.groups: empty choice"),
        ({"space.mitigations": {}}, "space.mitigations: empty choice"),
        (
            {"space.groups[0].methods.lora.rank": {"choices": []}},
            "lora.rank.choices: must be a non-empty",
        ),
        ({"space.groups[0].units": []}, "space.groups[0].units: empty choice"),
        (
            {"baselines.methods": ["full"], "baselines.mitigations": []},
            "baselines.mitigations: empty choice",
        ),
    ],
)
def test_empty_choices_are_errors(tmp_path, capsys, change, expected):
    assert expected in validate_error(tmp_path, modified(**change), capsys)


def test_unit_selection_matching_nothing_is_an_error(tmp_path, capsys):
    data = modified(**{"space.groups[1].units": "mid_blok"})
    line = validate_error(tmp_path, data, capsys)
    assert "space.groups[1].units: unit pattern 'mid_blok' matches no unit" in line
    assert "mid_block" in line  # the close name is suggested


def test_overlapping_groups_are_an_error(tmp_path, capsys):
    data = modified(**{"space.groups[1].units": "mid_block"})  # contains mid-block attention too
    assert "groups must not overlap" in validate_error(tmp_path, data, capsys)


def test_unknown_method_and_reserved_names(tmp_path, capsys):
    line = validate_error(tmp_path, modified(**{"space.groups[0].methods.lorax": {}}), capsys)
    assert "space.groups[0].methods.lorax: unknown method 'lorax'" in line
    line = validate_error(tmp_path, modified(**{"space.groups[0].name": "lr"}), capsys)
    assert "space.groups[0].name: 'lr' is reserved" in line


def test_baseline_errors(tmp_path, capsys):
    line = validate_error(tmp_path, modified(**{"baselines.methods": ["svdiff"]}), capsys)
    assert "baselines.methods[0]: no group of space.groups allows 'svdiff'" in line
    data = modified(**{"baselines.methods": ["lora"], "space.lr": [1.0e-5, 5.0e-5]})
    assert "train.lr: 0.0001 lies outside space.lr" in validate_error(tmp_path, data, capsys)
    data = modified(**{"baselines.methods": ["lora"], "baselines.train": {"full": {"lr": 1.0e-4}}})
    assert "baselines.train.full: 'full' is not in baselines.methods" in validate_error(
        tmp_path, data, capsys
    )


def test_searched_steps_and_learning_rate_choices_hold_the_baselines(tmp_path, capsys):
    data = modified(**{"baselines.methods": ["lora"], "space.steps": {"choices": [100, 200]}})
    assert "train.steps: 300 lies outside space.steps (100, 200)" in validate_error(
        tmp_path, data, capsys
    )
    spec = load_spec(write(tmp_path, modified(**{"baselines.methods": ["lora"],
                                                 "space.steps": {"choices": [100, 300]}})),
                     check_model=False)  # fmt: skip
    assert spec.baseline("lora").params["steps"] == 300


def test_a_method_may_search_its_own_learning_rate(tmp_path, capsys):
    from capsearch.search.space import params_to_method_spec

    data = modified(
        **{
            "space.groups[1].methods.difffit": {"lr": [1.0e-3, 1.0e-2]},
            "baselines.methods": ["difffit"],
        }
    )
    spec = load_spec(write(tmp_path, data), check_model=False)  # MINIMAL's groups miss units
    p = spec.search_space.groups[1].methods["difffit"].params["lr"]
    assert p.kind == "float" and p.log  # rates are searched on a log scale
    point = spec.baseline("difffit").params
    assert point["mid.difffit.lr"] == pytest.approx(10**-2.5)  # the geometric middle
    entries = params_to_method_spec(point, spec.search_space)
    assert entries[-1]["method"] == "difffit" and entries[-1]["lr"] == pytest.approx(10**-2.5)
    bad = modified(**{"space.groups[1].methods.difffit": {"lr": -1.0e-3}})
    line = validate_error(tmp_path, bad, capsys)
    assert "space.groups[1].methods.difffit.lr: -0.001 is not a positive number" in line
    bad = modified(**{"space.groups[1].methods.difffit": {"lr": [0, 1.0e-2]}})
    assert "methods.difffit.lr: a log range needs low > 0" in validate_error(tmp_path, bad, capsys)


def test_lr_1d_is_a_rate_of_a_methods_second_set_only(tmp_path, capsys):
    line = validate_error(tmp_path, modified(**{"train.lr_1d": 1.0e-3}), capsys)
    assert "train.lr_1d: unknown key" in line  # no global 1-D rate any more
    line = validate_error(tmp_path, modified(**{"space.lr_1d": [1.0e-4, 1.0e-3]}), capsys)
    assert "space.lr_1d: unknown key" in line
    data = modified(**{"space.groups[1].methods.difffit": {"lr": 1.0e-3, "lr_1d": 1.0e-3}})
    line = validate_error(tmp_path, data, capsys)
    assert "methods.difffit: difffit.lr_1d: difffit trains one parameter set" in line
    data = modified(**{"space.groups[1].methods.svdiff": {"lr": 1.0e-3, "lr_1d": 1.0e-6}})
    spec = load_spec(write(tmp_path, data))
    assert spec.search_space.groups[1].methods["svdiff"].params["lr_1d"].value == 1.0e-6


def test_a_baseline_must_be_its_method_on_the_whole_unet(tmp_path, capsys):
    data = modified(**{"space.groups[1].methods.full": {}, "baselines.methods": ["full"]})
    line = validate_error(tmp_path, data, capsys)
    assert "baselines.methods[0]: baseline 'full' would leave" in line
    assert "e.g. conv_in" in line
    # Attn Tuning trains the attention blocks only: groups covering them are enough for it.
    attn = {"name": "attn", "units": "**.attentions", "methods": {"frozen": {}, "attention": {}}}
    data = {**MINIMAL, "space": {"groups": [attn]}, "baselines": {"methods": ["attention"]}}
    spec = load_spec(write(tmp_path, data))
    assert spec.baseline("attention").params["attn.method"] == "attention"
    attn["units"] = "**.attentions:*_attn"  # its feed-forwards, norms and proj_in/out left out
    line = validate_error(tmp_path, data, capsys)
    assert "baseline 'attention' would leave" in line and ".attentions.0:" in line


def test_asha_needs_probes_and_a_scalar_objective(tmp_path, capsys):
    data = modified(**{"search.scheduler": "asha"})
    assert "train.probe_every: asha needs" in validate_error(tmp_path, data, capsys)
    data = modified(
        **{"search.scheduler": "asha", "train.probe_every": 5, "objective.mode": "pareto"}
    )
    assert "search.scheduler: asha stops trials on one metric" in validate_error(
        tmp_path, data, capsys
    )


def test_yaml_problems_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("space: [unclosed\n")
    assert main(["validate", str(bad)]) == 2
    assert "invalid YAML" in capsys.readouterr().err
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_scientific_notation_reads_as_float(tmp_path):
    text = yaml.safe_dump(MINIMAL) + "train: {lr: 3e-5}\n"
    (tmp_path / "s.yaml").write_text(text)
    assert load_spec(tmp_path / "s.yaml").train.lr == pytest.approx(3e-5)


def test_extends_deep_merges_and_lists_replace(tmp_path):
    write(tmp_path, {**MINIMAL, "train": {"steps": 50, "lr": 2.0e-4}}, "base.yaml")
    (tmp_path / "sub").mkdir()
    override = {
        "extends": "../base.yaml",
        "train": {"steps": 7},
        "baselines": {"methods": ["freeze", "lora"]},
    }
    spec = load_spec(write(tmp_path / "sub", override, "exp.yaml"), check_model=False)
    assert spec.train.steps == 7 and spec.train.lr == pytest.approx(2.0e-4)
    assert [b.name for b in spec.baseline_points] == ["freeze", "lora"]
    assert spec.name == "exp"


def test_extends_drops_a_baselines_rate_set_to_null(tmp_path):
    train = {"lora": {"lr": 1e-3}, "difffit": {"lr": 2e-2}}
    write(
        tmp_path,
        {**MINIMAL, "baselines": {"methods": ["difffit", "lora"], "train": train}},
        "b.yaml",
    )
    fewer = {"extends": "b.yaml", "baselines": {"methods": ["difffit"], "train": {"lora": None}}}
    spec = load_spec(write(tmp_path, fewer, "fewer.yaml"), check_model=False)
    assert list(spec.baselines.train) == ["difffit"] and spec.baselines.train["difffit"].lr == 2e-2
    bad = {**fewer, "baselines": {"methods": ["difffit"]}}  # lora's rate kept, lora not run
    with pytest.raises(UserError, match="baselines.train.lora: 'lora' is not in baselines.methods"):
        load_spec(write(tmp_path, bad, "bad.yaml"), check_model=False)


def test_extends_loops_and_missing_bases_are_errors(tmp_path):
    write(tmp_path, {"extends": "b.yaml"}, "a.yaml")
    write(tmp_path, {"extends": "a.yaml"}, "b.yaml")
    with pytest.raises(UserError, match="extends loops"):
        resolve_extends(tmp_path / "a.yaml")
    write(tmp_path, {"extends": "nowhere.yaml"}, "c.yaml")
    with pytest.raises(UserError, match="nowhere.yaml does not exist"):
        resolve_extends(tmp_path / "c.yaml")


def test_set_overrides(tmp_path):
    path = write(tmp_path, MINIMAL)
    spec = load_spec(path, ["search.num_samples=2", "space.groups[0].methods.lora.rank=[2, 4]"])
    assert spec.search.num_samples == 2
    assert spec.search_space.groups[0].methods["lora"].params["rank"].high == 4
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        load_spec(path, ["search.num_samples"])


def test_deep_merge_does_not_mutate():
    base = {"a": {"b": 1, "c": [1, 2]}}
    merged = deep_merge(base, {"a": {"c": [3]}})
    assert merged == {"a": {"b": 1, "c": [3]}} and base == {"a": {"b": 1, "c": [1, 2]}}


def test_fid_reference_is_held_out_and_the_final_stage_samples_fresh_seeds(tmp_path, capsys):
    line = validate_error(tmp_path, modified(**{"evaluate.fid_reference": "train"}), capsys)
    assert line.endswith("evaluate: fid_reference was removed: prompts and the FID reference both "
                         "come from the held-out evaluate.split (validate while searching, test "
                         "in the final stage)")  # fmt: skip
    line = validate_error(tmp_path, modified(**{"evaluate.split": "train"}), capsys)
    assert "evaluate.split: Input should be 'validate' or 'test'" in line
    line = validate_error(tmp_path, modified(**{"final.seed": 0}), capsys)
    assert "final.seed: must differ from evaluate.seed" in line
    spec = load_spec(ROOT / "search_spaces/tiny.yaml")
    assert spec.evaluate.split == "validate" and spec.final.split == "test"
    final = spec.final.settings(spec.evaluate)
    assert final.split == "test" and final.seed != spec.evaluate.seed
    assert final.n_prompts > spec.evaluate.n_prompts  # the finalists get more samples
    assert final.extraction_n == spec.evaluate.extraction_n  # unset: the search's value


def test_phantom_held_out_images_follow_the_largest_evaluation():
    from capsearch.search.inputs import held_out_images_needed

    spec = load_spec(ROOT / "search_spaces/tiny.yaml")
    samples = max(spec.evaluate.samples, spec.final.samples(spec.evaluate))
    assert held_out_images_needed(spec) == 4 * samples
    off = load_spec(ROOT / "search_spaces/tiny.yaml", ["final.enabled=false"])
    assert held_out_images_needed(off) == 4 * off.evaluate.samples


def test_a_precision_this_cpu_cannot_train_is_refused_when_the_spec_loads(tmp_path, monkeypatch):
    from capsearch.models import precision

    fp16 = write(tmp_path, {**MINIMAL, "train": {"mixed_precision": "fp16"}}, "fp16.yaml")
    with pytest.raises(UserError, match=r"fp16 needs a GPU \(resources\.gpu\)"):
        load_spec(fp16, check_model=False)
    bf16 = write(tmp_path, {**MINIMAL, "train": {"mixed_precision": "bf16"}}, "bf16.yaml")
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    with pytest.raises(UserError, match="needs native bf16"):
        load_spec(bf16, check_model=False)
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    assert load_spec(bf16, check_model=False).train.mixed_precision == "bf16"
    on_gpu = {**MINIMAL, "train": {"mixed_precision": "fp16"}, "resources": {"cpu": 1, "gpu": 1}}
    assert load_spec(write(tmp_path, on_gpu, "gpu.yaml"), check_model=False).resources.gpu == 1


def test_bf16_sampling_on_a_cpu_without_it_is_refused_when_the_spec_loads(tmp_path, monkeypatch):
    from capsearch.models import precision

    spec = write(tmp_path, {**MINIMAL, "evaluate": {"precision": "bf16"}}, "eval_bf16.yaml")
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    with pytest.raises(UserError, match=r"evaluate\.precision=bf16 on a CPU needs native bf16"):
        load_spec(spec, check_model=False)
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    assert load_spec(spec, check_model=False).evaluate.precision == "bf16"


def test_the_safe_spec_makes_memorisation_a_limit_not_a_price():
    """tiny_safe.yaml: the reward is quality only, memorisation two limits, checked on three seeds."""
    from capsearch.search.reward import compute_reward

    spec = load_spec(ROOT / "search_spaces/tiny_safe.yaml")
    assert dict(spec.objective.constraints) == {"extraction_bound": 0.2, "nearest_own": 0.25}
    assert spec.final.train_seeds == [1, 2] and spec.train.seed == 0
    weights = spec.objective.weights.model_dump()
    metrics = {"fid": 50.0, "alignment": 0.4, "amd": 0.1, "amd_heldout": 0.2,
               "extracted_fraction": 0.5, "nearest_own": 0.9}  # fmt: skip
    # copying changes nothing in the reward: only the limits see it
    assert compute_reward(metrics, weights) == pytest.approx(-math.log(50.0) + 0.4)


def test_the_second_worlds_specs_say_what_docs_results_plans():
    """broad_regime.yaml: the broad base, 440 patients disjoint from the corpus, 2.1% duplicated 20x,
    deltas kept every quarter; broad_onset.yaml: Full FT alone at 1e-3 on the rate-selection seed 11,
    judged on the validate split (the test split stays the tables')."""
    regime = load_spec(ROOT / "experiments/broad_regime.yaml", check_model=False)
    assert regime.model == "tiny-broad" and regime.train.steps == 2000
    assert regime.data.phantom.model_dump() == {
        "patients": 440, "size": 32, "seed": 0, "dup_fraction": 0.021, "dup_copies": 20,
        "held_out_images": None, "avoid_reports_of": None, "disjoint_from_corpus": True}  # fmt: skip
    assert regime.train.keep_deltas_every == regime.train.steps // 4
    onset = load_spec(ROOT / "experiments/broad_onset.yaml", check_model=False)
    assert [b.name for b in onset.baseline_points] == ["full"]
    assert onset.baselines.train["full"].lr == 1e-3
    assert onset.data.phantom.seed == onset.train.seed == 11 and onset.final.split == "validate"
