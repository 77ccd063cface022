"""The sweeps' rung schedulers on hand-made rung records, in this process: multi-objective ASHA's decisions
(non-dominated sorting on val PPL and KV bytes/token), ASHA's against Ray Tune's, the LM rule, the state that
survives a new driver, and ``--scheduler``."""

from __future__ import annotations

import json
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from kvsweep.config import ConfigError, DataCfg, KvsweepError, SweepCfg, TrainCfg
from kvsweep.losses import LossCfg
from kvsweep.sweepargs import sweep_cfg, sweep_parser
from kvsweep.tune import moasha
from kvsweep.tune.fifo import FIFO
from kvsweep.tune.moasha import MOASHA, crowding_distances, nondominated_fronts, pareto_places
from kvsweep.tune.rounds import lm_peak, make_scheduler
from kvsweep.tune.scheduler import SCHEDULER_FILE, DurableASHA, Rung, asha_keeps, milestones, read_state
from kvsweep.tune.spec import SpecificationError, SweepRecord, plan, specification
from kvsweep.tune.store import SweepStore

INF = math.inf
PEAKS = {"lm": 1.0, "rec_to_lm": 1.0, "rec": 0.0}  # the peak of each schedule's LM weight (LossCfg.named)


def _trial(tid: str, schedule: str = "lm"):
    return SimpleNamespace(trial_id=tid, config={"schedule": schedule})


def _make(cls, store: SweepStore, *, max_t: int = 8, rf: float = 2, lm_rule: bool = True):
    s = cls(store, max_t=max_t, grace_period=1, reduction_factor=rf, lm_peak=(lambda c: PEAKS[c["schedule"]]) if lm_rule else None)
    s.set_search_properties("val_ppl", "min")
    return s


def _result(epoch: int, ppl: float, size: int = 1000, w_lm: float = 1.0) -> dict:
    return {"epoch": epoch, "val_ppl": ppl, "kv_bytes_per_token": size, "w_lm": w_lm}


def _report(s, tid: str, *args, schedule: str = "lm", **kw) -> str:
    return s.on_trial_result(None, _trial(tid, schedule), _result(*args, **kw))


# --- non-dominated sorting -------------------------------------------------------------------------------

def test_fronts_crowding_and_places_of_hand_made_points():
    pts = np.array([(50, 1000), (55, 700), (70, 300), (60, 800), (80, 300), (50, 1000)], dtype=float)
    assert nondominated_fronts(pts).tolist() == [0, 0, 0, 1, 1, 0]  # (60, 800) behind (55, 700); equal points one front
    front = np.array([(1, 5), (2, 4), (2.5, 3.5), (3, 3), (4, 2), (5, 1)], dtype=float)
    cd = crowding_distances(front)
    assert cd[0] == cd[-1] == INF and cd[1:-1].tolist() == pytest.approx([0.75, 0.5, 0.75, 1.0])
    assert crowding_distances(np.array([(1.0, 2.0), (1.0, 2.0), (3.0, 1.0)])).tolist() == [INF] * 3  # two distinct points
    # places: fronts first, then the most isolated; equal keys share a place; non-finite points last
    assert pareto_places(front).tolist() == [0, 3, 5, 3, 2, 0]
    assert pareto_places([(50, 1000), (INF, 100), (52, 800), (53, 900), (51, 950), (math.nan, 100)]).tolist() == [0, 4, 0, 3, 2, 4]
    assert pareto_places([(50, 1000), (50, 1000), (60, 1000)]).tolist() == [0, 0, 2]
    assert pareto_places(np.zeros((0, 2))).tolist() == []


def test_places_depend_only_on_the_set_of_points():
    rng = np.random.default_rng(0)
    pts = np.c_[rng.integers(40, 60, 40), rng.choice([300, 500, 700, 1000], 40)].astype(float)
    places = pareto_places(pts)
    for _ in range(5):
        perm = rng.permutation(len(pts))
        assert pareto_places(pts[perm]).tolist() == places[perm].tolist()


def _brute_places(pts: np.ndarray) -> list[int]:
    """Places from the definitions, O(N^2) per front: fronts by repeated removal of the non-dominated points, the
    crowding distance over each front's distinct points, non-finite points last."""
    n = len(pts)
    finite = np.isfinite(pts).all(axis=1)
    front = np.full(n, -1)
    left, k = set(np.flatnonzero(finite).tolist()), 0
    while left:
        dominated = {j for j in left for i in left if (pts[i] <= pts[j]).all() and (pts[i] < pts[j]).any()}
        for j in left - dominated:
            front[j] = k
        left, k = dominated, k + 1
    crowd = np.zeros(n)
    for f in range(k):
        members = np.flatnonzero(front == f)
        distinct = sorted({tuple(p) for p in pts[members].tolist()})
        dist = dict.fromkeys(distinct, 0.0)
        if len(distinct) <= 2:
            dist = dict.fromkeys(distinct, INF)
        else:
            for m in range(pts.shape[1]):
                order = sorted(distinct, key=lambda p: p[m])  # stable over the lexicographic order
                span = order[-1][m] - order[0][m]
                if span <= 0:
                    continue
                dist[order[0]] = dist[order[-1]] = INF
                for a, b, c in zip(order, order[1:], order[2:]):
                    dist[b] += (c[m] - a[m]) / span
        for i in members:
            crowd[i] = dist[tuple(pts[i].tolist())]
    front[~finite] = k
    key = [(front[i], -crowd[i]) for i in range(n)]
    return [sum(key[j] < key[i] for j in range(n)) for i in range(n)]


def test_places_match_their_definition_on_random_points_with_ties_and_non_finite_values():
    """The sort takes O(N log N) for two objectives; its places are those of the definitions, computed directly."""
    rng = np.random.default_rng(3)
    for case in range(150):
        n, m = int(rng.integers(1, 40)), (2, 2, 3)[case % 3]
        pts = rng.integers(0, 5, size=(n, m)).astype(float) if case % 2 else rng.normal(size=(n, m)).round(1)
        if case % 5 == 0:
            pts[rng.integers(0, n, 2)] = (math.nan, INF, 1.0)[:m] if m == 3 else (math.nan, 1.0)
        assert pareto_places(pts).tolist() == _brute_places(pts), pts.tolist()


def test_both_two_objective_sorts_give_the_fronts_of_the_general_sort_on_large_sets_with_few_byte_values():
    """Two objectives are sorted by groups of equal bytes (few distinct values) or by Kung's sweep; both give the
    fronts of the O(N^2) sort (taken here through a constant third objective, which changes no dominance), and so
    do the places, rebuilt from those fronts and each front's crowding distances."""
    rng = np.random.default_rng(5)
    for case in range(40):
        n = int(rng.integers(200, 1500))
        ppl = rng.normal(50, 5, n).round(int(rng.integers(0, 3)))  # ties at 0 decimals
        size = rng.choice([256.0, 512.0, 1024.0, 2048.0][: 1 + case % 4], n)
        pts = np.c_[ppl, size] if case % 2 else np.c_[size, ppl]  # the grouped objective either first or second
        distinct, index = moasha._distinct(pts)
        general = nondominated_fronts(np.c_[pts, np.zeros(n)])
        assert moasha._fronts_grouped(distinct, 1 - case % 2, moasha._dense_ranks(distinct))[index].tolist() == general.tolist()
        assert moasha._fronts_sweep(distinct)[index].tolist() == general.tolist()
        assert nondominated_fronts(pts).tolist() == general.tolist()
        key = np.zeros(n)
        for f in np.unique(general):
            key[general == f] = -crowding_distances(pts[general == f])
        expected = [int(((general < general[i]) | ((general == general[i]) & (key < key[i]))).sum()) for i in range(n)]
        assert pareto_places(pts).tolist() == expected


def test_two_objectives_are_sorted_by_groups_of_the_one_with_few_values_whichever_column_it_is(monkeypatch):
    calls = []
    for name in ("_fronts_grouped", "_fronts_sweep"):
        fn = getattr(moasha, name)
        monkeypatch.setattr(moasha, name, lambda *a, fn=fn, name=name: calls.append((name, a[1] if len(a) > 1 else None)) or fn(*a))
    rng = np.random.default_rng(2)
    ppl, size, spread = rng.normal(50, 5, 2000), rng.choice([2048.0, 256.0], 2000), rng.normal(500, 50, 2000)
    spread[np.argmax(ppl)] = spread.min() - 1  # the last point in lexicographic order has the lowest second objective
    for pts, expected in ((np.c_[ppl, size], ("_fronts_grouped", 1)), (np.c_[size, ppl], ("_fronts_grouped", 0)),
                          (np.c_[ppl, spread], ("_fronts_sweep", None))):
        calls.clear()
        nondominated_fronts(pts)
        assert calls == [expected]


def test_moashas_decisions_from_the_points_it_keeps_per_rung_are_those_of_the_places_computed_afresh(tmp_path):
    """MOASHA keeps each rung's records sorted between decisions (``RungPoints``: one insertion per record, a full sort
    only when many arrive at once, as from a stored state); each decision is the one the places of all the rung's
    records and the newcomer, computed from scratch, give."""
    rng = np.random.default_rng(11)
    for case in range(12):
        s = _make(MOASHA, SweepStore(str(tmp_path), f"s{case}"), rf=(2, 3, 4)[case % 3], lm_rule=False)
        rung = Rung(1.0)
        if case % 4 == 0:  # a stored rung read back: many records before the first decision
            rung.recorded.update({f"old{i}": (round(float(rng.normal(50, 5)), 1), 512.0) for i in range(200)})
        for i in range(400):
            record = (round(float(rng.normal(50, 5)), case % 3), float(rng.choice([256, 512, 1024, 2048][: 1 + case % 4])))
            if rng.random() < 0.03:
                record = (math.nan, record[1]) if rng.random() < 0.5 else (INF, record[1])
            if rng.random() < 0.1 and rung.recorded:  # a repeat of an earlier point
                record = tuple(rung.values()[int(rng.integers(len(rung.recorded)))].tolist())
            others = rung.values()
            places = pareto_places(np.vstack([others, record])) if len(others) else np.zeros(1)
            expected = not len(others) or asha_keeps(float(places[-1]), places[:-1].astype(float), s._rf)
            assert s.keeps(record, rung) == expected, (case, i)
            rung.recorded[f"t{i}"] = record
            if i % 97 == 0:  # records that arrive without a decision (trials that completed at this rung)
                rung.recorded.update({f"c{i}.{j}": (float(rng.normal(50, 5)), 512.0) for j in range(int(rng.integers(1, 40)))})


@pytest.mark.parametrize("m", [2, 3])
def test_moashas_decision_from_the_fronts_that_decide_is_the_one_from_every_place(m):
    """The decision computes crowding distances only in the newcomer's front and the fronts holding the order
    statistics of the cutoff; it must be ``asha_keeps`` over every place, for any reduction factor, rung size and ties
    (integer places whose cutoff falls exactly on one, e.g. three places apart at a third)."""
    rng = np.random.default_rng(5 + m)
    for case in range(3000):
        n = int(rng.integers(0, 40 if case % 2 else 400))
        levels = int(rng.integers(1, 6))
        pts = np.c_[rng.integers(0, 3 + case % 25, (n + 1, 1)).astype(float), rng.integers(0, levels, (n + 1, m - 1)) * 256.0]
        pts[rng.random(n + 1) < (0.05, 0.5, 1.0)[case % 3], 0] = rng.choice([np.nan, np.inf, -np.inf])  # diverged trials
        rf = float(rng.choice([1.5, 2, 2.5, 3, 4, 7]))
        places = pareto_places(pts)
        expected = asha_keeps(float(places[-1]), places[:-1].astype(float), rf)
        finite, distinct, count, index = moasha._finite_distinct(pts)
        at = int(index[-1]) if finite[-1] else -1
        assert moasha._newcomer_keeps(distinct, count, at, int((~finite[:-1]).sum()), rf) == expected, case


def test_a_rungs_values_follow_its_records_however_they_were_added():
    rung = Rung(1.0)
    assert rung.values().shape[0] == 0
    rung.recorded.update({f"a{i}": (float(i), 2.0 * i) for i in range(3)})  # as a stored state is loaded
    assert rung.values().tolist() == [[0.0, 0.0], [1.0, 2.0], [2.0, 4.0]]
    for i in range(3, 200):  # as decisions record, past the buffer's first size
        rung.recorded[f"a{i}"] = (float(i), 2.0 * i)
        if i % 37 == 0:
            assert rung.values().tolist() == [list(v) for v in rung.recorded.values()]
    assert rung.values().tolist() == [list(v) for v in rung.recorded.values()]


# --- decisions at a rung ---------------------------------------------------------------------------------

def test_moasha_keeps_a_low_byte_trial_that_asha_stops(tmp_path):
    """Rank 512 reaches rung 1 first, then rank 256 and rank 64 with worse PPLs and fewer bytes: ASHA on PPL
    stops both, MOASHA keeps them (the front's low-byte end); a trial dominated by rank 256 stops under both."""
    decisions = {}
    for cls in (MOASHA, DurableASHA):
        s = _make(cls, SweepStore(str(tmp_path), cls.NAME))
        decisions[cls.NAME] = [_report(s, t, 1, ppl, size) for t, ppl, size in
                               (("r512", 50.0, 1000), ("r256", 55.0, 700), ("r64", 70.0, 200), ("worse256", 58.0, 700))]
    assert decisions == {"moasha": ["CONTINUE", "CONTINUE", "CONTINUE", "STOP"], "asha": ["CONTINUE", "STOP", "STOP", "STOP"]}


def test_ties_and_rungs_with_fewer_trials_than_the_reduction_factor_are_decided_as_asha_decides(tmp_path):
    s = _make(MOASHA, SweepStore(str(tmp_path), "a"), rf=3)
    assert _report(s, "a", 1, INF, 500) == "CONTINUE"  # an empty rung: the first goes on, whatever it reports
    s = _make(MOASHA, SweepStore(str(tmp_path), "b"), rf=3)
    assert _report(s, "a", 1, 50.0, 1000) == "CONTINUE"
    assert _report(s, "tie", 1, 50.0, 1000) == "CONTINUE"  # equal objectives: a tie with the cutoff goes on
    assert _report(s, "other_end", 1, 90.0, 100) == "CONTINUE"  # one of fewer than 3, not dominated: goes on
    assert _report(s, "dominated", 1, 51.0, 1000) == "STOP"  # behind the others: stopped, as ASHA stops a worse one
    assert _report(s, "diverged", 1, INF, 50) == "STOP"  # a non-finite PPL is behind every finite one
    a = _make(DurableASHA, SweepStore(str(tmp_path), "c"), rf=3)
    assert [_report(a, t, 1, p) for t, p in (("a", 50.0), ("tie", 50.0), ("worse", 51.0))] == ["CONTINUE", "CONTINUE", "STOP"]


def test_with_equal_bytes_moasha_decides_on_ppl():
    for others, value in (([50.0], 49.0), ([50.0], 51.0), ([50.0, 60.0, 40.0], 45.0), ([50.0, 60.0, 40.0], 55.0), ([40, 50, 60, 70, 80], 65)):
        places = pareto_places([(o, 700.0) for o in others] + [(value, 700.0)])
        assert asha_keeps(places[-1], places[:-1], 2) == asha_keeps(value, others, 2), (others, value)


def test_durable_asha_decides_as_ray_tunes_asha(tmp_path):
    """Trials report asynchronously, in a random interleaving, with random PPLs; some end early (their last
    result recorded on completion). Without the LM rule every decision equals Ray Tune's ASHAScheduler's."""
    rnd = random.Random(0)
    for case in range(6):
        rf, max_t = (2, 3)[case % 2], 9
        ours = _make(DurableASHA, SweepStore(str(tmp_path), f"s{case}"), max_t=max_t, rf=rf, lm_rule=False)
        ray = ASHAScheduler(time_attr="epoch", max_t=max_t, grace_period=1, reduction_factor=rf, metric="val_ppl", mode="min")
        epoch = {f"t{i}": 0 for i in range(12)}
        last = {f"t{i}": rnd.randint(1, max_t + 1) for i in range(12)}  # max_t + 1: ends at max_t by Tune's stop
        for tid in epoch:
            ours.on_trial_add(None, _trial(tid))
            ray.on_trial_add(None, _trial(tid))
        while epoch:
            tid = rnd.choice(sorted(epoch))
            epoch[tid] += 1
            result = _result(epoch[tid], rnd.uniform(40, 60))
            if epoch[tid] == last[tid]:  # ends by itself (early stopping): Tune calls on_trial_complete
                ours.on_trial_complete(None, _trial(tid), result)
                ray.on_trial_complete(None, _trial(tid), result)
                del epoch[tid]
                continue
            decision = ours.on_trial_result(None, _trial(tid), result)
            assert decision == ray.on_trial_result(None, _trial(tid), result), (case, tid, result)
            if decision == "STOP":
                del epoch[tid]


def test_milestones_are_ray_tunes():
    for max_t, grace, rf in ((30, 1, 2), (3, 1, 2), (27, 1, 3), (10, 2, 1.5)):
        ray = ASHAScheduler(time_attr="epoch", max_t=max_t, grace_period=grace, reduction_factor=rf)
        assert milestones(max_t, grace, rf) == sorted(m for m, _ in ray._brackets[0]._rungs)


# --- the LM rule -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [MOASHA, DurableASHA])
def test_a_rung_judges_a_trial_only_once_its_lm_weight_is_half_its_peak(tmp_path, cls):
    """Rungs at 1, 2, 4 (max_t 8). A rec_to_lm trial reports w_lm = epoch/8: rungs 1 and 2 pass it (far worse,
    not stopped, not recorded), rung 4 judges it (w_lm 0.5) against the lm trials' epoch-4 results."""
    s = _make(cls, SweepStore(str(tmp_path), "s"))
    for e in (1, 2, 4):
        assert _report(s, "lm", e, 40.0 - e) == "CONTINUE"
    assert _report(s, "late", 1, 400.0, w_lm=1 / 8, schedule="rec_to_lm") == "CONTINUE"
    assert _report(s, "late", 2, 300.0, w_lm=2 / 8, schedule="rec_to_lm") == "CONTINUE"
    assert _report(s, "late", 3, 200.0, w_lm=3 / 8, schedule="rec_to_lm") == "CONTINUE"
    assert _report(s, "late", 4, 100.0, w_lm=4 / 8, schedule="rec_to_lm") == "STOP"
    state = read_state(SweepStore(str(tmp_path), "s"))
    assert [(r["milestone"], sorted(r["recorded"]), r["passed"]) for r in state["rungs"]] == [
        (1, ["lm"], ["late"]), (2, ["lm"], ["late"]), (4, ["late", "lm"], []), (8, [], [])]
    # passed rungs stay behind the trial: a later result is never judged at them
    s = _make(cls, SweepStore(str(tmp_path), "t"))
    assert _report(s, "lm", 2, 40.0) == "CONTINUE"
    assert _report(s, "late", 2, 99.0, w_lm=0.25, schedule="rec_to_lm") == "CONTINUE"
    assert _report(s, "late", 3, 99.0, w_lm=0.9, schedule="rec_to_lm") == "CONTINUE"  # no rung at 3; rung 2 was passed


def test_a_schedule_without_lm_weight_is_never_stopped_and_weights_are_compared_with_a_tolerance(tmp_path):
    s = _make(MOASHA, SweepStore(str(tmp_path), "s"))
    for e in (1, 2, 4):
        assert _report(s, "lm", e, 40.0) == "CONTINUE"
        assert _report(s, "rec", e, 1e6, 2000, w_lm=0.0, schedule="rec") == "CONTINUE"
    assert _report(s, "rec", 8, 1e6, 2000, w_lm=0.0, schedule="rec") == "STOP"  # max_t ends every trial
    cosine_half = (1 - math.cos(math.pi * 0.5)) / 2  # 0.49999999999999994: rec_to_lm_cosine at half the run
    assert cosine_half < 0.5 and s.lm_weighted(_trial("c", "rec_to_lm"), _result(4, 50.0, w_lm=cosine_half))
    assert not s.lm_weighted(_trial("c", "rec_to_lm"), _result(4, 50.0, w_lm=0.49))
    # a failed trial's last report has no weights (EpochReport.failed): neither judged nor passed
    assert s.on_trial_result(None, _trial("f"), {"epoch": 1, "val_ppl": INF}) == "CONTINUE"
    assert "f" not in s._rungs[-1].passed and "f" not in s._rungs[-1].recorded


def test_the_lm_peak_comes_from_the_trials_schedule():
    sweep = SweepCfg(name="s", data=DataCfg(train_samples=8, val_samples=4), train=TrainCfg(epochs=4))
    for name in ("lm", "rec_to_lm", "rec_to_lm_cosine", "rec_to_lm_step", "rec"):
        assert lm_peak({"vdproj.rank": 8, "schedule": name}, sweep=sweep) == LossCfg.named(name).lm.peak
    assert lm_peak({"vdproj.rank": 8}, sweep=sweep) == 1.0  # the default schedule, lm
    assert lm_peak({"vdproj.rank": 8, "schedule": "rec"}, sweep=sweep) == 0.0


# --- state across drivers --------------------------------------------------------------------------------

def test_asha_decides_after_a_new_driver_as_it_would_have_without_one(tmp_path):
    """A trial reaches rung 1; a worse one arrives after the driver changed. Ray Tune's plain ASHA starts the new
    driver with empty rungs and lets it go on; the durable one stops it, as one driver throughout would."""
    store = SweepStore(str(tmp_path), "s")
    first = _make(DurableASHA, store, max_t=4)
    assert _report(first, "a", 1, 40.0) == "CONTINUE"
    whole = _make(DurableASHA, SweepStore(str(tmp_path), "other"), max_t=4)  # the same trials, one driver throughout
    assert [_report(whole, tid, 1, ppl) for tid, ppl in (("a", 40.0), ("c", 60.0))] == ["CONTINUE", "STOP"]
    plain = ASHAScheduler(time_attr="epoch", max_t=4, grace_period=1, reduction_factor=2, metric="val_ppl", mode="min")
    plain.on_trial_add(None, _trial("c"))
    assert _report(plain, "c", 1, 60.0) == "CONTINUE"  # what was lost
    assert _report(_make(DurableASHA, store, max_t=4), "c", 1, 60.0) == "STOP"  # the continued driver
    assert _report(_make(DurableASHA, store, max_t=4), "c", 1, 1.0) == "STOP"  # a stopped trial that resumes is stopped
    assert read_state(SweepStore(str(tmp_path), "s"))["stopped"] == {"c": 1}


def test_moasha_decides_after_a_new_driver_as_without_one(tmp_path):
    store = SweepStore(str(tmp_path), "s")
    first = _make(MOASHA, store)
    assert _report(first, "a", 1, 40.0, 1000) == "CONTINUE"
    assert _report(first, "late", 1, 90.0, 1000, w_lm=0.1, schedule="rec_to_lm") == "CONTINUE"  # passed at rung 1
    assert _report(first, "b", 1, 45.0, 1000) == "STOP"
    second = _make(MOASHA, store)  # the continued driver reads the rungs back
    assert _report(second, "c", 1, 60.0, 300) == "CONTINUE"  # not dominated by the records of the first driver
    assert _report(second, "d", 1, 41.0, 1000) == "STOP"  # dominated by a, recorded by the first driver
    assert _report(second, "b", 1, 1.0, 10) == "STOP"  # a stopped trial that resumes is stopped, whatever it reports
    assert _report(second, "late", 2, 90.0, 1000, w_lm=0.1, schedule="rec_to_lm") == "CONTINUE"  # rung 2: passed
    third = _make(MOASHA, store)
    assert third._rungs[-1].passed == {"late"} and third._rungs[-2].passed == {"late"}
    assert third._rungs[-1].recorded == {"a": (40.0, 1000.0), "b": (45.0, 1000.0), "c": (60.0, 300.0), "d": (41.0, 1000.0)}
    assert _report(third, "late", 3, 90.0, 1000, w_lm=0.9, schedule="rec_to_lm") == "CONTINUE"  # rungs 1, 2 stay passed
    state = read_state(SweepStore(str(tmp_path), "s"))
    assert state["scheduler"] == "moasha" and state["stopped"] == {"b": 1, "d": 1}


@pytest.mark.parametrize("cls", [MOASHA, DurableASHA])
def test_a_trial_stopped_after_its_last_checkpoint_trains_up_to_its_stop_again(tmp_path, cls):
    """The driver is killed between a stop at epoch 2 and Tune's record of epoch 2: the trial resumes from its epoch-1
    checkpoint, reports epoch 1 again (not judged again: rung 1 holds it), trains epoch 2 and is stopped there."""
    store = SweepStore(str(tmp_path), "s")
    first = _make(cls, store)
    assert [_report(first, t, e, p) for e, t, p in ((1, "x", 40.0), (1, "y", 40.0), (2, "x", 35.0), (2, "y", 39.0))] == [
        "CONTINUE", "CONTINUE", "CONTINUE", "STOP"]
    second = _make(cls, store)
    assert _report(second, "y", 1, 40.0) == "CONTINUE" and _report(second, "y", 2, 39.0) == "STOP"


class _CountingStore(SweepStore):
    """A sweep folder that counts the bytes written to it."""

    written = 0

    def write_bytes(self, name: str, data: bytes) -> None:
        self.written += len(data)
        super().write_bytes(name, data)


@pytest.mark.parametrize("cls", [MOASHA, DurableASHA])
def test_the_state_written_per_decision_does_not_grow_with_the_sweep_and_reads_back_whole(tmp_path, cls):
    """2,000 trials through three rungs. Rewriting the whole state at each change writes O(N^2) bytes (here some
    400 MB); the journal writes each change once and a snapshot each time the journal grew by a quarter of the state.
    Read back at any point, the state is the live scheduler's."""
    store = _CountingStore(str(tmp_path), "s")
    live = _make(cls, store)
    rng = random.Random(0)
    for i in range(2000):
        tid, ppl, size = f"t{i:05d}", rng.uniform(30, 90), rng.choice([300, 500, 1000])
        for epoch in (1, 2, 4):
            if _report(live, tid, epoch, ppl - epoch, size) == "STOP":
                break
        if i in (700, 1999):  # a new driver reads the same rungs
            again = _make(cls, SweepStore(str(tmp_path), "s"))
            assert [(r.recorded, r.passed) for r in again._rungs] == [(r.recorded, r.passed) for r in live._rungs]
            assert again._stopped == live._stopped  # so its decisions are the live one's
    snapshot = len((tmp_path / "s" / SCHEDULER_FILE).read_bytes())
    assert store.written < 12 * snapshot, (store.written, snapshot)
    assert len(list((tmp_path / "s" / "scheduler").iterdir())) <= 2000 * 3 // 4  # the journal is compacted


def test_journal_entries_a_snapshot_holds_are_skipped_and_a_bad_state_is_refused(tmp_path):
    store = SweepStore(str(tmp_path), "s")
    s = _make(DurableASHA, store, max_t=4)
    for tid, ppl in (("a", 40.0), ("b", 50.0), ("c", 45.0)):
        _report(s, tid, 1, ppl)
    state = read_state(store)
    assert state["rungs"][0]["recorded"] == {"a": [40.0], "b": [50.0], "c": [45.0]} and state["stopped"] == {"b": 1}
    raw = json.loads((tmp_path / "s" / SCHEDULER_FILE).read_text())
    assert raw["format"] == 3 and raw["journal"] == 1 and len(list((tmp_path / "s" / "scheduler").iterdir())) == 2
    # a driver killed after a snapshot, before it deleted the entries the snapshot holds: they are not folded in twice
    assert state["entries"] == 2
    store.write_json(SCHEDULER_FILE, {**raw, "journal": 3, "stopped": {"b": 1, "c": 7}})
    assert read_state(store)["stopped"] == {"b": 1, "c": 7} and read_state(store)["entries"] == 0
    store.write_json("scheduler/0000000004.json", {"events": [["pass", 1.0, "p"], ["pass", 1.0, "p"]]})
    rung1 = next(r for r in read_state(store)["rungs"] if r["milestone"] == 1.0)
    assert rung1["passed"] == ["p"] and read_state(store)["entries"] == 1  # a trial passed twice is kept once
    store.write_json("scheduler/0000000005.json", {"events": [["record", 16.0, "z", [1.0]]]})
    with pytest.raises(KvsweepError, match="names no rung"):
        read_state(store)
    store.write_json(SCHEDULER_FILE, {**raw, "format": 9})
    with pytest.raises(KvsweepError, match="format 9; this kvsweep reads formats 1 to 3"):
        _make(DurableASHA, store, max_t=4)
    store.delete(SCHEDULER_FILE)
    with pytest.raises(KvsweepError, match="holds scheduler journal entries but .*scheduler.json is missing"):
        read_state(store)


def test_asha_state_written_by_older_kvsweep_continues_and_other_state_is_refused(tmp_path):
    store = SweepStore(str(tmp_path), "s")
    older = {"format": 1, "brackets": [[{"milestone": 4.0, "recorded": {}}, {"milestone": 2.0, "recorded": {}},
                                        {"milestone": 1.0, "recorded": {"a": -40.0}}]], "stopped": {"c": 1}}
    store.write_json(SCHEDULER_FILE, older)  # DurableASHA's file before moasha: Ray's rewards (-val_ppl)
    s = _make(DurableASHA, store, max_t=4)
    assert s._rungs[-1].recorded == {"a": (40.0,)} and _report(s, "c", 2, 1.0) == "STOP"
    assert _report(s, "b", 1, 41.0) == "STOP"
    store.write_json(SCHEDULER_FILE, older)
    with pytest.raises(KvsweepError, match="state of the asha scheduler; continue the sweep with --scheduler asha"):
        _make(MOASHA, store, max_t=4)
    with pytest.raises(KvsweepError, match=r"other asha rungs \(epochs 1, 2, 4\).*--grace-period and --reduction-factor"):
        DurableASHA(store, max_t=30, grace_period=1, reduction_factor=3)


# --- --scheduler -----------------------------------------------------------------------------------------

def _cfg(*argv: str) -> SweepCfg:
    return sweep_cfg(sweep_parser("x", "v").parse_args(["--smoke-test", *argv]), "v")


def test_the_scheduler_flag_and_its_deprecated_alias(tmp_path):
    assert _cfg().scheduler == "moasha" and _cfg("--scheduler", "asha").scheduler == "asha"
    assert _cfg("--no-asha").scheduler == "fifo" == _cfg("--no-asha", "--scheduler", "fifo").scheduler
    with pytest.raises(ConfigError, match="--no-asha is --scheduler fifo"):
        _cfg("--no-asha", "--scheduler", "moasha")
    with pytest.raises(SystemExit):
        _cfg("--scheduler", "hyperband")
    with pytest.raises(ConfigError, match="scheduler must be one of moasha, asha, fifo"):
        SweepCfg(scheduler="hyperband")
    SweepCfg(scheduler="fifo", grace_period=5, train=TrainCfg(epochs=2))  # no rungs: any grace period
    with pytest.raises(ConfigError, match="grace_period"):
        SweepCfg(scheduler="moasha", grace_period=5, train=TrainCfg(epochs=2))
    store = SweepStore(str(tmp_path), "s")
    kinds = {name: type(make_scheduler(SweepCfg(scheduler=name, train=TrainCfg(epochs=4)), store)) for name in ("moasha", "asha", "fifo")}
    assert kinds == {"moasha": MOASHA, "asha": DurableASHA, "fifo": FIFO}


class _Controller:
    """Tune's controller as a scheduler sees it: the experiment's trials in order (counting the walks over them) and the
    live ones (not terminated)."""

    def __init__(self):
        self.trials, self.walks = [], 0

    def get_trials(self):
        self.walks += 1
        return self.trials

    def get_live_trials(self):
        return {t for t in self.trials if t.status not in (Trial.TERMINATED, Trial.ERROR)}


class _LiveTrial:
    def __init__(self, trial_id: str):
        self.trial_id, self.status, self.config = trial_id, Trial.PENDING, {"schedule": "lm"}


@pytest.mark.parametrize("name", ["moasha", "asha", "fifo"])
def test_the_next_trial_is_fifos_choice_read_from_the_live_trials_alone(tmp_path, name):
    """Tune asks for the next trial at every step of its loop; Ray's FIFO choice walks every trial of the experiment,
    finished ones first (O(N) per step). kvsweep's schedulers make the same choice from the live trials."""
    rng = random.Random(0)
    scheduler = make_scheduler(SweepCfg(scheduler=name, train=TrainCfg(epochs=4)), SweepStore(str(tmp_path), "s"))
    ray_fifo, ctl = FIFOScheduler(), _Controller()
    statuses = [Trial.PENDING, Trial.RUNNING, Trial.PAUSED, Trial.TERMINATED, Trial.ERROR]
    for i in range(300):
        trial = _LiveTrial(f"t{i:03d}")
        ctl.trials.append(trial)
        scheduler.on_trial_add(ctl, trial)
        for t in rng.sample(ctl.trials, min(3, len(ctl.trials))):
            t.status = rng.choice(statuses)
        if rng.random() < 0.1:  # a failed trial re-queued at the end of Tune's list, added again
            t = rng.choice(ctl.trials)
            ctl.trials.remove(t)
            ctl.trials.append(t)
            t.status = Trial.PENDING
            scheduler.on_trial_add(ctl, t)
        walks = ctl.walks
        expected = ray_fifo.choose_trial_to_run(ctl)
        assert ctl.walks > walks
        walks = ctl.walks
        assert scheduler.choose_trial_to_run(ctl) is expected
        assert ctl.walks == walks  # the live trials only
    for t in ctl.trials:
        t.status = Trial.TERMINATED
    assert scheduler.choose_trial_to_run(ctl) is None is ray_fifo.choose_trial_to_run(ctl)


def test_a_sweep_stored_with_asha_continues_under_asha_and_is_refused_under_moasha():
    space = {"rank": [32, 64], "seed": [0]}
    asha = SweepCfg(name="s", scheduler="asha", data=DataCfg(train_samples=64, val_samples=16), train=TrainCfg(epochs=2))
    stored_spec = specification(asha, space, "d")
    assert {k: v for k, v in stored_spec.items() if k.startswith("scheduler")} == {
        "scheduler": "asha", "scheduler.grace_period": 1, "scheduler.reduction_factor": 2.0}  # as older kvsweep wrote it
    p = plan(None, stored_spec, space, asha)
    p.record.rounds[0].finished = True
    stored = SweepRecord.from_json(p.record.to_json(), "sweep.json")
    assert plan(stored, specification(asha, space, "d"), space, asha).todo == []
    moasha = SweepCfg(name="s", data=DataCfg(train_samples=64, val_samples=16), train=TrainCfg(epochs=2))
    with pytest.raises(SpecificationError) as e:
        plan(stored, specification(moasha, space, "d"), space, moasha)
    assert [ln for ln in str(e.value).splitlines() if ln.startswith("  ")] == ['  scheduler: "asha" -> "moasha"']
