"""kvsweep.report: reports from hand-made and synthetic results, partial sweeps, several sweeps, bad input, the CLI."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from matplotlib.collections import PathCollection
from matplotlib.colors import to_rgba

from kvsweep.cli import main as cli_main
from kvsweep.config import KvsweepError
from kvsweep.report import (NoResultsError, NotResultsError, ReportError, SchemaError, analyze, build_report,
                            load_results)
from kvsweep.report.cli import add_parser
from kvsweep.report.load import load_all
from kvsweep.report.synthetic import write_synthetic
from kvsweep.report import figures
from kvsweep.report.front_tables import overall_ppl_table
from kvsweep.report.tables import DASH, scheduler_table
from kvsweep.report.trial_tables import curve_epochs, history_table, learning_table, position_table
from kvsweep.results import READABLE_VERSIONS, TRIAL_SCHEMA, SchedulerSavings, scheduler_savings, table, write_parquet

from .test_report_helpers import (HAND_FRONT, HAND_TRIALS, TRIALS, buckets, curve, hand_results, trial,  # noqa: F401
                                  write_results)


def read_csv(path: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def decode_png(data: bytes) -> np.ndarray:
    from matplotlib.image import imread

    return imread(io.BytesIO(data), format="png")


def assert_nothing_written(parent: Path, out: Path, keep: set[str]) -> None:
    assert not out.exists()
    assert {p.name for p in parent.iterdir()} <= keep, "no temporary folder may be left behind"


# --- the report of a hand-made sweep ----------------------------------------------------------------

def test_report_of_a_partly_failed_running_sweep(hand_results, tmp_path):
    out = build_report([hand_results], tmp_path / "reports" / "hand")
    assert out == tmp_path / "reports" / "hand"
    names = {p.name for p in out.iterdir()}
    assert {"report.md", "report.html", "frontier.csv", "front.png", "front_variants.png", "front_families.png", "learning_curves.png",
            "positions.png"} == names  # no fixed bytes: no memory figure; two families (vdproj, ka_gated): their fronts
    for png in out.glob("*.png"):
        img = decode_png(png.read_bytes())
        assert img.shape[0] > 300 and img.shape[1] > 600

    rows = read_csv(out / "frontier.csv")
    assert [r["trial_id"] for r in rows] == HAND_FRONT
    assert [r["front_rank"] for r in rows] == ["1", "2", "3", "4"]
    assert json.loads(rows[0]["config"]) == {"trial": "t1", "rank": 8, "lr": 1e-4}
    assert float(rows[0]["kv_pct_of_base"]) == pytest.approx(50.0)
    assert set(TRIAL_SCHEMA.names) <= set(rows[0])

    md = (out / "report.md").read_text()
    top = md.split("## Summary")[0]
    assert "Partial results" in top
    assert "still running" in top and "t10" in top  # epochs but no trial row
    assert "2 trials ended in error" in top and "boom: CUDA out of memory" in top
    assert "1 trial without a finite val PPL" in top
    for heading in ("Pareto front", "Fronts per variant", "Overall perplexity", "Memory at L and break-even context", "Hypervolume",
                    "Position-wise perplexity", "Learning curves", "Scheduler and search", "Experiment history"):
        assert f"## {heading}" in md
    assert "![Val PPL against KV bytes/token" in md and "(front.png)" in md
    assert "| t9 " not in md.split("## Pareto front")[1].split("## Fronts per variant")[0]  # the failed trial is not on the front


def test_the_position_rows_of_version_4_results_are_read_per_split(tmp_path):
    test_rows = [{**r, "split": "test", "ppl": 2 * r["ppl"]} for r in buckets("t1", 60.0)]
    src = write_results(tmp_path / "r", [trial("t1", 500, 60.0)], curve("t1", 3, 60.0), buckets("t1", 60.0) + test_rows)
    an = analyze(load_all([str(src)]))
    assert sorted({r["split"] for r in an.positions_of(0).to_pylist()}) == ["test", "validation"]
    for split, factor in (("validation", 1), ("test", 2)):
        rows = an.point_positions(0, split)
        assert [(b.lo, b.ppl.mean) for b in rows] == [(r["lo"], factor * r["ppl"]) for r in buckets("t1", 60.0)]


def test_tables_hold_the_seeds_numbers(hand_results):
    an = analyze(load_all([str(hand_results)]))
    assert an.points.label[an.front].tolist() == HAND_FRONT
    assert (an.eligibility.n_error, an.eligibility.n_missing, an.eligibility.n_not_candidate) == (2, 1, 2)  # t3, t5: stopped by ASHA
    assert an.running == [["t10"]]
    assert {k: an.points.label[v].tolist() for k, v in an.variant_fronts.items()} == {"ka_gated / lm": ["t4"], "vdproj / lm": ["t1", "t8", "t2"]}
    assert an.headline == "validation"  # results before the test split

    overall = overall_ppl_table(an, an.front)
    row = dict(zip(overall.columns, overall.rows[0]))
    assert row == {"point": "t1", "variant": "vdproj / lm", "KV bytes/token": "500", "seeds": "1", "base val PPL": "50.000",
                   "val PPL": "60.000", "val 95% CI": "n/a (1 seed)", "val difference": "+10.000", "val degradation": "+20.00%",
                   "val: vs the base": "n/a (1 seed)"}
    assert dict(zip(overall.columns, overall.rows[3]))["val degradation"] == "-2.00%"

    pos, missing = position_table(an, an.front)
    assert missing == []
    first = dict(zip(pos.columns, pos.rows[0]))
    assert first == {"point": "t1", "positions": "0-16", "tokens": "100", "base PPL": "75.000", "validation PPL": "90.000",
                     "95% CI": "n/a (1 seed)", "difference": "+15.000", "degradation": "+20.00%"}
    assert len(pos.rows) == 3 * len(HAND_FRONT)

    curves, missing = learning_table(an, an.front)
    assert missing == []
    t2 = dict(zip(curves.columns, curves.rows[2]))
    assert t2["trial"] == "t2" and t2["val PPL @20"] == "—" and t2["best epoch"] == "9" and t2["val PPL @best"] == "55.000"
    assert t2["val PPL @1"] == f"{55.0 * (1 + 0.5 * 8 / 9):,.3f}"
    t1 = dict(zip(curves.columns, curves.rows[0]))
    assert t1["val PPL @20"] == f"{60.0 * 1.02:,.3f}" and t1["best epoch"] == "18"

    asha = dict(zip(scheduler_table(an).columns, scheduler_table(an).rows[0]))
    assert asha["scheduler"] == "stops trials (no sweep.json)"
    run = sum(t["epochs_run"] for t in HAND_TRIALS)
    saved = (20 - 1) + (20 - 3)  # t3 and t5, the two trials ASHA stopped; t2's early stop and the errors saved nothing
    assert asha["stopped by the scheduler"] == "2" and asha["epochs run"] == f"{run:,}"
    assert asha["epochs saved"] == f"{saved:,}" and asha["epochs without the scheduler"] == f"{run + saved:,}"
    assert asha["% saved"] == f"{100 * saved / (run + saved):.1f}%"

    hist = dict(zip(history_table(an).columns, history_table(an).rows[0]))
    assert hist["date"] == "2025-11-21" and hist["best point"] == "t4" and hist["degradation"] == "-2.00%"


def test_a_complete_sweep_says_so(tmp_path):
    src = write_results(tmp_path / "r", [trial("a", 500, 60.0), trial("b", 800, 52.0)],
                        curve("a", 20, 60.0) + curve("b", 20, 52.0), buckets("a", 60.0) + buckets("b", 52.0))
    out = build_report([src], tmp_path / "out", title=r"A <complete> $\undefined{ $sweep")  # not mathtext, not HTML
    md = (out / "report.md").read_text()
    assert md.startswith("# A <complete> $\\undefined{ $sweep\n")
    assert "**Complete.**" in md and "Partial" not in md
    assert "<title>A &lt;complete&gt; $\\undefined{ $sweep</title>" in (out / "report.html").read_text()
    assert "front_variants.png" not in {p.name for p in out.iterdir()}  # a single variant


def test_a_single_trial_and_a_missing_positions_file(tmp_path):
    src = write_results(tmp_path / "r", [trial("only", 700, 55.0)], curve("only", 5, 55.0), positions=None)
    out = build_report([src], tmp_path / "out")
    names = {p.name for p in out.iterdir()}
    assert "positions.png" not in names and "learning_curves.png" in names
    md = (out / "report.md").read_text()
    assert "positions.parquet is missing" in md.split("## Summary")[0]
    assert "No position rows for 1 front point: only" in md
    assert [r["trial_id"] for r in read_csv(out / "frontier.csv")] == ["only"]


def test_a_sweep_where_every_trial_failed_still_reports(tmp_path):
    src = write_results(tmp_path / "r", [trial("x", None, None, status="error", error="no GPU"), trial("y", 500, None, status="error")])
    out = build_report([src], tmp_path / "out")
    md = (out / "report.md").read_text()
    assert "the front is empty" in md and "2 trials ended in error" in md
    assert read_csv(out / "frontier.csv") == []
    assert {"front.png", "report.html"} <= {p.name for p in out.iterdir()}


def test_several_sweeps_on_one_front(tmp_path):
    a = write_results(tmp_path / "a", [trial("t1", 500, 60.0, sweep="alpha"), trial("t2", 900, 51.0, sweep="alpha")],
                      curve("t1", 3, 60.0) + curve("t2", 3, 51.0), buckets("t1", 60.0))
    b = write_results(tmp_path / "b", [trial("t1", 400, 70.0, sweep="beta", finished_at="2025-10-01T00:00:00+00:00"),
                                       trial("t2", 600, 59.0, sweep="beta", variant="ka_gated / lm",
                                             finished_at="2025-10-02T00:00:00+00:00")])
    out = build_report([a, str(b)], tmp_path / "out")
    rows = read_csv(out / "frontier.csv")
    assert [(r["source"], r["trial_id"]) for r in rows] == [("beta", "t1"), ("alpha", "t1"), ("beta", "t2"), ("alpha", "t2")]
    an = analyze(load_all([str(a), str(b)]))
    assert an.points.label[an.front].tolist() == ["beta/t1", "alpha/t1", "beta/t2", "alpha/t2"]  # ids collide, so keys name the sweep
    assert {k: v.size for k, v in an.source_fronts.items()} == {"alpha": 2, "beta": 2}
    hist = history_table(an)
    assert [(r[0], r[1]) for r in hist.rows] == [("2025-10-02", "beta"), ("2025-11-20", "alpha")]  # by date
    md = (out / "report.md").read_text()
    assert "`beta`: epochs.parquet is missing" in md and "`beta`: positions.parquet is missing" in md
    assert "No position rows for 3 front points" in md


def test_a_trial_with_a_status_that_is_not_final_is_flagged_and_no_front_candidate(tmp_path):
    src = write_results(tmp_path / "r", [trial("a", 500, 60.0), trial("b", 400, 70.0, status="running", epochs_run=2)])
    out = build_report([src], tmp_path / "out")
    top = (out / "report.md").read_text().split("## Summary")[0]
    assert "Partial results" in top and "1 trial with status `running`" in top and "no front candidates" in top
    assert [r["trial_id"] for r in read_csv(out / "frontier.csv")] == ["a"]  # b would be on the front, but has not finished


def test_the_same_folder_twice_gets_distinct_labels(hand_results, tmp_path):
    results = load_all([str(hand_results), str(hand_results)])
    assert [r.label for r in results] == ["hand", "hand#2"]


def test_a_file_uri_is_read_through_pyarrow_filesystems(hand_results, tmp_path):
    out = build_report([hand_results.resolve().as_uri()], tmp_path / "out")
    assert [r["trial_id"] for r in read_csv(out / "frontier.csv")] == HAND_FRONT
    assert hand_results.resolve().as_uri() in (out / "report.md").read_text()


def test_an_unreachable_uri_is_a_clear_error(tmp_path):
    with pytest.raises(ReportError, match="cannot open nosuchscheme://x"):
        build_report(["nosuchscheme://x/results"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_html_is_self_contained(hand_results, tmp_path):
    out = build_report([hand_results], tmp_path / "out")
    page = (out / "report.html").read_text()
    assert "http://" not in page and "https://" not in page and "<script" not in page and "<link" not in page
    assert "Content-Security-Policy" in page
    assert page.count('src="data:image/png;base64,') == len(list(out.glob("*.png")))


# --- what the scheduler saved -------------------------------------------------------------------------

SAVINGS_ROWS = [
    {"status": "completed", "epochs_run": 20, "max_epochs": 20},
    {"status": "early_stopped", "epochs_run": 12, "max_epochs": 20},  # its own patience, not the scheduler
    {"status": "error", "epochs_run": 2, "max_epochs": 20},
    {"status": "error", "epochs_run": None, "max_epochs": 20},
    {"status": "asha_stopped", "epochs_run": 1, "max_epochs": 20},
    {"status": "asha_stopped", "epochs_run": 3, "max_epochs": 20},
    {"status": "running", "epochs_run": 4, "max_epochs": 20},
    {"status": "asha_stopped", "epochs_run": 5, "max_epochs": None},  # no max_epochs: nothing to count as saved
]


def test_scheduler_savings_count_only_the_trials_the_scheduler_stopped():
    got = scheduler_savings(SAVINGS_ROWS)
    run = 20 + 12 + 2 + 0 + 1 + 3 + 4 + 5
    assert got == SchedulerSavings(run=run, without_scheduler=run + 19 + 17, saved=19 + 17)
    assert got.saved_pct == pytest.approx(100 * 36 / (run + 36))
    tbl = pa.Table.from_pylist(SAVINGS_ROWS, schema=pa.schema([("status", pa.string()), ("epochs_run", pa.int32()),
                                                               ("max_epochs", pa.int32())]))
    assert scheduler_savings(tbl) == got
    assert scheduler_savings([]) == SchedulerSavings(run=0, without_scheduler=0, saved=0) and scheduler_savings([]).saved_pct == 0.0


def test_a_sweep_where_asha_stopped_nothing_saved_nothing(tmp_path):
    src = write_results(tmp_path / "r", [
        trial("a", 500, 60.0), trial("b", 600, 55.0, status="early_stopped", epochs_run=8),
        trial("c", 700, None, status="error", epochs_run=0, error="boom"), trial("d", 800, None, status="error", epochs_run=1, error="boom"),
    ])
    an = analyze(load_all([str(src)]))
    row = dict(zip(scheduler_table(an).columns, scheduler_table(an).rows[0]))
    assert row["stopped by the scheduler"] == "0" and row["epochs saved"] == "0" and row["% saved"] == "0.0%"
    assert row["epochs run"] == row["epochs without the scheduler"] == f"{20 + 8 + 0 + 1:,}"


# --- learning curves: the sweep's own epochs ----------------------------------------------------------

@pytest.mark.parametrize("epochs, expected", [
    ([1, 2], (1, 2)),
    ([1, 2, 3], (1, 2, 3)),
    ([0, 1, 2, 3], (1, 2, 3)),  # epoch 0 is the adapters at init
    (range(1, 31), (1, 10, 20, 30)),
    (range(1, 21), (1, 5, 10, 15, 20)),
    (range(1, 13), (1, 5, 12)),  # 10 is too close to the last
    ([1, 2, 7, 30], (1, 2, 7, 30)),
    ([1, 2, 3, 7, 8, 30], (1, 8, 30)),  # only epochs that exist: 10 becomes 8, 20 the last
    (range(100, 111), (100, 105, 110)),  # the step follows the span
    ([0], (0,)),
    ([], ()),
])
def test_curve_epochs_are_the_first_a_few_between_and_the_last(epochs, expected):
    assert curve_epochs(epochs) == expected


@pytest.mark.parametrize("max_epochs", [2, 3])
def test_a_short_sweep_has_no_empty_learning_curve_columns(tmp_path, max_epochs):
    src = write_synthetic(tmp_path / "r", 60, max_epochs=max_epochs, seed=1)
    an = analyze(load_all([str(src)]))
    curves, missing = learning_table(an, an.front)
    assert missing == [] and curves.rows
    for k, col in enumerate(curves.columns):
        assert any(row[k] != DASH for row in curves.rows), f"column {col!r} is empty for every trial"
    at = [c.split("@")[1] for c in curves.columns if c.startswith("val PPL @") and c != "val PPL @best"]
    assert at[0] == "1" and at[-1] == str(max_epochs)


# --- figures: one colour per variant, the same in every figure ------------------------------------------

def _chromatic(rgb: tuple) -> bool:
    return not (abs(rgb[0] - rgb[1]) < 1e-6 and abs(rgb[1] - rgb[2]) < 1e-6)  # black and greys mark fronts and the base


def _points(an, kind: str, idx: np.ndarray) -> list[dict[int, np.ndarray]]:
    """Per axes of the figure: point (or, in the front figure, trial) index -> the (x, y) points the figure draws for it."""
    if kind == "front":
        return [{int(i): np.array([[an.kv_bytes[i], an.val_ppl[i]]]) for i in np.flatnonzero(an.eligibility.mask)}]
    if kind == "variant_fronts":
        return [{int(p): np.array([[an.points.kv[p], an.points.val.mean[p]]]) for p in idx}]
    if kind == "learning":
        axes: list[dict[int, np.ndarray]] = [{}, {}]
        for p in idx:
            i = an.points.first(int(p))
            t = an.epochs_of(i)
            e = np.array(t.column("epoch").to_pylist(), dtype=float)
            axes[0][int(p)] = np.c_[e, np.array(t.column("train_ppl").to_pylist(), dtype=float)]
            axes[1][int(p)] = np.r_[np.c_[e, np.array(t.column("val_ppl").to_pylist(), dtype=float)],
                                    [[an.column("best_epoch")[i], an.val_ppl[i]]]]
        return axes
    rows = {int(p): an.positions_of(an.points.first(int(p))).to_pylist() for p in idx}
    buckets = sorted({(r["lo"], r["hi"]) for rs in rows.values() for r in rs})
    pos = {b: k for k, b in enumerate(buckets)}
    return [{i: np.array([[pos[(r["lo"], r["hi"])], r["ppl"]] for r in rs]) for i, rs in rows.items()},
            {i: np.array([[pos[(r["lo"], r["hi"])], 100.0 * (r["ppl"] - r["base_ppl"]) / r["base_ppl"]] for r in rs]) for i, rs in rows.items()}]


def _drawn(ax) -> list[tuple[np.ndarray, list[tuple]]]:
    """Every line and scatter of an axes: its points and the colour of each point."""
    out = []
    for line in ax.lines:
        xy = np.asarray(line.get_xydata(), dtype=float)
        out.append((xy, [to_rgba(line.get_color())[:3]] * len(xy)))
    for coll in ax.collections:
        if isinstance(coll, PathCollection):
            xy = np.asarray(coll.get_offsets(), dtype=float)
            fc = [tuple(c[:3]) for c in coll.get_facecolors()]
            out.append((xy, fc * len(xy) if len(fc) == 1 else fc))
    return out


FIGURES = {
    "front": lambda an, idx: figures.draw_front(an, title="t"),
    "variant_fronts": lambda an, idx: figures.draw_variant_fronts(an),
    "learning": lambda an, idx: figures.draw_learning(an, idx),
    "positions": lambda an, idx: figures.draw_positions(an, idx, "validation"),
}


@pytest.mark.parametrize("kind", list(FIGURES))
def test_every_figure_colours_a_trial_by_its_variant(hand_results, kind):
    an = analyze(load_all([str(hand_results)]))
    idx = np.concatenate(list(an.variant_fronts.values())) if kind == "variant_fronts" else an.front
    colours = {v: tuple(c[:3]) for v, c in figures.variant_colours(an).items()}
    variant = an.variant if kind == "front" else an.points.variant  # the front figure draws every trial; the others, points
    fig = FIGURES[kind](an, idx)
    axes = [ax for ax in fig.axes if ax.lines or ax.collections]
    expected = _points(an, kind, idx)
    assert len(axes) == len(expected)
    seen: dict[int, int] = {}
    for ax, trial_points in zip(axes, expected):
        for xy, cols in _drawn(ax):
            for p, c in zip(xy, cols):
                owners = [i for i, pts in trial_points.items() if np.isclose(pts, p, rtol=1e-9, atol=0).all(axis=1).any()]
                if not owners or not _chromatic(c):
                    continue
                for i in owners:
                    assert np.allclose(c, colours[variant[i]]), f"{i} drawn in {c}, its variant {variant[i]!r} is {colours[variant[i]]}"
                    seen[i] = seen.get(i, 0) + 1
    assert set(seen) == set().union(*expected), "every trial or point is drawn in its variant's colour"
    if kind != "front":
        assert set(seen) >= {int(p) for p in idx}


@pytest.mark.parametrize("kind", ["learning", "positions"])
def test_the_legend_tells_trials_of_one_variant_apart(hand_results, kind):
    an = analyze(load_all([str(hand_results)]))
    fig = FIGURES[kind](an, an.front)
    colours = figures.variant_colours(an)
    leg = fig.legends[0]
    entries = {t.get_text(): h for t, h in zip(leg.get_texts(), leg.legend_handles)}
    styles = []
    for p in an.front:
        h = entries[figures.point_label(an, int(p))]  # each point is named in the legend
        assert np.allclose(to_rgba(h.get_color())[:3], colours[an.points.variant[p]][:3])
        styles.append((an.points.variant[p], h.get_linestyle(), h.get_marker()))
    assert len(set(styles)) == len(styles), styles  # t1 and t8 share a variant (and their numbers): their styles differ


def test_figures_are_png(hand_results):
    an = analyze(load_all([str(hand_results)]))
    for png in (figures.front_figure(an, title="t"), figures.variant_fronts_figure(an), figures.learning_figure(an, an.front),
                figures.positions_figure(an, an.front, "validation")):
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and decode_png(png).shape[1] > 600


# --- writing: atomic, never over something that is not a report ------------------------------------

def test_an_earlier_report_is_replaced_and_a_failed_build_leaves_it_alone(hand_results, tmp_path, monkeypatch):
    out = tmp_path / "reports" / "hand"
    build_report([hand_results], out)
    (out / "old.png").write_bytes(b"stale")
    build_report([hand_results], out)
    assert not (out / "old.png").exists()
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    from kvsweep.report import compose

    real = compose.build

    def broken(an, *, title, **kw):
        built = real(an, title=title, **kw)
        return compose.Built(built.doc, {**built.images, "no/such/folder.png": b"x"}, built.frontier_csv)

    monkeypatch.setattr(compose, "build", broken)
    with pytest.raises(OSError):
        build_report([hand_results], out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert {p.name for p in out.parent.iterdir()} == {"hand"}


def test_an_output_folder_with_other_files_is_refused(hand_results, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ReportError, match="refusing to replace .*notes.txt"):
        build_report([hand_results], out)
    assert (out / "notes.txt").read_text() == "keep me"
    with pytest.raises(ReportError, match="refusing"):
        build_report([hand_results], hand_results)  # the results folder itself
    (tmp_path / "afile").write_text("")
    with pytest.raises(ReportError, match="is a file"):
        build_report([hand_results], tmp_path / "afile")


# --- bad input: a clear error, nothing written ------------------------------------------------------

def _bad(tmp_path: Path, make) -> Path:
    src = tmp_path / "results"
    make(src)
    return src


def _no_metadata(src: Path) -> None:
    src.mkdir()
    pq.write_table(table([trial("a", 1, 1.0)], TRIALS), src / "trials.parquet")


def _other_version(src: Path) -> None:
    src.mkdir()
    tbl = table([trial("a", 1, 1.0)], TRIALS)
    pq.write_table(tbl.replace_schema_metadata({b"kvsweep_schema": b"0"}), src / "trials.parquet")


def _missing_column(src: Path) -> None:
    src.mkdir()
    write_parquet(table([trial("a", 1, 1.0)], TRIALS).drop_columns(["kv_bytes_per_token"]), src / "trials.parquet")


def _wrong_type(src: Path) -> None:
    src.mkdir()
    tbl = table([trial("a", 1, 1.0)], TRIALS)
    tbl = tbl.set_column(tbl.schema.get_field_index("best_val_ppl"), "best_val_ppl", pa.array(["sixty"]))
    write_parquet(tbl, src / "trials.parquet")


def _epochs_other_version(src: Path) -> None:
    write_results(src, [trial("a", 1, 1.0)])
    pq.write_table(pa.table({"trial_id": ["a"]}).replace_schema_metadata({b"kvsweep_schema": b"99"}), src / "epochs.parquet")


def _not_parquet(src: Path) -> None:
    src.mkdir()
    (src / "trials.parquet").write_text("trial_id,status\na,completed\n")


def _other_files(src: Path) -> None:
    src.mkdir()
    (src / "README.md").write_text("hello")
    (src / "data.csv").write_text("a,b\n")


def _epochs_only(src: Path) -> None:
    src.mkdir()
    from kvsweep.results import EPOCH_SCHEMA

    write_parquet(table(curve("t", 2, 50.0), EPOCH_SCHEMA), src / "epochs.parquet")


def _no_trials(src: Path) -> None:
    write_results(src, [])


def _a_file(src: Path) -> None:
    src.write_text("not a folder")


@pytest.mark.parametrize("make, error, message", [
    (lambda src: None, NoResultsError, "no results at .*: no such folder"),
    (lambda src: src.mkdir(), NoResultsError, "is empty: no results yet"),
    (_a_file, NotResultsError, "is a file, not a results folder"),
    (_other_files, NotResultsError, r"not a kvsweep results folder: it has no trials.parquet \(it holds README.md, data.csv\)"),
    (_not_parquet, NotResultsError, "trials.parquet is not kvsweep results: not a Parquet file"),
    (_no_metadata, NotResultsError, "metadata has no kvsweep_schema"),
    (_other_version, SchemaError, "schema version '0', but this kvsweep reads versions " + ", ".join(f"'{v}'" for v in READABLE_VERSIONS)),
    (_epochs_other_version, SchemaError, "epochs.parquet has results schema version '99'"),
    (_missing_column, SchemaError, "lacks column.* kv_bytes_per_token"),
    (_wrong_type, SchemaError, "column types differ"),
    (_epochs_only, NoResultsError, "no trial has finished"),
    (_no_trials, NoResultsError, "holds no trials yet"),
], ids=["missing", "empty", "file", "other-files", "not-parquet", "no-metadata", "other-version", "epochs-other-version",
        "missing-column", "wrong-type", "epochs-only", "no-trials"])
def test_bad_input_is_a_clear_error_and_nothing_is_written(tmp_path, make, error, message):
    src = _bad(tmp_path, make)
    out = tmp_path / "reports" / "x"
    with pytest.raises(error, match=message) as e:
        build_report([src], out)
    assert isinstance(e.value, KvsweepError)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "reports").exists()
    assert_nothing_written(tmp_path, out, {"results"})


def test_no_sources_is_an_error(tmp_path):
    with pytest.raises(NoResultsError, match="no results given"):
        build_report([], tmp_path / "out")


def test_one_bad_source_among_good_ones_writes_nothing(hand_results, tmp_path):
    with pytest.raises(NoResultsError):
        build_report([hand_results, tmp_path / "missing"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_repeated_trial_rows_keep_the_last_and_say_so(tmp_path):
    src = write_results(tmp_path / "r", [trial("a", 500, 90.0), trial("b", 600, 50.0), trial("a", 500, 60.0)])
    r = load_results(str(src))
    assert r.trials.column("trial_id").to_pylist() == ["b", "a"]
    assert r.trials.column("best_val_ppl").to_pylist() == [50.0, 60.0]
    assert any("more than once" in n for n in r.notes)


# --- the CLI and the import boundary -----------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvsweep")
    add_parser(p.add_subparsers(dest="command", required=True))
    return p


def test_cli_handler_writes_the_report(hand_results, tmp_path, capsys):
    out = tmp_path / "reports" / "hand"
    args = _parser().parse_args(["report", str(hand_results), "-o", str(out), "--title", "Hand"])
    assert args.results == [str(hand_results)] and args.title == "Hand"
    assert args.func(args) == 0
    assert "report.html" in capsys.readouterr().out
    assert (out / "report.md").read_text().startswith("# Hand\n")


def test_cli_needs_results_and_out(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["report", "-o", "x"])
    with pytest.raises(SystemExit):
        _parser().parse_args(["report", "results"])


def test_cli_bad_input_raises_a_kvsweep_error(tmp_path):
    args = _parser().parse_args(["report", str(tmp_path / "nope"), "-o", str(tmp_path / "out")])
    with pytest.raises(KvsweepError, match="no such folder"):
        args.func(args)


def test_report_imports_neither_torch_nor_ray(tmp_path):
    """A whole report is made in a fresh interpreter without importing torch or ray."""
    code = textwrap.dedent(f"""
        import sys
        import kvsweep.report, kvsweep.report.cli
        from kvsweep.report.synthetic import write_synthetic
        src = write_synthetic({str(tmp_path / 'r')!r}, 50, running=2)
        kvsweep.report.build_report([src], {str(tmp_path / 'out')!r})
        bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray'))
        assert not bad, bad
        print('ok')
    """)
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_synthetic_sweep_of_many_trials(tmp_path):
    src = write_synthetic(tmp_path / "r", 2000, running=5, seed=3)
    out = build_report([src], tmp_path / "out")
    rows = read_csv(out / "frontier.csv")
    an = analyze(load_all([str(src)]))
    assert len(rows) == an.front.size > 3
    kv = np.array([float(r["kv_bytes_per_token"]) for r in rows])
    ppl = np.array([float(r["best_val_ppl"]) for r in rows])
    assert np.all(np.diff(kv) >= 0) and np.all(np.diff(ppl) <= 0)
    assert all(r["status"] != "error" for r in rows)
    assert "5 trials have epochs but no result" in (out / "report.md").read_text()


# The trials schema of results version 2 (b43f62f and before): V-DProj's options and the KA variant as fixed columns.
V2_TRIALS = pa.schema([
    ("trial_id", pa.string()), ("sweep", pa.string()), ("variant", pa.string()), ("adapters", pa.string()), ("rank", pa.int32()),
    ("target", pa.string()), ("init", pa.string()), ("ka", pa.string()), ("schedule", pa.string()), ("seed", pa.int64()),
    ("config", pa.string()), ("status", pa.string()), ("error", pa.string()), ("epochs_run", pa.int32()), ("max_epochs", pa.int32()),
    ("best_epoch", pa.int32()), ("best_val_ppl", pa.float64()), ("base_val_ppl", pa.float64()), ("init_val_ppl", pa.float64()),
    ("degradation_pct", pa.float64()), ("kv_bytes_per_token", pa.int64()), ("kv_bytes_per_token_accounted", pa.int64()),
    ("kv_bytes_per_token_base", pa.int64()), ("kv_ratio", pa.float64()), ("trainable_params", pa.int64()), ("total_params", pa.int64()),
    ("wall_seconds", pa.float64()), ("git_revision", pa.string()), ("finished_at", pa.string()),
])


def test_results_of_schema_version_2_still_make_a_report(tmp_path):
    src = tmp_path / "old"
    src.mkdir()
    rows = []
    for t in HAND_TRIALS:
        r = {k: v for k, v in t.items() if k in V2_TRIALS.names}
        ka = "ka_gated" if t["variant"].startswith("ka_gated") else None
        r.update(rank=t["vdproj.rank"], target=t["vdproj.target"], init=t["vdproj.init"], ka=ka)
        methods = ([{"name": "vdproj", "layers": None, "rank": t["vdproj.rank"], "target": "v", "init": "pca", "bias": True,
                     "calib_samples": 64}] if t["vdproj.rank"] is not None else []) + ([{"name": ka, "layers": [2, 3]}] if ka else [])
        r["config"] = json.dumps({"adapters": methods, "train": {"lr": 1e-4}})  # what version 2 stored: TrialCfg.to_dict()
        rows.append(r)
    tbl = pa.Table.from_pylist(rows, schema=V2_TRIALS).replace_schema_metadata({b"kvsweep_schema": b"2"})
    pq.write_table(tbl, src / "trials.parquet")
    out = tmp_path / "reports" / "old"
    assert cli_main(["report", str(src), "-o", str(out)]) == 0
    with open(out / "frontier.csv", newline="") as f:
        front = list(csv.DictReader(f))
    # version 2 stored each trial's whole config: t1 and t8 are one configuration (and seed), pooled into one point
    assert [r["trial_ids"] for r in front] == ["t1;t8", "t2", "t4"] and [r["n_seeds"] for r in front] == ["2", "1", "1"]
    assert [r["trial_id"] for r in front] == ["t1", "t2", "t4"]
    by_id = {r["trial_id"]: r for r in front}
    for t in HAND_TRIALS:
        if t["trial_id"] in by_id:
            row = by_id[t["trial_id"]]
            assert row["vdproj.rank"] == ("" if t["vdproj.rank"] is None else str(t["vdproj.rank"]))
            assert row["vdproj.bias"] == ("" if t["vdproj.rank"] is None else "True")  # every option, from the config
            assert row["family"] == ("ka" if t["vdproj.rank"] is None else "vdproj")
            if t["vdproj.rank"] is None:
                assert row["ka_gated.layers"] == "2,3" and row["options"] == "ka_gated"
    assert "vdproj rank=8 init=pca" in (out / "report.md").read_text()
