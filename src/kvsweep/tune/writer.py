"""A sweep's result tables: built from what Tune knows of each trial, kept current while the sweep runs.

``build_tables`` turns trial records (a trial's config, every result it reported, its error) into
``trials``, ``epochs`` and ``positions`` tables of DESIGN.md's schema, each trial exactly once. A trial's
results are read back as typed ``EpochReport``s; its epoch 0 (the adapters at init, never reported to Tune
on its own, so that the scheduler counts epochs as before, unless the trial trains nothing) is written from
the ``init_val_ppl`` its reports carry. Its best epoch (chosen on validation by the trial, the init included)
with the best epoch's validation and test PPL comes from its last report, which carries the best so far.
``write_tables`` writes them compacted, replacing the parts ``kvsweep.tune.partwriter.ResultsWriter`` appends
while the sweep runs (``kvsweep.results.parts``); ``records_from`` reads
the records of a Tune experiment back from its folder (the trials' own result files), which is how a
continued or grown sweep gets the trials of its earlier runs.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
from ray.tune import ExperimentAnalysis

from ..config import SweepCfg, position_buckets
from ..evaluate import SplitStats
from ..adapters.options import method_columns, option_columns
from ..results import (EpochReport, epoch_table, is_true, position_metrics, position_table, reports_of, table, trial_schema,
                       with_schema_version)
from ..train import git_revision, init_metrics
from ..results.parts import PARTS, parse_part, running_name, seq_of, with_seq
from .guard import error_text
from .space import schedule_label, trial_cfg
from .store import SweepStore

@dataclass
class TrialRecord:
    """What Tune knows of one trial: its config, every result it reported, and its error, if any."""

    trial_id: str
    config: dict
    results: list[dict] = field(default_factory=list)
    error: str | None = None
    finished: bool = True  # False while Tune still runs (or may resume) the trial


__all__ = ["TrialRecord", "build_tables", "has_experiment", "is_true", "load_records", "next_seq", "parquet_bytes",
           "records_from", "trial_status", "write_tables"]
_ASK = object()  # build_tables: look the git revision up


def trial_status(reports: list[EpochReport], max_epochs: int, *, error: str | None = None, finished: bool = True) -> tuple[str, str | None]:
    """A trial's status in ``trials.parquet`` (``completed``, ``early_stopped``, ``asha_stopped``, ``error``, ``running``)
    and its error, from its reports (in order), its ``max_epochs``, the error Tune recorded and whether Tune ended it."""
    last = reports[-1] if reports else None
    if last is not None and last.error:
        return "error", last.error
    if error:
        return "error", error
    if not finished:
        return "running", None
    if last is not None and last.early_stopped:
        return "early_stopped", None
    if (last.epoch if last is not None else 0) >= max_epochs:
        return "completed", None
    if last is not None and last.epoch == 0 and last.early_stopped is False:  # a trial that trains nothing: its epoch 0
        return "completed", None
    return "asha_stopped", None


def _finished_at(rec: TrialRecord) -> str | None:
    """When the trial last reported (ISO 8601, UTC), from Tune's ``timestamp``; ``None`` if it never did."""
    stamps = [r["timestamp"] for r in rec.results if isinstance(r.get("timestamp"), (int, float)) and r["timestamp"] == r["timestamp"]]
    if not stamps:
        return None
    return dt.datetime.fromtimestamp(max(stamps), dt.timezone.utc).isoformat(timespec="seconds")


def build_tables(records: list[TrialRecord], sweep: SweepCfg, base_stats: SplitStats, *, revision=_ASK) -> dict[str, pa.Table]:
    """trials, epochs and positions tables of DESIGN.md's schema; each trial exactly once. ``revision``: the
    ``git_revision`` column (looked up, two ``git`` processes, unless given)."""
    ranges = position_buckets(sweep.data.eval_len, None)
    base_buckets = base_stats.val.buckets(ranges)
    base_test_buckets = base_stats.test.buckets(ranges) if base_stats.test is not None else None
    base_ppl = base_stats.val.ppl
    trials, epochs, positions = [], [], []
    revision = git_revision() if revision is _ASK else revision
    seen: set[str] = set()
    for rec in sorted(records, key=lambda r: r.trial_id):  # a stable order, whatever order Tune gives
        if rec.trial_id in seen:
            continue
        seen.add(rec.trial_id)
        cfg = trial_cfg(rec.config, sweep)
        reports = reports_of(rec.results)
        by_epoch: dict[int, EpochReport] = {}
        for r in reports:
            if r.error:
                continue
            if not (r.resumed and r.epoch in by_epoch):
                by_epoch[r.epoch] = r  # a restarted trial's repeated epoch counts once
        history = [by_epoch[e] for e in sorted(by_epoch)]
        status, error = trial_status(reports, cfg.train.epochs, error=rec.error, finished=rec.finished)
        best = history[-1] if history else None  # each report carries the best epoch so far
        last = history[-1].trial if history else None
        schedule = schedule_label(cfg, last.trainable_params if last is not None else None)
        init_val_ppl = last.init_val_ppl if last is not None and last.init_val_ppl is not None else math.nan
        trials.append({
            "trial_id": rec.trial_id, "sweep": sweep.name, **method_columns(cfg.adapters, schedule),
            "schedule": cfg.loss.name, "seed": cfg.train.seed,
            "config": _config_json(cfg), "status": status, "error": error,
            "epochs_run": len([h for h in history if h.epoch > 0]), "max_epochs": 0 if schedule == "training-free" else cfg.train.epochs,
            "best_epoch": best.best_epoch if best else None,
            "best_val_ppl": best.best_val_ppl if best else math.nan,
            "base_val_ppl": base_ppl,
            "init_val_ppl": init_val_ppl,
            "test_ppl": best.test_ppl if best else None,
            "base_test_ppl": base_stats.test.ppl if base_stats.test is not None else None,
            "eval_seq_len": sweep.data.eval_len,
            "degradation_pct": 100 * (best.best_val_ppl - base_ppl) / base_ppl if best else math.nan,
            "kv_bytes_per_token": (last.kv_bytes_per_token if last.kv_bytes_per_token_measured is None else last.kv_bytes_per_token_measured)
            if last is not None else None,  # results of a kvsweep that did not measure: the accounting
            "kv_bytes_per_token_accounted": last.kv_bytes_per_token if last is not None else None,
            "kv_bytes_per_token_base": round(last.kv_bytes_per_token / last.kv_ratio) if last is not None else None,
            "kv_ratio": last.kv_ratio if last is not None else None,
            "fixed_bytes": last.fixed_bytes if last is not None else None,
            "trainable_params": last.trainable_params if last is not None else None,
            "total_params": last.total_params if last is not None else None,
            "wall_seconds": float(sum(h.metrics.seconds if h.metrics.seconds is not None else 0.0 for h in history)),
            "git_revision": revision,
            "finished_at": _finished_at(rec),
        })
        if history and math.isfinite(init_val_ppl) and 0 not in by_epoch:  # epoch 0: the adapters at init
            epochs.append((rec.trial_id, init_metrics(cfg, init_val_ppl)))
        epochs += [(rec.trial_id, h.metrics) for h in history]
        if best:
            positions += [(rec.trial_id, p) for p in position_metrics(best.best_buckets, base_buckets)]
            if base_test_buckets is not None and best.test_buckets:
                positions += [(rec.trial_id, p) for p in position_metrics(best.test_buckets, base_test_buckets, "test")]
    return {"trials": table(trials, trial_schema(option_columns())), "epochs": epoch_table(epochs), "positions": position_table(positions)}


def _config_json(cfg) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True)


def parquet_bytes(tbl: pa.Table, seq: int | None = None) -> bytes:
    """``tbl`` as a Parquet file, with the schema version (and the flush ``seq`` that writes it) in its metadata."""
    sink = pa.BufferOutputStream()
    pq.write_table(with_schema_version(tbl if seq is None else with_seq(tbl, seq)), sink)
    return sink.getvalue().to_pybytes()


def write_tables(tables: dict[str, pa.Table], store: SweepStore, seq: int | None = None) -> int:
    """Write each table as ``<name>.parquet`` in the sweep's folder, each atomically and marked as flush ``seq``
    (default: after every file there, so that it supersedes them), then remove the parts it replaces (those
    listed before it was written); the bytes written.

    Raises:
        OSError: a local write failed (a full disk: ``is_storage_full``); the parts are then kept.
        StorageError: an object store refused a write.
    """
    parts = [n for n in store.names(PARTS) if n.endswith(".parquet")]
    seq = next_seq(store, parts) if seq is None else seq
    total = 0
    for name in sorted(tables, key=lambda n: n == "trials"):  # trials last: a reader never sees a trial's row before its epochs
        data = parquet_bytes(tables[name], seq)
        store.write_bytes(f"{name}.parquet", data)
        total += len(data)
    for name in sorted(parts, key=lambda n: not n.startswith("trials-")):  # trials first: no trial's row without its epochs
        store.delete(f"{PARTS}/{name}")
    return total


def next_seq(store: SweepStore, parts: list[str] | None = None) -> int:
    """The flush after every file in the sweep's folder: above the compacted tables' seq and every part's."""
    parts = [n for n in store.names(PARTS)] if parts is None else parts
    seqs = [p[2] for p in map(parse_part, parts) if p is not None]
    for name in ("trials.parquet", running_name("trials")):
        try:
            with store.fs.open_input_file(store.path(name)) as f:
                seqs.append(seq_of(pq.read_metadata(f).metadata))
        except (OSError, pa.ArrowException):  # not there (or not Parquet): nothing to be above
            pass
    return max(seqs, default=-1) + 1


def records_from(analysis: ExperimentAnalysis) -> list[TrialRecord]:
    """The records of a Tune experiment's trials: configs, every reported result, errors, and whether
    Tune finished them (TERMINATED or ERROR) or may still resume them."""
    out = []
    for trial in analysis.trials:
        df = analysis.trial_dataframes.get(trial.trial_id)
        rows = df.to_dict("records") if df is not None and len(df) else ([dict(trial.last_result)] if trial.last_result else [])
        error = None
        if trial.status == "ERROR":
            error = _error_line(trial)
        out.append(TrialRecord(str(trial.trial_id), dict(trial.config), rows, error, trial.status in ("TERMINATED", "ERROR")))
    return out


def _error_line(trial) -> str:
    """The last line of the error Tune recorded for a failed trial."""
    lines = error_text(trial).strip().splitlines()
    return lines[-1] if lines else "trial failed; see its error file"


def load_records(store: SweepStore, folder: str) -> list[TrialRecord]:
    """The trial records of the Tune experiment in ``<sweep>/<folder>``; none when it has no state yet."""
    if not has_experiment(store, folder):
        return []
    analysis = ExperimentAnalysis(store.path(folder), storage_filesystem=store.fs)
    return records_from(analysis)


def has_experiment(store: SweepStore, folder: str) -> bool:
    """Whether ``<sweep>/<folder>`` holds a Tune experiment's state (a run that can be resumed or read)."""
    return any(n.startswith("experiment_state-") and n.endswith(".json") for n in store.names(folder))
