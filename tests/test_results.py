"""The typed metrics of ``kvsweep.results``: the Parquet schemas are their fields, a report round-trips through
Tune's flat dicts (and through pandas, as Tune's result files come back), and the sweep's tables are built from them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from kvsweep.config import DataCfg, SweepCfg, TrainCfg
from kvsweep.evaluate import PositionStats, SplitStats
from kvsweep.results import (EPOCH_SCHEMA, POSITION_SCHEMA, BucketPPL, EpochMetrics, EpochReport, PositionMetrics, TrialConstants,
                             arrow_schema, bucket_key, epoch_table, position_metrics, reports_of, table)
from kvsweep.tune.writer import TrialRecord, build_tables

# The columns files of schema version "4" hold: a field renamed, retyped or dropped in EpochMetrics or PositionMetrics
# changes the schema and fails here, instead of becoming a null column that old and new files disagree on.
STORED_EPOCH_SCHEMA = pa.schema([
    ("trial_id", pa.string()), ("epoch", pa.int32()), ("train_ppl", pa.float64()), ("val_ppl", pa.float64()),
    ("loss", pa.float64()), ("loss_lm", pa.float64()), ("loss_rec", pa.float64()), ("loss_kl", pa.float64()),
    ("w_lm", pa.float64()), ("w_rec", pa.float64()), ("w_kl", pa.float64()), ("lr", pa.float64()), ("steps", pa.int64()),
    ("seconds", pa.float64()),
])
STORED_POSITION_SCHEMA = pa.schema([
    ("trial_id", pa.string()), ("lo", pa.int32()), ("hi", pa.int32()), ("tokens", pa.int64()), ("ppl", pa.float64()),
    ("base_ppl", pa.float64()), ("diff", pa.float64()), ("degradation_pct", pa.float64()), ("split", pa.string()),
])

CONSTANTS = TrialConstants(base_val_ppl=40.0, init_val_ppl=55.5, kv_bytes_per_token=768, kv_bytes_per_token_measured=768,
                           kv_ratio=0.75, trainable_params=1234, total_params=99_999, fixed_bytes=2468, base_test_ppl=42.0)


def _buckets(ppl: float) -> tuple[BucketPPL, ...]:
    return (BucketPPL(0, 16, ppl * 1.2), BucketPPL(16, 32, ppl * 0.8))


def _report(epoch: int, val_ppl: float, best: tuple[int, float, float] | None = None, **kw) -> EpochReport:
    """Epoch ``epoch``'s report; ``best``: (best epoch, its validation PPL, its test PPL), this epoch by default, with
    a test PPL 10% above the validation PPL."""
    metrics = EpochMetrics(epoch=epoch, train_ppl=val_ppl * 0.9, val_ppl=val_ppl, loss=3.1, loss_lm=2.9, loss_rec=0.1, loss_kl=0.05,
                           w_lm=0.5, w_rec=0.5, w_kl=0.0, lr=1e-3, steps=8 * epoch, seconds=1.5)
    best_epoch, best_val, best_test = best or (epoch, val_ppl, val_ppl * 1.1)
    return EpochReport(metrics, _buckets(val_ppl), CONSTANTS, best_val_ppl=best_val, early_stopped=False, best_epoch=best_epoch,
                       best_buckets=_buckets(best_val), test_ppl=best_test, test_buckets=_buckets(best_test), **kw)


def test_the_parquet_schemas_are_the_fields_of_the_metrics():
    assert EPOCH_SCHEMA.names == ["trial_id"] + [f.name for f in fields(EpochMetrics)]
    assert POSITION_SCHEMA.names == ["trial_id"] + [f.name for f in fields(PositionMetrics)]
    assert EPOCH_SCHEMA.equals(STORED_EPOCH_SCHEMA) and POSITION_SCHEMA.equals(STORED_POSITION_SCHEMA)


def test_a_renamed_field_changes_the_schema_instead_of_becoming_a_null():
    @dataclass(frozen=True)
    class Renamed:
        epoch: int = field(metadata={"arrow": pa.int32()})
        validation_ppl: float | None = None

    assert arrow_schema(Renamed).names == ["trial_id", "epoch", "validation_ppl"]
    with pytest.raises(TypeError, match="no Arrow type"):
        arrow_schema(_listy())
    # and a flat key that no field has is refused by the table builder, never dropped
    with pytest.raises(ValueError, match="validation_ppl"):
        table([{"trial_id": "a", "epoch": 1, "validation_ppl": 3.0}], EPOCH_SCHEMA)


def _listy():
    @dataclass
    class Listy:
        x: list[int]
    return Listy


def test_every_flat_name_is_a_field_or_a_bucket():
    flat = _report(2, 30.0, first_step_at=12.0, startup_seconds=3.0, resumed=True).to_report()
    names = {f.name for f in fields(EpochMetrics)} | {f.name for f in fields(TrialConstants)}
    extras = {"best_val_ppl", "best_epoch", "test_ppl", "early_stopped", "first_step_at", "startup_seconds", "resumed"}
    buckets = {bucket_key(lo, hi, prefix) for prefix in ("", "best_", "test_") for lo, hi in ((0, 16), (16, 32))}
    assert set(flat) == names | extras | buckets
    assert {"test_ppl", "base_test_ppl", "test_ppl_pos_0_16", "best_ppl_pos_16_32"} <= set(flat)  # the names the reports read
    assert set(EpochReport.failed(3, "loss is nan").to_report()) == {"epoch", "val_ppl", "trial_error"}


def test_a_report_round_trips_through_tunes_flat_dicts_and_pandas():
    reports = [_report(1, 30.0, first_step_at=12.25, startup_seconds=3.5), replace(_report(2, 29.0), early_stopped=True),
               replace(_report(2, 29.0), resumed=True), EpochReport.failed(3, "loss is nan at epoch 3")]
    for r in reports:
        assert EpochReport.from_report(r.to_report()) == r
    # Tune's result files come back through pandas: NaN for the keys a row lacks, numpy bools and floats
    rows = pd.DataFrame([r.to_report() for r in reports]).to_dict("records")
    assert math.isnan(rows[3]["loss"]) and math.isnan(rows[0]["resumed"]) and isinstance(rows[0]["epoch"], (int, np.integer))
    numpy_row = {**reports[1].to_report(), "early_stopped": np.bool_(True), "epoch": np.int64(2), "steps": np.float64(16.0)}
    assert EpochReport.from_report(numpy_row) == reports[1]  # numpy's scalars, as Tune's frames may hold them
    back = reports_of(rows)
    assert [b.epoch for b in back] == [1, 2, 2, 3] and all(type(b.epoch) is int for b in back)
    assert back[0] == reports[0] and back[1] == reports[1] and back[2] == reports[2]
    assert back[3].error == reports[3].error and back[3].val_ppl == math.inf and back[3].trial is None
    assert not back[0].resumed and back[2].resumed and back[1].early_stopped is True
    assert reports_of([{"timestamp": 1.0}]) == []  # a row without an epoch is no epoch's report


def test_position_rows_are_the_trials_buckets_against_the_bases():
    base = [{"lo": 0, "hi": 16, "tokens": 90, "ppl": 50.0}, {"lo": 16, "hi": 32, "tokens": 96, "ppl": 40.0}]
    rows = position_metrics([BucketPPL(0, 16, 60.0)], base)
    assert rows[0] == PositionMetrics(0, 16, 90, 60.0, 50.0, 10.0, 20.0)
    assert rows[1].lo == 16 and math.isnan(rows[1].ppl)  # a bucket the trial lacks: NaN, never dropped


def _sweep() -> SweepCfg:
    return SweepCfg(name="s", data=DataCfg(train_samples=64, val_samples=16, seq_len=32), train=TrainCfg(epochs=3))


def test_the_sweep_tables_take_the_best_epoch_its_test_ppl_and_epoch_0_from_the_reports():
    base = SplitStats(PositionStats(np.full(31, math.log(40.0)), np.ones(31, dtype=np.int64)),
                      PositionStats(np.full(31, math.log(42.0)), np.ones(31, dtype=np.int64)))
    init_better = replace(CONSTANTS, init_val_ppl=10.0)  # the init is better than every trained epoch: the best epoch is 0
    at_init = (0, 10.0, 11.5)
    results = [replace(_report(1, 30.0, at_init), trial=init_better), replace(_report(2, 25.0, at_init), trial=init_better),
               replace(_report(2, 25.0, at_init), trial=init_better, resumed=True), replace(_report(3, 27.0, at_init), trial=init_better)]
    trained = [_report(1, 30.0), _report(2, 25.0), _report(3, 27.0, (2, 25.0, 27.5))]
    rows = pd.DataFrame([r.to_report() for r in results]).to_dict("records")
    failed = [EpochReport.failed(1, "loss is nan at epoch 1, step 2 of 8").to_report()]
    records = [TrialRecord("a", {"rank": 32, "schedule": "rec_to_lm"}, rows), TrialRecord("b", {"rank": 32}, failed),
               TrialRecord("c", {"rank": 16}, pd.DataFrame([r.to_report() for r in trained]).to_dict("records"))]
    tables = build_tables(records, _sweep(), base)
    trials = {r["trial_id"]: r for r in tables["trials"].to_pylist()}
    a = trials["a"]
    assert (a["status"], a["epochs_run"], a["best_epoch"], a["best_val_ppl"], a["test_ppl"]) == ("completed", 3, 0, 10.0, 11.5)
    assert (a["base_val_ppl"], a["base_test_ppl"], a["eval_seq_len"]) == pytest.approx((40.0, 42.0, 32))
    assert a["init_val_ppl"] == 10.0 and a["kv_bytes_per_token"] == 768 and a["kv_bytes_per_token_base"] == 1024
    assert a["wall_seconds"] == 4.5
    c = trials["c"]
    assert (c["best_epoch"], c["best_val_ppl"], c["test_ppl"]) == (2, 25.0, 27.5)
    epochs = [e for e in tables["epochs"].to_pylist() if e["trial_id"] == "a"]
    assert [e["epoch"] for e in epochs] == [0, 1, 2, 3]
    e0 = epochs[0]
    assert e0["val_ppl"] == 10.0 and e0["train_ppl"] is None and e0["loss"] is None and e0["steps"] == 0
    assert (e0["w_lm"], e0["w_rec"], e0["lr"]) == (0.0, 1.0, _sweep().train.lr)  # rec_to_lm starts on reconstruction
    assert [e["val_ppl"] for e in epochs[1:]] == [30.0, 25.0, 27.0]
    positions = [p for p in tables["positions"].to_pylist() if p["trial_id"] == "a"]
    assert [(p["split"], p["lo"], p["hi"]) for p in positions] == [("validation", 0, 16), ("validation", 16, 32),
                                                                   ("test", 0, 16), ("test", 16, 32)]
    assert [(p["ppl"], p["base_ppl"]) for p in positions] == [pytest.approx((ppl, base)) for ppl, base in (
        (10.0 * 1.2, 40.0), (10.0 * 0.8, 40.0), (11.5 * 1.2, 42.0), (11.5 * 0.8, 42.0))]  # the init's buckets, on both sets
    b = trials["b"]
    assert b["status"] == "error" and "nan" in b["error"] and b["epochs_run"] == 0 and b["test_ppl"] is None
    assert [e for e in tables["epochs"].to_pylist() if e["trial_id"] == "b"] == []  # nothing measured, not even the init
    assert tables["epochs"].schema.equals(EPOCH_SCHEMA) and tables["positions"].schema.equals(POSITION_SCHEMA)
    assert epoch_table([("x", EpochMetrics(epoch=0))]).schema.equals(EPOCH_SCHEMA)


def test_a_trial_that_trains_nothing_is_completed_with_its_epoch_0():
    base = SplitStats(PositionStats(np.full(31, math.log(40.0)), np.ones(31, dtype=np.int64)))  # no test set
    init = replace(_report(0, 12.0), test_ppl=None, test_buckets=(), trial=replace(CONSTANTS, base_test_ppl=None))
    tables = build_tables([TrialRecord("z", {"rank": 32}, [init.to_report()])], _sweep(), base)
    z = tables["trials"].to_pylist()[0]
    assert (z["status"], z["epochs_run"], z["best_epoch"], z["test_ppl"], z["base_test_ppl"]) == ("completed", 0, 0, None, None)
    assert [e["epoch"] for e in tables["epochs"].to_pylist()] == [0]
    assert {p["split"] for p in tables["positions"].to_pylist()} == {"validation"}


def test_a_training_free_point_is_completed_at_its_epoch_0_with_its_own_max_epochs_and_variant():
    base = SplitStats(PositionStats(np.full(31, math.log(40.0)), np.ones(31, dtype=np.int64)))
    init = replace(_report(0, 12.0), test_ppl=None, test_buckets=(), trial=replace(CONSTANTS, base_test_ppl=None))
    trained = [_report(1, 30.0), _report(2, 25.0)]  # stopped by the scheduler after 2 of the sweep's 3 epochs
    weightless = replace(init, trial=replace(init.trial, trainable_params=0))  # a method without weights: evaluated at init only
    tables = build_tables([TrialRecord("free", {"rank": 32, "epochs": 0}, [init.to_report()]),
                           TrialRecord("t", {"rank": 32}, [r.to_report() for r in trained]),
                           TrialRecord("q", {"quant": "quant"}, [weightless.to_report()])], _sweep(), base)
    rows = {r["trial_id"]: r for r in tables["trials"].to_pylist()}
    free, t, q = rows["free"], rows["t"], rows["q"]
    assert (free["status"], free["max_epochs"], free["variant"]) == ("completed", 0, "vdproj[v,random] / training-free")
    assert (t["status"], t["max_epochs"], t["variant"]) == ("asha_stopped", 3, "vdproj[v,random] / lm")
    assert (q["status"], q["max_epochs"], q["variant"]) == ("completed", 0, "quant[kv,4b,G32,R128] / training-free")  # as with epochs 0


def test_a_points_epochs_are_at_most_the_sweeps():
    from kvsweep.config import ConfigError
    from kvsweep.tune.space import trial_cfg

    assert trial_cfg({"rank": 8, "epochs": 0}, _sweep()).train.epochs == 0 and trial_cfg({"rank": 8}, _sweep()).train.epochs == 3
    for bad in (4, -1, 1.5, True):
        with pytest.raises(ConfigError, match=r"epochs must be a whole number in 0\.\.3"):
            trial_cfg({"rank": 8, "epochs": bad}, _sweep())


def test_results_of_version_3_are_read_with_nulls_for_the_test_set(tmp_path):
    import pyarrow.parquet as pq

    from kvsweep.report.load import load_results
    from kvsweep.results import TRIAL_SCHEMA

    v3_trials = pa.schema([f for f in TRIAL_SCHEMA if f.name not in ("test_ppl", "base_test_ppl", "eval_seq_len")])
    row = {"trial_id": "t1", "sweep": "old", "variant": "vdproj[v] / lm", "adapters": "vdproj", "family": "vdproj",
           "options": "vdproj rank=32", "status": "completed", "epochs_run": 3, "max_epochs": 3, "best_epoch": 2,
           "best_val_ppl": 30.0, "base_val_ppl": 25.0, "kv_bytes_per_token": 768}
    positions = STORED_POSITION_SCHEMA.remove(STORED_POSITION_SCHEMA.get_field_index("split"))
    for name, tbl in (("trials", table([row], v3_trials)),
                      ("positions", table([{"trial_id": "t1", "lo": 0, "hi": 16, "tokens": 90, "ppl": 31.0, "base_ppl": 26.0}], positions))):
        pq.write_table(tbl.replace_schema_metadata({b"kvsweep_schema": b"3"}), tmp_path / f"{name}.parquet")
    r = load_results(str(tmp_path))
    t = r.trials.to_pylist()[0]
    assert (t["best_val_ppl"], t["test_ppl"], t["base_test_ppl"], t["eval_seq_len"]) == (30.0, None, None, None)
    assert r.positions.column("split").to_pylist() == ["validation"] and r.positions.schema.equals(POSITION_SCHEMA)
