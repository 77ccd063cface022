"""Rung schedulers of a sweep (ASHA and, in ``moasha``, multi-objective ASHA) whose rung records and stop
decisions survive a killed driver, and which judge a trial only once its schedule weights the LM term.

**Rungs.** One bracket of asynchronous successive halving, as Ray Tune's ``ASHAScheduler`` builds it: rungs
at ``grace_period * reduction_factor**k`` epochs below or at ``max_t``. A result at epoch ``t`` reaches the
highest rung at or below ``t`` that the trial has not reached yet; there the scheduler compares it with the
trials recorded at that rung before it, decides whether it goes on, and records it. A trial at ``max_t``
is done; its last result is recorded when it completes (so is an early-stopped trial's).

**The LM rule.** Validation PPL measures the LM objective, which a schedule such as ``rec_to_lm`` (linear
0 -> 1) weights little early on and ``rec_to_lm_step`` not at all before half the run: a rung at epoch 1
would judge such trials before they pursue the objective it measures. So a rung judges a trial only if the
LM weight its result reports (``w_lm``, the weight at the end of that epoch) has reached half the peak of its
LM schedule (``Schedule.peak`` of the trial's configuration): ``w_lm >= LM_SHARE * peak``. At a rung before
that the trial is *passed*: neither judged nor recorded, and never judged there later; its first judgement is
at the first rung at or after the epoch that crosses the threshold, against the other trials' results of
that rung's epoch. ``lm`` is judged from the first rung; ``rec_to_lm``, ``rec_to_lm_cosine`` and
``rec_to_lm_step`` from half the run on (epoch 15 of 30: rung 16 with rungs 1, 2, 4, 8, 16); ``rec``
(no LM weight ever) is never stopped by a rung, only by its own early stopping or ``max_t``. Half the peak
is where each of the rising named schedules first gives the LM term at least the weight the reconstruction
term has; the reported weight is the one the trial's steps used (progress by step), the peak is a property
of its schedule that no single report shows.

**Durability.** Ray Tune keeps a scheduler's rung records in the driver's memory only: a continued sweep
would start with empty rungs, and a trial stopped just before a kill (before Tune's next experiment snapshot)
would resume and train on. These schedulers write their rungs (records and passed trials) and every stop
decision to the sweep's folder before the decision takes effect (``scheduler.json`` and its journal: each change
one small file, ``kvsweep.tune.journal``), and read them back
when the sweep continues or grows (new trials are judged against the rungs of the earlier ones). A resumed
trial first reports its checkpoint's epoch again (``trainable.resumed_report``): a trial that had been
stopped is stopped there, before it trains on; one whose checkpoint is older than the epoch it was stopped
at (the driver was killed between the decision and Tune's record of that epoch) trains up to that epoch
and is stopped there, as it was without the kill.
"""

from __future__ import annotations

import itertools
import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from ..config import KvsweepError
from .fifo import FIFO
from .journal import SCHEDULER_FILE, Journal, read_state
from .store import SweepStore

__all__ = ["SCHEDULER_FILE", "DurableRungs", "DurableASHA", "Rung", "asha_keeps", "milestones", "read_state", "real"]
LM_SHARE = 0.5  # a rung judges a trial once its reported LM weight is at least this share of its schedule's peak
_REL_TOL = 1e-9  # reported weights are floats: cos(pi/2) is not exactly 0


@dataclass
class Rung:
    """One rung: its milestone (epochs), the trials recorded there with their objectives (each minimised),
    and the trials that reached it before their schedule weighted the LM term (never judged there)."""

    milestone: float
    recorded: dict[str, tuple[float, ...]] = field(default_factory=dict)
    passed: set[str] = field(default_factory=set)
    _values: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)), repr=False, compare=False)
    _rows: int = field(default=0, repr=False, compare=False)

    def values(self) -> np.ndarray:
        """The recorded objectives in the order recorded: (N, M) float64, a view of a buffer that grows by doubling
        (the trials added to ``recorded`` since the last call are appended; records are only ever added)."""
        n = len(self.recorded)
        if n > self._rows:
            new = np.asarray(list(itertools.islice(self.recorded.values(), self._rows, None)), dtype=np.float64)
            if n > len(self._values):
                grown = np.empty((max(2 * n, 64), new.shape[1]))
                if self._rows:
                    grown[:self._rows] = self._values[:self._rows]
                self._values = grown
            self._values[self._rows:n] = new
            self._rows = n
        return self._values[:n]


def milestones(max_t: int, grace_period: int, reduction_factor: float) -> list[float]:
    """The rungs of Ray Tune's one-bracket ASHA, ascending: ``grace_period * reduction_factor**k <= max_t``."""
    n = int(np.log(max_t / grace_period) / np.log(reduction_factor) + 1)
    return [grace_period * reduction_factor ** k for k in range(n)]


def real(value) -> float | None:
    """A reported value as a float when it is a real number (a bool is not one); ``None`` otherwise."""
    return float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else None


def asha_keeps(value: float, others: Sequence[float], reduction_factor: float) -> bool:
    """ASHA's decision at a rung: whether a trial with ``value`` (lower is better) goes on, given the values
    of the trials recorded there before it.

    On an empty rung it goes on. Otherwise it goes on unless ``value`` is above the ``100 / reduction_factor``-th
    percentile (linear interpolation, NaN ignored) of ``others``: Ray Tune's ``_Bracket`` cutoff, written for a
    minimised value. A tie with the cutoff goes on; with fewer than ``reduction_factor`` trials recorded the
    cutoff lies among them (with one, a worse trial stops).
    """
    arr = np.asarray(others, dtype=np.float64)
    if arr.size == 0 or np.isnan(arr).all():
        return True
    return not value > np.nanpercentile(arr, 100.0 / reduction_factor)


class DurableRungs(FIFO):
    """The rungs, the LM rule and the durable state shared by ``DurableASHA`` and ``MOASHA``; a subclass says
    what a trial's objectives are (``objectives``) and whether a trial goes on at a rung (``keeps``).

    Args:
        store: the sweep's folder; its ``scheduler.json`` and journal are read now and written at every change.
        max_t, grace_period, reduction_factor: as Ray Tune's ``ASHAScheduler``'s (epochs).
        lm_peak: a trial's config -> the peak of its LM weight schedule; ``None``: every result is judged
            (no LM rule).

    Raises:
        KvsweepError: bad rung settings, or stored state of another scheduler or other rungs (the sweep's
            specification check refuses both earlier).
    """

    NAME = ""  # the scheduler's name in scheduler.json and in --scheduler

    def __init__(self, store: SweepStore, *, max_t: int, grace_period: int, reduction_factor: float,
                 lm_peak: Callable[[dict], float] | None = None):
        if not (max_t >= grace_period >= 1 and reduction_factor > 1):
            raise KvsweepError(f"{self.NAME}: need max_t >= grace_period >= 1 and reduction_factor > 1; got max_t={max_t}, "
                               f"grace_period={grace_period}, reduction_factor={reduction_factor}")
        super().__init__()
        self._store = store
        self._max_t, self._rf = max_t, reduction_factor
        self._rungs = [Rung(m) for m in reversed(milestones(max_t, grace_period, reduction_factor))]  # highest first
        self._stopped: dict[str, int] = {}  # trial id -> the epoch it was stopped at
        self._lm_peak = lm_peak
        self._peaks: dict[str, float] = {}  # trial id -> the peak of its LM weight
        self._time_attr, self._mode, self._sign = "epoch", None, 1.0
        self._num_stopped = 0
        self._changes: list[list] = []  # not yet written
        state = read_state(store)
        if state is not None:
            self._load(state)
        self._journal = Journal(store, state)

    # --- what a subclass decides -----------------------------------------------------------------------

    def objectives(self, result: dict) -> tuple[float, ...] | None:
        """The trial's objectives in ``result``, each minimised; ``None`` when the result lacks one."""
        raise NotImplementedError

    def keeps(self, record: tuple[float, ...], rung: Rung) -> bool:
        """Whether a trial with ``record`` goes on at ``rung``, against the trials recorded there before it (``rung.values()``:
        (N, M))."""
        raise NotImplementedError

    def _metric_value(self, result: dict) -> float | None:
        value = real(result.get(self._metric))
        return None if value is None else self._sign * value

    # --- Ray Tune's TrialScheduler ----------------------------------------------------------------------

    def set_search_properties(self, metric: str | None, mode: str | None, **spec) -> bool:
        if (self._metric and metric) or (self._mode and mode):
            return False
        self._metric = metric or self._metric
        self._mode = mode or self._mode
        self._sign = -1.0 if self._mode == "max" else 1.0
        return True

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        super().on_trial_add(tune_controller, trial)
        if not self._metric or self._mode not in ("min", "max"):
            raise ValueError(f"{type(self).__name__} needs a metric and a mode (min or max); got {self._metric!r}, {self._mode!r}")

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        if self._time_attr not in result or self._metric not in result:
            return TrialScheduler.CONTINUE
        if trial.trial_id in self._stopped:  # a stopped trial resumed (its decision came after Tune's last snapshot):
            # stopped again at the epoch it was stopped at; from an older checkpoint it first trains up to that epoch
            return TrialScheduler.STOP if result[self._time_attr] >= self._stopped[trial.trial_id] else TrialScheduler.CONTINUE
        if result[self._time_attr] >= self._max_t:
            return TrialScheduler.STOP
        arrival = self._arrive(trial, result)
        if arrival is None:
            return TrialScheduler.CONTINUE
        rung, record = arrival
        keep = self.keeps(record, rung)
        self._record(rung, trial.trial_id, record)
        if not keep:
            self._stopped[trial.trial_id] = int(result[self._time_attr])
            self._changes.append(["stop", trial.trial_id, self._stopped[trial.trial_id]])
            self._num_stopped += 1
        self._save()  # before Tune acts on the decision
        return TrialScheduler.CONTINUE if keep else TrialScheduler.STOP

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        if trial.trial_id in self._stopped or self._time_attr not in result or self._metric not in result:
            return
        arrival = self._arrive(trial, result)
        if arrival is not None:
            rung, record = arrival
            self._record(rung, trial.trial_id, record)
            self._save()

    def debug_string(self) -> str:
        rungs = " | ".join(f"epoch {r.milestone:g}: {len(r.recorded)} recorded, {len(r.passed)} passed" for r in reversed(self._rungs))
        return f"Using {self.NAME} (kvsweep, durable): num_stopped={self._num_stopped}\n{rungs}"

    # --- rungs and the LM rule -------------------------------------------------------------------------

    def _arrive(self, trial: Trial, result: dict) -> tuple[Rung, tuple[float, ...]] | None:
        """The rung ``result`` reaches and the trial's objectives there; ``None`` when it reaches none, is passed
        there (the LM rule: recorded as passed) or is no epoch's report (a failed trial's last: no weights)."""
        tid, t = trial.trial_id, result[self._time_attr]
        rung = next((r for r in self._rungs if t >= r.milestone), None)  # the highest rung at or below t
        if rung is None or tid in rung.recorded or tid in rung.passed:
            return None  # before the first rung, or this rung is behind the trial (and so are the lower ones)
        weighted = self.lm_weighted(trial, result)
        if weighted is None:
            return None
        if not weighted:
            rung.passed.add(tid)
            self._changes.append(["pass", rung.milestone, tid])
            self._save()
            return None
        record = self.objectives(result)
        return None if record is None else (rung, record)

    def lm_weighted(self, trial: Trial, result: dict) -> bool | None:
        """Whether ``result``'s LM weight ``w_lm`` has reached ``LM_SHARE`` of the peak of the trial's LM schedule
        (always ``True`` without ``lm_peak``); ``None`` for a result without ``w_lm``."""
        if self._lm_peak is None:
            return True
        w = real(result.get("w_lm"))
        if w is None or not math.isfinite(w):
            return None
        if trial.trial_id not in self._peaks:
            self._peaks[trial.trial_id] = float(self._lm_peak(trial.config))
        peak = self._peaks[trial.trial_id]
        return peak > 0 and w >= LM_SHARE * peak * (1 - _REL_TOL)

    # --- scheduler.json and its journal ---------------------------------------------------------------

    def _record(self, rung: Rung, tid: str, record: tuple[float, ...]) -> None:
        rung.recorded[tid] = record
        self._changes.append(["record", rung.milestone, tid, list(record)])

    def _load(self, state: dict) -> None:
        """The state ``read_state`` read (the journal folded in) into the rungs.

        Raises:
            KvsweepError: the state of another scheduler, or of other rungs.
        """
        where = f"{self._store.uri}/{SCHEDULER_FILE}"
        if state["scheduler"] != self.NAME:
            raise KvsweepError(f"{where} holds the state of the {state['scheduler']} scheduler; continue the sweep with "
                               f"--scheduler {state['scheduler']}")
        saved = sorted(state["rungs"], key=lambda r: -r["milestone"])
        if [round(r["milestone"], 9) for r in saved] != [round(r.milestone, 9) for r in self._rungs]:
            epochs = ", ".join(f"{r['milestone']:g}" for r in reversed(saved))
            raise KvsweepError(f"{where} holds the state of other {self.NAME} rungs (epochs {epochs}); "
                               "continue the sweep with its own --epochs, --grace-period and --reduction-factor")
        for rung, r in zip(self._rungs, saved):
            rung.recorded.update({k: tuple(float(x) for x in v) for k, v in r["recorded"].items()})
            rung.passed.update(r["passed"])
        self._stopped = {k: int(v) for k, v in state["stopped"].items()}

    def _save(self) -> None:
        """Write the changes made since the last call (``kvsweep.tune.journal``), before they take effect."""
        changes, self._changes = self._changes, []
        self._journal.write(changes, self._snapshot)

    def _snapshot(self) -> dict:
        return {
            "scheduler": self.NAME,
            "rungs": [{"milestone": r.milestone, "recorded": {k: list(v) for k, v in r.recorded.items()}, "passed": sorted(r.passed)}
                      for r in reversed(self._rungs)],
            "stopped": self._stopped,
        }


class DurableASHA(DurableRungs):
    """ASHA (asynchronous successive halving: Li et al., "A System for Massively Parallel Hyperparameter
    Tuning", MLSys 2020) on the Tune metric (``val_ppl``) alone, with the decisions of Ray Tune's
    ``ASHAScheduler`` (one bracket; ``asha_keeps``), the LM rule and durable state (module docstring).
    Arguments and errors: ``DurableRungs``'s."""

    NAME = "asha"

    def objectives(self, result: dict) -> tuple[float, ...] | None:
        value = self._metric_value(result)
        return None if value is None else (value,)

    def keeps(self, record: tuple[float, ...], rung: Rung) -> bool:
        others = rung.values()
        return asha_keeps(record[0], others[:, 0] if len(others) else (), self._rf)
