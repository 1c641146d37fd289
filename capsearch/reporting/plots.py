"""Plots of search runs: quality against memorisation (the front plot of report.md, over seeds, and
the front of a search's stages)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from capsearch.figures import save_figure


def tradeoff_plot(points: list[dict[str, Any]], xlabel: str, path: Path) -> Path | None:
    """Held-out FID against a memorisation measure, both with their intervals as error bars: every
    point (capsearch.reporting.tradeoff.tradeoff_points), the front joined and drawn in colour, the
    others grey; baselines are squares labelled by name, the best trial a star. None if no point."""
    if not points:
        return None
    # lazy: matplotlib loads only where a plot is drawn
    import matplotlib

    matplotlib.use("Agg")
    # lazy: matplotlib loads only where a plot is drawn
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    front = sorted((p for p in points if p["front"]), key=lambda p: (p["x"], p["fid"]))
    if len(front) > 1:
        ax.step([p["x"] for p in front], [p["fid"] for p in front], where="post", color="C3",
                lw=1.2, zorder=1, label="front (no trial better on both)")  # fmt: skip
    marker = {"baseline": ("s", 7), "searched": ("o", 6), "best": ("*", 13)}
    seen = set()
    for p in points:
        err = {}
        for axis, key in (("xerr", "x"), ("yerr", "fid")):
            ci = p[f"{key}_ci"]
            if ci:
                err[axis] = [[max(0.0, p[key] - ci[0])], [max(0.0, ci[1] - p[key])]]
        shape, size = marker[p["kind"]]
        colour = "C3" if p["front"] else "0.55"
        name = f"{p['kind']}{' on the front' if p['front'] else ''}"
        ax.errorbar(p["x"], p["fid"], fmt=shape, ms=size, color=colour, mec="k", mew=0.6,
                    elinewidth=0.7, capsize=2, zorder=3 if p["front"] else 2,
                    label=None if name in seen else name, **err)  # fmt: skip
        seen.add(name)
        if p["kind"] != "searched" or p["front"]:
            ax.annotate(p["label"], (p["x"], p["fid"]), fontsize=7, xytext=(5, 3),
                        textcoords="offset points")  # fmt: skip
    _log_fid_axis(ax, [p["fid"] for p in points], 10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out FID ↓ (bars: 95% interval)")
    ax.set_title("Quality against memorisation", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path


# Marker per mitigation in the seeds plot (the method sets the colour): none, RWA, Threshold, others.
MITIGATION_MARKERS = {"": "o", "rwa": "s", "threshold": "^"}


def method_and_marker(name: str) -> tuple[str, str]:
    """A seeds-plot name's method (its colour) and its mitigation's marker: `Full FT + RWA†` → square."""
    method, _, mitigation = name.rstrip("†").partition(" + ")
    key = mitigation.split()[0].lower() if mitigation.strip() else ""
    return method, MITIGATION_MARKERS.get(key, "D")


def seeds_plot(series: list[tuple[str, list[tuple[float, float]]]], path: Path) -> Path | None:
    """Held-out FID against extracted images: a small marker per seed, a large one at the mean over
    seeds with ± 1 sample standard deviation bars; None if nothing to plot.

    `series` holds (display name, [(extracted, FID) per seed]) in legend order; a name's part before
    " + " (the method) sets the colour and the part after (a mitigation, Table 2) the marker's shape.
    """
    series = [(name, points) for name, points in series if points]
    if not series:
        return None
    # lazy: matplotlib loads only where a plot is drawn
    import matplotlib

    matplotlib.use("Agg")
    # lazy: matplotlib loads only where a plot is drawn
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    colours = plt.get_cmap("tab10")
    methods: list[str] = []
    for name, points in series:
        method, marker = method_and_marker(name)
        methods += [method] if method not in methods else []
        colour = colours(methods.index(method) % 10)
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        ax.scatter(xs, ys, s=16, color=colour, marker=marker, alpha=0.6, zorder=2)
        many = len(points) > 1
        ax.errorbar(
            statistics.mean(xs),
            statistics.mean(ys),
            xerr=statistics.stdev(xs) if many else None,
            yerr=statistics.stdev(ys) if many else None,
            fmt=marker,
            ms=9,
            color=colour,
            mec="k",
            capsize=3,
            zorder=3,
            label=f"{name} ({len(points)} seed{'s' * many})",
        )
    _log_fid_axis(ax, [p[1] for _, points in series for p in points], 10)
    ax.set_xlabel("extracted images ↓ (count)")
    ax.set_ylabel("held-out FID ↓")
    return _finish(fig, ax, "Quality against memorisation, over seeds", path)


def front(points: list[dict[str, Any]]) -> list[int]:
    """Indices of the points no other point beats on both extracted images and FID (lower is better:
    at most as many extracted and at most the FID, one of them strictly), by extracted count."""
    out = []
    for i, p in enumerate(points):
        beaten = any(
            q["extracted"] <= p["extracted"] and q["fid"] <= p["fid"]
            and (q["extracted"] < p["extracted"] or q["fid"] < p["fid"])
            for q in points
        )  # fmt: skip
        if not beaten:
            out.append(i)
    return sorted(out, key=lambda i: (points[i]["extracted"], points[i]["fid"]))


def front_plot(panels: list[tuple[str, list[dict[str, Any]]]], path: Path) -> Path | None:
    """Held-out FID against extracted images, one panel per evaluation stage; None if nothing to plot.

    Each panel is (title, points); a point is a dict with `label`, `kind` ("baseline", "searched" or
    "winner"), `extracted`, `fid` and optionally `intervals` ({"fid": [lo, hi], "extracted": [lo, hi]},
    drawn as error bars). The points no other point beats on both axes are joined by a step line.
    """
    panels = [(title, pts) for title, pts in panels if pts]
    if not panels:
        return None
    # lazy: matplotlib loads only where a plot is drawn
    import matplotlib

    matplotlib.use("Agg")
    # lazy: matplotlib loads only where a plot is drawn
    import matplotlib.pyplot as plt

    style = {"baseline": ("s", "C1"), "searched": ("o", "C0"), "winner": ("*", "C3")}
    fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 4.6), squeeze=False)
    for ax, (title, pts) in zip(axes[0], panels):
        best = front(pts)
        if len(best) > 1:
            ax.step([pts[i]["extracted"] for i in best], [pts[i]["fid"] for i in best],
                    where="post", color="0.6", lw=1, zorder=1, label="front")  # fmt: skip
        for kind, (marker, colour) in style.items():
            mine = [p for p in pts if p["kind"] == kind]
            for j, p in enumerate(mine):
                iv = p.get("intervals") or {}
                err = {}
                for axis, key in (("xerr", "extracted"), ("yerr", "fid")):
                    if iv.get(key):
                        lo, hi = iv[key]
                        err[axis] = [[max(0.0, p[key] - lo)], [max(0.0, hi - p[key])]]
                ax.errorbar(p["extracted"], p["fid"], fmt=marker, color=colour, mec="k",
                            ms=14 if kind == "winner" else 8, capsize=3, elinewidth=0.8,
                            zorder=3, label=kind if j == 0 else None, **err)  # fmt: skip
        _labels(ax, pts)
        _log_fid_axis(ax, [p["fid"] for p in pts], 2.5)
        ax.set_xlabel("extracted images ↓ (count)")
        ax.set_ylabel("FID ↓")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def _log_fid_axis(ax: Any, fids: list[float], spread: float) -> None:
    """A log-scale FID axis with plain tick labels at 1, 2, 5 × 10^k, when the FIDs span more than
    `spread` times (a linear axis otherwise)."""
    if min(fids) > 0 and max(fids) / min(fids) > spread:
        # lazy: matplotlib loads only where a plot is drawn
        from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())


def _labels(ax: Any, pts: list[dict[str, Any]]) -> None:
    """Label each point; of points at one extracted count whose FIDs lie within 6% of each other,
    every other label goes to the left, so that neighbours do not print over each other."""
    left = False
    previous: dict[str, Any] | None = None
    for p in sorted(pts, key=lambda p: (p["extracted"], p["fid"])):
        near = (previous is not None and previous["extracted"] == p["extracted"]
                and p["fid"] <= 1.06 * previous["fid"])  # fmt: skip
        left = not left if near else False
        ax.annotate(p["label"], (p["extracted"], p["fid"]), fontsize=7,
                    xytext=(-6 if left else 6, 3), ha="right" if left else "left",
                    textcoords="offset points")  # fmt: skip
        previous = p


def _finish(fig, ax, title: str, path: Path) -> Path:
    """Title, legend, layout; write the figure to `path` and close it."""
    # lazy: matplotlib loads only where a plot is drawn
    import matplotlib.pyplot as plt

    ax.set_title(title)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path
