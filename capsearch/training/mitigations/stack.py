"""The mitigations of one fine-tune, applied stage by stage inside the training loop.

Hooks by stage (each mitigation file registers one, capsearch.training.mitigations.base):
- caption: `apply(cfg, draw: CaptionDraw) -> int | None` changes `draw.texts` (or `draw.dropped`) in
  place and returns how many samples it touched (None: it did nothing at this stage). A `prepare` hook
  may fix captions per training record once, before training;
- embedding: `apply(cfg, states, dropped, generator) -> (states, touched)`;
- loss: `apply(cfg, scores) -> keep`, a mask of the samples the loss keeps, from the per-sample
  text-conditional strength ‖ε(x_t, e_p) − ε(x_t, e_∅)‖₂ the loop measures (Wen et al. 2024).

Within a stage the registered `order` decides, not the order of the list.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from capsearch.errors import UserError
from capsearch.training.mitigations.base import (
    CAPTION,
    EMBEDDING,
    LOSS,
    Mitigation,
    MitigationConfig,
    get_mitigation,
)

if TYPE_CHECKING:
    import torch


@dataclass
class CaptionDraw:
    """One batch's captions as the caption-stage mitigations see and change them."""

    texts: list[str]
    rng: random.Random
    pool: list[str]  # every training record's caption, in record order
    fixed: dict[int, str] = field(default_factory=dict)  # captions fixed per record before training
    words: list[str] = field(default_factory=list)  # the vocabulary random words come from
    dropped: list[bool] = field(default_factory=list)  # which captions are now the empty prompt

    def record_caption(self, index: int) -> str:
        """The caption training record `index` is drawn with (its fixed one, if any)."""
        return self.fixed.get(index, self.pool[index])


def add_words(text: str, k: int, words: Sequence[str], rng: random.Random) -> str:
    """Insert k random words of the vocabulary at random positions of a caption (Somepalli et al.)."""
    if not words:
        raise UserError("mitigation rwa needs a vocabulary of words to insert")
    parts = text.split()
    for _ in range(k):
        parts.insert(rng.randint(0, len(parts)), rng.choice(words))
    return " ".join(parts)


class Mitigations:
    """The parsed mitigations of one run (TrainSettings.mitigation_stack), with their hooks by stage."""

    def __init__(
        self,
        configs: Sequence[MitigationConfig],
        tokenizer: Any = None,
        words: Sequence[str] | None = None,
    ) -> None:
        self.configs = tuple(configs)
        active = sorted(
            ((get_mitigation(c.name), c) for c in self.configs), key=lambda a: a[0].order
        )
        self._stage: dict[str, list[tuple[Mitigation, MitigationConfig]]] = {
            stage: [(m, c) for m, c in active if m.stage == stage]
            for stage in (CAPTION, EMBEDDING, LOSS)
        }
        needs_words = any(m.vocabulary for m, _ in active)
        if words is None and needs_words and tokenizer is not None:
            words = vocabulary_words(tokenizer)
        self.words = list(words or [])
        self.fixed: dict[int, str] = {}  # training record → its caption fixed before training
        self._fixed_by: str | None = None

    @property
    def filters_batch(self) -> bool:
        """Whether a loss-stage mitigation needs the batch's text-conditional strengths."""
        return bool(self._stage[LOSS])

    def fix_captions(self, captions: list[str], groups: list, seed: int) -> None:
        """Run the prepare hooks once, before training: the captions they fix per training record."""
        self.fixed, self._fixed_by = {}, None
        for m, cfg in self._stage[CAPTION]:
            if m.prepare is not None:
                fixed = m.prepare(cfg, captions, groups, seed, self.words)
                if fixed is not None:
                    self.fixed, self._fixed_by = fixed, m.name

    def captions(
        self, idx: list[int], pool: list[str], rng: random.Random
    ) -> tuple[list[str], list[bool], dict[str, int]]:
        """Captions of training records `idx` after the caption-stage mitigations, which of them were
        dropped (the empty prompt), and how many samples each mitigation touched."""
        draw = CaptionDraw(
            [self.fixed.get(i, pool[i]) for i in idx], rng, pool, self.fixed, self.words
        )
        draw.dropped = [False] * len(idx)
        counts: dict[str, int] = {}
        if self.fixed:  # the records drawn with a caption fixed before training
            counts[self._fixed_by] = sum(i in self.fixed for i in idx)
        for m, cfg in self._stage[CAPTION]:
            touched = m.apply(cfg, draw)
            if touched is not None:
                counts[m.name] = touched
        return draw.texts, draw.dropped, counts

    def embeddings(
        self, states: torch.Tensor, dropped: list[bool], generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, int]]:
        """The text states after the embedding-stage mitigations, and how many samples each touched."""
        counts: dict[str, int] = {}
        for m, cfg in self._stage[EMBEDDING]:
            states, counts[m.name] = m.apply(cfg, states, dropped, generator)
        return states, counts

    def keep_mask(self, scores: torch.Tensor) -> torch.Tensor:
        """Samples every loss-stage mitigation keeps, given their per-sample text-conditional strengths."""
        keep = None
        for m, cfg in self._stage[LOSS]:
            mask = m.apply(cfg, scores)
            keep = mask if keep is None else keep & mask
        if keep is None:
            raise UserError("keep_mask needs a loss-stage mitigation (filters_batch)")
        return keep


def vocabulary_words(tokenizer: Any) -> list[str]:
    """Every non-special token of the tokenizer's vocabulary, decoded to text: one entry per id.

    Dutt et al.'s code inserts `tokenizer.decode([i])` for i uniform in CLIP's ids; tokens that decode
    to nothing visible (whitespace, control bytes) would insert nothing and are left out.
    """
    special = set(tokenizer.all_special_ids)
    ids = [[i] for i in range(len(tokenizer)) if i not in special]
    words = [w.strip() for w in tokenizer.batch_decode(ids)]
    return [w for w in words if w and w.isprintable()]
