"""The committed seeds reports (the paper's tables) are what `capsearch report` makes of the committed
run records today: regenerated from copies of those records at the same relative paths, every line but
the `Written` one is identical."""

import re
import shutil
from pathlib import Path

import pytest

from capsearch.reporting.seeds import write_seeds_report

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "experiments" / "results" / "paper"
REPORTS = sorted(p.parent for p in PAPER.glob("table*/report.md")) if PAPER.is_dir() else []
RUN_LINE = re.compile(r"^- `([^`]+)`: spec ")


def _stable(text: str) -> list[str]:
    return [line for line in text.splitlines() if not line.startswith("Written ")]


def test_the_paper_tables_are_committed():
    assert [p.name for p in REPORTS][:1] == ["table1"], (
        "experiments/results/paper/table1 is missing"
    )


@pytest.mark.parametrize("folder", REPORTS, ids=[p.name for p in REPORTS])
def test_committed_seeds_report_regenerates_from_committed_records(folder, tmp_path, monkeypatch):
    committed = (folder / "report.md").read_text()
    runs = [m.group(1) for line in committed.splitlines() if (m := RUN_LINE.match(line))]
    assert len(runs) >= 2, f"{folder}/report.md lists no runs"
    for run in runs:
        assert (ROOT / run).is_dir(), f"{run} is named by {folder.name}/report.md but not committed"
        shutil.copytree(ROOT / run, tmp_path / run, ignore=shutil.ignore_patterns("*.png"))
        # the grids are linked only where they exist: keep the files, not their bytes
        for png in (ROOT / run).rglob("memorised.png"):
            (tmp_path / run / png.relative_to(ROOT / run)).write_bytes(b"png")
    monkeypatch.chdir(tmp_path)
    out = folder.relative_to(ROOT)
    text = write_seeds_report([Path(r) for r in runs], out).read_text()
    assert _stable(text) == _stable(committed)


SEARCH = ROOT / "experiments" / "results" / "search"
ANALYSES = sorted(SEARCH.glob("*/search.md")) + sorted(SEARCH.glob("*/control.md"))
WRITTEN = re.compile(r"^Written by `python (experiments/\w+\.py) (.+)`$")


@pytest.mark.parametrize("md", ANALYSES, ids=[f"{p.parent.name}/{p.name}" for p in ANALYSES])
def test_committed_search_analysis_regenerates_from_committed_records(md, tmp_path, monkeypatch):
    """search.md (experiments/search_compare.py) and control.md (experiments/search_control.py), run
    again with the command line they name on copies of the records they read."""
    import importlib.util
    import shlex
    import sys

    committed = md.read_text()
    match = next((m for line in committed.splitlines() if (m := WRITTEN.match(line))), None)
    assert match, f"{md} names no `Written by` command"
    script, argv = match.group(1), shlex.split(match.group(2))
    for arg in argv:
        if (ROOT / arg).is_dir() and not (tmp_path / arg).exists():
            shutil.copytree(ROOT / arg, tmp_path / arg, ignore=shutil.ignore_patterns("*.png"))
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    name = Path(script).stem
    spec = importlib.util.spec_from_file_location(name, ROOT / script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    monkeypatch.chdir(tmp_path)
    assert module.main(argv) == 0
    assert _stable((tmp_path / md.relative_to(ROOT)).read_text()) == _stable(committed)
