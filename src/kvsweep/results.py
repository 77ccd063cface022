"""Result tables in DESIGN.md's schema, written with pyarrow, atomically.

    trials.parquet     one row per trial: config, status, best/base PPL, KV bytes/token, parameters, time
    epochs.parquet     one row per trial and epoch: train/val PPL, loss components and weights
    positions.parquet  one row per trial and position bucket: PPL of the trial (best epoch) and of the base
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_path

SCHEMA_VERSION = "2"
"""Stored in each file's metadata as ``kvsweep_schema``; readers reject files of another version."""

TRIAL_SCHEMA = pa.schema([
    ("trial_id", pa.string()),
    ("sweep", pa.string()),
    ("variant", pa.string()),  # adapters and schedule, e.g. "vdproj+ka_gated / rec_to_lm"; rank and seed are separate
    ("adapters", pa.string()),  # "vdproj", "vdproj+ka_gated", "ka_residual", or "base"
    ("rank", pa.int32()),  # V-DProj rank; null without vdproj
    ("target", pa.string()),
    ("init", pa.string()),
    ("ka", pa.string()),  # the KA variant; null without one
    ("schedule", pa.string()),
    ("seed", pa.int64()),
    ("config", pa.string()),  # the full trial config as JSON
    ("status", pa.string()),  # completed | early_stopped | asha_stopped | error; running in files of a running sweep
    ("error", pa.string()),
    ("epochs_run", pa.int32()),
    ("max_epochs", pa.int32()),
    ("best_epoch", pa.int32()),
    ("best_val_ppl", pa.float64()),
    ("base_val_ppl", pa.float64()),
    ("init_val_ppl", pa.float64()),
    ("degradation_pct", pa.float64()),
    ("kv_bytes_per_token", pa.int64()),  # measured: what a latent-cache decode's cache tensors hold
    ("kv_bytes_per_token_accounted", pa.int64()),  # kvsweep.kvcache's accounting (equal, or the trial fails)
    ("kv_bytes_per_token_base", pa.int64()),
    ("kv_ratio", pa.float64()),
    ("trainable_params", pa.int64()),
    ("total_params", pa.int64()),
    ("wall_seconds", pa.float64()),
    ("git_revision", pa.string()),
    ("finished_at", pa.string()),  # ISO 8601, UTC
])
TRIAL_STATUSES = ("completed", "early_stopped", "asha_stopped", "error")

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
