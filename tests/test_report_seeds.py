"""kvsweep.report over seeds, splits and costs: configurations pooled over seeds with their intervals, "not distinguishable
from the base", scheduler-stopped trials off the front, --x memory-at-L with break-even contexts, the hypervolume of a
front, the scheduler and searcher from sweep.json, and test PPL as the headline (results of the test split)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kvsweep.cli import main as cli_main
from kvsweep.report import ReportError, analyze, build_report
from kvsweep.report.front_tables import front_volumes, frontier_table, hypervolume_table, memory_table, overall_ppl_table
from kvsweep.report.load import load_all
from kvsweep.report.points import configuration_codes, group
from kvsweep.report.synthetic import write_synthetic
from kvsweep.report.tables import scheduler_table, search_table, status_table

from .test_report_helpers import hand_results, trial, write_results  # noqa: F401

T_2 = 4.3026527  # Student's t, 0.975 quantile, 2 degrees of freedom (printed tables: 4.303)
CFG_A = {"adapters": [{"name": "vdproj", "rank": 8}], "train": {"lr": 1e-4}}
CFG_B = {"adapters": [{"name": "vdproj", "rank": 16}], "train": {"lr": 1e-4}}


def read_csv(path: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def rows(table) -> list[dict]:
    return [dict(zip(table.columns, r)) for r in table.rows]


def seeded(tmp_path: Path) -> Path:
    """Configuration A over three seeds (PPL 60, 61, 62.5), B over three seeds that hold the base's PPL 50 in their interval,
    A at another lr (one seed), and a seed of B that ASHA stopped (its PPL is not pooled)."""
    return write_results(tmp_path / "r", [
        trial("a0", 500, 60.0, seed=0, config=CFG_A), trial("a1", 500, 61.0, seed=1, config=CFG_A),
        trial("a2", 500, 62.5, seed=2, config=CFG_A, status="early_stopped", epochs_run=12, best_epoch=9),
        trial("b0", 700, 49.0, seed=0, config=CFG_B), trial("b1", 700, 50.5, seed=1, config=CFG_B), trial("b2", 700, 51.0, seed=2, config=CFG_B),
        trial("b3", 700, 45.0, seed=3, config=CFG_B, status="asha_stopped", epochs_run=1),
        trial("c0", 400, 70.0, seed=0, config={**CFG_A, "train": {"lr": 3e-4}}),
    ])


def test_configurations_differing_only_by_seed_are_one_point(tmp_path):
    an = analyze(load_all([str(seeded(tmp_path))]))
    P = an.points
    assert [an.key[m].tolist() for m in P.members] == [["a0", "a1", "a2"], ["b0", "b1", "b2"], ["c0"]]  # b3: stopped by ASHA
    assert P.seeds == ((0, 1, 2), (0, 1, 2), (0,))
    a = P.val[0]  # 60, 61, 62.5: mean 61.1667, half width 4.30265 * 1.258306 / sqrt(3) = 3.125805
    assert (a.mean, a.low, a.high, a.n) == (pytest.approx(61.166667, abs=1e-6), pytest.approx(58.040862, abs=1e-5),
                                            pytest.approx(64.292472, abs=1e-5), 3)
    assert an.points.label[an.front].tolist() == ["c0", "a0 (+2 seeds)", "b0 (+2 seeds)"]  # built on the means
    assert P.val.n[2] == 1 and np.isnan(P.val.low[2])


def test_an_interval_holding_the_base_is_not_distinguishable_from_it(tmp_path):
    out = build_report([seeded(tmp_path)], tmp_path / "out")
    front = {r["trial_ids"]: r for r in read_csv(out / "frontier.csv")}
    b = front["b0;b1;b2"]  # 49, 50.5, 51: mean 50.1667, s = 1.040833, half width 4.30265 * 1.040833 / sqrt(3) = 2.585574
    assert float(b["val_ppl_mean"]) == pytest.approx(50.166667, abs=1e-6)
    assert float(b["val_ppl_ci_low"]) == pytest.approx(50.166667 - 2.585574, abs=1e-5)
    assert float(b["val_ppl_ci_high"]) == pytest.approx(50.166667 + 2.585574, abs=1e-5)
    assert (b["n_seeds"], b["seeds"], b["distinguishable_from_base"], b["headline_split"]) == ("3", "0;1;2", "False", "validation")
    assert front["a0;a1;a2"]["distinguishable_from_base"] == "True"
    assert front["c0"]["distinguishable_from_base"] == "" and front["c0"]["val_ppl_ci_low"] == ""  # one seed: unknown
    an = analyze(load_all([str(tmp_path / "r")]))
    table = {r["point"]: r for r in rows(frontier_table(an, an.front))}
    assert table["b0 (+2 seeds)"]["vs the base"] == "not distinguishable from the base"
    assert table["a0 (+2 seeds)"]["vs the base"] == "distinguishable" and table["c0"]["vs the base"] == "n/a (1 seed)"
    assert table["c0"]["95% CI"] == "n/a (1 seed)" and table["b0 (+2 seeds)"]["95% CI"] == "47.581 – 52.752"
    assert table["a0 (+2 seeds)"]["status"] == "completed, early_stopped" and table["a0 (+2 seeds)"]["seeds"] == "3 (0, 1, 2)"
    md = (out / "report.md").read_text()
    assert "not distinguishable from the base" in md and "95% t-interval" in md


def test_scheduler_stopped_trials_are_drawn_but_never_on_the_front(tmp_path):
    src = write_results(tmp_path / "r", [trial("done", 800, 60.0), trial("stopped", 500, 55.0, status="asha_stopped", epochs_run=1),
                                         trial("patience", 900, 52.0, status="early_stopped", epochs_run=7)])
    an = analyze(load_all([str(src)]))
    assert an.eligibility.mask.tolist() == [True, True, True] and an.eligibility.candidate.tolist() == [True, False, True]
    out = build_report([src], tmp_path / "out")
    assert [r["trial_id"] for r in read_csv(out / "frontier.csv")] == ["done", "patience"]  # "stopped" beats both on bytes
    md = (out / "report.md").read_text()
    assert "are drawn and counted, but are no front candidates" in md
    status = rows(status_table(an))[0]
    assert (status["front candidates"], status["on the front"], status["asha stopped"]) == ("2", "2", "1")


# --- memory at L ----------------------------------------------------------------------------------

def memory_results(tmp_path: Path) -> Path:
    """A: 500 B/token with 1 MB fixed; B: 800 B/token with none; the base 1,000 B/token."""
    return write_results(tmp_path / "r", [trial("A", 500, 55.0, fixed_bytes=1_000_000), trial("B", 800, 60.0, fixed_bytes=0)])


def test_memory_at_l_moves_the_front_and_gives_break_even_contexts(tmp_path):
    src = memory_results(tmp_path)
    by_bytes = build_report([src], tmp_path / "bytes")
    assert [r["trial_id"] for r in read_csv(by_bytes / "frontier.csv")] == ["A"]  # A beats B on bytes/token and PPL
    # at L = 2,048: A holds 1,000,000 + 2,048 x 500 = 2,024,000 bytes, B 2,048 x 800 = 1,638,400: both on the front, B first
    assert cli_main(["report", str(src), "-o", str(tmp_path / "mem"), "--x", "memory-at-L", "--context", "2048"]) == 0
    front = read_csv(tmp_path / "mem" / "frontier.csv")
    assert [r["trial_id"] for r in front] == ["B", "A"]
    assert [float(r["memory_at_L_bytes"]) for r in front] == [1_638_400, 2_024_000]
    assert [r["break_even_context"] for r in front] == ["1.0", "2001.0"]  # A: 1,000,000 / (1,000 - 500) = 2,000, below from 2,001
    assert {r["cost_axis"] for r in front} == {"memory-at-L"} and {r["context_L"] for r in front} == {"2048"}
    assert float(front[0]["base_memory_at_L_bytes"]) == 2_048_000
    # at L = 10,000: A holds 6,000,000 bytes, B 8,000,000: A beats B again
    build_report([src], tmp_path / "long", x="memory-at-L", context=10_000)
    assert [r["trial_id"] for r in read_csv(tmp_path / "long" / "frontier.csv")] == ["A"]
    md = (tmp_path / "mem" / "report.md").read_text()
    assert "L = 2,048: given with --context" in md and "memory.png" in md


def test_memory_table_and_default_context(tmp_path):
    an = analyze(load_all([str(memory_results(tmp_path))]))
    assert an.axis.context == 2048 and "maximum context of the Pythia models" in an.axis.context_source
    mem = rows(memory_table(an, an.front))
    assert mem[0]["point"] == "base" and mem[0]["memory at L = 2,048"] == "2.05 MB" and mem[0]["fixed bytes"] == "0"
    assert mem[1]["point"] == "A" and mem[1]["memory at L = 2,048"] == "2.02 MB" and mem[1]["break-even context (tokens)"] == "2,001"


def test_unknown_fixed_bytes_are_said_so(tmp_path):
    src = write_results(tmp_path / "r", [trial("old", 500, 55.0)])  # no fixed bytes: results before they were recorded
    an = analyze(load_all([str(src)]))
    assert rows(memory_table(an, an.front))[1]["break-even context (tokens)"] == "unknown (no fixed bytes)"
    out = build_report([src], tmp_path / "mem", x="memory-at-L")
    assert read_csv(out / "frontier.csv") == []
    assert "1 trial without a finite val PPL or KV bytes/token and fixed bytes" in (out / "report.md").read_text()


@pytest.mark.parametrize("argv", [["--x", "bytes"], ["--context", "0"], ["--context", "many"]])
def test_bad_cost_flags_are_refused(tmp_path, argv, capsys):
    with pytest.raises(SystemExit):
        cli_main(["report", str(tmp_path), "-o", str(tmp_path / "out"), *argv])
    with pytest.raises(ReportError, match="--x must be"):
        build_report([tmp_path], tmp_path / "out", x="bytes")
    assert not (tmp_path / "out").exists()


# --- hypervolume ----------------------------------------------------------------------------------

def test_hypervolume_of_the_hand_made_front(hand_results):
    # Front t1/t8 (500, 60), t2 (700, 55), t4 (1,200, 49); reference (the base's 1,000 bytes, 50 x 1.5 = 75): t4 lies beyond it.
    # Area: (700 - 500) x (75 - 60) + (1,000 - 700) x (75 - 55) = 3,000 + 6,000 = 9,000; normalised 9,000 / (1,000 x 75) = 0.12.
    an = analyze(load_all([str(hand_results)]))
    (v,) = front_volumes(an)
    assert (v.split, v.points, v.reference) == ("validation", 4, (1000.0, 75.0))
    assert v.volume == pytest.approx(9000.0) and v.normalised == pytest.approx(0.12)
    assert rows(hypervolume_table(an))[0]["hypervolume"] == "9,000.0"


# --- the scheduler and the searcher -----------------------------------------------------------------

def _sweep_json(folder: Path, spec: dict) -> None:
    (folder / "sweep.json").write_text(json.dumps({"format": 1, "name": "hand", "specification": spec, "rounds": [], "base": None}))


def test_scheduler_and_searcher_come_from_sweep_json(hand_results, tmp_path):
    _sweep_json(hand_results, {"scheduler": "asha", "scheduler.grace_period": 1, "scheduler.reduction_factor": 2, "search": "random",
                               "search.num_samples": 9, "space.vdproj.rank": [8, 16, 32, 64], "space.schedule": ["lm", "rec_to_lm"],
                               "space.seed": [0, 1, 2], "data.digest": "abc"})
    an = analyze(load_all([str(hand_results)]))
    assert rows(scheduler_table(an))[0]["scheduler"] == "asha (grace period 1, reduction factor 2)"
    search = rows(search_table(an))[0]
    assert search == {"sweep": "hand", "searcher": "random (9 samples)", "trials": "9", "configurations in the grid": "24",
                      "trials saved against the grid": "15", "% saved": "62.5%"}
    md = (build_report([hand_results], tmp_path / "out") / "report.md").read_text()
    assert "Run with scheduler asha, searcher random" in md


def test_a_specification_before_the_search_field_is_a_grid_and_a_bad_one_a_note(hand_results, tmp_path):
    _sweep_json(hand_results, {"scheduler": "fifo", "search.num_samples": None, "space.vdproj.rank": [8, 16]})
    an = analyze(load_all([str(hand_results)]))
    assert rows(search_table(an))[0]["searcher"] == "grid (inferred: the specification predates its search field)"
    (hand_results / "sweep.json").write_text("{not json")
    md = (build_report([hand_results], tmp_path / "out") / "report.md").read_text()
    assert "sweep.json cannot be read" in md.split("## Summary")[0]


def test_the_sweep_file_is_the_tune_drivers():
    from kvsweep.report.sweepinfo import SWEEP_FILE
    from kvsweep.tune.spec import SWEEP_FILE as TUNE_SWEEP_FILE

    assert SWEEP_FILE == TUNE_SWEEP_FILE


# --- test split: the headline ---------------------------------------------------------------------

def test_results_with_a_test_split_headline_test_ppl_over_seeds(tmp_path):
    src = write_synthetic(tmp_path / "r", 240, seeds=3, seed=4)
    trials = pq.read_table(src / "trials.parquet").to_pylist()
    by_id = {t["trial_id"]: t for t in trials}
    out = build_report([src], tmp_path / "out")
    front = read_csv(out / "frontier.csv")
    assert front and {r["headline_split"] for r in front} == {"test"}
    for r in front:
        ids = r["trial_ids"].split(";")
        assert all(by_id[i]["status"] in ("completed", "early_stopped") for i in ids)
        assert float(r["test_ppl_mean"]) == pytest.approx(np.mean([by_id[i]["test_ppl"] for i in ids]))
        assert float(r["val_ppl_mean"]) == pytest.approx(np.mean([by_id[i]["best_val_ppl"] for i in ids]))
    assert any(int(r["n_seeds"]) > 1 for r in front)
    md = (out / "report.md").read_text()
    assert "Headline figures are test PPL" in md and "test PPL" in md.split("## Pareto front")[1].split("## Fronts per variant")[0]
    assert "Test PPL per position bucket" in md and "front_test.png" in md
    an = analyze(load_all([str(src)]))
    overall = rows(overall_ppl_table(an, an.front))[0]
    assert {"test PPL", "test 95% CI", "val PPL", "val 95% CI", "base test PPL"} <= set(overall)
    assert {v.split for v in front_volumes(an)} == {"validation", "test"}


def test_results_without_a_test_split_say_the_figures_are_validation(hand_results, tmp_path):
    md = (build_report([hand_results], tmp_path / "out") / "report.md").read_text()
    assert "No test PPL in these results" in md and "Validation PPL per position bucket" in md
    assert read_csv(tmp_path / "out" / "frontier.csv")[0]["test_ppl_mean"] == ""


def test_configurations_are_grouped_by_everything_but_the_seed():
    cfg = {"rank": 8, "train": {"lr": 1e-4, "seed": 0}, "data": {"seed": 1}}
    text = [json.dumps(cfg), json.dumps({"data": {"seed": 1}, "train": {"seed": 5, "lr": 1e-4}, "rank": 8}, indent=1),  # 0, 1: one
            json.dumps({**cfg, "data": {"seed": 2}}),  # 2: another data seed is another configuration
            json.dumps({**cfg, "seed": 3}), "", None, None, "not json", json.dumps(cfg)]  # 3 pools with 0 (a top-level seed); 4-6 too
    tbl = pa.table({"variant": ["v"] * 9, "kv_bytes_per_token": [1.0] * 5 + [float("nan")] * 2 + [1.0, 1.0],
                    "vdproj.rank": [8] * 8 + [None], "config": text, "seed": [2, 1, 0, None, 0, 1, 0, 0, 0]})
    source = np.array([0, 0, 0, 0, 0, 0, 0, 1, 0])
    rows = np.arange(9)
    groups = [m.tolist() for m in group(rows, configuration_codes(tbl, source, rows), tbl.column("seed").to_pylist())]
    # by first trial; members by seed, nulls last; "" is no config; NaN KV bytes equal NaN; another source or rank: not pooled
    assert groups == [[1, 0, 3], [2], [4], [6, 5], [7], [8]]
    assert group(rows[:0], configuration_codes(tbl, source, rows[:0]), []) == []
