"""The report's families: the leaderboard (each family's best point within each budget of the base's cache), the decode
benchmark's figures beside it, one hue per family, and the per-family fronts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kvsweep.cli import main as cli_main
from kvsweep.report import ReportError, analyze, build_report
from kvsweep.report.figstyle import family_colours, variant_colours
from kvsweep.report.leaderboard import BUDGETS, leaderboard, leaderboard_table, load_decode
from kvsweep.report.load import load_all

from .test_report_helpers import KV_BASE, trial, write_results


def fam(trial_id: str, family: str, kv: int, val: float, test: float, *, seed: int = 0, variant: str | None = None, **kw) -> dict:
    """A trial of ``family`` (its variant ``<family>[...]``); trials of one id prefix and family are one configuration."""
    row = trial(trial_id, kv, val, variant=variant or f"{family}[x] / lm", seed=seed,
                config={"family": family, "kv": kv, "id": trial_id.rstrip("0123456789")}, **kw)
    row.update(family=family, test_ppl=test, base_test_ppl=52.0)
    return row


TRIALS = [
    fam("v75a", "vdproj", 750, 51.0, 53.0), fam("v50a", "vdproj", 500, 55.0, 57.0), fam("v25a", "vdproj", 250, 70.0, 72.0),
    # lowrank at 50%: two seeds of one configuration, and a worse one at a smaller cache
    fam("l50a", "lowrank", 500, 54.0, 56.5, seed=0), fam("l50a", "lowrank", 500, 54.4, 56.9, seed=1),
    fam("l40b", "lowrank", 400, 60.0, 58.0),  # better on test, worse on validation: never chosen for it
    fam("q25a", "quant", 260, 58.0, 60.0),  # 26%: over the 25% budget
    fam("q12a", "quant", 125, 66.0, 68.0),  # exactly 12.5%: within it
]
TRIALS[4]["trial_id"] = "l50a1"


@pytest.fixture
def results(tmp_path: Path) -> Path:
    return write_results(tmp_path / "r", TRIALS)


def test_each_budget_holds_each_familys_best_point_by_validation(results):
    an = analyze(load_all([str(results)]))
    board = {(e.budget, e.family): (None if e.point is None else an.points.label[e.point]) for e in leaderboard(an)}
    assert [b for b, _ in board][::3] == list(BUDGETS)  # largest budget first, then the families by name
    assert board[(0.75, "vdproj")] == "v75a" and board[(0.75, "lowrank")] == "l50a (+1 seed)" and board[(0.75, "quant")] == "q25a"
    assert board[(0.5, "lowrank")] == "l50a (+1 seed)"  # its validation PPL wins, though l40b has the lower test PPL
    assert board[(0.25, "quant")] == "q12a"  # q25a holds 26% of the base's cache
    assert board[(0.25, "lowrank")] is None and board[(0.125, "vdproj")] is None
    assert board[(0.125, "quant")] == "q12a"  # exactly at the budget
    assert KV_BASE == 1000


def test_the_leaderboard_table_headlines_test_ppl_with_its_interval(results):
    an = analyze(load_all([str(results)]))
    table = leaderboard_table(an, leaderboard(an, (0.5,)))
    rows = [dict(zip(table.columns, r)) for r in table.rows]
    lr = next(r for r in rows if r["family"] == "lowrank")
    assert lr["budget (of the base's KV)"] == "≤ 50%" and lr["KV bytes/token"] == "500" and lr["% of base"] == "50.0%"
    assert lr["test PPL"] == "56.700" and "–" in lr["95% CI"] and lr["seeds"] == "2"
    assert lr["val PPL"] == "54.200"
    assert next(r for r in rows if r["family"] == "quant")["point"] == "q25a"  # within 50%, and better on validation than q12a
    assert "decode tok/s" not in table.columns


def decode_file(tmp_path: Path) -> Path:
    rows = [{"family": "vdproj", "method": "vdproj rank=256", "budget": 0.5, "kv_bytes_per_token": 6144, "tokens_per_s": 90.0},
            {"family": "lowrank", "method": "lowrank g1 k=32 v=32", "methods": "lowrank[g1]", "budget": 0.5, "kv_bytes_per_token": 6144,
             "tokens_per_s": 110.0},
            {"family": "lowrank", "method": "lowrank g4 k=128 v=128", "methods": "lowrank[x]", "budget": 0.5, "kv_bytes_per_token": 6144,
             "tokens_per_s": 70.0}]
    path = tmp_path / "decode.json"
    path.write_text(json.dumps({"setting": "pythia-70m (random weights), context 64, cpu",
                                "base": {"kv_bytes_per_token": 12288, "tokens_per_s": 100.0}, "rows": rows}))
    return path


def test_decode_figures_join_the_leaderboard_by_family_and_budget(results, tmp_path):
    an = analyze(load_all([str(results)]))
    decode = load_decode(decode_file(tmp_path))
    table = leaderboard_table(an, leaderboard(an, (0.5, 0.25)), decode)
    rows = {(r[0], r[1]): dict(zip(table.columns, r)) for r in table.rows}
    lowrank = rows[("≤ 50%", "lowrank")]  # its point's variant is lowrank[x] / lm: the row timed with those methods
    assert (lowrank["decode tok/s"], lowrank["× base"], lowrank["timed"]) == ("70.0", "0.70", "lowrank g4 k=128 v=128")
    assert rows[("≤ 50%", "vdproj")]["× base"] == "0.90" and rows[("≤ 50%", "vdproj")]["timed"] == "vdproj rank=256"  # the family's row
    assert rows[("≤ 50%", "quant")]["decode tok/s"] == "—"  # quant has no row in the benchmark's figures
    assert rows[("≤ 25%", "vdproj")]["decode tok/s"] == "—"  # the benchmark ran vdproj at 50% only


def test_the_report_has_the_leaderboard_the_family_fronts_and_the_decode_rows(results, tmp_path):
    out = build_report([results], tmp_path / "rep", budgets=(0.5, 0.125), decode=decode_file(tmp_path))
    md = (out / "report.md").read_text()
    assert "## Families and the leaderboard" in md and "≤ 12.5%" in md and "≤ 75%" not in md
    assert "lowrank g1 k=32 v=32" in md and (out / "front_families.png").is_file()
    assert cli_main(["report", str(results), "-o", str(tmp_path / "rep2"), "--budgets", "0.25"]) == 0
    assert "≤ 25%" in (tmp_path / "rep2" / "report.md").read_text()


@pytest.mark.parametrize("budgets", [(0.0,), (1.5,), ()])
def test_budgets_outside_zero_to_one_are_refused(results, tmp_path, budgets):
    with pytest.raises(ReportError, match="--budgets must be shares"):
        build_report([results], tmp_path / "rep", budgets=budgets)
    assert not (tmp_path / "rep").exists()


def test_a_bad_decode_file_is_refused_naming_it(results, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"rows": []}')
    with pytest.raises(ReportError, match="bad.json is not the JSON of benchmarks/decode.py --json"):
        build_report([results], tmp_path / "rep", decode=bad)
    with pytest.raises(ReportError, match="no such file"):
        build_report([results], tmp_path / "rep", decode=tmp_path / "none.json")
    with pytest.raises(SystemExit):
        cli_main(["report", str(results), "-o", str(tmp_path / "rep"), "--budgets", "half"])
    assert "shares of the base's KV cache" in capsys.readouterr().err


def test_with_several_families_a_family_is_a_hue_and_its_variants_shades_of_it(tmp_path):
    trials = [fam("a", "lowrank", 500, 55.0, 56.0, variant="lowrank[g1] / lm"), fam("b", "lowrank", 400, 57.0, 58.0, variant="lowrank[g2] / lm"),
              fam("c", "quant", 250, 60.0, 61.0, variant="quant[4] / lm")]
    an = analyze(load_all([str(write_results(tmp_path / "r", trials))]))
    hues, colours = family_colours(an), variant_colours(an)
    assert colours["quant[4] / lm"] == hues["quant"] and colours["lowrank[g1] / lm"] == hues["lowrank"]
    g2 = np.array(colours["lowrank[g2] / lm"][:3])
    assert not np.allclose(g2, hues["lowrank"][:3])  # a shade of the family's hue, not another hue
    assert np.allclose(g2, 0.55 * np.array(hues["lowrank"][:3]), atol=1e-9)  # 45% of the way to black
    one = analyze(load_all([str(write_results(tmp_path / "s", trials[:2]))]))
    assert len(set(variant_colours(one).values())) == 2  # one family: a colour per variant, as before
