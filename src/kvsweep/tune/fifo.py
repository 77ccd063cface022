"""Ray Tune's FIFO choice of the next trial to start, in time that does not grow with the sweep.

Tune asks its scheduler for a trial to start at every step of its loop (``choose_trial_to_run``). Ray's
``FIFOScheduler`` (and so its ``ASHAScheduler``) walks every trial of the experiment for the first PENDING one,
then for the first PAUSED one; the finished trials come first in that list, so each step costs O(N) and a sweep
O(N^2): at 4,000 trials it was the largest part of Tune's own loop that grew with the sweep (``benchmarks/scale.py``).
``FIFO`` gives the same choice from Tune's live trials (the ones not terminated, which Tune keeps as a set): it
numbers the trials in the order Tune adds them (``on_trial_add``, called again when Tune re-queues a failed trial
at the end of its list), which is the order of Tune's list.
"""

from __future__ import annotations

import itertools

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler


class FIFO(FIFOScheduler):
    """Ray Tune's ``FIFOScheduler`` whose ``choose_trial_to_run`` reads only the live trials: the first PENDING trial
    in the order of Tune's trial list, else the first PAUSED one, else ``None`` (as Ray's); O(live trials) per call."""

    def __init__(self):
        super().__init__()
        self._added = itertools.count()
        self._position: dict[str, int] = {}  # trial id -> when Tune last added it (its place in Tune's list)

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        self._position[trial.trial_id] = next(self._added)

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        live = tune_controller.get_live_trials()
        if any(t.trial_id not in self._position for t in live):  # added before this scheduler was: Ray's walk
            return super().choose_trial_to_run(tune_controller)
        for status in (Trial.PENDING, Trial.PAUSED):
            ready = [t for t in live if t.status == status]
            if ready:
                return min(ready, key=lambda t: self._position[t.trial_id])
        return None
