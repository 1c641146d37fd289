"""Mitigations: RWA's two modes and whole vocabulary, stacking and its order, GNI, parameter checks."""

from __future__ import annotations

import random

import pytest
import torch

from capsearch.errors import UserError
from capsearch.training.mitigations import Mitigations, vocabulary_words

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta"]


def test_rwa_per_draw_inserts_fresh_words_each_draw():
    m = Mitigations.parse([{"name": "rwa", "k": 2, "p": 1.0}], WORDS)
    rng = random.Random(0)
    a, dropped, counts = m.captions([0], ["small left effusion"], rng)
    b, _, _ = m.captions([0], ["small left effusion"], rng)
    assert counts == {"rwa": 1} and dropped == [False]
    assert len(a[0].split()) == 5 and a != b


def test_rwa_fixed_draws_once_per_record_seeded_and_copies_share():
    captions = ["small left effusion"] * 3 + ["no acute finding", "mild cardiomegaly"]
    groups = [7, 7, 7, None, None]  # three copies of one memorised image, two other records
    m = Mitigations.parse([{"name": "rwa", "k": 4, "p": 1.0, "mode": "fixed"}], WORDS)
    m.fix_captions(captions, groups, seed=0)
    rng = random.Random(0)
    first, _, counts = m.captions([0, 1, 2, 3, 4], captions, rng)
    again, _, _ = m.captions([4, 3, 2, 1, 0], captions, rng)
    assert counts == {"rwa": 5}
    assert again == first[::-1]  # the same words every time a record is drawn
    assert first[0] == first[1] == first[2]  # a duplicate group shares one draw
    assert all(len(t.split()) == len(c.split()) + 4 for t, c in zip(first, captions))
    same = Mitigations.parse([{"name": "rwa", "k": 4, "mode": "fixed"}], WORDS)
    same.fix_captions(captions, groups, seed=0)
    other = Mitigations.parse([{"name": "rwa", "k": 4, "mode": "fixed"}], WORDS)
    other.fix_captions(captions, groups, seed=1)
    assert same.fixed == m.fixed and other.fixed != m.fixed


def test_rwa_fixed_p_is_the_share_of_records_augmented():
    captions = [f"caption {i}" for i in range(400)]
    m = Mitigations.parse([{"name": "rwa", "k": 1, "p": 0.25, "mode": "fixed"}], WORDS)
    m.fix_captions(captions, [None] * 400, seed=3)
    assert 70 <= len(m.fixed) <= 130
    texts, _, counts = m.captions(list(range(400)), captions, random.Random(0))
    assert counts["rwa"] == len(m.fixed)
    assert sum(t != c for t, c in zip(texts, captions)) == len(m.fixed)


def test_vocabulary_is_every_token_of_the_tokenizer_decoded():
    from capsearch.models.load import load_pipeline

    tok = load_pipeline("tiny:random").tokenizer
    words = vocabulary_words(tok)
    special = set(tok.all_special_ids)
    decoded = [tok.decode([i]).strip() for i in range(len(tok)) if i not in special]
    visible = [w for w in decoded if w and w.isprintable()]
    assert words == visible  # one entry per token id, in id order
    assert len(words) > 0.9 * len(tok)
    assert not any(s in words for s in tok.all_special_tokens)
    # subword pieces, punctuation and digits count, not only whole alphabetic words
    assert any(not w.isalpha() for w in words) and "!" in words
    assert tok.decode([len(tok) - 3]).strip() in words  # the last ordinary token id is there


def test_dropout_applies_last_so_augmented_captions_can_be_dropped():
    m = Mitigations.parse(
        [{"name": "caption_dropout", "p": 0.5}, {"name": "rwa", "k": 3, "p": 1.0}], WORDS
    )
    pool = ["left lower lobe opacity"] * 200
    texts, dropped, counts = m.captions(list(range(200)), pool, random.Random(1))
    assert counts["rwa"] == 200  # every caption got its words, then some were dropped
    assert counts["caption_dropout"] == sum(dropped) and 70 <= sum(dropped) <= 130
    assert all((t == "") == d for t, d in zip(texts, dropped))
    assert all(len(t.split()) == 7 for t, d in zip(texts, dropped) if not d)


def test_dropout_probability_does_not_depend_on_the_other_mitigations():
    pool = [f"caption {i}" for i in range(50)]
    alone = Mitigations.parse([{"name": "caption_dropout", "p": 0.3}])
    stacked = Mitigations.parse(
        [{"name": "caption_dropout", "p": 0.3}, {"name": "caption_replace", "p": 0.5}], WORDS
    )
    for m in (alone, stacked):
        _, dropped, _ = m.captions(list(range(50)) * 20, pool, random.Random(2))
        assert 0.25 <= sum(dropped) / 1000 <= 0.35


def test_gni_leaves_dropped_captions_the_empty_prompt_embedding():
    m = Mitigations.parse([{"name": "gni", "sigma": 0.5}])
    ehs = torch.zeros(3, 4, 8)
    out, counts = m.embeddings(ehs, [True, False, False], torch.Generator().manual_seed(0))
    assert torch.equal(out[0], ehs[0]) and not torch.equal(out[1], ehs[1])
    assert counts == {"gni": 2}


@pytest.mark.parametrize(
    "items, match",
    [
        ([{"name": "nope"}], "unknown mitigation"),
        ([{"name": "rwa", "q": 1}], "unknown parameter"),
        ([{"name": "threshold"}], "exactly one"),
        ([{"name": "caption_dropout", "p": 3}], r"\[0, 1\]"),
        ([{"name": "rwa", "mode": "once"}], "mode must be one of per_draw, fixed"),
        ([{"name": "rwa", "k": 1.5}], "k must be an integer"),
        ([{"name": "rwa", "k": 0}], "k must be at least 1"),
        ([{"name": "gni", "sigma": "big"}], "sigma must be a number"),
        (
            [{"name": "caption_dropout", "p": 0.1}, {"name": "caption_dropout", "p": 0.2}],
            "caption_dropout is listed twice",
        ),
    ],
)
def test_bad_mitigations_are_user_errors(items, match):
    with pytest.raises(UserError, match=match):
        Mitigations.parse(items, ["word"])


def test_rwa_without_a_vocabulary_is_a_user_error():
    m = Mitigations.parse([{"name": "rwa"}])
    with pytest.raises(UserError, match="vocabulary"):
        m.captions([0], ["a caption"], random.Random(0))


def test_space_accepts_rwa_modes_fixed_or_searched():
    from capsearch.search.space import _mitigation_choice

    fixed = _mitigation_choice("rwa", {"k": 4, "p": 1.0, "mode": "fixed"}, "space.mitigations.rwa")
    assert fixed.params["mode"].value == "fixed"
    searched = _mitigation_choice(
        "rwa", {"mode": {"choices": ["fixed", "per_draw"]}}, "space.mitigations.rwa"
    )
    assert searched.params["mode"].choices == ("fixed", "per_draw")
    with pytest.raises(UserError, match=r"space.mitigations.rwa.mode: must be one of"):
        _mitigation_choice("rwa", {"mode": "sometimes"}, "space.mitigations.rwa")
    with pytest.raises(UserError, match=r"space.mitigations.rwa.mode: must be one of"):
        _mitigation_choice("rwa", {"mode": {"choices": ["fixed", 1]}}, "space.mitigations.rwa")


def test_threshold_keeps_samples_at_or_below_the_limit():
    strengths = torch.tensor([0.1, 0.5, 0.9, 0.3])
    by_value = Mitigations.parse([{"name": "threshold", "value": 0.5}])
    assert by_value.keep_mask(strengths).tolist() == [True, True, False, True]
    by_share = Mitigations.parse([{"name": "threshold", "percentile": 50}])
    assert by_share.keep_mask(strengths).tolist() == [True, False, False, True]
