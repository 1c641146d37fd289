"""Invariants of every registered PEFT method on the tiny UNet, mixed trials, optimizer groups, CLI."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch
from conftest import example_spec, run_unet, unet_inputs

from capsearch.errors import UserError
from capsearch.methods import (
    Applied,
    MethodConfig,
    apply_methods,
    count_trainable,
    get_method,
    make_config,
    method_names,
    optimizer_groups,
)
from capsearch.models.tiny import build_tiny_unet
from capsearch.units import Unit, select_units

METHODS = method_names()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return unet_inputs(seed=0, timesteps=(10, 700))


@pytest.fixture(scope="module")
def base_output(inputs) -> torch.Tensor:
    return run_unet(build_tiny_unet().eval(), inputs)


def adam_step(applied: Applied, unet: torch.nn.Module, inputs, lr: float = 1e-2) -> None:
    x, t, ehs = inputs
    opt = torch.optim.AdamW(optimizer_groups(applied, unet, lr, weight_decay=0.01))
    loss = (unet(x, t, encoder_hidden_states=ehs).sample - 1.0).pow(2).mean()
    loss.backward()
    opt.step()


# ---- analytic trainable counts, from the base layers' shapes --------------------------------------


def _modules(base: torch.nn.Module, units: Sequence[Unit]) -> list[tuple[str, torch.nn.Module]]:
    names = dict.fromkeys(m for u in units for m in u.modules)
    return [(n, base.get_submodule(n)) for n in names]


def _fan(module: torch.nn.Module) -> tuple[int, int, int]:
    """(out, in, kernel area) of a Linear or Conv2d."""
    if isinstance(module, torch.nn.Conv2d):
        kh, kw = module.kernel_size
        return module.out_channels, module.in_channels, kh * kw
    return module.out_features, module.in_features, 1


def _adaptable(base, units):
    return [
        m for _, m in _modules(base, units) if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
    ]


def _is_norm(m: torch.nn.Module) -> bool:
    return isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))


def _factorization(d: int) -> tuple[int, int]:
    """d = m·n with m ≤ n and m the largest divisor not above √d (LoKr's default split)."""
    m = max(k for k in range(1, int(d**0.5) + 1) if d % k == 0)
    return m, d // m


def count_lokr(base, units, cfg) -> int:
    total = 0
    for m in _adaptable(base, units):
        out, fan_in, area = _fan(m)
        (a, b), (c, d) = _factorization(out), _factorization(fan_in)
        total += a * c  # W1 kept whole (decompose_both off)
        full_w2 = cfg.rank >= max(b, d) / 2
        total += b * d * area if full_w2 else cfg.rank * (b + d * area)
    return total


def count_difffit(base, units, cfg) -> int:
    gammas = 0
    for name, m in _modules(base, units):
        branch = (
            ("attn1" in cfg.gamma_on and name.endswith("attn1.to_out.0"))
            or ("attn2" in cfg.gamma_on and name.endswith("attn2.to_out.0"))
            or ("ff" in cfg.gamma_on and name.endswith("ff.net.2"))
            or ("resnet" in cfg.gamma_on and ".resnets." in name and name.endswith("conv2"))
        )
        if branch:
            gammas += 1 if cfg.gamma_shape == "scalar" else _fan(m)[0]
    rest = 0
    for _, m in _modules(base, units):
        if _is_norm(m) and cfg.train_norm:
            rest += m.weight.numel() + m.bias.numel()
        elif cfg.train_bias and getattr(m, "bias", None) is not None:
            rest += m.bias.numel()
    return gammas + rest


def count_attention(base, units, cfg) -> int:
    """Attn Tuning: every parameter of the units inside `*.attentions.N` blocks."""
    return sum(u.numel for u in units if ".attentions." in f".{u.block}.")


def count_svdiff(base, units, cfg) -> int:
    """One shift per singular value, min(m, n) for an m × n (conv: out × in·kh·kw) weight, plus one
    per norm-layer weight (a 1 × C matrix has one singular value)."""
    mods = _modules(base, units)
    shifts = sum(min(_fan(m)[0], _fan(m)[1] * _fan(m)[2]) for m in _adaptable(base, units))
    norms = sum(1 for _, m in mods if _is_norm(m) and m.weight is not None)
    return shifts + (norms if cfg.shift_norms else 0)


def count_attn_proj(base, units, cfg) -> int:
    kinds = {"both": ("self_attn", "cross_attn"), "self": ("self_attn",), "cross": ("cross_attn",)}
    ends = ("to_q", "to_k", "to_v") + (() if cfg.qkv_only else ("to_out.0",))
    chosen = [u for u in units if u.kind in kinds[cfg.which]]
    return sum(
        p.numel() for n, m in _modules(base, chosen) if n.endswith(ends) for p in m.parameters()
    )


ANALYTIC: dict[str, Callable[[torch.nn.Module, Sequence[Unit], MethodConfig], int]] = {
    "freeze": lambda base, units, cfg: 0,
    "full": lambda base, units, cfg: sum(u.numel for u in units),
    "attention": count_attention,
    "attn_proj": count_attn_proj,
    "bitfit": lambda base, units, cfg: sum(
        m.bias.numel() for _, m in _modules(base, units) if getattr(m, "bias", None) is not None
    ),
    "norm": lambda base, units, cfg: sum(
        p.numel() for _, m in _modules(base, units) if _is_norm(m) for p in m.parameters()
    ),
    "difffit": count_difffit,
    "svdiff": count_svdiff,
    # LoRA: A is r × in·k·k, B is out × r
    "lora": lambda base, units, cfg: sum(
        cfg.rank * (_fan(m)[1] * _fan(m)[2] + _fan(m)[0]) for m in _adaptable(base, units)
    ),
    # LoHa: two such pairs
    "loha": lambda base, units, cfg: sum(
        2 * cfg.rank * (_fan(m)[1] * _fan(m)[2] + _fan(m)[0]) for m in _adaptable(base, units)
    ),
    "lokr": count_lokr,
    # OFT: in/b blocks of b(b-1)/2 skew-symmetric entries, on Linear and 1×1 convs that split evenly
    "oft": lambda base, units, cfg: sum(
        _fan(m)[1] // cfg.block_size * cfg.block_size * (cfg.block_size - 1) // 2
        for m in _adaptable(base, units)
        if _fan(m)[2] == 1 and _fan(m)[1] % cfg.block_size == 0
    ),
}


# ---- invariants, parametrised over the registry -----------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_starts_at_the_base_output(name: str, inputs, base_output) -> None:
    unet = build_tiny_unet().eval()
    apply_methods(unet, example_spec(name))
    assert (run_unet(unet, inputs) - base_output).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", METHODS)
def test_a_step_changes_only_trainable_tensors(name: str, inputs) -> None:
    unet = build_tiny_unet()
    applied = apply_methods(unet, example_spec(name))
    names = applied.names
    assert names == [n for n, p in unet.named_parameters() if p.requires_grad]
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    assert set(names) <= set(before)
    if names:
        adam_step(applied, unet, inputs)
    after = unet.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed <= set(names)
    assert bool(changed) == bool(names)


@pytest.mark.parametrize("name", METHODS)
def test_trainable_count_is_analytic(name: str) -> None:
    if name not in ANALYTIC:
        pytest.fail(f"add an analytic trainable count for method {name!r} to ANALYTIC")
    base = build_tiny_unet()
    spec = example_spec(name)
    units = select_units(base, spec["units"])
    expected = ANALYTIC[name](base, units, make_config(get_method(name), {}))
    unet = build_tiny_unet()
    apply_methods(unet, spec)
    assert count_trainable(unet) == expected
    assert name == "freeze" or expected > 0  # every example selection trains something on tiny


@pytest.mark.parametrize("name", METHODS)
def test_empty_selection_is_freeze(name: str, inputs, base_output) -> None:
    unet = build_tiny_unet().eval()
    keys = set(unet.state_dict())
    assert apply_methods(unet, {"method": name, "units": []}).names == []
    assert count_trainable(unet) == 0
    assert set(unet.state_dict()) == keys
    assert torch.equal(run_unet(unet, inputs), base_output)


@pytest.mark.parametrize(
    "spec, name",
    [
        ({"method": "attn_proj", "which": "cross", "qkv_only": True}, "attn_proj"),
        ({"method": "attn_proj", "which": "self"}, "attn_proj"),
        ({"method": "attention", "units": ["*:attn_norm", "*:proj", "*:conv"]}, "attention"),
        ({"method": "difffit", "gamma_on": ["attn1", "ff", "resnet"], "units": "*"}, "difffit"),
        ({"method": "difffit", "gamma_shape": "scalar", "train_bias": False}, "difffit"),
        ({"method": "lora", "rank": 2, "alpha": 8, "units": ["*:conv", "*:proj"]}, "lora"),
        ({"method": "loha", "rank": 3, "units": "down_blocks.1"}, "loha"),
        ({"method": "lokr", "rank": 8, "units": "*:ff"}, "lokr"),
        ({"method": "oft", "block_size": 16, "units": "*"}, "oft"),
        ({"method": "svdiff", "units": "*:conv"}, "svdiff"),
        ({"method": "svdiff", "units": "*", "shift_norms": False}, "svdiff"),
    ],
)
def test_hyper_parameter_variants(spec: dict, name: str, inputs, base_output) -> None:
    base = build_tiny_unet()
    hyper = {k: v for k, v in spec.items() if k not in ("method", "units")}
    cfg = make_config(get_method(name), hyper)
    expected = ANALYTIC[name](base, select_units(base, spec.get("units", "*")), cfg)
    unet = build_tiny_unet().eval()
    apply_methods(unet, spec)
    assert count_trainable(unet) == expected > 0
    assert (run_unet(unet, inputs) - base_output).abs().max().item() <= 1e-5


def test_oft_leaves_out_kxk_convs() -> None:
    unet = build_tiny_unet()
    names = apply_methods(unet, {"method": "oft", "units": "*:conv"}).names
    adapted = {n.split(".oft_R.")[0] for n in names}
    assert adapted and all(
        unet.get_submodule(n).get_base_layer().kernel_size == (1, 1) for n in adapted
    )


# ---- mixed trials -------------------------------------------------------------------------------------


def test_mixed_entries_add_up(inputs, base_output) -> None:
    spec = [
        {"method": "svdiff", "units": "down_blocks"},
        {"method": "difffit", "units": "mid_block"},
        {"method": "lora", "units": "up_blocks.*:*_attn", "rank": 2},
        {"method": "lora", "units": "up_blocks.*:ff", "rank": 8},
        {"method": "norm", "units": "up_blocks"},
    ]
    separate = 0
    for entry in spec:
        unet = build_tiny_unet()
        apply_methods(unet, entry)
        separate += count_trainable(unet)
    unet = build_tiny_unet().eval()
    applied = apply_methods(unet, spec)
    assert count_trainable(unet) == separate
    assert len(applied.names) == len(set(applied.names))
    assert (run_unet(unet, inputs) - base_output).abs().max().item() <= 1e-5
    recorded = applied.entries
    assert [e["method"] for e in recorded] == [e["method"] for e in spec]
    assert recorded[2]["rank"] == 2 and recorded[2]["alpha"] == 4.0  # defaults filled in


def test_every_lora_entry_stays_active(inputs, base_output) -> None:
    unet = build_tiny_unet().eval()
    apply_methods(
        unet,
        [
            {"method": "lora", "units": "down_blocks:*_attn"},
            {"method": "lora", "units": "up_blocks:ff"},
        ],
    )
    first = [
        m for n, m in unet.named_modules() if n.startswith("down_blocks") and hasattr(m, "lora_B")
    ]
    assert first
    with torch.no_grad():
        for module in first:
            for layer in module.lora_B.values():
                layer.weight.normal_()
    assert (run_unet(unet, inputs) - base_output).abs().max().item() > 1e-3


def test_in_place_training_survives_adapter_injection() -> None:
    unet = build_tiny_unet()
    apply_methods(unet, [{"method": "bitfit"}, {"method": "lora", "units": "*:*_attn"}])
    bitfit_only = build_tiny_unet()
    apply_methods(bitfit_only, {"method": "bitfit"})
    lora_only = build_tiny_unet()
    apply_methods(lora_only, {"method": "lora", "units": "*:*_attn"})
    assert count_trainable(unet) == count_trainable(bitfit_only) + count_trainable(lora_only)


@pytest.mark.parametrize(
    "spec",
    [
        [
            {"method": "svdiff", "units": "mid_block"},
            {"method": "lora", "units": "mid_block:*_attn"},
        ],
        [{"method": "full", "units": "*"}, {"method": "svdiff", "units": "up_blocks.1:conv"}],
        [{"method": "difffit", "units": "*"}, {"method": "lora", "units": "mid_block:self_attn"}],
        [{"method": "lora", "units": "mid_block"}, {"method": "loha", "units": "mid_block:ff"}],
        [{"method": "svdiff", "units": "conv_in"}, {"method": "svdiff", "units": "*:conv"}],
        [
            {"method": "svdiff", "units": "mid_block:norm"},
            {"method": "difffit", "units": "mid_block"},
        ],
    ],
)
def test_incompatible_entries_are_refused(spec: list) -> None:
    with pytest.raises(UserError) as err:
        apply_methods(build_tiny_unet(), spec)
    assert spec[0]["method"] in str(err.value) and spec[1]["method"] in str(err.value)


def test_compatible_sharing_is_allowed() -> None:
    """Entries that share tensors train each once: the count is the union of the base tensors they
    train plus the tensors each adds (SVDiff's δ, DiffFit's γ), here from names and shapes alone."""
    unet = build_tiny_unet()
    apply_methods(
        unet,
        [
            {"method": "svdiff", "units": "**.resnets:conv"},
            {"method": "difffit", "units": "*", "gamma_on": ["attn1", "attn2", "ff", "resnet"]},
            {"method": "full", "units": "mid_block:ff"},
            {"method": "attention", "units": "mid_block"},
        ],
    )
    base = build_tiny_unet()
    named, modules = dict(base.named_parameters()), dict(base.named_modules())
    norms = {f"{n}.{w}" for n, m in modules.items() if _is_norm(m) for w in ("weight", "bias")}
    shared = {n for n in named if n.endswith(".bias")} | norms  # DiffFit on every unit
    ff = "mid_block.attentions.0.transformer_blocks.0.ff."
    shared |= {n for n in named if n.startswith(ff)}  # Full on the mid-block's feed-forward
    shared |= {n for n in named if n.startswith("mid_block.attentions.")}  # Attn Tuning there
    resnet_convs = [
        m for n, m in modules.items() if ".resnets." in n and isinstance(m, torch.nn.Conv2d)
    ]
    deltas = sum(min(m.out_channels, m.weight[0].numel()) for m in resnet_convs)  # one per σ
    branches = ("attn1.to_out.0", "attn2.to_out.0", "ff.net.2")
    gammas = sum(m.out_features for n, m in modules.items() if n.endswith(branches))
    gammas += sum(
        m.out_channels for n, m in modules.items() if ".resnets." in n and n.endswith("conv2")
    )
    expected = sum(named[n].numel() for n in shared) + deltas + gammas
    assert count_trainable(unet) == expected


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ({"method": "dora"}, "dora"),
        ({"method": "lora", "rnak": 4}, "rnak"),
        ({"method": "lora", "rank": "four"}, "lora.rank"),
        ({"method": "lora", "rank": 0}, "lora.rank"),
        ({"method": "attn_proj", "which": "all"}, "attn_proj.which"),
        ({"method": "attention", "which": "self"}, "which"),
        ({"method": "difffit", "lr_1d": 1e-3}, "difffit.lr_1d: difffit trains one parameter set"),
        ({"method": "full", "lr": 1e-4, "lr_1d": 1e-3}, "full.lr_1d"),
        ({"method": "difffit", "gamma_on": ["attn3"]}, "attn3"),
        ({"units": "*"}, "method"),
        ({"method": "bitfit", "units": "up_blocks.9"}, "up_blocks.9"),
    ],
)
def test_bad_specs_name_the_problem(spec: dict, fragment: str) -> None:
    with pytest.raises(UserError) as err:
        apply_methods(build_tiny_unet(), spec)
    assert fragment in str(err.value)


def test_bad_spec_leaves_the_unet_untouched() -> None:
    unet = build_tiny_unet()
    with pytest.raises(UserError):
        apply_methods(unet, [{"method": "bitfit"}, {"method": "lora", "rnak": 2}])
    assert all(p.requires_grad for p in unet.parameters())
    apply_methods(unet, {"method": "bitfit"})  # not marked as applied: a corrected spec applies


def test_applying_twice_is_refused() -> None:
    unet = build_tiny_unet()
    apply_methods(unet, {"method": "bitfit"})
    with pytest.raises(UserError):
        apply_methods(unet, {"method": "norm"})


def test_claims_last_one_apply_call() -> None:
    """Two UNets adapted one after the other share no claims: the same modules are free on each."""
    for _ in range(2):
        apply_methods(build_tiny_unet(), {"method": "svdiff", "units": "mid_block"})
    full, unet = get_method("full"), build_tiny_unet()
    with pytest.raises(RuntimeError):  # outside apply_methods there are no claims to join
        full.apply(unet, select_units(unet, "mid_block"), make_config(full, {}))


def test_counts_on_sd15_shapes_are_analytic() -> None:
    """Every method on all of SD v1.5's units, on the meta device (shapes only, no memory)."""
    from diffusers import UNet2DConditionModel

    from capsearch.models.tiny import SD15_UNET_CONFIG

    def sd15() -> torch.nn.Module:
        with torch.device("meta"):
            return UNet2DConditionModel(**SD15_UNET_CONFIG)

    base = sd15()
    units = select_units(base, "*")
    for name in METHODS:
        unet = sd15()
        apply_methods(unet, {"method": name})
        cfg = make_config(get_method(name), {})
        assert count_trainable(unet) == ANALYTIC[name](base, units, cfg), name


# ---- the baselines' sizes on SD v1.5, from the authors' definitions (no capsearch unit logic) --------


def _sd15_meta() -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    from capsearch.models.tiny import SD15_UNET_CONFIG

    with torch.device("meta"):
        return UNet2DConditionModel(**SD15_UNET_CONFIG)


def _independent_counts(unet: torch.nn.Module) -> dict[str, int]:
    """Trainable counts of the baselines computed straight from parameter names and layer shapes."""
    import re

    named = dict(unet.named_parameters())
    modules = dict(unet.named_modules())
    linear_conv = [m for m in modules.values() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    norms = [m for m in modules.values() if _is_norm(m)]
    projection = re.compile(r"\.attn[12]\.to_(q|k|v|out\.0)\.(weight|bias)$")
    # DiffFit (Xie et al. 2023): every bias, every norm's scale and shift, and one γ per output channel
    # of the attention and feed-forward branches (capsearch's default gamma_on: attn1, attn2, ff).
    gamma_on = ("attn1.to_out.0", "attn2.to_out.0", "ff.net.2")
    difffit = sum(p.numel() for n, p in named.items() if n.endswith(".bias"))
    difffit += sum(m.weight.numel() for m in norms)
    difffit += sum(m.out_features for n, m in modules.items() if n.endswith(gamma_on))
    return {
        "full": sum(p.numel() for p in named.values()),
        # Dutt et al.'s code (adaptors.enable_attention_update): every name containing "attentions"
        "attention": sum(p.numel() for n, p in named.items() if "attentions" in n),
        "attn_proj": sum(p.numel() for n, p in named.items() if projection.search(n)),
        # SVDiff: one δ per singular value of each weight (conv: out × in·kh·kw), one per norm weight
        "svdiff": sum(min(m.weight.shape[0], m.weight[0].numel()) for m in linear_conv)
        + len(norms),
        "difffit": difffit,
    }


def test_baseline_sizes_on_sd15_follow_the_authors_definitions() -> None:
    expected = _independent_counts(_sd15_meta())
    total = expected["full"]
    for name, count in expected.items():
        unet = _sd15_meta()
        apply_methods(unet, {"method": name})
        assert count_trainable(unet) == count, name
    # The figures the docs quote (docs/methods.md, "Sizes")
    assert total == 859_520_964
    assert round(expected["attention"] / 1e6, 1) == 267.2
    assert round(100 * expected["attention"] / total, 1) == 31.1
    assert round(expected["attn_proj"] / 1e6, 1) == 93.5
    assert round(100 * expected["attn_proj"] / total, 1) == 10.9
    assert expected["svdiff"] == 222_696 + 109  # spectral shifts + one per affine norm layer


# ---- optimizer groups ------------------------------------------------------------------------------


def test_optimizer_groups_split_decay_not_rates_by_dimension() -> None:
    unet = build_tiny_unet()
    applied = apply_methods(
        unet,
        [{"method": "svdiff", "units": "down_blocks"}, {"method": "full", "units": "mid_block"}],
    )
    groups = optimizer_groups(applied, unet, lr=1e-4, weight_decay=0.1)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"matrices", "vectors"}
    assert {g["lr"] for g in groups} == {1e-4}  # no global 1-D rate: biases and norms at the run's
    assert by_name["matrices"]["weight_decay"] == 0.1 and by_name["vectors"]["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in by_name["matrices"]["params"])
    assert all(p.ndim < 2 for p in by_name["vectors"]["params"])
    grouped = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in unet.parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable)
    torch.optim.AdamW(groups)  # accepted as is


def test_an_entry_learns_at_its_own_rate() -> None:
    unet = build_tiny_unet()
    applied = apply_methods(
        unet,
        [
            {"method": "full", "units": "mid_block"},
            {"method": "difffit", "units": "down_blocks", "lr": 3e-3},
            {"method": "lora", "units": "up_blocks.1.attentions", "lr": 5e-4},
        ],
    )
    groups = optimizer_groups(applied, unet, lr=1e-4, weight_decay=0.1)
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(unet.named_parameters())
    trainable = [n for n, p in named.items() if p.requires_grad]
    assert len(rate) == len(trainable)  # every trainable parameter in exactly one group
    for name in trainable:
        p = named[name]
        if name.startswith("down_blocks"):  # DiffFit's own rate for all its parameters
            expected = 3e-3
        elif name.startswith("up_blocks"):  # LoRA's own rate
            expected = 5e-4
        else:  # full fine-tuning at the run's rate, its biases and norms included
            expected = 1e-4
        assert rate[id(p)] == expected, name
        assert decay[id(p)] == (0.1 if p.ndim >= 2 else 0.0), name
    assert {g["name"] for g in groups} == {
        "matrices",
        "vectors",
        "vectors@0.003",
        "matrices@0.0005",
    }
    # The rates are part of the recorded spec, so a saved delta re-applies them.
    recorded = applied.entries
    assert recorded[1]["lr"] == 3e-3 and "lr" not in recorded[0]


def _is_norm_shift(unet: torch.nn.Module, name: str) -> bool:
    """A δ on the weight of a GroupNorm/LayerNorm (found from the module tree, not the method)."""
    owner, found, _ = name.partition(".parametrizations.weight.")
    return bool(found) and _is_norm(unet.get_submodule(owner))


@pytest.mark.parametrize("rates", [{"lr": 1e-3, "lr_1d": 1e-6}, {"lr_1d": 1e-6}])
def test_svdiff_lr_1d_is_the_rate_of_its_norm_layer_shifts(rates: dict) -> None:
    """SVDiff (Han et al. 2023; svdiff-pytorch) trains spectral shifts at lr and norm shifts at lr_1d."""
    unet = build_tiny_unet()
    applied = apply_methods(unet, {"method": "svdiff", "units": "*", **rates})
    names = applied.names
    norms = [n for n in names if _is_norm_shift(unet, n)]
    affine = [m for m in build_tiny_unet().modules() if _is_norm(m) and m.weight is not None]
    assert len(norms) == len(affine) > 0
    named = dict(unet.named_parameters())
    assert all(named[n].ndim == 1 for n in names)  # every δ is 1-D: only the role tells them apart
    groups = optimizer_groups(applied, unet, lr=1e-4, weight_decay=0.1)
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    for name in names:
        expected = rates["lr_1d"] if name in norms else rates.get("lr", 1e-4)
        assert rate[id(named[name])] == expected, name


def test_a_later_entry_without_rates_takes_the_run_rates_back() -> None:
    unet = build_tiny_unet()
    applied = apply_methods(
        unet,
        [
            {"method": "full", "units": "mid_block", "lr": 1e-2},
            {"method": "difffit", "units": "mid_block"},  # retrains the same biases/norms
        ],
    )
    groups = optimizer_groups(applied, unet, lr=1e-4)
    named = dict(unet.named_parameters())
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert rate[id(named["mid_block.resnets.0.norm1.weight"])] == 1e-4
    assert rate[id(named["mid_block.resnets.0.conv1.weight"])] == 1e-2


@pytest.mark.parametrize("value", [0, -1e-3, "fast", True])
def test_entry_rates_must_be_positive_numbers(value) -> None:
    unet = build_tiny_unet()
    with pytest.raises(UserError, match=r"difffit\.lr must be a positive number"):
        apply_methods(unet, {"method": "difffit", "lr": value})
    assert all(p.requires_grad for p in unet.parameters())  # checked before the UNet is touched


def test_optimizer_groups_empty_when_frozen() -> None:
    unet = build_tiny_unet()
    applied = apply_methods(unet, {"method": "freeze"})
    assert optimizer_groups(applied, unet, lr=1e-4) == []
