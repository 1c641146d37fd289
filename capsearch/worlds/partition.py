"""A fixed split of the shared report text and lung masks into a pretraining part and a fine-tuning part.

The broad pretraining corpus (capsearch.worlds.corpus) holds a few chest radiographs, as LAION holds some
X-rays; so that no fine-tuning caption was seen in pretraining, each report sentence and each lung mask
belongs to exactly one part, decided by a stable hash of its normalised text (or the mask's file name).
The corpus draws only from the pretraining part; a phantom world made with `disjoint_from_corpus` draws
only from the fine-tuning part. Every sentence the bank's templates can write belongs to the fine-tuning
part (templates are the fine-tuning bank's last fallback and cannot be filtered), so the two parts share
no sentence. Worlds made without `disjoint_from_corpus` draw from both parts, as before this split existed.
"""

from __future__ import annotations

import copy
import functools
import hashlib
from collections import defaultdict
from typing import Literal

from capsearch.worlds.anatomy import _mask_archive, lung_mask
from capsearch.worlds.reports import ReportBank, _sentences, report_bank
from capsearch.worlds.transfer import normalise, template_sentences

Part = Literal["pretrain", "finetune"]
PRETRAIN_SHARE = 0.4  # share of hashed sentences and masks that go to the pretraining part
_SALT = "capsearch-corpus-split-v1"  # changing it would move every sentence: never change it


def _hashed_part(key: str) -> Part:
    """The part a key hashes to: the first 8 bytes of sha256(salt, key) as a fraction below the share."""
    digest = hashlib.sha256(f"{_SALT}\n{key}".encode()).digest()
    return "pretrain" if int.from_bytes(digest[:8], "big") < PRETRAIN_SHARE * 2**64 else "finetune"


def sentence_part(sentence: str) -> Part:
    """The part one report sentence belongs to (template sentences: always the fine-tuning part)."""
    key = normalise(sentence)
    if key in _templates():
        return "finetune"
    return _hashed_part(f"sentence:{key}")


def text_part(text: str) -> Part | None:
    """The part every sentence of a report belongs to, or None where its sentences straddle both."""
    parts = {sentence_part(s) for s in (_sentences(text) or [text])}
    return parts.pop() if len(parts) == 1 else None


@functools.lru_cache(maxsize=1)
def _templates() -> frozenset[str]:
    """Every sentence the bank's templates can write, normalised."""
    return frozenset(template_sentences())


@functools.lru_cache(maxsize=2)
def bank_part(part: Part) -> ReportBank:
    """The shared report bank restricted to one part: impressions wholly in it, its single sentences."""
    if part not in ("pretrain", "finetune"):
        raise ValueError(f"unknown part {part!r}")
    bank = report_bank()
    clean = copy.copy(bank)
    clean.whole = defaultdict(list)
    for findings, impressions in bank.whole.items():
        if kept := [t for t in impressions if text_part(t) == part]:
            clean.whole[findings] = kept
    for name in ("positive", "negative"):
        kept_by_finding = defaultdict(list)
        for finding, sentences in getattr(bank, name).items():
            if kept := [s for s in sentences if sentence_part(s) == part]:
                kept_by_finding[finding] = kept
        setattr(clean, name, kept_by_finding)
    return clean


def mask_part(index: int) -> Part:
    """The part lung mask `index` belongs to (hashed on its file name in the shipped archive)."""
    return _hashed_part(f"mask:{_mask_archive()[1][index]}")


@functools.lru_cache(maxsize=2)
def masks_of(part: Part) -> tuple[int, ...]:
    """Indices of the usable lung masks in one part."""
    count = len(_mask_archive()[1])
    return tuple(i for i in range(count) if mask_part(i) == part and lung_mask(i) is not None)
