"""Units: naming on the tiny UNet and on SD v1.5's shapes, and the selection syntax."""

from __future__ import annotations

import re

import pytest
import torch

from capsearch.errors import UserError
from capsearch.methods import method_names
from capsearch.models.tiny import SD15_UNET_CONFIG, build_tiny_unet
from capsearch.units import Unit, list_units, select_units, unit_matches

BLOCK_CLASSES = {"Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"}


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return build_tiny_unet()


@pytest.fixture(scope="module")
def sd15() -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**SD15_UNET_CONFIG)


@pytest.mark.parametrize("model", ["tiny", "sd15"])
def test_units_partition_every_parameter(model: str, request: pytest.FixtureRequest) -> None:
    unet = request.getfixturevalue(model)
    units = list_units(unet)
    names = [u.name for u in units]
    assert len(names) == len(set(names))
    covered = [p for u in units for p in u.params]
    assert sorted(covered) == sorted(n for n, _ in unet.named_parameters())
    shapes = dict(unet.named_parameters())
    for unit in units:
        assert unit.numel == sum(shapes[p].numel() for p in unit.params)
        assert all(any(p.startswith(m + ".") for m in unit.modules) for p in unit.params)


@pytest.mark.parametrize("model", ["tiny", "sd15"])
def test_blocks_are_diffusers_module_paths(model: str, request: pytest.FixtureRequest) -> None:
    unet = request.getfixturevalue(model)
    block_modules = {n for n, m in unet.named_modules() if type(m).__name__ in BLOCK_CLASSES}
    blocks = {u.block for u in list_units(unet)}
    assert blocks - block_modules == {"conv_in", "time_embedding", "conv_out"}
    assert block_modules <= blocks
    for unit in list_units(unet):
        if unit.block in block_modules:
            assert unit.name == f"{unit.block}:{unit.kind}"


@pytest.mark.parametrize("model", ["tiny", "sd15"])
def test_kinds_per_block_type(model: str, request: pytest.FixtureRequest) -> None:
    unet = request.getfixturevalue(model)
    kinds: dict[str, set[str]] = {}
    for unit in list_units(unet):
        kinds.setdefault(unit.block, set()).add(unit.kind)
    for name, module in unet.named_modules():
        cls = type(module).__name__
        if cls == "Transformer2DModel":
            assert kinds[name] == {"self_attn", "cross_attn", "ff", "attn_norm", "proj"}
        elif cls == "ResnetBlock2D":
            assert kinds[name] == {"conv", "norm", "time_emb_proj"}
        elif cls in ("Downsample2D", "Upsample2D"):
            assert kinds[name] == {"conv"}
    by_name = {u.name: u for u in list_units(unet)}
    assert set(by_name["conv_out"].modules) == {"conv_norm_out", "conv_out"}
    assert by_name["time_embedding"].modules == (
        "time_embedding.linear_1",
        "time_embedding.linear_2",
    )
    assert [u.name for u in list_units(unet)][0] == "conv_in"
    assert [u.name for u in list_units(unet)][-1] == "conv_out"


def test_self_and_cross_attention_cover_attn1_and_attn2(tiny: torch.nn.Module) -> None:
    for unit in list_units(tiny):
        if unit.kind in ("self_attn", "cross_attn"):
            branch = "attn1" if unit.kind == "self_attn" else "attn2"
            assert {m.rsplit(".", 1)[-1] for m in unit.modules} >= {"to_q", "to_k", "to_v", "0"}
            assert all(f".{branch}." in m for m in unit.modules)


def test_sd15_unit_names(sd15: torch.nn.Module) -> None:
    names = {u.name for u in list_units(sd15)}
    for expected in (
        "down_blocks.0.attentions.0:cross_attn",
        "down_blocks.0.resnets.1:time_emb_proj",
        "down_blocks.2.downsamplers.0:conv",
        "mid_block.attentions.0:self_attn",
        "up_blocks.3.attentions.2:ff",
        "up_blocks.0.upsamplers.0:conv",
        "conv_in",
        "conv_out",
        "time_embedding",
    ):
        assert expected in names
    # 16 transformer blocks in SD v1.5: 6 down, 1 mid, 9 up
    assert sum(u.kind == "cross_attn" for u in list_units(sd15)) == 16


def _names(unet: torch.nn.Module, selection) -> list[str]:
    return [u.name for u in select_units(unet, selection)]


def test_star_selects_all_and_prefix_selects_subtree(tiny: torch.nn.Module) -> None:
    everything = [u.name for u in list_units(tiny)]
    assert _names(tiny, "*") == everything
    assert _names(tiny, "*:*") == everything
    mid = _names(tiny, "mid_block")
    assert mid and all(n.startswith("mid_block.") for n in mid)
    assert mid == [n for n in everything if n.startswith("mid_block.")]


def test_ranges_globs_and_kinds(tiny: torch.nn.Module) -> None:
    everything = list_units(tiny)
    ranged = _names(tiny, "up_blocks.0-1")
    assert ranged == _names(tiny, ["up_blocks.0", "up_blocks.1"])
    assert ranged and all(re.match(r"up_blocks\.[01]\.", n) for n in ranged)
    cross = _names(tiny, "*.*.attentions.*:cross_attn")
    # two parts before "attentions": down/up blocks, not mid_block.attentions.0
    assert cross == [
        u.name
        for u in everything
        if u.kind == "cross_attn" and u.block.split(".")[2:3] == ["attentions"]
    ]
    assert "mid_block.attentions.0:cross_attn" not in cross
    assert _names(tiny, ":cross_attn") == [u.name for u in everything if u.kind == "cross_attn"]
    both = _names(tiny, "*:*_attn")
    assert both == [u.name for u in everything if u.kind in ("self_attn", "cross_attn")]
    deep = _names(tiny, "**.attentions.0:ff")
    assert deep == [
        u.name for u in everything if u.kind == "ff" and u.block.endswith("attentions.0")
    ]


def test_selection_keeps_model_order_and_dedups(tiny: torch.nn.Module) -> None:
    picked = _names(tiny, ["up_blocks.1:ff", "down_blocks", "up_blocks.1"])
    order = [u.name for u in list_units(tiny)]
    assert picked == [n for n in order if n in set(picked)]
    assert len(picked) == len(set(picked))


def test_empty_selections(tiny: torch.nn.Module) -> None:
    assert select_units(tiny, []) == []
    assert select_units(tiny, None) == []


def test_select_accepts_a_unit_list(tiny: torch.nn.Module) -> None:
    units = list_units(tiny)
    assert select_units(units, "conv_in") == [units[0]]
    assert isinstance(units[0], Unit)


@pytest.mark.parametrize(
    "pattern, fragment",
    [
        ("up_block.1", "up_blocks.1"),  # typo: suggests the real block
        ("mid_block:crossattn", "cross_attn"),  # unknown kind: lists kinds
        ("down_blocks.7", "down_blocks"),
    ],
)
def test_unmatched_pattern_names_itself_and_suggests(
    tiny: torch.nn.Module, pattern: str, fragment: str
) -> None:
    with pytest.raises(UserError) as err:
        select_units(tiny, ["mid_block", pattern])
    assert repr(pattern) in str(err.value)
    assert fragment in str(err.value)


@pytest.mark.parametrize("pattern", ["", "  ", "up_blocks..1", "up_blocks.3-1"])
def test_malformed_patterns(tiny: torch.nn.Module, pattern: str) -> None:
    with pytest.raises(UserError):
        select_units(tiny, pattern)


def test_unit_matches_is_prefix_on_whole_parts() -> None:
    unit = Unit("up_blocks.1.resnets.0:conv", "up_blocks.1.resnets.0", "conv", (), (), 0)
    assert unit_matches(unit, "up_blocks.1")
    assert unit_matches(unit, "up_blocks.1-3.resnets")
    assert not unit_matches(unit, "up_blocks.10")
    assert not unit_matches(unit, "up_blocks.2-3")
    assert not unit_matches(unit, "up_blocks.1.resnets.0.conv1")  # longer than the block path
    assert not unit_matches(unit, "up_blocks.1:norm")
    assert unit_matches(unit, "**.resnets:c*")


# ---- CLI ----------------------------------------------------------------------------------------------


def _table_rows(text: str) -> dict[str, list[str]]:
    """A rich table's rows by their first cell (continuation lines, first cell empty, left out)."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if line.startswith("│") and cells[0]:
            rows[cells[0]] = cells
    return rows


def test_cli_methods_and_units(
    capsys: pytest.CaptureFixture[str], monkeypatch, tiny: torch.nn.Module, sd15: torch.nn.Module
) -> None:
    """`methods` sizes each method on --units of --model; `units` lists --select's units of --model."""
    import capsearch.models.load as load
    from capsearch.cli import main

    loaded, real = [], load.load_pipeline
    monkeypatch.setattr(load, "load_pipeline", lambda spec: loaded.append(spec) or real(spec))
    assert main(["methods", "--model", "tiny:random", "--units", "mid_block"]) == 0
    out = capsys.readouterr().out
    assert loaded == ["tiny:random"] and "PEFT methods on tiny:random, units 'mid_block'" in out
    rows = _table_rows(out)
    assert set(method_names()) <= set(rows)
    trainable = {name: int(rows[name][2].replace(",", "")) for name in method_names()}
    named = dict(tiny.named_parameters())
    mid = {n: p.numel() for n, p in named.items() if n.startswith("mid_block.")}
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    mid_norms = [
        m for n, m in tiny.named_modules() if n.startswith("mid_block.") and isinstance(m, norms)
    ]
    assert trainable["freeze"] == 0 and trainable["full"] == sum(mid.values())
    assert trainable["bitfit"] == sum(v for n, v in mid.items() if n.endswith(".bias"))
    assert trainable["norm"] == sum(p.numel() for m in mid_norms for p in m.parameters())
    assert trainable["attention"] == sum(
        v for n, v in mid.items() if n.startswith("mid_block.attentions.")
    )
    total = sum(p.numel() for p in named.values())
    assert rows["full"][3] == f"{100 * sum(mid.values()) / total:.4f}"
    assert main(["units", "--model", "sd15-config", "--select", "mid_block:ff"]) == 0
    out = capsys.readouterr().out
    ff = "mid_block.attentions.0.transformer_blocks.0.ff."
    size = sum(p.numel() for n, p in sd15.named_parameters() if n.startswith(ff))
    assert (
        f"1 units of sd15-config ({sum(p.numel() for p in sd15.parameters()):,} parameters)" in out
    )
    assert _table_rows(out)["mid_block.attentions.0:ff"][1:3] == ["ff", f"{size:,}"]
    assert main(["units", "--select", "up_blocks.9"]) == 2
    assert "up_blocks.9" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["tiny", "sd15"])
def test_attention_block_units_hold_exactly_the_attentions_parameters(
    model: str, request: pytest.FixtureRequest
) -> None:
    """The units in `*.attentions.N` blocks are what the paper's Attn Tuning trains (names with
    "attentions", Dutt et al.'s code), so the `attention` method can select by unit."""
    from capsearch.methods.attention import in_attention_block

    unet = request.getfixturevalue(model)
    by_units = {p for u in list_units(unet) if in_attention_block(u) for p in u.params}
    assert by_units == {n for n, _ in unet.named_parameters() if "attentions" in n}


def test_trained_units_maps_new_parameters_to_their_units() -> None:
    from capsearch.methods import trained_units

    def names(spec: dict) -> set[str]:
        return {u.name for u in trained_units(build_tiny_unet(), spec)}

    everything = {u.name for u in list_units(build_tiny_unet())}
    assert names({"method": "full"}) == everything
    assert names({"method": "svdiff"}) == everything  # δ under `parametrizations`
    assert names({"method": "lora", "units": "mid_block:*_attn"}) == {
        "mid_block.attentions.0:self_attn",
        "mid_block.attentions.0:cross_attn",
    }  # lora_A / lora_B under the wrapped layer
    attention = names({"method": "attention"})
    assert attention and all(".attentions." in n for n in attention)
    assert names({"method": "freeze"}) == set()
