"""Mitigations: the registry, RWA's two modes and whole vocabulary, stacking and its order, GNI, checks."""

from __future__ import annotations

import random

import pytest
import torch

from capsearch.errors import UserError
from capsearch.training.mitigations import (
    CAPTION,
    EMBEDDING,
    LOSS,
    Mitigations,
    get_mitigation,
    mitigation_names,
    parse_mitigations,
    vocabulary_words,
)

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta"]


def stack(items: list[dict], words: list[str] | None = None) -> Mitigations:
    """The run-time mitigations of a list, as the training loop builds them (words: the vocabulary)."""
    return Mitigations(parse_mitigations(items), words=words)


def test_rwa_per_draw_inserts_fresh_words_each_draw():
    m = stack([{"name": "rwa", "k": 2, "p": 1.0}], WORDS)
    rng = random.Random(0)
    a, dropped, counts = m.captions([0], ["small left effusion"], rng)
    b, _, _ = m.captions([0], ["small left effusion"], rng)
    assert counts == {"rwa": 1} and dropped == [False]
    assert len(a[0].split()) == 5 and a != b


def test_rwa_fixed_draws_once_per_record_seeded_and_copies_share():
    captions = ["small left effusion"] * 3 + ["no acute finding", "mild cardiomegaly"]
    groups = [7, 7, 7, None, None]  # three copies of one memorised image, two other records
    m = stack([{"name": "rwa", "k": 4, "p": 1.0, "mode": "fixed"}], WORDS)
    m.fix_captions(captions, groups, seed=0)
    rng = random.Random(0)
    first, _, counts = m.captions([0, 1, 2, 3, 4], captions, rng)
    again, _, _ = m.captions([4, 3, 2, 1, 0], captions, rng)
    assert counts == {"rwa": 5}
    assert again == first[::-1]  # the same words every time a record is drawn
    assert first[0] == first[1] == first[2]  # a duplicate group shares one draw
    assert all(len(t.split()) == len(c.split()) + 4 for t, c in zip(first, captions))
    same = stack([{"name": "rwa", "k": 4, "mode": "fixed"}], WORDS)
    same.fix_captions(captions, groups, seed=0)
    other = stack([{"name": "rwa", "k": 4, "mode": "fixed"}], WORDS)
    other.fix_captions(captions, groups, seed=1)
    assert same.fixed == m.fixed and other.fixed != m.fixed


def test_rwa_fixed_p_is_the_share_of_records_augmented():
    captions = [f"caption {i}" for i in range(400)]
    m = stack([{"name": "rwa", "k": 1, "p": 0.25, "mode": "fixed"}], WORDS)
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
    m = stack([{"name": "caption_dropout", "p": 0.5}, {"name": "rwa", "k": 3, "p": 1.0}], WORDS)
    pool = ["left lower lobe opacity"] * 200
    texts, dropped, counts = m.captions(list(range(200)), pool, random.Random(1))
    assert counts["rwa"] == 200  # every caption got its words, then some were dropped
    assert counts["caption_dropout"] == sum(dropped) and 70 <= sum(dropped) <= 130
    assert all((t == "") == d for t, d in zip(texts, dropped))
    assert all(len(t.split()) == 7 for t, d in zip(texts, dropped) if not d)


def test_dropout_probability_does_not_depend_on_the_other_mitigations():
    pool = [f"caption {i}" for i in range(50)]
    alone = stack([{"name": "caption_dropout", "p": 0.3}])
    stacked = stack(
        [{"name": "caption_dropout", "p": 0.3}, {"name": "caption_replace", "p": 0.5}], WORDS
    )
    for m in (alone, stacked):
        _, dropped, _ = m.captions(list(range(50)) * 20, pool, random.Random(2))
        assert 0.25 <= sum(dropped) / 1000 <= 0.35


def test_gni_leaves_dropped_captions_the_empty_prompt_embedding():
    m = stack([{"name": "gni", "sigma": 0.5}])
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
        parse_mitigations(items)


def test_rwa_without_a_vocabulary_is_a_user_error():
    m = stack([{"name": "rwa"}])
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
    by_value = stack([{"name": "threshold", "value": 0.5}])
    assert by_value.keep_mask(strengths).tolist() == [True, True, False, True]
    by_share = stack([{"name": "threshold", "percentile": 50}])
    assert by_share.keep_mask(strengths).tolist() == [True, False, False, True]


def test_every_mitigation_is_registered_with_its_stage():
    assert mitigation_names() == ["rwa", "threshold", "gni", "caption_replace", "caption_dropout"]
    stages = {name: get_mitigation(name).stage for name in mitigation_names()}
    assert stages == {"rwa": CAPTION, "caption_replace": CAPTION, "caption_dropout": CAPTION,
                      "gni": EMBEDDING, "threshold": LOSS}  # fmt: skip
    assert [n for n in mitigation_names() if get_mitigation(n).shorthand] == ["caption_dropout"]


def test_caption_mitigations_apply_in_registered_order_whatever_the_list_order():
    pool = [f"caption {i}" for i in range(40)]
    items = [{"name": "caption_dropout", "p": 0.3}, {"name": "rwa", "k": 2, "p": 0.5},
             {"name": "caption_replace", "p": 0.4}]  # fmt: skip
    forward = stack(items, WORDS).captions(list(range(40)), pool, random.Random(5))
    backward = stack(items[::-1], WORDS).captions(list(range(40)), pool, random.Random(5))
    assert forward == backward
    # the same draws by hand: replacement, then per-draw RWA, then dropout, on one random stream
    rng = random.Random(5)
    texts = [pool[i] for i in range(40)]
    replaced = [rng.random() < 0.4 for _ in texts]
    for j, hit in enumerate(replaced):
        if hit:
            texts[j] = pool[rng.randrange(len(pool))]
    added = [rng.random() < 0.5 for _ in texts]
    for j, hit in enumerate(added):
        if hit:
            words = texts[j].split()
            for _ in range(2):
                words.insert(rng.randint(0, len(words)), rng.choice(WORDS))
            texts[j] = " ".join(words)
    dropped = [rng.random() < 0.3 for _ in texts]
    texts = ["" if d else t for d, t in zip(dropped, texts)]
    counts = {"caption_replace": sum(replaced), "rwa": sum(added), "caption_dropout": sum(dropped)}
    assert forward == (texts, dropped, counts)


def test_a_list_is_parsed_once_and_none_is_nothing():
    items = [{"name": "none"}, {"name": "rwa", "k": 2.0}, {"name": "gni", "sigma": 1}]
    first = parse_mitigations(items)
    assert parse_mitigations([dict(i) for i in items]) is first  # the same content: parsed once
    assert [type(c).__name__ for c in first] == ["RWA", "GNI"]
    assert first[0].k == 2 and isinstance(first[0].k, int) and first[1].sigma == 1.0
    with pytest.raises(UserError, match="mitigation gni: missing parameter sigma"):
        parse_mitigations([{"name": "gni"}])


def test_train_settings_parse_their_mitigations_with_the_caption_dropout_shorthand():
    from capsearch.settings import TrainSettings

    settings = TrainSettings(caption_dropout=0.2, mitigations=[{"name": "gni", "sigma": 0.01}])
    assert settings.all_mitigations() == [
        {"name": "caption_dropout", "p": 0.2},
        {"name": "gni", "sigma": 0.01},
    ]
    assert settings.mitigation_stack() == parse_mitigations(settings.all_mitigations())
    assert TrainSettings(caption_dropout=0.0).all_mitigations() == []
    twice = {"mitigations": [{"name": "caption_dropout", "p": 0.3}]}
    with pytest.raises(
        UserError, match=r"train.mitigations: .*twice.*\(train.caption_dropout counts\)"
    ):
        TrainSettings.parse(twice, "train")
    assert TrainSettings.parse({**twice, "caption_dropout": 0.0}).all_mitigations() == [
        {"name": "caption_dropout", "p": 0.3}
    ]
    with pytest.raises(UserError, match="train.mitigations: mitigation rwa: k must be an integer"):
        TrainSettings.parse({"mitigations": [{"name": "rwa", "k": 1.5}]}, "train")


def test_the_loop_reads_the_vocabulary_only_for_a_mitigation_that_needs_it():
    class Tokenizer:
        all_special_ids = [0]

        def __len__(self) -> int:
            return 3

        def batch_decode(self, ids):
            self.asked = True
            return {1: "one", 2: " two "}[ids[0][0]], {1: "one", 2: " two "}[ids[1][0]]

    tok = Tokenizer()
    assert stack([{"name": "gni", "sigma": 0.1}]).words == []
    assert Mitigations(parse_mitigations([{"name": "gni", "sigma": 0.1}]), tok).words == []
    assert not hasattr(tok, "asked")
    assert Mitigations(parse_mitigations([{"name": "rwa"}]), tok).words == ["one", "two"]
    assert stack([{"name": "threshold", "value": 1.0}]).filters_batch
    assert not stack([{"name": "rwa"}]).filters_batch
