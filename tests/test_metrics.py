"""Metrics: FID against torchmetrics, exact AMD, extraction cliques, denoising strength, and phantom controls."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from capsearch.errors import UserError
from capsearch.metrics import (
    ExtractionResult,
    alignment_score,
    amd,
    denoising_strength,
    denoising_strength_per_prompt,
    extraction_attack,
    frechet_distance,
    frechet_distance_from_stats,
    frechet_distance_to,
    gaussian_stats,
    kernel_inception_distance,
    kernel_inception_distance_to,
    nearest_train,
    prompt_cliques,
    threshold_scores,
    tiled_distance,
)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- FID ---------------------------------------------------------------------------------------------


class _Identity(torch.nn.Module):
    """Feeds features straight to torchmetrics (it reads the width from num_features)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_frechet_distance_matches_torchmetrics():
    from torchmetrics.image.fid import FrechetInceptionDistance

    real = _randn(400, 32, seed=1) @ _randn(32, 32, seed=2) * 0.5 + 1.0
    fake = _randn(300, 32, seed=3) * 1.3 - 0.2
    reference = FrechetInceptionDistance(feature=_Identity(32))
    reference.update(real.double(), real=True)
    reference.update(fake.double(), real=False)
    expected = float(reference.compute())
    ours = frechet_distance(real, fake)
    assert expected > 1.0
    assert ours == pytest.approx(expected, rel=1e-3)


def test_frechet_distance_formula_cases():
    x = _randn(500, 16, seed=4)
    shift = torch.linspace(-1, 1, 16)
    # Same covariance, shifted mean: the trace terms cancel and d² = ‖shift‖².
    assert frechet_distance(x, x + shift) == pytest.approx(float(shift @ shift), rel=1e-6)
    assert abs(frechet_distance(x, x)) < 1e-6
    # Scaling by s: Tr(Σ + s²Σ − 2sΣ) = (1 − s)² Tr Σ for identical means (centred data).
    xc = x - x.mean(0)
    trace = float(torch.cov(xc.T.double()).trace())
    assert frechet_distance(xc, 2 * xc) == pytest.approx(trace, rel=1e-6)


def _sqrtm_fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Heusel et al.'s eq. (6) through scipy's general matrix square root, for comparison."""
    from scipy import linalg

    mu1, mu2 = real.double().mean(0).numpy(), fake.double().mean(0).numpy()
    s1, s2 = torch.cov(real.double().T).numpy(), torch.cov(fake.double().T).numpy()
    root = linalg.sqrtm(s1 @ s2)
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1 + s2) - 2 * np.trace(root).real)


def test_frechet_distance_degenerate_covariances_match_closed_forms():
    # Fewer samples than dimensions (10 and 6 samples in 64-d): singular covariances, no offset needed.
    x = _randn(10, 64, seed=5).double()
    x = x - x.mean(0)
    trace = float(torch.cov(x.T).trace())
    shift = torch.linspace(-1, 1, 64).double()
    # Σ_y = 4Σ_x, so Tr((Σ_x Σ_y)^½) = 2 Tr Σ_x and d = ‖shift‖² + (1 − 2)² Tr Σ_x.
    assert frechet_distance(x, 2 * x + shift) == pytest.approx(
        float(shift @ shift) + trace, rel=1e-10
    )
    # Supports on disjoint coordinates: Σ1Σ2 = 0 and d = ‖μ1 − μ2‖² + Tr Σ1 + Tr Σ2.
    a, b = torch.zeros(6, 64, dtype=torch.float64), torch.zeros(7, 64, dtype=torch.float64)
    a[:, :8], b[:, 8:16] = _randn(6, 8, seed=15).double(), _randn(7, 8, seed=16).double() + 1
    expected = float(
        (a.mean(0) - b.mean(0)).pow(2).sum() + torch.cov(a.T).trace() + torch.cov(b.T).trace()
    )
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_with_fewer_samples_than_dimensions_matches_sqrtm_and_torchmetrics():
    from torchmetrics.image.fid import FrechetInceptionDistance

    # Well-conditioned reference (400 samples in 64-d) against a singular one (40 samples).
    real = _randn(400, 64, seed=17) @ (torch.eye(64) + 0.1 * _randn(64, 64, seed=18))
    fake = _randn(40, 64, seed=19) * 1.2 + 0.3
    ours = frechet_distance(real, fake)
    assert math.isfinite(ours) and ours > 1.0
    assert ours == pytest.approx(_sqrtm_fid(real, fake), rel=1e-6)
    reference = FrechetInceptionDistance(feature=_Identity(64))
    reference.update(real.double(), real=True)
    reference.update(fake.double(), real=False)
    assert ours == pytest.approx(float(reference.compute()), rel=1e-6)
    # Through the stats (√Σ factors on both sides) and through a fixed reference (the data as a factor).
    from_stats = frechet_distance_from_stats(*gaussian_stats(real), *gaussian_stats(fake))
    assert from_stats == pytest.approx(ours, rel=1e-9)
    assert frechet_distance_to(real)(fake) == pytest.approx(ours, rel=1e-12)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    few = _randn(10, 64, seed=20)
    many = _randn(300, 16, seed=21) * 3 + 2
    # Rank-deficient with more samples than dimensions: constant and duplicated columns (dead units).
    dead = torch.cat([many, torch.ones(300, 4), many[:, :3]], dim=1)
    for x in (few, many, dead):
        assert frechet_distance(x, x) == pytest.approx(
            0.0, abs=1e-9 * float(x.double().var(0).sum())
        )


def test_frechet_distance_refuses_a_covariance_that_is_not_one():
    mu = np.zeros(3)
    with pytest.raises(FloatingPointError, match="not positive semi-definite"):
        frechet_distance_from_stats(mu, np.diag([1.0, 1.0, -0.5]), mu, np.eye(3))
    with pytest.raises(UserError, match="not symmetric"):
        frechet_distance_from_stats(mu, np.triu(np.ones((3, 3))), mu, np.eye(3))


def test_frechet_distance_rejects_bad_input():
    with pytest.raises(UserError):
        frechet_distance(_randn(10, 4), _randn(10, 5))
    with pytest.raises(UserError):
        frechet_distance(_randn(1, 4), _randn(10, 4))
    with pytest.raises(UserError):
        frechet_distance(_randn(10), _randn(10, 1))


# --- KID ---------------------------------------------------------------------------------------------


def _brute_force_kid(x: torch.Tensor, y: torch.Tensor) -> float:
    """Bińkowski et al. 2018's unbiased MMD² with k(a, b) = (aᵀb/d + 1)³, pair by pair."""
    x, y = x.double().tolist(), y.double().tolist()
    dim = len(x[0])

    def k(a: list[float], b: list[float]) -> float:
        return (sum(p * q for p, q in zip(a, b)) / dim + 1) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(a, b) for a in x for b in y) / (m * n)
    return xx + yy - 2 * xy


def test_kid_matches_its_definition_by_brute_force():
    x, y = _randn(5, 3, seed=30), _randn(7, 3, seed=31) * 1.5 + 0.4
    expected = _brute_force_kid(x, y)
    assert abs(expected) > 0.1  # at 5 and 7 samples the unbiased estimate may be negative
    assert kernel_inception_distance(x, y) == pytest.approx(expected, rel=1e-12)
    # Kernel blocks of 2 rows (uneven last block) and the fixed-reference form give the same value.
    assert kernel_inception_distance(x, y, block_rows=2) == pytest.approx(expected, rel=1e-12)
    assert kernel_inception_distance_to(x)(y) == pytest.approx(expected, rel=1e-12)


def test_kid_is_unbiased_where_the_plug_in_estimate_is_not():
    rng = np.random.default_rng(32)
    draws, plug_in = [], []
    for _ in range(400):
        # Two samples of 8 from the same distribution: MMD² is 0, so the estimates must average to 0.
        x, y = rng.standard_normal((8, 4)), rng.standard_normal((8, 4))
        draws.append(kernel_inception_distance(x, y))
        k = (np.concatenate([x, y]) @ np.concatenate([x, y]).T / 4 + 1) ** 3
        plug_in.append(k[:8, :8].mean() + k[8:, 8:].mean() - 2 * k[:8, 8:].mean())
    draws, plug_in = np.array(draws), np.array(plug_in)
    se = draws.std(ddof=1) / np.sqrt(len(draws))
    assert abs(draws.mean()) < 3 * se
    assert (draws < 0).any()  # an unbiased estimate of 0 must go negative; it is never clamped
    # The plug-in (V-statistic) estimate keeps the i = j terms and is biased upwards at this size.
    assert plug_in.mean() > 10 * plug_in.std(ddof=1) / np.sqrt(len(plug_in))


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_kid_matches_torchmetrics():
    from torchmetrics.image.kid import KernelInceptionDistance

    real = _randn(50, 16, seed=33).double()
    fake = (_randn(50, 16, seed=34) * 1.2 + 0.1).double()
    # With subset_size equal to the sample count every torchmetrics subset is the whole set, so its
    # subset mean is the all-samples estimate.
    reference = KernelInceptionDistance(feature=_Identity(16), subsets=3, subset_size=50)
    reference.update(real, real=True)
    reference.update(fake, real=False)
    mean, std = reference.compute()
    ours = kernel_inception_distance(real, fake)
    assert ours > 1e-3
    assert ours == pytest.approx(float(mean), rel=1e-9) and float(std) == pytest.approx(
        0, abs=1e-12
    )


def test_kid_rejects_bad_input():
    with pytest.raises(UserError):
        kernel_inception_distance(_randn(10, 4), _randn(10, 5))
    with pytest.raises(UserError):
        kernel_inception_distance(_randn(1, 4), _randn(10, 4))
    with pytest.raises(UserError):
        kernel_inception_distance_to(_randn(10, 4))(_randn(10, 3))


# --- AMD ---------------------------------------------------------------------------------------------


def _brute_force(gen: torch.Tensor, train: torch.Tensor, k: int):
    cos = torch.nn.functional.normalize(gen, dim=1) @ torch.nn.functional.normalize(train, dim=1).T
    return (1 - cos).topk(k, dim=1, largest=False)


def test_nearest_train_is_exact_with_tiny_blocks():
    gen, train = _randn(37, 24, seed=7), _randn(205, 24, seed=8)
    want_d, want_i = _brute_force(gen, train, 3)
    # Blocks of 7 training rows and 5 queries force every merge path (uneven last blocks included).
    dist, idx = nearest_train(gen, train, k=3, block_rows=7, query_rows=5)
    assert torch.equal(idx, want_i)
    assert torch.allclose(dist, want_d, atol=1e-5)
    one_block_d, one_block_i = nearest_train(gen, train, k=3)
    assert torch.equal(one_block_i, idx) and torch.allclose(one_block_d, dist, atol=1e-6)


def test_amd_zero_for_copies_and_larger_for_fresh_samples():
    train = _randn(300, 16, seed=9)
    copies = train[::3] * 2.5  # cosine distance ignores scale
    assert amd(copies, train, block_rows=50) == pytest.approx(0.0, abs=1e-5)
    fresh = amd(_randn(100, 16, seed=10), train, block_rows=50)
    brute = float(_brute_force(_randn(100, 16, seed=10), train, 1)[0].mean())
    assert fresh == pytest.approx(brute, abs=1e-5) and fresh > 0.2


def test_nearest_train_rejects_bad_input():
    with pytest.raises(UserError):
        nearest_train(_randn(3, 4), _randn(5, 6))
    with pytest.raises(UserError):
        nearest_train(_randn(3, 4), _randn(5, 4), k=6)


# --- extraction ----------------------------------------------------------------------------------------


def test_tiled_distance_is_max_over_tiles_of_normalised_l2():
    a = torch.zeros(1, 1, 16, 16)
    b = a.clone()
    b[..., :4, :4] = 1.0  # one 4x4 tile changes by 0.5 in [0, 1] units
    d = tiled_distance(a, b, tiles=4)
    assert d.shape == (1, 1)
    assert float(d) == pytest.approx(0.5, abs=1e-6)  # the global per-pixel ℓ2 would only be 0.125
    x = torch.rand(5, 3, 16, 16) * 2 - 1
    y = torch.rand(4, 3, 16, 16) * 2 - 1
    manual = torch.zeros(5, 4)
    for i in range(5):
        for j in range(4):
            diff = ((x[i] - y[j]) / 2).reshape(3, 4, 4, 4, 4).permute(1, 3, 0, 2, 4).reshape(16, -1)
            manual[i, j] = (diff.pow(2).mean(dim=1).sqrt()).max()
    assert torch.allclose(tiled_distance(x, y), manual, atol=1e-5)


def test_prompt_cliques_are_cliques_not_connected_components():
    # Constant images at -0.2, 0, 0.2 ([-1, 1]): neighbours are 0.1 apart, the ends 0.2 (threshold 0.15).
    chain = torch.tensor([-0.2, 0.0, 0.2]).view(3, 1, 1, 1).expand(3, 1, 8, 8).contiguous()
    cliques, _ = prompt_cliques(chain, threshold=0.15, min_clique=3, tiles=4)
    assert cliques == []  # a connected-components grouping would report all three
    tight = (
        torch.tensor([0.0, 0.02, 0.04, 0.06, 0.08]).view(5, 1, 1, 1).expand(5, 1, 8, 8).contiguous()
    )
    cliques, capped = prompt_cliques(tight, threshold=0.15, min_clique=3, tiles=4)
    assert not capped and len(cliques) == 1
    members, medoid = cliques[0]
    assert members == [0, 1, 2, 3, 4] and medoid == 2


def _copier(train: torch.Tensor, noise: float):
    """A generator that returns noisy copies of the training image named by the prompt ('image k')."""

    def run(prompts: list[str], n_per_prompt: int, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        out = [
            train[int(p.split()[-1])].expand(n_per_prompt, -1, -1, -1)
            + noise * torch.randn(n_per_prompt, *train.shape[1:], generator=gen)
            for p in prompts
        ]
        return torch.cat(out).clamp(-1, 1)

    return run


def _noise_generator(prompts: list[str], n_per_prompt: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(len(prompts) * n_per_prompt, 1, 32, 32, generator=gen) * 2 - 1


def test_extraction_attack_on_synthetic_copier_and_noise():
    train = torch.rand(40, 1, 32, 32, generator=torch.Generator().manual_seed(11)) * 2 - 1
    prompts = [f"image {k}" for k in range(0, 40, 2)]
    result = extraction_attack(
        _copier(train, 0.05), prompts, train, n_per_prompt=8, min_clique=4, batch_size=32
    )
    assert isinstance(result, ExtractionResult)
    assert result.count == len(prompts)
    assert sorted(t for _, t, _ in result.extracted) == list(range(0, 40, 2))
    for prompt, t, gen_index in result.extracted:
        assert int(prompt.split()[-1]) == t
        assert prompts.index(prompt) == gen_index // 8  # prompt-major generation indices
    assert result.settings["n_generated"] == len(prompts) * 8
    noise = extraction_attack(_noise_generator, prompts, train, n_per_prompt=8, min_clique=4)
    assert noise.count == 0 and noise.extracted == [] and noise.settings["n_cliques"] == 0


def test_extraction_attack_finds_every_copied_prompt_at_scale():
    # 20 prompts x 50 generations; its cost (and 100 x 50) is timed by
    # experiments/benchmarks/bench_extraction.py, not here.
    train = torch.rand(100, 1, 32, 32, generator=torch.Generator().manual_seed(12)) * 2 - 1
    prompts = [f"image {k}" for k in range(20)]
    result = extraction_attack(_copier(train, 0.05), prompts, train, n_per_prompt=50, min_clique=10)
    assert result.count == 20
    assert sorted(t for _, t, _ in result.extracted) == list(range(20))


def test_extraction_attack_rejects_bad_settings():
    train = torch.zeros(2, 1, 32, 32)
    with pytest.raises(UserError):
        extraction_attack(_noise_generator, ["a"], train, n_per_prompt=3, min_clique=5)
    with pytest.raises(UserError):
        extraction_attack(_noise_generator, [], train)
    with pytest.raises(UserError):
        extraction_attack(object(), ["a"], train)


# --- pipeline-based metrics ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pipe():
    from capsearch.models.load import load_pipeline

    return load_pipeline("tiny:random")


def test_extraction_attack_runs_a_pipeline(tiny_pipe):
    prompts = ["no acute findings", "cardiomegaly"]
    train = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(13)) * 2 - 1

    def attack(threshold: float) -> ExtractionResult:
        return extraction_attack(
            tiny_pipe, prompts, train, n_per_prompt=3, threshold=threshold, steps=2, seed=4
        )

    # Tiled distances of [-1, 1] images lie in [0, 1]: at δ = 1 all three generations of a prompt form
    # one clique, and its medoid is within δ of every training image, so each prompt extracts once.
    everything = attack(1.0)
    assert everything.settings["n_cliques"] == 2 and len(everything.extracted) == 2
    for (prompt, t, gen_index), own in zip(everything.extracted, prompts):
        assert prompt == own and 0 <= t < 3 and gen_index // 3 == prompts.index(own)
    assert everything.count == len({t for _, t, _ in everything.extracted})
    # The real sampler's generations are never pixel-identical, so at δ = 0 there are no cliques.
    nothing = attack(0.0)
    assert nothing.count == 0 and nothing.settings["n_cliques"] == 0
    assert nothing.settings["n_generated"] == 6 and nothing.settings["steps"] == 2


def test_extraction_attack_counts_a_pipeline_that_copies(tiny_pipe, monkeypatch):
    import capsearch.models.sampling as sample

    train = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(14)) * 2 - 1
    calls = []

    def stand_in(pipe, prompts, n_per_prompt, steps, guidance, seed, batch_size, scheduler):
        # Prompt "image k" gets noisy copies of training image k; any other prompt gets pure noise.
        calls.append((pipe, n_per_prompt, steps, guidance, scheduler))
        gen = torch.Generator().manual_seed(seed)
        out = []
        for prompt in prompts:
            noise = torch.rand(n_per_prompt, 1, 32, 32, generator=gen) * 2 - 1
            if prompt.startswith("image "):
                noise = train[int(prompt.split()[1])] + 0.01 * noise
            out.append(noise)
        return torch.cat(out).clamp(-1, 1)

    monkeypatch.setattr(sample, "generate", stand_in)
    prompts = ["image 2", "cardiomegaly", "image 0"]
    result = extraction_attack(
        tiny_pipe, prompts, train, n_per_prompt=4, threshold=0.04, steps=3, guidance=1.0
    )
    assert sorted((p, t) for p, t, _ in result.extracted) == [("image 0", 0), ("image 2", 2)]
    assert result.count == 2
    assert all(c[0] is tiny_pipe for c in calls)
    assert {c[1:] for c in calls} == {(4, 3, 1.0, "ddim")}


def test_extraction_attack_reports_prompts_whose_cliques_were_capped(monkeypatch):
    import capsearch.metrics.extraction as extraction

    # Constant images at -0.2, 0, 0.2: at δ = 0.15 two overlapping maximal cliques, {0, 1} and {1, 2}.
    def chain(prompts: list[str], n_per_prompt: int, seed: int) -> torch.Tensor:
        levels = torch.tensor([-0.2, 0.0, 0.2]).view(3, 1, 1, 1).expand(3, 1, 8, 8)
        return levels.repeat(len(prompts), 1, 1, 1)

    train = torch.ones(2, 1, 8, 8)

    def attack() -> ExtractionResult:
        return extraction_attack(
            chain, ["a", "b"], train, n_per_prompt=3, threshold=0.15, min_clique=2
        )

    assert attack().settings["prompts_with_capped_cliques"] == 0
    uncapped = extraction.prompt_cliques
    monkeypatch.setattr(extraction, "prompt_cliques", lambda *args: uncapped(*args, max_cliques=1))
    assert attack().settings["prompts_with_capped_cliques"] == 2


def _l2_per_sample(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """‖a_i − b_i‖₂ over all of sample i's values, in float64 numpy (Wen et al. 2024, eq. 4)."""
    diff = a.detach().double().numpy() - b.detach().double().numpy()
    return np.sqrt((diff.reshape(len(diff), -1) ** 2).sum(axis=1))


def test_denoising_strength_properties(tiny_pipe, monkeypatch):
    """s(p) = 1/(nT) Σ_i Σ_t ‖ε(x_t⁽ⁱ⁾, e_p) − ε(x_t⁽ⁱ⁾, e_∅)‖₂ (docs/metrics.md), recomputed here in numpy
    from the two noise predictions `generate` passes to its on_step hook at every step."""
    import capsearch.models.sampling as sampling

    seen = []  # (first sample, timestep, ε_uncond, ε_cond) of every step of every chunk
    real_generate = sampling.generate

    def generate(*args, on_step=None, **kwargs):
        def record(first, t, eps_u, eps_c):
            seen.append((first, int(t), eps_u.clone(), eps_c.clone()))
            on_step(first, t, eps_u, eps_c)

        return real_generate(*args, on_step=record, **kwargs)

    monkeypatch.setattr(sampling, "generate", generate)
    prompts = ["no acute findings", "large left pleural effusion", ""]
    values = denoising_strength_per_prompt(tiny_pipe, prompts, steps=2, n=2, seed=1, batch_size=2)
    assert values.shape == (3,)
    per_sample: dict[int, list[float]] = {}
    for first, _, eps_u, eps_c in seen:
        for offset, norm in enumerate(_l2_per_sample(eps_c, eps_u)):
            per_sample.setdefault(first + offset, []).append(norm)
    assert sorted(per_sample) == list(range(6)) and all(len(v) == 2 for v in per_sample.values())
    expected = [np.mean([np.mean(per_sample[2 * p + i]) for i in range(2)]) for p in range(3)]
    assert expected[0] > 0.1 and expected[1] > 0.1  # the prompts pull: a real value to match
    np.testing.assert_allclose(values.numpy(), expected, rtol=1e-6, atol=1e-7)
    assert float(values[2]) == 0.0  # the empty prompt is the unconditional embedding
    seen.clear()
    mean = denoising_strength(tiny_pipe, prompts, steps=2, n=2, seed=1, batch_size=64)
    # Same value whether prompts were batched one by one or all together.
    assert mean == pytest.approx(float(np.mean(expected)), rel=1e-5)
    other_seed = denoising_strength_per_prompt(tiny_pipe, prompts[:1], steps=2, n=2, seed=2)
    assert not torch.allclose(values[:1], other_seed)


def test_threshold_scores(tiny_pipe):
    """The per-sample ‖ε(x_t, e_p) − ε(x_t, e_∅)‖₂, recomputed in numpy from the two predictions."""
    prompts = ["no acute findings", "cardiomegaly"]
    cond, uncond = tiny_pipe.encode_prompts(prompts), tiny_pipe.encode_prompts([""])
    noisy = _randn(2, 1, 32, 32, seed=14)
    t = torch.tensor([100, 700])
    scores = threshold_scores(tiny_pipe.unet, noisy, t, cond, uncond)
    with torch.no_grad():
        pred = tiny_pipe.unet(noisy, t, encoder_hidden_states=cond).sample
        pred_uncond = tiny_pipe.unet(
            noisy, t, encoder_hidden_states=uncond.expand(2, -1, -1)
        ).sample
    expected = _l2_per_sample(pred, pred_uncond)
    assert scores.shape == (2,) and (expected > 0.1).all()
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-5, atol=1e-6)
    same = threshold_scores(tiny_pipe.unet, noisy, t, uncond.expand(2, -1, -1), uncond)
    assert torch.allclose(same, torch.zeros(2), atol=1e-6)
    reused = threshold_scores(tiny_pipe.unet, noisy, t, cond, uncond, cond_pred=pred)
    np.testing.assert_allclose(reused.numpy(), expected, rtol=1e-5, atol=1e-6)
    shifted = threshold_scores(tiny_pipe.unet, noisy, t, cond, uncond, cond_pred=pred + 1.0)
    expected_shift = _l2_per_sample(pred + 1.0, pred_uncond)  # the given prediction is the one used
    np.testing.assert_allclose(shifted.numpy(), expected_shift, rtol=1e-5, atol=1e-6)


# --- alignment -----------------------------------------------------------------------------------------


class _BrightnessScorer:
    """Scores 1 when the image is bright and the prompt says 'bright', else 0."""

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        bright = images.mean(dim=(1, 2, 3)) > 0
        return torch.tensor(
            [float(b == ("bright" in p)) for b, p in zip(bright.tolist(), prompts, strict=True)]
        )


def test_alignment_score_averages_a_scorer():
    images = torch.cat([torch.ones(3, 1, 8, 8), -torch.ones(2, 1, 8, 8)])
    prompts = ["bright", "bright", "dark", "dark", "bright"]
    value = alignment_score(images, prompts, _BrightnessScorer(), batch_size=2)
    assert value == pytest.approx(3 / 5)
    with pytest.raises(UserError):
        alignment_score(images, prompts[:3], _BrightnessScorer())
    with pytest.raises(UserError):
        alignment_score(images, prompts, object())


# --- controls on the phantom world ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantom_world(tmp_path_factory):
    """A 30-patient phantom dataset at 32 px, the shipped scorer, and training-set features."""
    from capsearch.datasets.folder import ImageCaptionDataset
    from capsearch.metrics.features import PhantomFeatures
    from capsearch.worlds.phantom import write_phantom_dataset

    root = tmp_path_factory.mktemp("phantom") / "data"
    write_phantom_dataset(root, patients=30, size=32, seed=0)
    train = ImageCaptionDataset(root, "train", size=32)
    train_images = torch.stack([train.load(i) for i in range(len(train))])
    heldout = torch.cat(
        [
            torch.stack([d.load(i) for i in range(len(d))])
            for d in (ImageCaptionDataset(root, s, size=32) for s in ("test", "validate"))
        ]
    )
    extractor = PhantomFeatures()
    return {
        "captions": train.captions,
        "train": train_images,
        "heldout": heldout,
        "extractor": extractor,
        "train_feats": extractor.features(train_images),
    }


def _phantom_copier(world: dict, noise: float = 0.02):
    """Noisy copies of the first training image of each prompt: what a fully memorising model would emit."""
    first = {}
    for index, caption in enumerate(world["captions"]):
        first.setdefault(caption, index)

    def run(prompts: list[str], n_per_prompt: int, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        copies = [world["train"][first[p]].expand(n_per_prompt, -1, -1, -1) for p in prompts]
        images = torch.cat(copies)
        return (images + noise * torch.randn(images.shape, generator=gen)).clamp(-1, 1)

    return run, first


def test_control_copier_is_caught(phantom_world):
    from capsearch.metrics import PHANTOM_THRESHOLD

    copier, first = _phantom_copier(phantom_world)
    prompts = sorted(first)
    result = extraction_attack(
        copier, prompts, phantom_world["train"], n_per_prompt=6, threshold=PHANTOM_THRESHOLD
    )
    found = {(p, t) for p, t, _ in result.extracted}
    copied = {(p, first[p]) for p in prompts}
    assert len(found & copied) >= 0.9 * len(copied)
    copies = copier(prompts, 2, seed=5)
    copier_amd = amd(phantom_world["extractor"].features(copies), phantom_world["train_feats"])
    assert copier_amd < 0.01


def test_control_heldout_phantoms_look_real_but_novel(phantom_world):
    extractor, train_feats = phantom_world["extractor"], phantom_world["train_feats"]
    heldout_feats = extractor.features(phantom_world["heldout"])
    gen = torch.Generator().manual_seed(3)
    noise = torch.rand(len(phantom_world["heldout"]), 1, 32, 32, generator=gen) * 2 - 1
    noise_feats = extractor.features(noise)
    fid_heldout = frechet_distance(train_feats, heldout_feats)
    fid_noise = frechet_distance(train_feats, noise_feats)
    assert fid_heldout < 0.2 * fid_noise
    copier, first = _phantom_copier(phantom_world)
    copier_amd = amd(extractor.features(copier(sorted(first), 1, seed=6)), train_feats)
    heldout_amd = amd(heldout_feats, train_feats)
    assert heldout_amd > 5 * copier_amd
    assert amd(noise_feats, train_feats) > heldout_amd


def test_control_pure_noise_extracts_nothing(phantom_world):
    from capsearch.metrics import PHANTOM_THRESHOLD

    prompts = sorted(set(phantom_world["captions"]))
    for threshold in (PHANTOM_THRESHOLD, 0.15):
        result = extraction_attack(
            _noise_generator, prompts, phantom_world["train"], n_per_prompt=6, threshold=threshold
        )
        assert result.count == 0


def test_novelty_floor_separates_copies_from_novel_phantoms(phantom_world):
    from capsearch.metrics import PHANTOM_THRESHOLD, novelty_floor

    floor = novelty_floor(phantom_world["train"], phantom_world["heldout"], quantile=0.0)
    copier, first = _phantom_copier(phantom_world)
    copies = copier(sorted(first), 1, seed=7)
    worst_copy = float(tiled_distance(copies, phantom_world["train"]).min(dim=1).values.max())
    assert worst_copy < PHANTOM_THRESHOLD < floor


# --- the memorisation probe -----------------------------------------------------------------------------


def test_memorisation_probe_counts_a_copier_of_the_duplicates(tmp_path, monkeypatch):
    import capsearch.models.sampling as sample
    from capsearch.datasets.folder import load_images, read_metadata
    from capsearch.metrics.memorisation import memorisation_probe, memorised_captions
    from capsearch.models.load import load_pipeline
    from capsearch.worlds.phantom import write_phantom_dataset

    root = tmp_path / "data"
    write_phantom_dataset(root, patients=12, size=32, seed=3, dup_fraction=0.2, dup_copies=4)
    records = [r for r in read_metadata(root) if r["split"] == "train"]
    memorised, rows, others = memorised_captions(records)
    assert memorised and len(others) == len(memorised)
    assert all(len(rows[c]) == 4 for c in memorised)
    train = load_images(root, "train", 32)
    real_generate = sample.generate

    def copier(pipe, prompts, n, *args, on_step=None, **kwargs):
        if on_step is not None:  # denoising strength: the real trajectories
            return real_generate(pipe, prompts, n, *args, on_step=on_step, **kwargs)
        gen = torch.Generator().manual_seed(0)
        out = []
        for caption in prompts:
            own = rows.get(caption)
            base = train[min(own)] if own else torch.zeros_like(train[0])
            out.append(base + 0.01 * torch.randn(n, *base.shape, generator=gen))
        return torch.cat(out).clamp(-1, 1)

    monkeypatch.setattr(sample, "generate", copier)
    probe = memorisation_probe(load_pipeline("tiny:random"), root, n=4, steps=2, other_n=2)
    assert probe["extracted"] == probe["of"] == len(memorised)
    assert probe["nearest_own"] == 1.0 and probe["copies"] == 1.0
    assert probe["copies_other"] == 0.0  # blank images for the other captions copy nothing
    for prompt, index, _ in probe["extracted_pairs"]:
        assert records[index]["text"] == prompt  # each extraction is the caption's own image
    assert probe["strength_memorised"] > 0 and probe["strength_ratio"] > 0


def test_memorisation_probe_needs_a_duplicated_subset(tmp_path):
    from capsearch.metrics.memorisation import memorisation_probe
    from capsearch.models.load import load_pipeline
    from capsearch.worlds.phantom import write_phantom_dataset

    write_phantom_dataset(tmp_path / "plain", patients=6, size=32, seed=1)
    with pytest.raises(UserError, match="no memorisation subset"):
        memorisation_probe(load_pipeline("tiny:random"), tmp_path / "plain", n=3, steps=1)
