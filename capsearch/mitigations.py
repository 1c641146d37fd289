"""Memorisation mitigations applied inside the training loop, each counting the samples it touched.

- RWA, random word addition (Somepalli et al. 2023b, "Understanding and Mitigating Copying in Diffusion
  Models"): insert k random words at random positions of a caption, drawn afresh each time it is drawn.
- Threshold mitigation (Wen et al. 2024): drop from the batch the samples whose text-conditional noise
  prediction ‖ε(x_t, e_p) − ε(x_t, e_∅)‖₂ exceeds an absolute threshold or a batch percentile.
- GNI: Gaussian noise added to the text embeddings (Somepalli et al. 2023b).
- Caption replacement (random caption of another sample) and caption dropout (empty prompt, which also
  trains the unconditional branch used by classifier-free guidance).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

import torch

from capsearch.errors import UserError

KNOWN = {
    "rwa": {"k": int, "p": float},
    "threshold": {"value": float, "percentile": float},
    "gni": {"sigma": float},
    "caption_replace": {"p": float},
    "caption_dropout": {"p": float},
}


@dataclass
class Mitigations:
    """The mitigations of one run, parsed and checked from `[{"name": ..., **params}, ...]`."""

    rwa: dict | None = None
    threshold: dict | None = None
    gni: dict | None = None
    caption_replace: dict | None = None
    caption_dropout: dict | None = None
    words: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, items: list[dict], vocabulary: list[str] | None = None) -> Mitigations:
        """Validate a mitigation list; unknown names or parameters raise a one-line UserError."""
        m = cls()
        for item in items or []:
            item = dict(item)
            name = item.pop("name", None)
            if name in (None, "none"):
                continue
            if name not in KNOWN:
                raise UserError(f"unknown mitigation {name!r}; choose from {', '.join(KNOWN)}")
            for key, value in item.items():
                if key not in KNOWN[name]:
                    raise UserError(
                        f"mitigation {name}: unknown parameter {key!r} (allowed: {', '.join(KNOWN[name])})"
                    )
                item[key] = KNOWN[name][key](value)
            if "p" in item and not 0 <= item["p"] <= 1:
                raise UserError(f"mitigation {name}: p must be in [0, 1], got {item['p']}")
            setattr(m, name, item)
        if m.rwa is not None:
            m.rwa = {"k": 1, "p": 1.0, **m.rwa}
            m.words = list(vocabulary or [])
            if not m.words:
                raise UserError("mitigation rwa needs a vocabulary of words to insert")
        if m.threshold is not None:
            if ("value" in m.threshold) == ("percentile" in m.threshold):
                raise UserError("mitigation threshold: give exactly one of value or percentile")
            if "percentile" in m.threshold and not 0 < m.threshold["percentile"] < 100:
                raise UserError("mitigation threshold: percentile must be in (0, 100)")
        return m

    def captions(
        self, texts: list[str], pool: list[str], rng: random.Random
    ) -> tuple[list[str], dict[str, int]]:
        """Apply the caption-level mitigations; return new captions and how many each one touched."""
        out, counts = list(texts), {}
        if self.caption_replace:
            hit = [rng.random() < self.caption_replace["p"] for _ in out]
            out = [rng.choice(pool) if h else t for h, t in zip(hit, out)]
            counts["caption_replace"] = sum(hit)
        if self.rwa:
            hit = [rng.random() < self.rwa["p"] for _ in out]
            out = [self._add_words(t, rng) if h else t for h, t in zip(hit, out)]
            counts["rwa"] = sum(hit)
        if self.caption_dropout:
            hit = [rng.random() < self.caption_dropout["p"] for _ in out]
            out = ["" if h else t for h, t in zip(hit, out)]
            counts["caption_dropout"] = sum(hit)
        return out, counts

    def _add_words(self, text: str, rng: random.Random) -> str:
        words = text.split()
        for _ in range(self.rwa["k"]):
            words.insert(rng.randint(0, len(words)), rng.choice(self.words))
        return " ".join(words)

    def embeddings(
        self, ehs: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, int]]:
        """Gaussian noise injection on the text embeddings."""
        if not self.gni:
            return ehs, {}
        noise = torch.randn(ehs.shape, generator=generator, device=ehs.device, dtype=ehs.dtype)
        return ehs + self.gni["sigma"] * noise, {"gni": ehs.shape[0]}

    def keep_mask(self, scores: torch.Tensor) -> torch.Tensor:
        """Samples the threshold mitigation keeps, given their per-sample text-conditional strengths."""
        if "value" in self.threshold:
            limit = torch.tensor(self.threshold["value"], device=scores.device)
        else:
            limit = torch.quantile(scores.float(), self.threshold["percentile"] / 100)
        return scores <= limit


def vocabulary_words(tokenizer, limit: int = 5000) -> list[str]:
    """Whole alphabetic words of a CLIP vocabulary (tokens ending in </w>), for random word addition."""
    words = [
        t[:-4]
        for t in tokenizer.get_vocab()
        if t.endswith("</w>") and re.fullmatch(r"[a-z]{3,}", t[:-4])
    ]
    return sorted(words)[:limit]
