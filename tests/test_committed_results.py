"""The committed seeds reports (the paper's tables) are what `capsearch report` makes of the committed
run records today: regenerated from copies of those records at the same relative paths, every line but
the `Written` one is identical."""

import re
import shutil
from pathlib import Path

import pytest

from capsearch.seeds import write_seeds_report

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
