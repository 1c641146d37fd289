"""Radiology-report text for the phantom world: negation-aware finding parser and real IU impressions."""

from __future__ import annotations

import functools
import importlib.util
import re
import tarfile
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from capsearch.errors import UserError

FINDINGS: tuple[str, ...] = (
    "cardiomegaly",
    "effusion",
    "pneumothorax",
    "consolidation",
    "nodule",
    "atelectasis",
    "support_device",
)

# Keyword patterns per finding (CheXpert-labeler style phrase lists, reduced to what the phantom draws).
_FINDING_PATTERNS: dict[str, str] = {
    "cardiomegaly": r"cardiomegaly|cardiac enlargement|enlarge\w* (?:of the )?(?:heart|cardiac)"
    r"|(?:heart|cardiac silhouette|cardiac size|heart size)(?: \w+){0,3} enlarged",
    "effusion": r"(?<!pericardial )effusions?|pleural fluid|hydrothorax"
    r"|blunt\w*(?: \w+){0,4} costophrenic",
    "pneumothorax": r"pneumothora(?:x|ces)",
    "consolidation": r"consolidat\w*|pneumonia|infiltrat\w*|air ?space (?:disease|opacit\w*|density)"
    r"|opacit(?:y|ies)|opacification",
    "nodule": r"nodul\w*|\bmass(?:es)?\b",
    "atelectasis": r"atelecta\w*|collapse",
    "support_device": r"\btubes?\b|catheters?|\bpicc\b|\blines\b|pacemaker|pacer|defibrillator|\bport\b"
    r"|\b(?:central|venous|subclavian|jugular|ij|arterial|dialysis)(?: \w+)? line\b",
}
# Findings the phantom does not draw: a report asserting one of them is never reused for a phantom.
_UNMODELLED = (
    r"edema|emphysema|copd|hyperinfla\w*|hyperexpan\w*|fibros\w*|fractur\w*|granulom\w*|calcif\w*"
    r"|scolio\w*|hernia|spondylo\w*|degenerat\w*|osteo\w*|kyphos\w*|tortuous|aort\w*|cyst\w*"
    r"|interstitial|\bchf\b|failure|congesti\w*|vascular|pericardial|sternotomy|surgical|clips?"
    r"|cholecystectomy|scar\w*|\btb\b|tuberculosis|adenopathy|hilar|thickening|pneumoperitoneum"
    r"|elevat\w*|cardiomediastinal|mediastin\w*|widen\w*|bronch\w*|metasta\w*|lymph\w*|nipple"
    r"|arthri\w*|deformit\w*|shoulder|prosthe\w*|hardware|postop\w*|expansion|volumes?|hypertension"
    r"|hypoinfla\w*|stimulator"
)
_PATTERNS = {name: re.compile(p) for name, p in _FINDING_PATTERNS.items()}
_PATTERNS["other"] = re.compile(_UNMODELLED)

# NegEx-style cues (Chapman et al. 2001): pre-negations before the phrase, post-negations after it,
# pseudo-negations that look like negation but are not (removed before scanning).
_PSEUDO = re.compile(
    r"\bno (?:significant |interval |definite )?change\w*|\bnot (?:be )?(?:excluded|ruled out)"
    r"|cannot be (?:excluded|ruled out)|\bunchanged\b|\bno longer\b(?= \w+ (?:normal|clear))"
)
_PRE_NEGATION = re.compile(
    r"\bno\b|\bnot\b|\bwithout\b|\bnegative for\b|\bfree of\b|\babsence of\b|\bresolution of\b"
    r"|\bresolved\b|\bclear of\b|\bclearing of\b|\brather than\b|\bno longer\b|\bnor\b|\bremoval of\b"
    r"|\bevaluat\w* (?:for|of)\b|\bassess\w* for\b|\bto exclude\b|\brule out\b|\br/o\b"
)
_POST_NEGATION = re.compile(
    r"\b(?:is|are|was|were|has|have)(?: \w+)? (?:resolved|absent|cleared)\b|\bresolved\b"
    r"|\b(?:removed|withdrawn|discontinued)\b"
    r"|\bnot (?:seen|identified|present|visualized|evident|demonstrated|appreciated)\b|\bruled out\b"
)
# A negation's scope ends at the end of its clause (Chapman's "termination terms").
_CLAUSE_BREAK = re.compile(
    r"[.;:!?](?:\s|$)|\n|\b(?:but|however|although|though|except|whereas|which|with|there is"
    r"|there are|otherwise)\b|\d\.\s"
)

_SIDE = re.compile(r"\b(bilateral\w*|bibasilar|bibasal|both|left|right)\b")
_SIZE = re.compile(
    r"\b(tiny|trace|small|minimal|minimally|mild|mildly|borderline|slight|slightly|moderate|moderately"
    r"|large|massive|marked|markedly|severe|severely|extensive)\b"
)
_ZONE = re.compile(
    r"\b(upper|apical|apex|apices|middle|mid|lingula\w*|lower|base|bases|basilar|basal|retrocardiac)\b"
)
_ZONE_OF = {
    **dict.fromkeys(("upper", "apical", "apex", "apices"), "upper"),
    **dict.fromkeys(("middle", "mid", "lingula", "lingular"), "middle"),
    **dict.fromkeys(("lower", "base", "bases", "basilar", "basal", "retrocardiac"), "lower"),
}
_SIZE_OF = {
    **dict.fromkeys(("tiny", "trace", "small", "minimal", "minimally", "mild", "mildly"), "small"),
    **dict.fromkeys(("borderline", "slight", "slightly"), "small"),
    **dict.fromkeys(("moderate", "moderately"), "moderate"),
    **dict.fromkeys(("large", "massive", "marked", "markedly", "severe", "severely"), "large"),
    "extensive": "large",
}


@dataclass(frozen=True)
class Mention:
    """One mention of a finding in a report: the phrase, its clause, whether it is negated."""

    finding: str
    negated: bool
    clause: str
    start: int  # the phrase's span within the clause
    end: int

    @property
    def phrase(self) -> str:
        """The matched words."""
        return self.clause[self.start : self.end]


def _clauses(text: str) -> list[str]:
    """Lower-cased clauses of a report, split at negation-scope terminators."""
    text = _PSEUDO.sub(" ", text.lower())
    return [c.strip() for c in _CLAUSE_BREAK.split(text) if c and c.strip()]


def finding_mentions(text: str) -> list[Mention]:
    """Every mention of a finding (or of something the phantom does not draw, as 'other')."""
    mentions = []
    for clause in _clauses(text):
        for name, pattern in _PATTERNS.items():
            for match in pattern.finditer(clause):
                negated = bool(
                    _PRE_NEGATION.search(clause[: match.start()])
                    or re.search(r"\bnot?\b", match.group())
                    or _POST_NEGATION.search(clause[match.end() :])
                )
                mentions.append(Mention(name, negated, clause, match.start(), match.end()))
    return mentions


def findings_from_text(text: str) -> set[str]:
    """The findings a report asserts (any un-negated mention), ignoring negated ones."""
    return {m.finding for m in finding_mentions(text) if not m.negated and m.finding != "other"}


def _words_near(mention: Mention, others: list[Mention]) -> tuple[str, str]:
    """The clause text between the previous mention and this phrase, and from it to the next one:
    the words that can describe this finding and no other."""
    before = max((o.end for o in others if o.end <= mention.start), default=0)
    after = min((o.start for o in others if o.start >= mention.end), default=len(mention.clause))
    return mention.clause[before : mention.start], mention.clause[mention.end : after]


def _nearest(pattern: re.Pattern, before: str, after: str) -> str | None:
    """The closest match before the phrase (modifiers precede nouns: "small left effusion"), else
    the closest one after it ("effusion on the left")."""
    found = [m.group(1) for m in pattern.finditer(before)]
    if found:
        return found[-1]
    found = [m.group(1) for m in pattern.finditer(after)]
    return found[0] if found else None


_DEVICE_KIND = re.compile(r"\b(pacemaker|pacer|defibrillator|tubes?|catheters?|picc|lines?|port)\b")
_KIND_OF = {"pacer": "pacemaker", "defibrillator": "pacemaker", "tube": "tube", "tubes": "tube"}
_BILATERAL = {"bilateral", "bilaterally", "bibasilar", "bibasal", "both"}


def attributes_from_text(text: str) -> dict[str, dict[str, str]]:
    """Side, size, zone (and device kind) a report gives each asserted finding; sides are the patient's."""
    attributes: dict[str, dict[str, str]] = {}
    mentions = finding_mentions(text)
    for m in mentions:
        if m.negated or m.finding == "other":
            continue
        others = [o for o in mentions if o.clause is m.clause and o.start != m.start]
        before, after = _words_near(m, others)
        found = attributes.setdefault(m.finding, {})
        near = set(_SIDE.findall(before)) or set(_SIDE.findall(after))
        greater = re.search(r"(?:left|right) (?:greater|more|larger) than", m.clause)
        if near & _BILATERAL or {"left", "right"} <= near or greater:
            found.setdefault("side", "bilateral")
        elif side := _nearest(_SIDE, before, after):
            found.setdefault("side", side)
        if size := _nearest(_SIZE, before, after):
            found.setdefault("size", _SIZE_OF[size])
        if zone := _nearest(_ZONE, before, after):
            found.setdefault("zone", _ZONE_OF.get(zone, "lower"))
        if m.finding == "nodule" and re.search(r"\bmass(?:es)?\b", m.phrase):
            found["size"] = "large"
        if m.finding == "support_device" and (kind := _DEVICE_KIND.search(m.phrase)):
            found.setdefault("kind", _KIND_OF.get(kind.group(1), kind.group(1)))
    for found in attributes.values():
        if found.get("kind") not in (None, "tube", "pacemaker"):
            found["kind"] = "line"  # catheters, PICCs, ports and lines are drawn as a central line
    return attributes


def torchxrayvision_data() -> Path:
    """The `data/` folder that the installed torchxrayvision package ships."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "torchxrayvision is not installed; the phantom world needs its data/ folder"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    if not folder.is_dir():
        raise UserError(f"torchxrayvision's data folder is missing: {folder}")
    return folder


def _clean(text: str) -> str:
    """Whitespace and repeated full stops normalised, as the IU reports have stray ' . .' tails."""
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"(?:\s*\.){2,}$", ".", text)
    return re.sub(r"\s+\.", ".", text)


@functools.lru_cache(maxsize=1)
def iu_impressions() -> tuple[str, ...]:
    """The IMPRESSION texts of the Indiana University reports torchxrayvision ships (one per report)."""
    path = torchxrayvision_data() / "NLMCXR_reports.tgz"
    impressions = []
    try:
        with tarfile.open(path) as archive:
            for member in archive:
                if not member.isfile() or not member.name.endswith(".xml"):
                    continue
                root = ET.fromstring(archive.extractfile(member).read())  # type: ignore[union-attr]
                for node in root.iter("AbstractText"):
                    if node.get("Label") == "IMPRESSION" and node.text and node.text.strip():
                        impressions.append(_clean(node.text))
    except (OSError, tarfile.TarError, ET.ParseError) as exc:
        raise UserError(f"cannot read the IU reports {path}: {exc}") from None
    return tuple(impressions)


def _usable(text: str, max_words: int) -> bool:
    """Whether a real text can describe a phantom: no anonymisation marks, short, nothing undrawn."""
    if "XXXX" in text or len(text.split()) > max_words or len(text) < 8:
        return False
    return not any(m.finding == "other" and not m.negated for m in finding_mentions(text))


def _sentences(text: str) -> list[str]:
    """Sentences of a report, numbering ('1.') removed."""
    parts = re.split(r"(?<=[.!?])\s+|\s*\b\d\.\s+", text)
    return [p.strip() for p in parts if p and len(p.strip()) > 3]


# Templates per finding, with the sides / sizes / zones each may name; {degree} words grade cardiomegaly.
_TEMPLATES: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "cardiomegaly": (("{Degree} cardiomegaly.", "The heart is {degree}ly enlarged."), (), ()),
    "effusion": (
        ("{Size} {side} pleural effusion.", "{Side} pleural effusion, {size} in size."),
        ("left", "right", "bilateral"),
        (),
    ),
    "pneumothorax": (
        ("{Size} {side} pneumothorax.", "{Side} apical pneumothorax."),
        ("left", "right"),
        (),
    ),
    "consolidation": (
        ("{Side} {zone} lobe consolidation.", "Airspace opacity in the {side} {zone} lung."),
        ("left", "right", "bilateral"),
        ("upper", "middle", "lower"),
    ),
    "nodule": (
        ("{Side} {zone} lung nodule.", "{Size} nodule in the {side} {zone} lung."),
        ("left", "right"),
        ("upper", "middle", "lower"),
    ),
    "atelectasis": (
        ("{Side} basilar atelectasis.", "Atelectasis in the {side} {zone} lung."),
        ("left", "right", "bilateral"),
        ("middle", "lower"),
    ),
    "support_device": (
        ("Central venous catheter in place.", "Endotracheal tube in place.", "Pacemaker in place."),
        (),
        (),
    ),
}
_DEGREE = {"small": "mild", "moderate": "moderate", "large": "marked"}
_NEGATIVE_TEMPLATES: dict[str, str] = {
    "cardiomegaly": "Heart size is normal.",
    "effusion": "No pleural effusion.",
    "pneumothorax": "No pneumothorax.",
    "consolidation": "No focal consolidation.",
    "nodule": "No suspicious pulmonary nodule.",
    "atelectasis": "No atelectasis.",
    "support_device": "",
}


class ReportBank:
    """Real IU impressions indexed by the finding set they assert, with real-sentence and template fallbacks."""

    def __init__(self, impressions: tuple[str, ...], max_words: int = 40) -> None:
        """Index whole impressions and single-finding sentences by what they assert."""
        self.whole: dict[frozenset[str], list[str]] = defaultdict(list)
        self.positive: dict[str, list[str]] = defaultdict(list)
        self.negative: dict[str, list[str]] = defaultdict(list)
        for text in impressions:
            if _usable(text, max_words):
                self.whole[frozenset(findings_from_text(text))].append(text)
            for sentence in _sentences(text):
                if not _usable(sentence, max_words // 2):
                    continue
                mentions = [m for m in finding_mentions(sentence) if m.finding != "other"]
                asserted = {m.finding for m in mentions if not m.negated}
                if len(asserted) == 1 and all(m.finding in asserted for m in mentions):
                    self.positive[next(iter(asserted))].append(sentence)
                elif mentions and not asserted and len({m.finding for m in mentions}) == 1:
                    self.negative[mentions[0].finding].append(sentence)

    def describe(self, findings: frozenset[str], rng: np.random.Generator) -> tuple[str, str]:
        """A report asserting exactly `findings`, and its source ('real', 'composed' or 'template')."""
        whole = self.whole.get(findings)
        if whole:  # sampled with their real frequency, so common impressions recur across patients
            return whole[rng.integers(len(whole))], "real"
        ordered = [f for f in FINDINGS if f in findings]
        if all(self.positive.get(f) for f in ordered):
            parts = [self.positive[f][rng.integers(len(self.positive[f]))] for f in ordered]
            absent = [f for f in FINDINGS if f not in findings and self.negative.get(f)]
            if absent and rng.random() < 0.5:
                f = absent[rng.integers(len(absent))]
                parts.append(self.negative[f][rng.integers(len(self.negative[f]))])
            text = " ".join(parts)
            if findings_from_text(text) == set(findings):
                return text, "composed"
        return self.template(findings, rng), "template"

    @staticmethod
    def template(findings: frozenset[str], rng: np.random.Generator) -> str:
        """A templated report asserting exactly `findings` ('No acute cardiopulmonary process.' if none)."""
        if not findings:
            return "No acute cardiopulmonary process."
        parts = []
        for f in FINDINGS:
            if f not in findings:
                continue
            options, sides, zones = _TEMPLATES[f]
            size = ("small", "moderate", "large")[rng.integers(3)]
            side = sides[rng.integers(len(sides))] if sides else ""
            zone = zones[rng.integers(len(zones))] if zones else ""
            words = {"side": side, "size": size, "zone": zone, "degree": _DEGREE[size]}
            words |= {k.capitalize(): v.capitalize() for k, v in list(words.items())}
            parts.append(options[rng.integers(len(options))].format(**words))
        for f in FINDINGS:
            if f not in findings and _NEGATIVE_TEMPLATES[f] and rng.random() < 0.3:
                parts.append(_NEGATIVE_TEMPLATES[f])
        return " ".join(parts)


@functools.lru_cache(maxsize=1)
def report_bank() -> ReportBank:
    """The report bank built from the shipped IU reports (cached per process)."""
    return ReportBank(iu_impressions())
