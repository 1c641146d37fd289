"""W against a single other trial (capsearch.reporting.dominance.versus) and experiments/search_control.py: is the
search's winner better than Full FT because of its capacity or because of its lower learning rate?"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
from dominance import table_lines, versus
from test_dominance import GOOD_W, ROOT, TPE, W_PARAMS, load_script, make_run, record

from capsearch.errors import UserError
from capsearch.search.runs import trial_dir

SEEDS = (0, 1, 3)


def test_versus_judges_each_metric_under_the_paired_rules():
    # W extracts 0 on every seed, the control 6, 9, 4: W better (d = 6, 9, 4, t-interval above 0);
    # FIDs differ by −2, 3, 1: not shown
    wins = [record(20 + i, None, {**GOOD_W, "fid": f}, s)
            for i, (s, f) in enumerate(zip(SEEDS, (75.0, 70.0, 72.0)))]  # fmt: skip
    ctrl = [record(30 + i, "full_at_w_rate", {**GOOD_W, "fid": f, "extracted": e}, s)
            for i, (s, f, e) in enumerate(zip(SEEDS, (73.0, 73.0, 73.0), (6, 9, 4)))]  # fmt: skip
    result = versus(wins, ctrl, SEEDS, "the control")
    verdicts = {c.metric: c.verdict for c in result.conditions}
    assert verdicts == {"fid": "not shown", "amd": "not shown", "alignment": "not shown",
                        "extracted": "holds"}  # fmt: skip
    extracted = next(c for c in result.conditions if c.metric == "extracted")
    assert extracted.diffs == (6.0, 9.0, 4.0) and extracted.b == "the control"
    table = "\n".join(table_lines(result))
    assert table.startswith("W = t020 (seed 0), t021 (seed 1), t022 (seed 3).")
    assert "| W vs the control |" in table
    flipped = versus(ctrl, wins, SEEDS, "W", a_label="the control")
    assert next(c for c in flipped.conditions if c.metric == "extracted").verdict == "reversed"
    assert "\n".join(table_lines(flipped)).startswith("the control = t030 (seed 0)")
    with pytest.raises(UserError, match="the control: 2 records for 3 seeds"):
        versus(wins, ctrl[:2], SEEDS, "the control")


def load_control():
    load_script()  # search_compare, which the script imports, under its module name
    sys.path.insert(0, str(ROOT / "experiments"))
    spec = importlib.util.spec_from_file_location("search_control",
                                                  ROOT / "experiments" / "search_control.py")  # fmt: skip
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_search_control_compares_w_with_full_ft_at_its_rate_on_every_seed(tmp_path, capsys):
    main_run = make_run(tmp_path, "search_vs_baselines", "tpe", 0, TPE)  # W = t007
    confirm = [make_run(tmp_path, f"confirm_seed{s}", "tpe", s, [], {"found": W_PARAMS})
               for s in (1, 3)]  # fmt: skip
    control = {**{k: "full" for k in W_PARAMS if k.endswith(".method")}, "lr": 2.4e-4,
               "mitigation": "none"}  # fmt: skip
    controls = [make_run(tmp_path, f"control_seed{s}", "tpe", s, [], {"full_at_w_rate": control})
                for s in SEEDS]  # fmt: skip
    for run, extracted in zip(controls, (5, 7, 6)):  # the control memorises on every seed
        path = trial_dir(run, 20) / "final" / "result.json"
        final = json.loads(path.read_text())
        final["metrics"]["extracted"] = extracted
        path.write_text(json.dumps(final))
    out = tmp_path / "out"
    argv = [str(main_run), "--out", str(out), "--confirm", *map(str, confirm),
            "--control", *map(str, controls)]  # fmt: skip
    module = load_control()
    assert module.main(argv) == 0
    text = (out / "control.md").read_text()
    assert "search_control.py " + " ".join(argv) in text
    shares = text.split("## W against")[0]
    assert "| seed | W | Full FT at W's rate | Full FT |" in shares
    assert "| 0 | 0.10 | 0.10 | 0.10 |" in shares and "| 3 |" in shares  # final_result's share
    first, second = text.split("## W against Full FT at W's rate")[1].split("(the rate alone)")
    assert "W = t007 (seed 0), t020 (seed 1), t020 (seed 3)." in first
    assert "over seeds 0, 1, 3 (positive d: W better): fid: not shown" in first
    assert "extracted: holds" in first
    # the control against Full FT of the same seeds (10 extracted each, Table 1 seed 0's values)
    assert "Full FT at W's rate against Full FT over seeds 0, 1, 3" in second
    assert "extracted: holds" in second

    def argv_with(*runs):
        return [str(main_run), "--out", str(out), "--confirm", *map(str, confirm), "--control",
                *map(str, runs)]  # fmt: skip

    assert module.main(argv_with(*controls[:2])) == 2  # seed 3 has no control run
    assert "no control run for seed(s) 3" in capsys.readouterr().err
    other = make_run(tmp_path, "control_other_rate", "tpe", 3, [],
                     {"full_at_w_rate": {**control, "lr": 1e-3}})  # fmt: skip
    assert module.main(argv_with(*controls[:2], other)) == 2
    assert "should be one, W's" in capsys.readouterr().err
