"""The results of a running sweep, kept readable at a constant cost per trial: ``ResultsWriter``, a Tune callback.

A trial's rows are final once it has ended (completed, stopped, failed): at the flush after its end they are
appended once, as a new part (``kvsweep.results.parts``; trials ending within ``part_every`` seconds share
one), and the writer forgets the trial. The trials still running (at most the sweep's concurrency) are
rewritten as the running part every ``every`` seconds. Every ``FAN_IN``
parts of one level are merged into one part of the next, up to ``MERGE_LEVELS`` times per row, so the folder
holds at most ``2 * FAN_IN`` parts plus one per ``FAN_IN ** MERGE_LEVELS`` trials. A flush therefore costs the
same after 10 trials as after 10,000 (the merges add a bounded number of rewrites per row); the driver
compacts everything into ``trials.parquet``, ``epochs.parquet`` and ``positions.parquet`` at the end
(``write_tables``). Each file is written atomically; a killed driver leaves parts that readers merge, and
the continued sweep rebuilds the tables from Tune's own records of every trial.

The writer keeps no state in Tune's experiment snapshots (``get_state`` is ``None``): only the running
trials' results, the finished trials not yet written and the list of its parts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
from ray import tune

from ..config import SweepCfg
from ..evaluate import SplitStats
from ..results.parts import FAN_IN, MERGE_LEVELS, TABLES, merge_sources, part_name, running_name
from ..train import git_revision
from .guard import StorageGuard
from .store import SweepStore, is_storage_full
from .writer import TrialRecord, build_tables, next_seq, parquet_bytes

__all__ = ["Part", "ResultsWriter"]


@dataclass
class Part:
    """A finished part this writer wrote: the flushes it covers, how often its rows were merged, its bytes."""

    first: int
    last: int
    level: int
    nbytes: int


class ResultsWriter(tune.Callback):
    """Appends each finished trial's rows once (at most every ``part_every`` seconds: the trials that ended
    meanwhile share a part) and rewrites the running trials' (at most every ``every`` seconds). ``records``: the trials of the sweep's earlier runs; the writer keeps
    those that may resume (unfinished or failed, with results), so that a resumed trial's rows hold its whole
    history. A write that fails for want of space stops the sweep through ``guard``.

    ``timings`` holds ``(trials written so far, seconds)`` per flush (what ``benchmarks/scale.py`` prints).
    """

    def __init__(self, sweep: SweepCfg, base_stats: SplitStats, store: SweepStore, *, guard: StorageGuard | None = None,
                 records: list[TrialRecord] | None = None, every: float = 10.0, part_every: float = 1.0, fan_in: int = FAN_IN,
                 log=print):
        self.sweep, self.base_stats, self.store, self.guard, self.every, self.part_every, self.fan_in, self.log = (
            sweep, base_stats, store, guard, every, part_every, fan_in, log)
        self.earlier = {r.trial_id: r for r in records or [] if r.results and (not r.finished or r.error)}
        self.running: dict[str, TrialRecord] = {}
        self.ended: dict[str, TrialRecord] = {}  # finished since the last flush that wrote a part
        self.parts: list[Part] = []
        self.written = 0  # finished trials appended
        self.timings: list[tuple[int, float]] = []
        self.revision = git_revision()
        self.seq = next_seq(store)
        self._base_bytes = guard.tables_bytes if guard is not None else 0
        self._running_bytes = 0
        self._last = self._last_part = 0.0

    def _record(self, trial) -> TrialRecord:
        tid = trial.trial_id
        rec = self.running.get(tid) or self.ended.pop(tid, None) or self.earlier.pop(tid, None)
        if rec is None:
            rec = TrialRecord(tid, dict(trial.config), finished=False)
        self.running[tid] = rec
        return rec

    def _end(self, trial) -> TrialRecord:
        rec = self._record(trial)
        self.ended[trial.trial_id] = self.running.pop(trial.trial_id)
        rec.finished = True
        return rec

    def on_trial_start(self, iteration, trials, trial, **info):
        rec = self._record(trial)
        rec.error, rec.finished = None, False  # a restarted or resumed trial runs again

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._record(trial).results.append(dict(result))
        self._flush()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial).error = "trial failed; see its error file"
        self._flush_ended()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trial)
        self._flush_ended()

    def on_step_end(self, iteration, trials, **info):
        self._flush_ended()

    def on_experiment_end(self, trials, **info):
        self.flush()

    def flush(self) -> None:
        """Write what is pending now (the ended trials' part and the running part)."""
        self._flush(force=True)

    def _flush_ended(self) -> None:
        """Append the ended trials' part, at most every ``part_every`` seconds (trials that end together share one).
        The running part is left as it is: a finished part's higher seq supersedes its rows of these trials."""
        if self.ended and time.monotonic() - self._last_part >= self.part_every:
            self._flush(force=True, running=False)

    def _flush(self, force: bool = False, running: bool = True) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.every:
            return
        t0 = time.perf_counter()
        try:
            self.seq += 1
            if self.ended:
                self._last_part = now
                tables = build_tables(list(self.ended.values()), self.sweep, self.base_stats, revision=self.revision)
                nbytes = self._write(tables, lambda t: part_name(t, self.seq, self.seq), self.seq)
                self.parts.append(Part(self.seq, self.seq, 0, nbytes))
                self.written += len(self.ended)
                self.ended.clear()  # their rows are on the storage: forgotten here
                self._merge()
            if running:
                self._last = now
                tables = build_tables(list(self.running.values()), self.sweep, self.base_stats, revision=self.revision)
                self._running_bytes = self._write(tables, running_name, self.seq)
            if self.guard is not None:
                self.guard.tables_bytes = self._base_bytes + self._running_bytes + sum(p.nbytes for p in self.parts)
        except Exception as e:  # never let bookkeeping stop the sweep, except a full disk; the final gather writes again
            if is_storage_full(e) and self.guard is not None:
                self.guard.stop(f"writing the results to {self.store.uri} failed: {e}")
            else:
                self.log(f"kvsweep: could not update partial results: {e}")
        self.timings.append((self.written, time.perf_counter() - t0))

    def _write(self, tables: dict[str, pa.Table], name, seq: int) -> int:
        total = 0
        for t in sorted(tables, key=lambda t: t == "trials"):  # trials last: no trial's row before its epochs
            data = parquet_bytes(tables[t], seq)
            self.store.write_bytes(name(t), data)
            total += len(data)
        return total

    def _merge(self) -> None:
        """Merge the last ``fan_in`` parts while they share a level below ``MERGE_LEVELS``."""
        while len(self.parts) >= self.fan_in:
            group = self.parts[-self.fan_in:]
            level = group[0].level
            if level >= MERGE_LEVELS or any(p.level != level for p in group):
                return
            sources = [(p.last, {t: self._read(part_name(t, p.first, p.last)) for t in TABLES}) for p in group]
            first, last = group[0].first, group[-1].last
            merged = merge_sources(sources)
            nbytes = self._write({t: merged[t] for t in TABLES if merged[t] is not None}, lambda t: part_name(t, first, last), last)
            for p in group:  # trials first: no trial's row without its epochs
                for t in TABLES:
                    self.store.delete(part_name(t, p.first, p.last))
            self.parts[-self.fan_in:] = [Part(first, last, level + 1, nbytes)]

    def _read(self, name: str) -> pa.Table | None:
        data = self.store.read_bytes(name)
        if data is None:
            return None
        return pq.read_table(pa.BufferReader(data))
