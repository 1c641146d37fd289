"""Memorisation mitigations applied inside the training loop, each counting the samples it touched.

- RWA, random word addition (Somepalli et al. 2023b, "Understanding and Mitigating Copying in Diffusion
  Models"): insert k random tokens of the tokenizer's whole vocabulary, decoded, at random positions of
  a caption. `mode: per_draw` draws them afresh each time a caption is drawn; `mode: fixed` draws them
  once per training record before training (seeded), as Dutt et al.'s code does.
- Threshold mitigation (Wen et al. 2024): drop from the batch the samples whose text-conditional noise
  prediction ‖ε(x_t, e_p) − ε(x_t, e_∅)‖₂ exceeds an absolute threshold or a batch percentile.
- GNI: Gaussian noise added to the text embeddings (Somepalli et al. 2023b).
- Caption replacement (random caption of another sample) and caption dropout (empty prompt, which also
  trains the unconditional branch used by classifier-free guidance).

Several mitigations stack, each at most once. Caption-level ones apply in a fixed order whatever the
order of the list: fixed RWA (before training), then replacement, per-draw RWA and dropout last, so an
augmented caption can still be dropped and dropout keeps its probability p. GNI then perturbs the
embeddings of the captions that were not dropped, and threshold mitigation filters the batch's loss.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from capsearch.errors import UserError

RWA_MODES = ("per_draw", "fixed")

# Parameters of each mitigation: a type to convert to, or a tuple of allowed strings.
KNOWN: dict[str, dict[str, type | tuple[str, ...]]] = {
    "rwa": {"k": int, "p": float, "mode": RWA_MODES},
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
    fixed: dict[int, str] = field(default_factory=dict)  # training record → its fixed-RWA caption

    @classmethod
    def parse(cls, items: list[dict], vocabulary: list[str] | None = None) -> Mitigations:
        """Validate a mitigation list; an unknown name or parameter, or a name twice, is a UserError."""
        m = cls()
        for item in items or []:
            item = dict(item)
            name = item.pop("name", None)
            if name in (None, "none"):
                continue
            if name not in KNOWN:
                raise UserError(f"unknown mitigation {name!r}; choose from {', '.join(KNOWN)}")
            if getattr(m, name) is not None:
                raise UserError(f"mitigation {name} is listed twice; a run applies each one once")
            for key, value in item.items():
                if key not in KNOWN[name]:
                    raise UserError(
                        f"mitigation {name}: unknown parameter {key!r} (allowed: {', '.join(KNOWN[name])})"
                    )
                item[key] = _convert(name, key, value)
            if "p" in item and not 0 <= item["p"] <= 1:
                raise UserError(f"mitigation {name}: p must be in [0, 1], got {item['p']}")
            setattr(m, name, item)
        if m.rwa is not None:
            m.rwa = {"k": 1, "p": 1.0, "mode": "per_draw", **m.rwa}
            if m.rwa["k"] < 1:
                raise UserError(f"mitigation rwa: k must be at least 1, got {m.rwa['k']}")
            m.words = list(vocabulary or [])
        if m.threshold is not None:
            if ("value" in m.threshold) == ("percentile" in m.threshold):
                raise UserError("mitigation threshold: give exactly one of value or percentile")
            if "percentile" in m.threshold and not 0 < m.threshold["percentile"] < 100:
                raise UserError("mitigation threshold: percentile must be in (0, 100)")
        return m

    def fix_captions(self, captions: list[str], groups: list, seed: int) -> None:
        """Fixed RWA: draw each training record's words once, seeded; a duplicate group shares one draw.

        Dutt et al.'s code augments every caption of its data frame once when the dataset is built, and
        its repeated memorisation rows are one data frame repeated, so copies share their words.
        """
        self.fixed = {}
        if not self.rwa or self.rwa["mode"] != "fixed":
            return
        # Its own random stream, so the per-step draws are the same in both modes.
        rng = random.Random(f"rwa-fixed:{seed}")
        shared: dict[object, str | None] = {}
        for i, (text, group) in enumerate(zip(captions, groups)):
            key = ("group", group) if group is not None else ("record", i)
            if key not in shared:
                hit = rng.random() < self.rwa["p"]
                shared[key] = self._add_words(text, rng) if hit else None
            if shared[key] is not None:
                self.fixed[i] = shared[key]

    def captions(
        self, idx: list[int], pool: list[str], rng: random.Random
    ) -> tuple[list[str], list[bool], dict[str, int]]:
        """Captions of training records `idx` after the caption-level mitigations, which of them were
        dropped, and how many samples each mitigation touched (order: module docstring)."""
        out, counts = [self.fixed.get(i, pool[i]) for i in idx], {}
        if self.fixed:
            counts["rwa"] = sum(i in self.fixed for i in idx)
        if self.caption_replace:
            hit = [rng.random() < self.caption_replace["p"] for _ in out]
            for j, h in enumerate(hit):
                if h:
                    other = rng.randrange(len(pool))
                    out[j] = self.fixed.get(other, pool[other])
            counts["caption_replace"] = sum(hit)
        if self.rwa and self.rwa["mode"] == "per_draw":
            hit = [rng.random() < self.rwa["p"] for _ in out]
            out = [self._add_words(t, rng) if h else t for h, t in zip(hit, out)]
            counts["rwa"] = sum(hit)
        dropped = [False] * len(out)
        if self.caption_dropout:
            dropped = [rng.random() < self.caption_dropout["p"] for _ in out]
            out = ["" if d else t for d, t in zip(dropped, out)]
            counts["caption_dropout"] = sum(dropped)
        return out, dropped, counts

    def _add_words(self, text: str, rng: random.Random) -> str:
        if not self.words:
            raise UserError("mitigation rwa needs a vocabulary of words to insert")
        words = text.split()
        for _ in range(self.rwa["k"]):
            words.insert(rng.randint(0, len(words)), rng.choice(self.words))
        return " ".join(words)

    def embeddings(
        self, ehs: torch.Tensor, dropped: list[bool], generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, int]]:
        """Gaussian noise injection on the text embeddings of the captions that were not dropped."""
        if not self.gni:
            return ehs, {}
        noise = torch.randn(ehs.shape, generator=generator, dtype=ehs.dtype).to(ehs.device)
        # A dropped caption stays the exact empty-prompt embedding that guidance samples with.
        kept = torch.tensor([not d for d in dropped], device=ehs.device)
        noise = noise * kept.view(-1, *[1] * (ehs.dim() - 1)).to(ehs.dtype)
        return ehs + self.gni["sigma"] * noise, {"gni": int(kept.sum())}

    def keep_mask(self, scores: torch.Tensor) -> torch.Tensor:
        """Samples the threshold mitigation keeps, given their per-sample text-conditional strengths."""
        if "value" in self.threshold:
            limit = torch.tensor(self.threshold["value"], device=scores.device)
        else:
            limit = torch.quantile(scores.float(), self.threshold["percentile"] / 100)
        return scores <= limit


def _convert(name: str, key: str, value: object) -> object:
    kind = KNOWN[name][key]
    if isinstance(kind, tuple):
        if value not in kind:
            raise UserError(
                f"mitigation {name}: {key} must be one of {', '.join(kind)}, got {value!r}"
            )
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"mitigation {name}: {key} must be a number, got {value!r}")
    if kind is int and value != int(value):
        raise UserError(f"mitigation {name}: {key} must be an integer, got {value!r}")
    return kind(value)


def vocabulary_words(tokenizer) -> list[str]:
    """Every non-special token of the tokenizer's vocabulary, decoded to text: one entry per id.

    Dutt et al.'s code inserts `tokenizer.decode([i])` for i uniform in CLIP's ids; tokens that decode
    to nothing visible (whitespace, control bytes) would insert nothing and are left out.
    """
    special = set(tokenizer.all_special_ids)
    ids = [[i] for i in range(len(tokenizer)) if i not in special]
    words = [w.strip() for w in tokenizer.batch_decode(ids)]
    return [w for w in words if w and w.isprintable()]
