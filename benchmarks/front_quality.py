"""Front quality per scheduler and searcher: how much of the reference front each finds, for how many epochs.

    python benchmarks/front_quality.py [--epochs 8] [--orders 5] [--workers 4] [--storage DIR]

On ``tiny`` (the CPU; minutes): one grid, ranks d/8 .. d x inits (random, pca) x schedules (lm, rec_to_lm),
is trained once with FIFO to the end (early stopping by patience still applies): its front is the
reference. ASHA and the Pareto-aware scheduler (``moasha``), at the same eta, and a budgeted Optuna search
under ``moasha`` are then *replayed* on those learning curves: training is deterministic, so a trial a
scheduler stops after epoch k has exactly the first k epochs of the reference run. The replay runs the
sweeps' own scheduler and searcher objects (``kvsweep.tune.rounds.make_scheduler``,
``kvsweep.tune.search.round_search``) on the recorded results, in the order an asynchronous sweep with
``--workers`` trials at a time produces (each epoch lasting what it lasted), over ``--orders`` random
orders of the grid. It prints, for each: epochs spent (fraction of the reference's), the hypervolume of
its front (trials that ran to their end, as the report draws them; both objectives minimised, reference
point the base's bytes and PPL x 1.5) as a fraction of the reference front's, and each one's hypervolume
at the other scheduler's epochs (anytime: the front of the trials finished by then).
Goal: moasha reaches >= 0.99 of the reference hypervolume with <= 0.5 of its epochs and beats ASHA at
equal epochs.
"""

from __future__ import annotations

import argparse
import heapq
import statistics
import tempfile
import time
from dataclasses import dataclass, field, replace
from types import SimpleNamespace

import numpy as np
from ray.tune.schedulers import TrialScheduler

from kvsweep.config import DataCfg, SweepCfg, TrainCfg
from kvsweep.report.pareto import hypervolume
from kvsweep.tune import model_dims, run_sweep
from kvsweep.tune.rounds import make_scheduler
from kvsweep.tune.search import round_search
from kvsweep.tune.store import SweepStore
from kvsweep.tune.writer import load_records


@dataclass
class Curve:
    """One trial of the reference run: its Tune config and every result it reported, epochs 1..n."""

    config: dict
    results: list[dict]
    ended_by_itself: bool  # ran to max epochs or stopped by its own patience


@dataclass
class Replay:
    """What one replayed sweep spent and found."""

    epochs: int = 0
    finished: list[tuple[int, float]] = field(default_factory=list)  # (kv bytes, best val PPL) of the trials that ran to their end
    anytime: list[tuple[int, float]] = field(default_factory=list)  # (epochs spent, hypervolume) after each finished trial


def reference_curves(sweep: SweepCfg) -> list[Curve]:
    """The reference run's curves: every trial's Tune config and results, from its experiment."""
    store = SweepStore(sweep.storage_uri, sweep.name)
    curves = []
    for rec in load_records(store, "tune-0"):
        results = sorted({r["epoch"]: r for r in rec.results if r.get("epoch", 0) >= 1}.values(), key=lambda r: r["epoch"])
        if rec.error or not results:
            continue
        last = results[-1]
        curves.append(Curve(rec.config, results, last["epoch"] >= sweep.train.epochs or bool(last.get("early_stopped"))))
    return curves


def _key(config: dict, fields: list[str]) -> tuple:
    return tuple(config.get(k) for k in fields)


def replay(curves: list[Curve], order: list[int] | None, scheduler: TrialScheduler, workers: int, reference: tuple[float, float],
           search=None, fields: list[str] | None = None, budget: int | None = None) -> Replay:
    """Run ``scheduler`` over ``curves`` as an asynchronous sweep with ``workers`` slots would: trials start in
    ``order`` (or as ``search`` suggests them, up to ``budget`` epochs), each epoch ends after its recorded
    seconds, and the scheduler decides at every epoch's end."""
    by_key = {_key(c.config, fields): c for c in curves} if search is not None else {}
    out, clock, events, seq, started = Replay(), 0.0, [], 0, 0
    queue = list(order or [])

    def start(now: float) -> bool:
        nonlocal seq, started
        if search is not None:
            if budget is not None and out.epochs >= budget:  # no new trial once the budget is spent
                return False
            tid = f"t{started}"
            suggested = search.suggest(tid)
            if not isinstance(suggested, dict):
                return False
            curve = by_key[_key(suggested, fields)]
        else:
            if not queue:
                return False
            tid, curve = f"t{started}", curves[queue.pop(0)]
        started += 1
        trial = SimpleNamespace(trial_id=tid, config=curve.config)
        scheduler.on_trial_add(None, trial)
        heapq.heappush(events, (now + curve.results[0].get("seconds", 1.0), seq, trial, curve, 0))
        seq += 1
        return True

    for _ in range(workers):
        start(clock)
    while events:
        clock, _, trial, curve, i = heapq.heappop(events)
        result = curve.results[i]
        out.epochs += 1
        last = i + 1 == len(curve.results)
        action = scheduler.on_trial_result(None, trial, result)
        if last or action == TrialScheduler.STOP:
            scheduler.on_trial_complete(None, trial, result)  # as Tune does for a running trial that ends or is stopped
            if search is not None:
                search.on_trial_complete(trial.trial_id, result)
            if last and curve.ended_by_itself:  # only trials that ran to their end enter the front
                out.finished.append((int(result["kv_bytes_per_token"]), float(result["best_val_ppl"])))
                out.anytime.append((out.epochs, hypervolume(out.finished, reference)))
            start(clock)
        else:
            heapq.heappush(events, (clock + curve.results[i + 1].get("seconds", 1.0), seq, trial, curve, i + 1))
            seq += 1
    return out


def at_epochs(r: Replay, epochs: int) -> float:
    """The hypervolume of ``r``'s front when it had spent ``epochs`` (0 before its first finished trial)."""
    return max((hv for e, hv in r.anytime if e <= epochs), default=0.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=8, help="max epochs per trial (default: 8: rungs 1, 2, 4, 8 at eta 2)")
    p.add_argument("--reduction-factor", type=float, default=2.0, help="eta of both ASHA and moasha (default: 2)")
    p.add_argument("--train-samples", type=int, default=128)
    p.add_argument("--val-samples", type=int, default=32)
    p.add_argument("--orders", type=int, default=5, help="random arrival orders replayed (default: 5)")
    p.add_argument("--workers", type=int, default=4, help="trials at a time in the replay (default: 4)")
    p.add_argument("--optuna-budget", type=float, default=0.5, help="Optuna's epochs as a fraction of the reference's (default: 0.5)")
    p.add_argument("--storage", default=None, help="results folder; a reference run already there is reused")
    a = p.parse_args()
    storage = a.storage or tempfile.mkdtemp(prefix="kvsweep-front-")
    sweep = SweepCfg(name="front-reference", storage=storage, report_dir=None, scheduler="fifo",
                     data=DataCfg(train_samples=a.train_samples, val_samples=a.val_samples),
                     train=TrainCfg(epochs=a.epochs, patience=3, lr=1e-3))
    d = model_dims(sweep).hidden
    space = {"vdproj.rank": list(range(d // 8, d + 1, d // 8)), "vdproj.init": ["random", "pca"], "schedule": ["lm", "rec_to_lm"]}
    t0 = time.perf_counter()
    trials = run_sweep(sweep, space, log=lambda m: None).tables["trials"].to_pylist()
    wall = time.perf_counter() - t0
    curves = reference_curves(sweep)
    ref_point = (float(trials[0]["kv_bytes_per_token_base"]), 1.5 * float(trials[0]["base_val_ppl"]))
    full = replay(curves, list(range(len(curves))), make_scheduler(sweep, SweepStore(tempfile.mkdtemp(), "fifo")), a.workers, ref_point)
    hv_ref = hypervolume(full.finished, ref_point)
    print(f"\nreference: {len(curves)} trials x up to {a.epochs} epochs on tiny, FIFO to the end: {full.epochs} epochs, "
          f"hypervolume {hv_ref:.4g} (reference point {ref_point[0]:.0f} B/token, PPL {ref_point[1]:.3f}); trained in {wall:.0f} s; {storage}")

    rng = np.random.default_rng(0)
    orders = [list(rng.permutation(len(curves))) for _ in range(a.orders)]
    fields = [k for k in sorted(space) if len(space[k]) > 1]  # what Optuna picks; the rest is the same in every trial
    runs: dict[str, list[Replay]] = {"asha": [], "moasha": [], "optuna + moasha": []}
    for order in orders:
        for kind in ("asha", "moasha"):
            s = replace(sweep, scheduler=kind, reduction_factor=a.reduction_factor)
            runs[kind].append(replay(curves, order, make_scheduler(s, SweepStore(tempfile.mkdtemp(), kind)), a.workers, ref_point))
        s = replace(sweep, scheduler="moasha", reduction_factor=a.reduction_factor, search="optuna", num_samples=len(curves))
        search, _ = round_search(s, space, None, None)
        runs["optuna + moasha"].append(replay(curves, None, make_scheduler(s, SweepStore(tempfile.mkdtemp(), "optuna")), a.workers,
                                              ref_point, search=search, fields=fields, budget=int(a.optuna_budget * full.epochs)))

    print(f"\nreplayed over {a.orders} arrival orders, {a.workers} trials at a time, eta {a.reduction_factor:g}; mean (min..max)")
    print("| how              | epochs | of reference | hypervolume of reference | finished trials |")
    print("|------------------|--------|--------------|--------------------------|-----------------|")
    print(f"| FIFO (reference) | {full.epochs:>6} |        1.000 |                    1.000 | {len(full.finished):>15} |")
    for kind, rs in runs.items():
        ep = [r.epochs for r in rs]
        hv = [hypervolume(r.finished, ref_point) / hv_ref for r in rs]
        print(f"| {kind:<16} | {statistics.mean(ep):>6.0f} | {statistics.mean(ep) / full.epochs:>12.3f} | "
              f"{statistics.mean(hv):>6.3f} ({min(hv):.3f}..{max(hv):.3f})    | {statistics.mean(len(r.finished) for r in rs):>15.1f} |")
    print("\nat equal epochs (each order: both schedulers' hypervolume when the one that spent fewer had spent all of its):")
    wins = ties = 0
    for asha, mo in zip(runs["asha"], runs["moasha"]):
        budget = min(asha.epochs, mo.epochs)
        ha, hm = at_epochs(asha, budget) / hv_ref, at_epochs(mo, budget) / hv_ref
        ties += abs(hm - ha) < 1e-3  # the same front within a thousandth
        wins += hm - ha >= 1e-3
        print(f"  {budget:>4} epochs: asha {ha:.4f}, moasha {hm:.4f}")
    mo = runs["moasha"]
    goal_hv = statistics.mean(hypervolume(r.finished, ref_point) / hv_ref for r in mo) >= 0.99
    goal_ep = statistics.mean(r.epochs for r in mo) / full.epochs <= 0.5
    print(f"\ngoal: moasha >= 0.99 of the reference hypervolume: {'met' if goal_hv else 'not met'}; with <= 0.5 of its epochs: "
          f"{'met' if goal_ep else 'not met'}; at equal epochs moasha beats ASHA in {wins} of {a.orders} orders, ties in {ties} "
          f"(within 0.001), trails in {a.orders - wins - ties}")


if __name__ == "__main__":
    main()
