"""The replay of ``benchmarks/front_quality.py`` on hand-made learning curves (the benchmark itself trains a grid
on tiny for minutes; its figures are for people to read)."""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from dataclasses import replace

import pytest

from kvsweep.config import SweepCfg, TrainCfg
from kvsweep.report.pareto import hypervolume
from kvsweep.tune.rounds import make_scheduler
from kvsweep.tune.search import round_search
from kvsweep.tune.store import SweepStore

from .sweeps import ROOT

spec = importlib.util.spec_from_file_location("front_quality", ROOT / "benchmarks" / "front_quality.py")
fq = sys.modules["front_quality"] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
spec.loader.exec_module(fq)

EPOCHS = 4
RANKS = [16, 32, 48, 64]
REF = (1000.0, 60.0)


def _curve(rank: int, lr: float) -> "fq.Curve":
    """PPL falls with epochs; a larger rank is better at every epoch (so ASHA cuts the small ones)."""
    results, best = [], float("inf")
    for e in range(1, EPOCHS + 1):
        ppl = 40.0 - rank / 16 - e * lr
        best = min(best, ppl)
        results.append({"epoch": e, "val_ppl": ppl, "best_val_ppl": best, "kv_bytes_per_token": 500 + 5 * rank,
                        "w_lm": 1.0, "w_rec": 0.0, "w_kl": 0.0, "seconds": 1.0})
    return fq.Curve({"vdproj.rank": rank, "lr": lr, "schedule": "lm"}, results, True)


CURVES = [_curve(r, lr) for r in RANKS for lr in (0.5, 1.0)]
SWEEP = SweepCfg(scheduler="fifo", train=TrainCfg(epochs=EPOCHS))


def _scheduler(kind: str, **kw):
    return make_scheduler(replace(SWEEP, scheduler=kind, **kw), SweepStore(tempfile.mkdtemp(), kind))


def test_fifo_replay_runs_every_epoch_and_finds_the_whole_front():
    r = fq.replay(CURVES, list(range(len(CURVES))), _scheduler("fifo"), 2, REF)
    assert r.epochs == len(CURVES) * EPOCHS and len(r.finished) == len(CURVES)
    whole = hypervolume([(c.results[-1]["kv_bytes_per_token"], c.results[-1]["best_val_ppl"]) for c in CURVES], REF)
    assert hypervolume(r.finished, REF) == pytest.approx(whole)
    assert r.anytime[-1] == (r.epochs, pytest.approx(whole)) and [e for e, _ in r.anytime] == sorted(e for e, _ in r.anytime)


def test_moasha_keeps_the_small_caches_that_asha_stops():
    order = list(range(len(CURVES)))[::-1]  # the large ranks first: ASHA then stops every small one at its rungs
    asha = fq.replay(CURVES, order, _scheduler("asha"), 1, REF)
    moasha = fq.replay(CURVES, order, _scheduler("moasha"), 1, REF)
    assert asha.epochs < len(CURVES) * EPOCHS and moasha.epochs < len(CURVES) * EPOCHS
    small = 500 + 5 * RANKS[0]
    assert small in {b for b, _ in moasha.finished} and small not in {b for b, _ in asha.finished}
    assert hypervolume(moasha.finished, REF) > hypervolume(asha.finished, REF)
    assert fq.at_epochs(moasha, 0) == 0.0


def test_an_optuna_replay_stops_starting_trials_at_its_budget():
    space = {"vdproj.rank": RANKS, "lr": [0.5, 1.0], "schedule": ["lm"]}
    sweep = replace(SWEEP, scheduler="moasha", search="optuna", num_samples=len(CURVES))
    search, _ = round_search(sweep, space, None, None)
    r = fq.replay(CURVES, None, _scheduler("moasha"), 2, REF, search=search, fields=["lr", "vdproj.rank"], budget=10)
    assert 10 <= r.epochs < 10 + 2 * EPOCHS  # the trials running when the budget was reached end as the scheduler says
    assert r.finished
