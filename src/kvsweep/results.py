"""Result tables in DESIGN.md's schema, written with pyarrow, atomically.

    epochs.parquet     one row per trial and epoch: train/val PPL, loss components and weights
    positions.parquet  one row per trial and position bucket: PPL of the trial (best epoch) and of the base
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_path

EPOCH_SCHEMA = pa.schema([
    ("trial_id", pa.string()),
    ("epoch", pa.int32()),
    ("train_ppl", pa.float64()),
    ("val_ppl", pa.float64()),
    ("loss", pa.float64()),
    ("loss_lm", pa.float64()),
    ("loss_rec", pa.float64()),
    ("loss_kl", pa.float64()),
    ("w_lm", pa.float64()),
    ("w_rec", pa.float64()),
    ("w_kl", pa.float64()),
    ("lr", pa.float64()),
    ("steps", pa.int64()),
    ("seconds", pa.float64()),
])

POSITION_SCHEMA = pa.schema([
    ("trial_id", pa.string()),
    ("lo", pa.int32()),
    ("hi", pa.int32()),
    ("tokens", pa.int64()),
    ("ppl", pa.float64()),
    ("base_ppl", pa.float64()),
    ("diff", pa.float64()),
    ("degradation_pct", pa.float64()),
])


def table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Rows to a table of ``schema``; missing values are null, extra keys are an error."""
    names = set(schema.names)
    for row in rows:
        extra = set(row) - names
        if extra:
            raise ValueError(f"columns not in the schema: {sorted(extra)}")
    return pa.Table.from_pylist([{n: row.get(n) for n in schema.names} for row in rows], schema=schema)


def write_parquet(tbl: pa.Table, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(tbl, tmp)
