"""Notes under report.md's tables: the evaluation's noise floor, and whether the attack was cut short."""

from __future__ import annotations

from capsearch.search.records import TrialRecord


def noise_floor_lines(records: list[TrialRecord], what: str) -> list[str]:
    """One paragraph: FID and KID between disjoint sets of real held-out images at the sample count."""
    floors = [r.noise_floor for r in records if r.noise_floor]
    if not floors:
        return []
    f = floors[0]
    parts = []
    for key, label, fmt in (("fid", "FID", ".2f"), ("kid", "KID", ".4f")):
        if isinstance(f.get(key), dict):
            v = f[key]
            parts.append(
                f"{label} {format(v['mean'], fmt)} (95% of repeats in "
                f"[{format(v['low'], fmt)}, {format(v['high'], fmt)}])"
            )
    if not parts:
        return []
    return [
        "",
        f"Noise floor of the {what} evaluation: real held-out images against other real held-out "
        f"images, {f.get('n', '?')} of each, score " + " and ".join(parts) + ". A difference "
        "between trials smaller than this spread is not a difference. Intervals are 95%: FID and KID "
        "by a delete-one-prompt jackknife, AMD and image-text score by resampling prompts, extracted "
        'images by resampling attacked prompts (docs/metrics.md, "Intervals").',
    ]


def capped_lines(records: list[TrialRecord]) -> list[str]:
    """Whether the attack's clique enumeration was cut short anywhere (its count is then a lower bound)."""
    capped = {r.folder.name: r.value("capped_prompts") for r in records}
    known = {name: int(n) for name, n in capped.items() if n is not None}
    if not known:
        return []
    hit = {name: n for name, n in known.items() if n > 0}
    if not hit:
        return ["", f"The extraction attack enumerated every clique of all {len(known)} trials "
                "(no prompt hit the cap of 10,000 cliques)."]  # fmt: skip
    listed = ", ".join(f"{name} ({n} prompt{'s' * (n > 1)})" for name, n in hit.items())
    return ["", f"The extraction attack's clique enumeration hit its cap in {listed}: their "
            "extracted counts are lower bounds."]  # fmt: skip
