"""Test-wide settings: one torch thread (tiny models; avoids oversubscription when processes share 2 cores).

Also the fixtures and helpers that several test files share (`from conftest import ...`).
"""

import os
from collections.abc import Iterator

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module, restored afterwards (code under test may have raised it)."""
    # The test machine's two cores are shared; one intra-op thread avoids oversubscription stalls.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def unet_inputs(
    seed: int, timesteps: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two random samples, their timesteps and text states, shaped for the tiny UNet."""
    from capsearch.models.tiny import TINY_UNET_CONFIG

    g = torch.Generator().manual_seed(seed)
    size, channels = TINY_UNET_CONFIG["sample_size"], TINY_UNET_CONFIG["in_channels"]
    x = torch.randn(2, channels, size, size, generator=g)
    ehs = torch.randn(2, 77, TINY_UNET_CONFIG["cross_attention_dim"], generator=g)
    return x, torch.tensor(list(timesteps)), ehs


def run_unet(unet: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The UNet's prediction for inputs from unet_inputs, without gradients."""
    x, t, ehs = inputs
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=ehs).sample


def example_spec(name: str) -> dict:
    """A one-entry spec of a method on units where it trains something on the tiny UNet."""
    from capsearch.methods import get_method

    units = get_method(name).example_units
    return {"method": name, "units": units if isinstance(units, str) else list(units)}


def mid_block_groups() -> list[dict]:
    """Search-space groups over the tiny UNet's mid block: its attentions and its resnets."""
    return [
        {
            "name": "attn",
            "units": "mid_block.attentions",
            "methods": {"frozen": {}, "difffit": {}, "lora": {"rank": [2, 4]}},
        },
        {"name": "res", "units": "mid_block.resnets", "methods": {"frozen": {}, "difffit": {}}},
    ]


def phantom_data(tmp_path_factory: pytest.TempPathFactory, seed: int, held_out_images: int):
    """A small phantom data set with a memorisation subset (16 patients, 32 px, 20% duplicated 3×)."""
    from capsearch.worlds.phantom import write_phantom_dataset

    root = tmp_path_factory.mktemp("phantom")
    write_phantom_dataset(root, patients=16, size=32, seed=seed, dup_fraction=0.2, dup_copies=3,
                          held_out_images=held_out_images)  # fmt: skip
    return root


def make_searcher(spec, run_dir, storage=None):
    """The search's Optuna searcher (capsearch.search.loop.TrialSearch) on a fresh study in run_dir, as
    `_tune` builds it, driven by hand in the tests (storage: the study's, unless one is given)."""
    import functools

    from capsearch.search.loop import TrialSearch, make_sampler, open_study, study_storage
    from capsearch.search.space import define_space

    open_study(spec, run_dir)
    return TrialSearch(
        space=functools.partial(define_space, space=spec.search_space),
        metric="reward", mode="max", sampler=make_sampler(spec),
        study_name=spec.search.study_name, storage=storage or study_storage(run_dir),
        spec=spec, run_dir=run_dir,
    )  # fmt: skip


def bare_search_spec(num_samples: int):
    """A tiny search on a 6-patient phantom world (one group: mid-block attention frozen or full), for
    tests that drive run_search with its training and final stage patched out."""
    from capsearch.config import spec_from_dict

    return spec_from_dict({
        "model": "tiny:random", "data": {"phantom": {"patients": 6, "held_out_images": 8}},
        "search": {"num_samples": num_samples},
        "space": {"groups": [{"name": "a", "units": "mid_block.attentions",
                              "methods": {"frozen": {}, "full": {}}}]},
    })  # fmt: skip
