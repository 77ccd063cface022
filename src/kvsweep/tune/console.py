"""A sweep's compact console: one line per trial event and a progress line, instead of Ray Tune's status tables.

``ConsoleCallback`` is a Ray Tune callback on the driver, so it reads the same for trials alone, in packs and
under ``ray job submit``. Each trial's events, prefixed with the time since the round started:

    [0:03] trial 7f5741c0 started: vdproj.init=pca vdproj.rank=32
    [0:06] trial 7f5741c0 epoch 1/2: val PPL 54.377, train PPL 48.946
    [0:09] trial 2b0e93aa asha_stopped by moasha at the rung of epoch 1: best val PPL 78.979 (epoch 1), 1,280 KV bytes/token
    [0:11] trial 7f5741c0 completed: best val PPL 54.372 (epoch 2), 1,280 KV bytes/token
    [0:11] progress: 2/4 trials done, 3/6 epochs, 11s elapsed, ETA 0:21

and ``early_stopped``, ``error`` (the one-line message, the trial's error file and where its output is) and
``restarting`` (a failure Tune retries). The progress line counts trials done of those planned and epochs run
of those still possible (a trial the scheduler stopped plans no more), with an ETA at this run's pace. On a
terminal it is one line redrawn each second; elsewhere (a log file, a job's output) it is printed when a trial
ends and otherwise at most every ``every`` seconds.

``quiet_ray`` gives what quiets Ray itself: ``ray.init``'s documented ``log_to_driver`` (the trials' output stays in
Ray's worker logs) and ``logging_level`` (Ray's and Tune's INFO lines); ``quiet_ray`` Tune's environment variables
that silence its warning about frequent experiment snapshots (``CheckpointConfig(num_to_keep)`` forces one per
trial checkpoint, which a sweep wants), its experiment box and its trials' tracebacks; ``quiet_ray_start`` Ray's notice that a new local Ray has token
authentication on.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence, TextIO

from ray import tune
from ray._private import worker as ray_worker

from ..config import SweepCfg
from ..results import EpochReport
from .guard import error_text
from .space import trial_cfg
from .writer import trial_status

SNAPSHOT_WARNING_ENV = "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S"  # Tune: 0 silences the warning
NEW_OUTPUT_ENV = "RAY_AIR_NEW_OUTPUT"  # Tune: 0 selects the output engine that verbose=0 silences whole
TRIAL_ERRORS_ENV = "TUNE_PRINT_ALL_TRIAL_ERRORS"  # Tune: 0 leaves a failed trial's traceback to its error.txt
QUIET_TUNE = (SNAPSHOT_WARNING_ENV, NEW_OUTPUT_ENV, TRIAL_ERRORS_ENV)
AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"  # its one warning: token authentication is on
TTY_EVERY = 1.0  # seconds between redraws of a terminal's progress line
LOG_EVERY = 30.0  # at most this often a progress line in a log, besides the one at each trial's end


def ray_init_kwargs(verbose: bool) -> dict:
    """``ray.init``'s output settings of a sweep's driver: everything with ``verbose``; else no trial output forwarded
    to the driver and Ray's own log lines from WARNING up."""
    return {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.WARNING}


@contextmanager
def quiet_ray(verbose: bool) -> Iterator[None]:
    """While a round runs without ``verbose``, Tune's documented environment variables of ``QUIET_TUNE`` at 0: its
    snapshot warning off, its legacy output engine (the default one prints the experiment's configuration box and
    paths even at ``verbose=0``), and a failed trial's traceback left to its ``error.txt`` (the console's line names
    it); each unless the user set it; the environment as it was afterwards."""
    quiet = {} if verbose else {k: "0" for k in QUIET_TUNE if k not in os.environ}
    os.environ.update(quiet)
    try:
        yield
    finally:
        for k in quiet:
            os.environ.pop(k, None)


@contextmanager
def quiet_ray_start(verbose: bool) -> Iterator[None]:
    """While a local Ray starts without ``verbose``: its notice that token authentication is on (kvsweep keeps the
    token private itself, ``kvsweep.tune.local``) below the level shown, through that logger's level."""
    log = logging.getLogger(AUTH_LOGGER)
    saved = log.level
    if not verbose:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(saved)


def ray_logs_dir() -> str:
    """Where this node's Ray writes its workers' output (``<session>/logs``)."""
    try:  # Ray has no public accessor; its documented default otherwise
        return ray_worker._global_node.get_logs_dir_path()
    except AttributeError:
        return "/tmp/ray/session_latest/logs"


def duration(seconds: float) -> str:
    """``42s``, ``3:05`` (minutes), ``1:02:05`` (hours)."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def last_result(trial) -> dict:
    """Tune's last result of ``trial``, without waiting on its actor: ``Trial.last_result`` of a trial that has not
    reported yet fetches the trial's default metrics from its actor, a blocking call on the driver for each new trial;
    here such a trial has an empty result (its run metadata's, where Tune's trial has one)."""
    result = getattr(getattr(trial, "run_metadata", None), "last_result", None)
    return result if isinstance(result, dict) else (trial.last_result or {})


def _report(result: dict | None) -> EpochReport | None:
    try:
        return EpochReport.from_report(result or {})
    except ValueError:  # no epoch
        return None


class ConsoleCallback(tune.Callback):
    """One line per trial event and a progress line on ``out`` (see the module); ``searched``: the search-space
    fields whose values differ between trials (the started lines name them); ``experiment_uri``: the round's
    folder (an error line names the trial's error file in it); ``tty``: redraw the progress line in place
    (default: whether ``out`` is a terminal)."""

    def __init__(self, sweep: SweepCfg, searched: Sequence[str], *, experiment_uri: str = "", out: TextIO | None = None,
                 tty: bool | None = None, every: float = LOG_EVERY, clock: Callable[[], float] = time.monotonic,
                 logs_dir: str | None = None):
        self.sweep, self.searched, self.experiment_uri = sweep, list(searched), experiment_uri.rstrip("/")
        self.out = out if out is not None else sys.stdout
        self.tty = tty if tty is not None else bool(getattr(self.out, "isatty", lambda: False)())
        self.every, self.clock, self.logs_dir = every, clock, logs_dir
        self.start = clock()
        self.planned = 0
        self.trials: list = []
        self._epochs_at_start: int | None = None
        self._ended_ids: set[str] = set()  # Tune calls the hooks of a trial's end before it sets the trial's status
        # what the progress line sums, kept per trial and updated at the trial's own events: a line then costs the
        # same at 10,000 trials as at 10 (Tune's trial list only grows; the trials it gained are read when it has)
        self._counted: dict[str, tuple[int, int, bool]] = {}  # trial id -> (epochs run, epochs possible, ended)
        self._sums = [0, 0, 0]  # epochs run, epochs possible, trials ended; over self._counted
        self._max_epochs_of: dict[str, int] = {}
        self._listed = 0  # how much of Tune's trial list self._counted has read
        self._last_progress = -math.inf
        self._drawn = False  # a terminal's progress line is on screen

    # Tune's hooks

    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info):
        self.start = self._last_progress = self.clock()
        self.planned = total_num_samples or num_samples or 0

    def on_trial_start(self, iteration, trials, trial, **info):
        self.trials = trials
        self._count(trial)
        epoch = self._epoch(trial)
        searched = " ".join(f"{k}={trial.config.get(k)}" for k in self.searched if k in trial.config)
        if trial.num_failures:
            what = f"restarted ({trial.num_failures} of at most {self.sweep.max_failures} restarts)"
        elif epoch:
            what = f"resumed after epoch {epoch}"
        else:
            what = "started"
        self._line(f"trial {trial.trial_id} {what}" + (f": {searched}" if searched else ""))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.trials = trials
        self._count(trial)
        rep = _report(result)
        if rep is None or rep.error or rep.resumed:  # an error ends the trial (its line then); a resumed epoch was shown
            return
        train = f", train PPL {rep.metrics.train_ppl:.3f}" if rep.metrics.train_ppl is not None else ""
        val = f"{rep.val_ppl:.3f}" if rep.val_ppl is not None else "-"
        self._line(f"trial {trial.trial_id} epoch {rep.epoch}/{self._max_epochs(trial)}: val PPL {val}{train}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.trials = trials
        self._ended_ids.add(trial.trial_id)
        self._count(trial)
        rep = _report(trial.last_result)
        status, error = trial_status([rep] if rep is not None else [], self._max_epochs(trial))
        if status == "error":
            self._error_line(trial, error or "trial failed")
        else:
            self._line(f"trial {trial.trial_id} {self._ended(status, rep)}")
        self._progress_after_end()

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.trials = trials
        self._count(trial)
        self._line(f"trial {trial.trial_id} failed: {self._error_of(trial)}; traceback: {self._error_file(trial)}; "
                   "restarting from its last checkpoint")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.trials = trials
        self._ended_ids.add(trial.trial_id)
        self._count(trial)
        self._error_line(trial, self._error_of(trial))
        self._progress_after_end()

    def on_step_end(self, iteration, trials, **info):
        self.trials = trials
        if self._epochs_at_start is None:
            self._epochs_at_start = self._epochs_done()
        now = self.clock()
        if now - self._last_progress >= (TTY_EVERY if self.tty else self.every):
            self._progress()

    def on_experiment_end(self, trials, **info):
        self.trials = trials
        if self.tty:
            self._clear()
            self._line(self.progress_line())

    # the lines

    def progress_line(self) -> str:
        """``progress: D/N trials done, E/P epochs, T elapsed, ETA R``: P the epochs still possible (max epochs of
        the trials not ended, the epochs run of those that ended); the ETA at this run's epochs per second."""
        done, possible, ended = self._totals()
        planned = max(self.planned, len(self._counted))
        possible += (planned - len(self._counted)) * self.sweep.train.epochs
        elapsed = self.clock() - self.start
        ran = done - (self._epochs_at_start or 0)
        if ended == planned:
            eta = "done"
        elif ran > 0 and elapsed > 0:
            eta = f"ETA {duration((possible - done) * elapsed / ran)}"
        else:
            eta = "ETA ?"
        return f"progress: {ended}/{planned} trials done, {done}/{possible} epochs, {duration(elapsed)} elapsed, {eta}"

    def _ended(self, status: str, rep: EpochReport | None) -> str:
        best = ""
        if rep is not None and rep.best_val_ppl is not None:
            best = f": best val PPL {rep.best_val_ppl:.3f} (epoch {rep.best_epoch})"
            if rep.trial is not None:
                kv = rep.trial.kv_bytes_per_token_measured or rep.trial.kv_bytes_per_token
                best += f", {kv:,} KV bytes/token"
        epoch = rep.epoch if rep is not None else 0
        if status == "asha_stopped":
            return f"asha_stopped by {self.sweep.scheduler} at the rung of epoch {epoch}{best}"
        if status == "early_stopped":
            return f"early_stopped at epoch {epoch} (no better val PPL for {self.sweep.train.patience} epochs){best}"
        return f"{status}{best}"

    def _error_of(self, trial) -> str:
        lines = error_text(trial).strip().splitlines()
        return lines[-1] if lines else "trial failed"

    def _error_file(self, trial) -> str:
        folder = os.path.basename(str(getattr(trial, "path", "") or "").rstrip("/"))
        return f"{self.experiment_uri}/{folder}/error.txt" if self.experiment_uri and folder else "its error.txt"

    def _error_line(self, trial, message: str) -> None:
        where = self._error_file(trial)
        result = trial.last_result or {}
        node = f" on {result['hostname']}" if result.get("hostname") else ""
        pid = f" (pid {result['pid']})" if result.get("pid") else ""
        self._line(f"trial {trial.trial_id} error: {message}; traceback: {where}; its output: Ray's worker logs in "
                   f"{self.logs_dir or ray_logs_dir()}{node}{pid}, or run with --verbose")

    def _progress_after_end(self) -> None:
        if not self.tty:
            self._progress()

    def _progress(self) -> None:
        self._last_progress = self.clock()
        line = self.progress_line()
        if self.tty:
            self.out.write(f"\r{self._stamp()} {line}\x1b[K")
            self.out.flush()
            self._drawn = True
        else:
            self._line(line)

    def _clear(self) -> None:
        if self._drawn:
            self.out.write("\r\x1b[K")
            self._drawn = False

    def _line(self, text: str) -> None:
        self._clear()
        self.out.write(f"{self._stamp()} {text}\n")
        self.out.flush()

    def _stamp(self) -> str:
        s = max(0, int(self.clock() - self.start))
        h, rest = divmod(s, 3600)
        return f"[{h}:{rest // 60:02d}:{rest % 60:02d}]" if h else f"[{rest // 60}:{rest % 60:02d}]"

    # what Tune knows of a trial

    def _max_epochs(self, trial) -> int:
        if trial.trial_id not in self._max_epochs_of:  # a trial's config does not change
            try:
                epochs = trial_cfg(dict(trial.config), self.sweep).train.epochs
            except Exception:  # a config this sweep cannot read: the sweep's epochs
                epochs = self.sweep.train.epochs
            self._max_epochs_of[trial.trial_id] = epochs
        return self._max_epochs_of[trial.trial_id]

    @staticmethod
    def _epoch(trial) -> int:
        rep = _report(last_result(trial))
        return rep.epoch if rep is not None and not rep.error else (rep.epoch - 1 if rep is not None else 0)

    def _epochs_done(self) -> int:
        return self._totals()[0]

    def _count(self, trial) -> None:
        """Recount one trial's share of the progress line (at each of its events, and when first listed)."""
        ended = trial.status in ("TERMINATED", "ERROR") or trial.trial_id in self._ended_ids
        epoch = self._epoch(trial)
        new = (epoch, epoch if ended else self._max_epochs(trial), ended)
        old = self._counted.get(trial.trial_id, (0, 0, False))
        self._counted[trial.trial_id] = new
        for i in range(3):
            self._sums[i] += int(new[i]) - int(old[i])

    def _totals(self) -> tuple[int, int, int]:
        """Epochs run, epochs possible and trials ended over the trials Tune lists (those it gained since the last
        call are counted now)."""
        if len(self.trials) < self._listed:  # another list than the one read so far: read it whole
            self._listed = 0
        for t in itertools.islice(self.trials, self._listed, None):
            if t.trial_id not in self._counted or t.status in ("TERMINATED", "ERROR"):
                self._count(t)
        self._listed = len(self.trials)
        done, possible, ended = self._sums
        return done, possible, ended
