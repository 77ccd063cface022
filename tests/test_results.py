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
from kvsweep.evaluate import PositionStats
from kvsweep.results import (EPOCH_SCHEMA, POSITION_SCHEMA, BucketPPL, EpochMetrics, EpochReport, PositionMetrics, TrialConstants,
                             arrow_schema, bucket_key, epoch_table, position_metrics, reports_of, table)
from kvsweep.tune.writer import TrialRecord, build_tables

# The columns files of schema version "2" hold: a field renamed, retyped or dropped in EpochMetrics or PositionMetrics
# changes the schema and fails here, instead of becoming a null column that old and new files disagree on.
STORED_EPOCH_SCHEMA = pa.schema([
    ("trial_id", pa.string()), ("epoch", pa.int32()), ("train_ppl", pa.float64()), ("val_ppl", pa.float64()),
    ("loss", pa.float64()), ("loss_lm", pa.float64()), ("loss_rec", pa.float64()), ("loss_kl", pa.float64()),
    ("w_lm", pa.float64()), ("w_rec", pa.float64()), ("w_kl", pa.float64()), ("lr", pa.float64()), ("steps", pa.int64()),
    ("seconds", pa.float64()),
])
STORED_POSITION_SCHEMA = pa.schema([
    ("trial_id", pa.string()), ("lo", pa.int32()), ("hi", pa.int32()), ("tokens", pa.int64()), ("ppl", pa.float64()),
    ("base_ppl", pa.float64()), ("diff", pa.float64()), ("degradation_pct", pa.float64()),
])

CONSTANTS = TrialConstants(base_val_ppl=40.0, init_val_ppl=55.5, kv_bytes_per_token=768, kv_bytes_per_token_measured=768,
                           kv_ratio=0.75, trainable_params=1234, total_params=99_999, fixed_bytes=2468)


def _report(epoch: int, val_ppl: float, **kw) -> EpochReport:
    metrics = EpochMetrics(epoch=epoch, train_ppl=val_ppl * 0.9, val_ppl=val_ppl, loss=3.1, loss_lm=2.9, loss_rec=0.1, loss_kl=0.05,
                           w_lm=0.5, w_rec=0.5, w_kl=0.0, lr=1e-3, steps=8 * epoch, seconds=1.5)
    buckets = (BucketPPL(0, 16, val_ppl * 1.2), BucketPPL(16, 32, val_ppl * 0.8))
    return EpochReport(metrics, buckets, CONSTANTS, best_val_ppl=val_ppl, early_stopped=False, **kw)


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
    extras = {"best_val_ppl", "early_stopped", "first_step_at", "startup_seconds", "resumed"}
    assert set(flat) == names | extras | {bucket_key(0, 16), bucket_key(16, 32)}
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


def test_the_sweep_tables_have_epoch_0_from_the_init_and_the_same_best_epoch():
    base = PositionStats(np.full(31, math.log(40.0)), np.ones(31, dtype=np.int64))
    init_better = replace(CONSTANTS, init_val_ppl=10.0)  # the init is better than every trained epoch
    results = [replace(_report(1, 30.0), trial=init_better), replace(_report(2, 25.0), trial=init_better),
               replace(_report(2, 25.0), trial=init_better, resumed=True), replace(_report(3, 27.0), trial=init_better)]
    rows = pd.DataFrame([r.to_report() for r in results]).to_dict("records")
    failed = [EpochReport.failed(1, "loss is nan at epoch 1, step 2 of 8").to_report()]
    records = [TrialRecord("a", {"rank": 32, "schedule": "rec_to_lm"}, rows), TrialRecord("b", {"rank": 32}, failed)]
    tables = build_tables(records, _sweep(), base)
    trials = {r["trial_id"]: r for r in tables["trials"].to_pylist()}
    a = trials["a"]
    assert (a["status"], a["epochs_run"], a["best_epoch"], a["best_val_ppl"]) == ("completed", 3, 2, 25.0)  # not the init's
    assert a["init_val_ppl"] == 10.0 and a["kv_bytes_per_token"] == 768 and a["kv_bytes_per_token_base"] == 1024
    assert a["wall_seconds"] == 4.5
    epochs = [e for e in tables["epochs"].to_pylist() if e["trial_id"] == "a"]
    assert [e["epoch"] for e in epochs] == [0, 1, 2, 3]
    e0 = epochs[0]
    assert e0["val_ppl"] == 10.0 and e0["train_ppl"] is None and e0["loss"] is None and e0["steps"] == 0
    assert (e0["w_lm"], e0["w_rec"], e0["lr"]) == (0.0, 1.0, _sweep().train.lr)  # rec_to_lm starts on reconstruction
    assert [e["val_ppl"] for e in epochs[1:]] == [30.0, 25.0, 27.0]
    positions = [p for p in tables["positions"].to_pylist() if p["trial_id"] == "a"]
    assert [(p["lo"], p["hi"], p["ppl"]) for p in positions][:2] == [(0, 16, 25.0 * 1.2), (16, 32, 25.0 * 0.8)]
    b = trials["b"]
    assert b["status"] == "error" and "nan" in b["error"] and b["epochs_run"] == 0
    assert [e for e in tables["epochs"].to_pylist() if e["trial_id"] == "b"] == []  # nothing measured, not even the init
    assert tables["epochs"].schema.equals(EPOCH_SCHEMA)
    assert epoch_table([("x", EpochMetrics(epoch=0))]).schema.equals(EPOCH_SCHEMA)
