"""A byte-level BPE vocabulary in CLIP's format, learnt from capsearch's own caption corpora.

CLIP (Radford et al. 2021) tokenises lower-cased words into byte-level BPE symbols whose last symbol
carries the end-of-word marker ``</w>``; ``CLIPTokenizer`` reads such a vocabulary from ``vocab.json``
and ``merges.txt``. We learn the merges (Sennrich et al. 2016) on shape-world captions and radiology
reports so that the tiny text encoder sees whole words for the domain's vocabulary.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_WORD_RE = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+")


def byte_symbols() -> dict[int, str]:
    """Map each byte to a printable unicode character (printable latin-1 bytes map to themselves)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def split_words(text: str) -> list[str]:
    """Lower-case and split text into CLIP-style pre-tokens."""
    return _WORD_RE.findall(" ".join(text.lower().split()))


def _word_symbols(word: str, table: dict[int, str]) -> tuple[str, ...]:
    chars = [table[b] for b in word.encode("utf-8")]
    chars[-1] = chars[-1] + "</w>"
    return tuple(chars)


def learn_bpe(
    corpus: Iterable[str], num_merges: int = 2000, min_count: int = 2
) -> list[tuple[str, str]]:
    """Learn BPE merges greedily by pair frequency; ties break on the pair itself (deterministic)."""
    table = byte_symbols()
    word_counts = Counter(w for text in corpus for w in split_words(text))
    words = [list(_word_symbols(w, table)) for w in word_counts]
    freqs = [word_counts[w] for w in word_counts]
    pair_counts: Counter = Counter()
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, syms in enumerate(words):
        for pair in zip(syms, syms[1:]):
            pair_counts[pair] += freqs[i]
            where[pair].add(i)
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges and pair_counts:
        best = max(pair_counts.items(), key=lambda kv: (kv[1], kv[0]))
        pair, count = best
        if count < min_count:
            break
        merges.append(pair)
        for i in list(where.pop(pair, ())):
            syms = words[i]
            for old in zip(syms, syms[1:]):
                pair_counts[old] -= freqs[i]
                if pair_counts[old] <= 0:
                    del pair_counts[old]
            merged, j = [], 0
            while j < len(syms):
                if j + 1 < len(syms) and (syms[j], syms[j + 1]) == pair:
                    merged.append(syms[j] + syms[j + 1])
                    j += 2
                else:
                    merged.append(syms[j])
                    j += 1
            words[i] = merged
            for new in zip(merged, merged[1:]):
                pair_counts[new] += freqs[i]
                where[new].add(i)
        pair_counts.pop(pair, None)
    return merges


def write_clip_vocabulary(
    out_dir: Path, merges: list[tuple[str, str]], max_length: int = 77
) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json that CLIPTokenizer loads."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = list(byte_symbols().values())
    tokens = base + [s + "</w>" for s in base] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab: dict[str, int] = {}
    for tok in tokens:
        vocab.setdefault(tok, len(vocab))
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (out_dir / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def load_clip_tokenizer(path: Path):
    """Load a CLIPTokenizer from a folder written by write_clip_vocabulary."""
    # lazy: transformers' tokenizer loads only where a pipeline is built
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(path))
