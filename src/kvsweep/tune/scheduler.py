"""ASHA whose rung records and stop decisions survive a killed driver.

Ray Tune keeps ASHA's rung records in the driver's memory only. A sweep whose driver is killed and then
continued starts again with empty rungs (the next trial at a rung is compared with nothing), and a
trial that ASHA had stopped just before the kill (before Tune's next experiment snapshot) resumes from
its checkpoint and trains on. ``DurableASHA`` writes its rung records and every stop decision to
``scheduler.json`` in the sweep's folder before the decision takes effect, and reads them back when
the sweep continues (or grows: new trials are judged against the rungs of the earlier ones), so a
continued sweep makes the decisions an uninterrupted one makes. A resumed trial first reports its checkpoint's
epoch again (``trainable.resumed_report``): a trial ASHA had stopped is stopped there, before it trains on.
"""

from __future__ import annotations

from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from ..config import KvsweepError
from .store import SweepStore

SCHEDULER_FILE = "scheduler.json"
FORMAT = 1


class DurableASHA(ASHAScheduler):
    """Ray Tune's ``ASHAScheduler`` (asynchronous successive halving: Li et al., "A System for Massively
    Parallel Hyperparameter Tuning", MLSys 2020) on ``epoch``, with its state in ``store``.

    Args:
        store: the sweep's folder; its ``scheduler.json`` is read now and written after every change.
        max_t, grace_period, reduction_factor: as ``ASHAScheduler``'s (epochs).

    Raises:
        KvsweepError: the stored state belongs to other rungs (another grace period, reduction factor or
            max epochs: the sweep's specification check refuses that earlier).
    """

    def __init__(self, store: SweepStore, *, max_t: int, grace_period: int, reduction_factor: float):
        super().__init__(time_attr="epoch", max_t=max_t, grace_period=grace_period, reduction_factor=reduction_factor)
        self._store = store
        self._stopped: dict[str, int] = {}  # trial id -> the epoch ASHA stopped it at
        state = store.read_json(SCHEDULER_FILE)
        if state is not None:
            self._load(state)

    def _rungs(self) -> list[list[tuple[float, dict]]]:
        return [b._rungs for b in self._brackets]  # per bracket: (milestone, {trial id: signed metric}), highest first

    def _load(self, state: dict) -> None:
        saved = state.get("brackets", [])
        mine = self._rungs()
        if state.get("format") != FORMAT or [[m for m, _ in b] for b in mine] != [[r["milestone"] for r in b] for b in saved]:
            raise KvsweepError(f"{self._store.uri}/{SCHEDULER_FILE} holds the state of other ASHA rungs; "
                               "continue the sweep with its own --epochs, --grace-period and --reduction-factor")
        for bracket, saved_bracket in zip(mine, saved):
            for (_, recorded), r in zip(bracket, saved_bracket):
                recorded.update({k: float(v) for k, v in r["recorded"].items()})
        self._stopped = {k: int(v) for k, v in state.get("stopped", {}).items()}

    def _save(self) -> None:
        self._store.write_json(SCHEDULER_FILE, {
            "format": FORMAT,
            "brackets": [[{"milestone": m, "recorded": dict(rec)} for m, rec in b] for b in self._rungs()],
            "stopped": self._stopped,
        })

    def _size(self) -> int:
        return sum(len(rec) for b in self._rungs() for _, rec in b)

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        if trial.trial_id in self._stopped:  # a stopped trial resumed (its decision came after Tune's last snapshot)
            return TrialScheduler.STOP
        before = self._size()
        action = super().on_trial_result(tune_controller, trial, result)
        stopped = action == TrialScheduler.STOP and result.get(self._time_attr, 0) < self._max_t
        if stopped:
            self._stopped[trial.trial_id] = int(result[self._time_attr])
        if stopped or self._size() != before:
            self._save()  # before Tune acts on the decision
        return action

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        before = self._size()
        super().on_trial_complete(tune_controller, trial, result)
        if self._size() != before:
            self._save()
