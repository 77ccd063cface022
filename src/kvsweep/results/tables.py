"""The result tables in DESIGN.md's schema, written with pyarrow, atomically: their schemas (the epochs' and the
positions' derived from the typed metrics, the trials' with one column per method option), the reader of older
versions, the rows of the typed metrics as tables, and what a scheduler saved."""

from __future__ import annotations

import json

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from ..atomic import atomic_path

from .metrics import ARROW_TYPES, EpochMetrics, PositionMetrics, arrow_schema

SCHEMA_VERSION = "4"
"""Stored in each file's metadata as ``kvsweep_schema``. Readers take this version and, through
``upgrade``, the older ones they know (``READABLE_VERSIONS``); any other is rejected. Version 4 added the test set:
``test_ppl``, ``base_test_ppl`` and ``eval_seq_len`` in trials, ``split`` in positions."""
READABLE_VERSIONS = ("2", "3", SCHEMA_VERSION)

TRIAL_SCHEMA = pa.schema([
    ("trial_id", pa.string()),
    ("sweep", pa.string()),
    ("variant", pa.string()),  # the methods' report labels and the schedule, e.g. "vdproj[v,pca]+ka_gated / rec_to_lm"
    ("adapters", pa.string()),  # the methods by name, e.g. "vdproj+ka_gated", or "base"
    ("family", pa.string()),  # their families, e.g. "vdproj+ka", or "base"
    ("options", pa.string()),  # the methods with the options that differ from their defaults: "vdproj rank=64 init=pca + ka_gated"
    # then one column "<method>.<option>" per option of every registered method (null where the trial does not
    # use the method), e.g. "vdproj.rank"; see ``trial_schema``
    ("schedule", pa.string()),
    ("seed", pa.int64()),
    ("config", pa.string()),  # the full trial config as JSON
    ("status", pa.string()),  # completed | early_stopped | asha_stopped | error; running in files of a running sweep
    ("error", pa.string()),
    ("epochs_run", pa.int32()),
    ("max_epochs", pa.int32()),
    ("best_epoch", pa.int32()),  # chosen on validation; 0: the adapters at init
    ("best_val_ppl", pa.float64()),
    ("base_val_ppl", pa.float64()),
    ("init_val_ppl", pa.float64()),
    ("test_ppl", pa.float64()),  # at the best epoch; null without a test set
    ("base_test_ppl", pa.float64()),
    ("eval_seq_len", pa.int64()),  # tokens per validation and test sample
    ("degradation_pct", pa.float64()),
    ("kv_bytes_per_token", pa.int64()),  # measured: what a latent-cache decode's cache tensors hold
    ("kv_bytes_per_token_accounted", pa.int64()),  # kvsweep.kvcache's accounting (equal, or the trial fails)
    ("kv_bytes_per_token_base", pa.int64()),
    ("kv_ratio", pa.float64()),
    ("fixed_bytes", pa.int64()),  # bytes the methods add that do not grow with the context (``Adapter.fixed_bytes``)
    ("trainable_params", pa.int64()),
    ("total_params", pa.int64()),
    ("wall_seconds", pa.float64()),
    ("git_revision", pa.string()),
    ("finished_at", pa.string()),  # ISO 8601, UTC
])
TRIAL_STATUSES = ("completed", "early_stopped", "asha_stopped", "error")


def trial_schema(option_columns: list[tuple[str, pa.DataType]]) -> pa.Schema:
    """``TRIAL_SCHEMA`` with the methods' option columns (``kvsweep.adapters.options.option_columns``) after ``options``."""
    at = TRIAL_SCHEMA.get_field_index("options") + 1
    fields = list(TRIAL_SCHEMA)
    return pa.schema(fields[:at] + [pa.field(n, t) for n, t in option_columns] + fields[at:])


def option_column_names(tbl: pa.Table | pa.Schema) -> list[str]:
    """The method option columns of a trials table: ``<method>.<option>``."""
    return [n for n in tbl.names if "." in n]


_V2_FAMILY = {"vdproj": "vdproj"}  # version 2 knew V-DProj and the KA variants (family "ka")


def upgrade(name: str, tbl: pa.Table, version: str) -> pa.Table:
    """A table of schema ``version`` (one of ``READABLE_VERSIONS``) in this version's columns.

    Version 2 (before methods declared their own columns) had V-DProj's ``rank``, ``target`` and ``init`` and
    the KA variant as ``ka``. Every option of every method a trial used is in its ``config`` (JSON): those
    become the ``<method>.<option>`` columns, and ``family`` and ``options`` are made from them.
    Versions 2 and 3 had no test set and no evaluation length of their own: their trials get null
    ``test_ppl``, ``base_test_ppl`` and ``eval_seq_len``, their position rows ``split`` "validation". Epochs did not
    change.

    Raises:
        ValueError: a version this kvsweep does not read, or a ``config`` that is not JSON.
    """
    if version not in READABLE_VERSIONS:
        raise ValueError(f"results schema version {version!r} cannot be read")
    if version == "2" and name == "trials":
        tbl = _trials_of_version_2(tbl)
    if version in ("2", "3"):
        tbl = _without_test_set(name, tbl)
    return tbl


def _without_test_set(name: str, tbl: pa.Table) -> pa.Table:
    """A trials or positions table of version 3 in version 4's columns (see ``upgrade``)."""
    if name == "positions" and "split" not in tbl.column_names:
        return tbl.append_column(pa.field("split", pa.string()), pa.array(["validation"] * tbl.num_rows, pa.string()))
    if name == "trials":
        for column in ("test_ppl", "base_test_ppl", "eval_seq_len"):
            if column not in tbl.column_names:
                field = TRIAL_SCHEMA.field(column)
                tbl = tbl.append_column(field, pa.nulls(tbl.num_rows, field.type))
    return tbl


def _trials_of_version_2(tbl: pa.Table) -> pa.Table:
    """A trials table of version 2 with the ``<method>.<option>`` columns, ``family`` and ``options`` (see ``upgrade``)."""
    rows = tbl.to_pylist()
    types: dict[str, pa.DataType] = {}
    for r in rows:
        for old in ("rank", "target", "init", "ka"):
            r.pop(old, None)
        methods = json.loads(r["config"]).get("adapters", []) if r.get("config") else []
        fams, desc = [], []
        for m in methods:
            method = m["name"]
            fams.append(_V2_FAMILY.get(method, "ka"))
            shown = [f"{k}={v}" for k, v in (("rank", m.get("rank")), ("target", m.get("target")), ("init", m.get("init")))
                     if v is not None and (k == "rank" or v not in ("v", "random"))]
            desc.append(" ".join([method, *shown]))
            for key, value in m.items():
                if key == "name":
                    continue
                column = f"{method}.{key}"
                r[column] = ",".join(str(v) for v in value) if isinstance(value, list) else value
                if r[column] is not None:
                    types.setdefault(column, ARROW_TYPES.get(type(r[column]), pa.string()))
        r["family"], r["options"] = "+".join(fams) or "base", " + ".join(desc) or "base"
    schema = trial_schema(sorted(types.items()))
    return pa.Table.from_pylist([{n: r.get(n) for n in schema.names} for r in rows], schema=schema)


EPOCH_SCHEMA = arrow_schema(EpochMetrics)
POSITION_SCHEMA = arrow_schema(PositionMetrics)

def epoch_table(rows: Iterable[tuple[str, EpochMetrics]]) -> pa.Table:
    """``epochs.parquet``'s table of (trial id, metrics) rows."""
    return _rows_table(rows, EPOCH_SCHEMA)


def position_table(rows: Iterable[tuple[str, PositionMetrics]]) -> pa.Table:
    """``positions.parquet``'s table of (trial id, metrics) rows."""
    return _rows_table(rows, POSITION_SCHEMA)


def _rows_table(rows: Iterable[tuple[str, Any]], schema: pa.Schema) -> pa.Table:
    """The one row builder of the per-trial tables: a trial id, then a dataclass's fields, as ``schema``'s columns."""
    return table([{"trial_id": trial_id, **{f.name: getattr(m, f.name) for f in fields(m)}} for trial_id, m in rows], schema)

def table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Rows to a table of ``schema``; missing values are null, extra keys are an error."""
    names = set(schema.names)
    for row in rows:
        extra = set(row) - names
        if extra:
            raise ValueError(f"columns not in the schema: {sorted(extra)}")
    return pa.Table.from_pylist([{n: row.get(n) for n in schema.names} for row in rows], schema=schema)


@dataclass(frozen=True)
class SchedulerSavings:
    """Epochs a sweep ran, and the epochs its scheduler saved by stopping trials early.

    ``run`` is the sum of ``epochs_run`` over all trials; ``saved`` the sum of ``max_epochs - epochs_run``
    over the trials the scheduler stopped (status ``asha_stopped``); ``without_scheduler = run + saved``,
    the epochs the same trials would have run had no trial been stopped by the scheduler.
    """

    run: int
    without_scheduler: int
    saved: int

    @property
    def saved_pct(self) -> float:
        """``100 * saved / without_scheduler`` in %, 0.0 when nothing ran."""
        return 100.0 * self.saved / self.without_scheduler if self.without_scheduler > 0 else 0.0


def scheduler_savings(rows: pa.Table | Iterable[Mapping[str, object]]) -> SchedulerSavings:
    """What the scheduler saved, from ``trials.parquet`` rows (a table, or dicts with ``status``, ``epochs_run``, ``max_epochs``).

    Only trials with status ``asha_stopped`` count as saved: a trial that early-stopped by its own
    patience, ended in error or is still running saved nothing by the scheduler. A null ``epochs_run``
    counts as 0 epochs run; a stopped trial without ``max_epochs`` saved nothing that can be counted.
    """
    if isinstance(rows, pa.Table):
        rows = rows.select(["status", "epochs_run", "max_epochs"]).to_pylist()
    run = saved = 0
    for r in rows:
        done = int(r["epochs_run"] or 0)
        run += done
        if r["status"] == "asha_stopped" and r["max_epochs"] is not None:
            saved += max(int(r["max_epochs"]) - done, 0)
    return SchedulerSavings(run=run, without_scheduler=run + saved, saved=saved)


def with_schema_version(tbl: pa.Table) -> pa.Table:
    """``tbl`` with ``kvsweep_schema`` (``SCHEMA_VERSION``) in its metadata, which readers check."""
    return tbl.replace_schema_metadata({**(tbl.schema.metadata or {}), b"kvsweep_schema": SCHEMA_VERSION.encode()})


def write_parquet(tbl: pa.Table, path: str | Path) -> None:
    """Write ``tbl`` with the schema version in its metadata, atomically."""
    with atomic_path(path) as tmp:
        pq.write_table(with_schema_version(tbl), tmp)
