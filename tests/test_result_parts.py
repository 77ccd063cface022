"""The results of a running sweep as parts: a finished trial's rows appended once, the running trials rewritten,
readers (the report, ``kvsweep compact``) seeing every trial once, and the compacted tables equal to
``build_tables`` over every trial. Synthetic trial records, the writer driven as Tune drives it; no Ray workers."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kvsweep.cli import main
from kvsweep.config import DataCfg, SweepCfg, TrainCfg
from kvsweep.evaluate import PositionStats, SplitStats
from kvsweep.report.compact import compact_results
from kvsweep.report.load import load_results
from kvsweep.results import BucketPPL, EpochMetrics, EpochReport, TrialConstants
from kvsweep.results.parts import PARTS, merge_sources, parse_part, running_name, with_seq
from kvsweep.tune.partwriter import ResultsWriter
from kvsweep.tune.store import SweepStore
from kvsweep.tune.trainable import stub_reports
from kvsweep.tune.writer import TrialRecord, build_tables, write_tables

SWEEP = SweepCfg(name="s", data=DataCfg(train_samples=64, val_samples=16, seq_len=32), train=TrainCfg(epochs=3))
BASE = SplitStats(PositionStats(np.full(31, math.log(40.0)), np.ones(31, dtype=np.int64)),
                  PositionStats(np.full(31, math.log(42.0)), np.ones(31, dtype=np.int64)))
CONSTANTS = TrialConstants(base_val_ppl=40.0, init_val_ppl=55.5, kv_bytes_per_token=768, kv_bytes_per_token_measured=768,
                           kv_ratio=0.75, trainable_params=1234, total_params=99_999, fixed_bytes=2468, base_test_ppl=42.0)


def _result(epoch: int, ppl: float, stop: bool = False) -> dict:
    buckets = (BucketPPL(0, 16, ppl * 1.2), BucketPPL(16, 32, ppl * 0.8))
    metrics = EpochMetrics(epoch=epoch, train_ppl=ppl, val_ppl=ppl, loss=3.0, w_lm=1.0, w_rec=0.0, w_kl=0.0, lr=1e-3, steps=4 * epoch,
                           seconds=0.5)
    rep = EpochReport(metrics, buckets, CONSTANTS, best_val_ppl=ppl, early_stopped=stop, best_epoch=epoch, best_buckets=buckets,
                      test_ppl=ppl * 1.1, test_buckets=buckets)
    return {**rep.to_report(), "timestamp": 1_700_000_000 + epoch}


def _trial(i: int) -> SimpleNamespace:
    return SimpleNamespace(trial_id=f"t{i:04d}", config={"rank": [16, 32, 64][i % 3], "seed": i})


class Sweep:
    """A writer driven as Tune drives it, and the records ``build_tables`` gets at the sweep's end."""

    def __init__(self, folder: Path, **kw):
        self.store = SweepStore(str(folder), "s")
        self.writer = ResultsWriter(SWEEP, BASE, self.store, every=3600, part_every=0, log=pytest.fail, **kw)
        self.records: dict[str, TrialRecord] = {}

    def start(self, i: int) -> None:
        t = _trial(i)
        self.writer.on_trial_start(0, [], t)
        self.records[t.trial_id] = TrialRecord(t.trial_id, t.config, finished=False)

    def report(self, i: int, epoch: int) -> None:
        t, r = _trial(i), _result(epoch, 50.0 - epoch - i / 100)
        self.writer.on_trial_result(0, [], t, r)
        self.records[t.trial_id].results.append(r)

    def end(self, i: int, error: bool = False) -> None:
        t = _trial(i)
        rec = self.records[t.trial_id]
        rec.finished = True
        if error:
            rec.error = "trial failed; see its error file"
            self.writer.on_trial_error(0, [], t)
        else:
            self.writer.on_trial_complete(0, [], t)

    def run(self, trials: range, epochs: int = 2) -> None:
        for i in trials:
            self.start(i)
            for e in range(1, epochs + 1):
                self.report(i, e)
            self.end(i, error=i % 7 == 6)

    def expected(self) -> dict[str, pa.Table]:
        return build_tables(list(self.records.values()), SWEEP, BASE, revision=self.writer.revision)


def _rows(tbl: pa.Table | None, keys=("trial_id", "epoch", "split", "lo")) -> list[dict]:
    rows = tbl.to_pylist() if tbl is not None else []
    return sorted(rows, key=lambda r: tuple(str(r.get(k)) for k in keys))


def _same(results, expected: dict[str, pa.Table]) -> None:
    for name in ("trials", "epochs", "positions"):
        got = getattr(results, name)
        assert _rows(got.select(expected[name].column_names)) == _rows(expected[name]), name


def _part_rows(folder: Path, table: str = "trials") -> list[str]:
    """Trial ids in the finished parts, one entry per row."""
    return [i for p in sorted((folder / PARTS).glob(f"{table}-*.parquet")) if parse_part(p.name)
            for i in pq.read_table(p).column("trial_id").to_pylist()]


def test_a_finished_trial_is_appended_once_and_forgotten_and_the_running_ones_rewritten(tmp_path):
    s = Sweep(tmp_path)
    for i in range(3):
        s.start(i)
        s.report(i, 1)
    s.end(1)
    folder = tmp_path / "s"
    assert _part_rows(folder) == ["t0001"]
    s.writer.flush()  # the running trials' flush (throttled)
    assert sorted(pq.read_table(folder / running_name("trials")).column("trial_id").to_pylist()) == ["t0000", "t0002"]
    assert set(s.writer.running) == {"t0000", "t0002"} and not s.writer.ended  # the finished trial's history is gone
    s.report(0, 2)
    s.end(0)
    assert _part_rows(folder) == ["t0001", "t0000"]  # appended, not rewritten
    assert load_results(str(folder)).trials.num_rows == 3  # the running part still lists t0000: its newer part wins
    s.writer.flush()
    assert pq.read_table(folder / running_name("trials")).column("trial_id").to_pylist() == ["t0002"]
    assert not (folder / "trials.parquet").exists()
    _same(load_results(str(folder)), s.expected())  # a reader during the run sees every trial once
    assert s.writer.get_state() is None  # nothing of this goes into Tune's experiment snapshots


def test_parts_merge_so_that_files_stay_few_and_every_trial_is_in_one_part(tmp_path):
    s = Sweep(tmp_path, fan_in=4)
    s.run(range(70))
    folder = tmp_path / "s"
    ids = _part_rows(folder)
    assert sorted(ids) == sorted(s.records) and len(ids) == 70  # each finished trial once
    parts = [parse_part(p.name) for p in (folder / PARTS).glob("trials-*.parquet") if parse_part(p.name)]
    assert len(parts) <= 2 * 4 + 70 // 16 + 1  # merged twice at most: 16 trials per part of the top level
    assert max(last - first for _t, first, last in parts) >= 15
    assert len(_part_rows(folder, "epochs")) == 70 * 3  # epochs 0..2 of every trial, the failed ones too
    _same(load_results(str(folder)), s.expected())


def test_the_final_tables_equal_build_tables_and_replace_the_parts(tmp_path):
    s = Sweep(tmp_path, fan_in=4)
    s.run(range(20))
    s.start(20)
    s.report(20, 1)  # still running at the end (a stopped sweep)
    folder = tmp_path / "s"
    write_tables(s.expected(), s.store)
    assert not list((folder / PARTS).glob("*.parquet"))
    results = load_results(str(folder))
    _same(results, s.expected())
    assert not any("parts" in n for n in results.notes)
    again = Sweep(tmp_path, fan_in=4)  # a continued sweep: its flushes come after the compacted tables
    assert again.writer.seq > s.writer.seq


def test_compact_merges_a_killed_sweeps_parts_into_the_tables_build_tables_gives(tmp_path, capsys):
    s = Sweep(tmp_path, fan_in=4)
    s.run(range(30))
    write_tables(s.expected(), s.store)  # an earlier run's end
    s2 = Sweep(tmp_path, fan_in=4)  # the next run, killed after these
    s2.records = s.records
    s2.run(range(30, 45))
    s2.start(45)
    s2.report(45, 1)
    s2.writer.flush()  # its throttled flush, then the kill
    folder = tmp_path / "s"
    assert load_results(str(folder)).trials.num_rows == 46
    assert main(["compact", str(folder)]) == 0
    assert "46 trials" in capsys.readouterr().out
    assert not list((folder / PARTS).glob("*.parquet"))
    _same(load_results(str(folder)), s2.expected())
    assert compact_results(str(folder)).files == 0  # nothing left to merge


def test_readers_take_each_trials_rows_from_its_newest_source_only(tmp_path):
    s = Sweep(tmp_path)
    s.start(0)
    s.report(0, 1)
    s.end(0, error=True)  # failed after epoch 1; then resumed (a continued sweep) and running again
    s.start(1)
    s.report(1, 1)
    s.end(1)
    s.start(0)
    s.report(0, 1)
    s.report(0, 2)
    s.writer.flush()
    results = load_results(str(tmp_path / "s"))
    rows = {r["trial_id"]: r for r in results.trials.to_pylist()}
    assert results.trials.num_rows == 2 and rows["t0000"]["status"] == "running"
    assert sorted(e["epoch"] for e in results.epochs.to_pylist() if e["trial_id"] == "t0000") == [0, 1, 2]  # not the old part's too


def test_merge_sources_keeps_the_newest_sources_rows_and_the_union_of_option_columns():
    def src(seq, ids, extra=None):
        trials = pa.table({"trial_id": ids, "status": [f"s{seq}"] * len(ids), **({extra: [1] * len(ids)} if extra else {})})
        epochs = pa.table({"trial_id": [i for i in ids for _ in range(2)], "epoch": [e for _ in ids for e in (1, 2)],
                           "seq": [seq] * 2 * len(ids)})
        return seq, {"trials": with_seq(trials, seq), "epochs": epochs, "positions": None}

    orphan = (9, {"trials": None, "epochs": pa.table({"trial_id": ["z"], "epoch": [1], "seq": [9]}), "positions": None})
    out = merge_sources([src(5, ["a", "b"], "x.rank"), src(2, ["a", "c"]), orphan, src(7, ["b"], "y.bits")])
    assert sorted((r["trial_id"], r["status"]) for r in out["trials"].to_pylist()) == [("a", "s5"), ("b", "s7"), ("c", "s2")]
    assert {"x.rank", "y.bits"} <= set(out["trials"].column_names)
    assert sorted((r["trial_id"], r["seq"]) for r in out["epochs"].to_pylist()) == [
        ("a", 5), ("a", 5), ("b", 7), ("b", 7), ("c", 2), ("c", 2), ("z", 9)]
    assert out["positions"] is None


def test_trials_ending_together_share_a_part_and_the_experiments_end_writes_what_is_pending(tmp_path):
    s = Sweep(tmp_path)
    s.writer.part_every = 3600
    s.run(range(2))  # the first trial's part is written at once (no part for an hour before it); the second waits
    folder = tmp_path / "s"
    assert _part_rows(folder) == ["t0000"]
    s.run(range(2, 4))
    s.writer.on_step_end(0, [])
    assert _part_rows(folder) == ["t0000"] and set(s.writer.ended) == {"t0001", "t0002", "t0003"}
    s.writer.on_experiment_end([])
    assert sorted(_part_rows(folder)) == ["t0000", "t0001", "t0002", "t0003"] and len(list((folder / PARTS).glob("trials-0*"))) == 2
    _same(load_results(str(folder)), s.expected())


def test_the_benchmark_stub_trial_reports_what_a_trial_reports():
    sweep = replace(SWEEP, benchmark_stub_epoch_seconds=0.0)
    results = [r.to_report() for r in stub_reports({"rank": 32, "seed": 1}, sweep, BASE)]
    tables = build_tables([TrialRecord("x", {"rank": 32, "seed": 1}, results)], sweep, BASE)
    row = tables["trials"].to_pylist()[0]
    assert (row["status"], row["epochs_run"]) == ("completed", 3) and row["test_ppl"] > 0 and row["kv_bytes_per_token"] > 0
    assert [e["epoch"] for e in tables["epochs"].to_pylist()] == [0, 1, 2, 3]
    assert {p["split"] for p in tables["positions"].to_pylist()} == {"validation", "test"}
    assert results == [r.to_report() for r in stub_reports({"rank": 32, "seed": 1}, sweep, BASE)]  # the same for the same config


def test_a_trial_of_a_sweep_with_only_parts_is_found_for_export_and_downstream(tmp_path):
    from kvsweep.latent.trial import UnknownTrialError, find_trial

    s = Sweep(tmp_path)
    s.run(range(3))
    s.start(3)
    s.report(3, 1)
    s.writer.flush()  # a running sweep: its trials are in parts/ only
    folder = tmp_path / "s"
    assert not (folder / "trials.parquet").exists()
    for i in (1, 3):  # a finished trial and a running one
        rec = find_trial(folder, f"t{i:04d}")
        assert rec.trial_id == f"t{i:04d}" and rec.sweep == "s" and rec.config["train"]["seed"] == i
    with pytest.raises(UnknownTrialError, match="t0000"):
        find_trial(folder, "nope")
