"""Stop a sweep cleanly before its storage runs out of space.

A full disk in the middle of a sweep fails every trial's checkpoint upload (and their restarts), and
can leave Tune's experiment state half-written. ``StorageGuard`` watches the free space of local
storage and stops the sweep while there is still room for what a stop writes: the checkpoints in
flight, Tune's experiment state and the result tables. It stops through Tune's own graceful stop (the
one Ctrl+C or SIGUSR1 triggers): unfinished trials stay unfinished, so freeing space and running the same
command continues them. A write that fails for want of space anywhere in the driver stops the sweep the
same way.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import pyarrow.fs as pafs
from ray import tune

from .store import StorageFullError, SweepStore

MIN_FREE_BYTES = 8 << 20  # what a stop itself writes (experiment state, tables, sweep files), with a margin
CHECKPOINTS_IN_FLIGHT = 2  # per running trial: the checkpoint being uploaded and the one after it


class StorageGuard(tune.Callback):
    """A Tune callback that stops the sweep when local storage has less free space than ``reserve``.

    ``reserve`` grows with what the sweep writes: ``MIN_FREE_BYTES`` plus, per running trial,
    ``CHECKPOINTS_IN_FLIGHT`` times the largest checkpoint seen, plus twice the last result tables.

    Args:
        store: the sweep's folder (object stores are never full: the guard then only reacts to errors).
        every: seconds between two looks at the free space.
    """

    def __init__(self, store: SweepStore, every: float = 1.0):
        self.store, self.every = store, every
        self.largest_checkpoint = 0
        self.tables_bytes = 0
        self.running = 0
        self.full: str | None = None  # why the sweep stopped, once it did
        self.error: type[Exception] = StorageFullError  # what the driver raises then
        self._last = 0.0

    @property
    def reserve(self) -> int:
        return MIN_FREE_BYTES + CHECKPOINTS_IN_FLIGHT * self.largest_checkpoint * max(1, self.running) + 2 * self.tables_bytes

    def shortage(self) -> str | None:
        """Why the storage is too full to go on, or ``None``."""
        free = self.store.free_bytes()
        if free is None or free >= self.reserve:
            return None
        return (f"the storage {self.store.storage_uri} has {free / 2**20:.1f} MiB free, less than the {self.reserve / 2**20:.1f} MiB "
                "the sweep needs to write its next checkpoints and results")

    def stop(self, reason: str, error: type[Exception] = StorageFullError) -> None:
        """Stop the sweep gracefully (once): Tune finishes its step, saves its state and returns; the driver then
        raises ``error(reason)`` (any thread may call this).

        Raises:
            error: at once, when Tune's stop handler is not there to signal (Tune installs it only when the sweep
                runs on the main thread): the run ends as after a crash; the same command continues it.
        """
        if self.full is not None:
            return
        self.full, self.error = reason, error
        if not callable(signal.getsignal(signal.SIGUSR1)):
            raise error(reason)
        logging.getLogger("ray.tune.tune").addFilter(_TuneStopMessages())  # kvsweep says how to continue
        os.kill(os.getpid(), signal.SIGUSR1)  # Tune's handler: end the run, keep unfinished trials resumable

    def seed(self, store: SweepStore, most: int = 50) -> None:
        """Start from what the sweep wrote before (a continued sweep): its largest checkpoint among the last
        ``most`` trials' (local storage only) and its result tables."""
        if not store.local:
            return
        root = Path(store.root)
        self.tables_bytes = sum(p.stat().st_size for p in (*root.glob("*.parquet"), *root.glob("parts/*.parquet")))
        trials = sorted(root.glob("tune-*/*/"), key=lambda p: p.stat().st_mtime)[-most:]
        for folder in (c for t in trials for c in t.glob("checkpoint_*")):
            self.largest_checkpoint = max(self.largest_checkpoint, sum(f.stat().st_size for f in folder.iterdir() if f.is_file()))

    def due(self) -> bool:
        return self.full is None and time.monotonic() - self._last >= self.every

    def check(self, force: bool = False) -> None:
        if self.full is not None or not (force or self.due()):
            return
        self._last = time.monotonic()
        reason = self.shortage()
        if reason:
            self.stop(reason)

    def on_step_begin(self, iteration, trials, **info):
        if self.due():  # the running trials are counted only then: a count per step costs O(trials) per event
            self.running = sum(t.status == "RUNNING" for t in trials)
            self.check(force=True)

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        try:
            files = checkpoint.filesystem.get_file_info(pafs.FileSelector(checkpoint.path, recursive=True))
            self.largest_checkpoint = max(self.largest_checkpoint, sum(f.size or 0 for f in files if f.type == pafs.FileType.File))
        except OSError:
            pass
        self.check(force=True)

    def _failed(self, trial) -> None:
        error = error_text(trial)
        if any(s in error for s in FULL_MESSAGES):
            self.stop(f"a trial's write to the storage {self.store.storage_uri} failed: {error.strip().splitlines()[-1]}")
        self.check(force=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._failed(trial)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._failed(trial)


FULL_MESSAGES = ("No space left on device", "Disk quota exceeded")


class _TuneStopMessages(logging.Filter):
    """Drops Tune's messages about a stop signal and ``tune.run(..., resume=True)``: the sweep says itself
    why it stopped and that the same command continues it."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("Stop signal received" in text or "Resume experiment with" in text)


def error_text(trial) -> str:
    """The error Tune recorded for the trial's last failure ('' when there is none or it cannot be read): from
    the driver's staging folder while the sweep runs (Tune copies it to the storage at its next snapshot),
    else from the storage."""
    name = getattr(getattr(trial, "run_metadata", None), "error_filename", None)
    if not name:
        return ""
    try:
        local = Path(trial.local_path) / name
        if local.is_file():
            return local.read_text(errors="replace")
    except (RuntimeError, AttributeError, TypeError, OSError):  # no staging folder: a trial read back from the storage
        pass
    try:
        with trial.storage.storage_filesystem.open_input_stream(f"{trial.storage.trial_fs_path}/{name}") as f:
            return f.readall().decode(errors="replace")
    except (AttributeError, RuntimeError, OSError):
        return ""
