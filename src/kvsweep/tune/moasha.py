"""Multi-objective ASHA: at each rung a trial goes on if it is in the best ``1/reduction_factor`` of the trials
at that rung by non-dominated sorting on (validation PPL, KV bytes/token), both minimised.

ASHA on validation PPL alone compares a rank-64 trial with a rank-512 one at the same rung and stops the
small caches first, the end of the front the study is about. ``MOASHA`` ranks a rung's trials instead:
non-dominated sorting (NSGA-II's fronts: Deb et al., "A fast and elitist multiobjective genetic algorithm:
NSGA-II", IEEE TEC 2002) orders the fronts, and within a front the crowding distance (same paper) orders
the trials, the most isolated first, so that the trials kept spread over the front (the two ends of a front
have an infinite distance: the lowest-byte trial of the first front always goes on). A trial's *place* is
the number of the rung's trials ahead of it (equal objectives, or equal front and distance, share a place).
The decision is ASHA's rule (``asha_keeps``) with the place as the value: the newcomer goes on unless its
place is above the ``100/reduction_factor``-th percentile of the places of the trials recorded before it, so
that ties and rungs with fewer than ``reduction_factor`` trials are handled as ASHA handles them (an empty
rung: it goes on; one trial recorded: it stops only if it is behind it). With equal bytes everywhere this is
``asha`` on the rank of the PPL instead of its value: the same decisions, except where Ray's cutoff falls
between two recorded PPLs and the value decides. A result whose PPL (or bytes) is not finite (a diverged
trial) is placed behind every finite one.

Schmucker et al., "Multi-objective multi-fidelity hyperparameter optimization with application to fairness"
(2021) and Salinas et al., "A multi-objective perspective on jointly tuning hardware and hyperparameters"
(NAS workshop, ICLR 2021) describe MO-ASHA; Syne Tune's ``MOASHA`` is their reference implementation. It
orders a front by an epsilon-net and keeps a newcomer whose rank among all n is at most n/reduction_factor;
kvsweep uses the crowding distance (deterministic and order-free: the places depend only on the set of points)
and the cutoff of kvsweep's ``asha``, so that both schedulers treat ties and small rungs alike. Rungs, the LM
rule and the durable state are ``DurableRungs``'s.
"""

from __future__ import annotations

import bisect
from typing import Sequence

import numpy as np

from .scheduler import DurableRungs, Rung, asha_keeps, real

BYTES = "kv_bytes_per_token"  # the second objective, from each result (the accounted bytes)


def nondominated_fronts(points: np.ndarray) -> np.ndarray:
    """The front of each point, 0 for the non-dominated ones: (N, M) objectives, all minimised -> (N,) int.

    A point dominates another when it is no worse in every objective and better in one; front k holds the
    points dominated only by points of fronts before k. Equal points are in the same front. Two objectives take
    O(N log N) steps, or O(G N) vectorised when one takes G <= N / ``GROUP_SHARE`` values (``_fronts_2d``); more take
    O(N^2) time and memory.
    """
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim == 2 and pts.shape[1] == 2:
        distinct, index = _distinct(pts)
        return _fronts_2d(distinct)[index]
    n = len(pts)
    no_worse = (pts[:, None, :] <= pts[None, :, :]).all(axis=2)  # (N, N): i no worse than j everywhere
    better = (pts[:, None, :] < pts[None, :, :]).any(axis=2)
    dominates = no_worse & better  # (N, N): i dominates j
    dominators = dominates.sum(axis=0)  # (N,)
    front = np.full(n, -1, dtype=np.int64)
    k = 0
    while (front < 0).any():
        current = (front < 0) & (dominators == 0)
        front[current] = k
        dominators = dominators - dominates[current].sum(axis=0)
        dominators[front >= 0] = -1
        k += 1
    return front


def _distinct(pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct rows of (N, M) ``pts`` in lexicographic order (as ``np.unique(axis=0)``) and each row's index among
    them: -> (U, M), (N,)."""
    order = np.lexsort(pts.T[::-1])  # by the first column, then the second, ...
    ordered = pts[order]
    new = np.r_[True, (ordered[1:] != ordered[:-1]).any(axis=1)] if len(pts) else np.zeros(0, dtype=bool)
    index = np.empty(len(pts), dtype=np.int64)
    index[order] = np.cumsum(new) - 1
    return ordered[new], index


def _fronts_2d(distinct: np.ndarray) -> np.ndarray:
    """``nondominated_fronts`` of (U, 2) distinct points in lexicographic order (``_distinct``): grouped by the
    objective with fewer distinct values (``_fronts_grouped``) when it has at most one per ``GROUP_SHARE`` points,
    else Kung's sweep (``_fronts_sweep``, a Python step per point). Both give the same fronts; only the time differs
    (10,000 points with 10 byte values: 0.9 ms grouped, 2.3 ms swept, on one 2-core CI machine)."""
    if len(distinct) == 0:
        return np.zeros(0, dtype=np.int64)
    ranks = _dense_ranks(distinct)
    sizes = [int(ranks[0][-1]) + 1, int(ranks[1].max()) + 1]  # distinct values per column (column 0's ranks ascend)
    by = int(sizes[1] < sizes[0])
    if sizes[by] * GROUP_SHARE <= len(distinct):
        return _fronts_grouped(distinct, by, ranks)
    return _fronts_sweep(distinct)


def _dense_ranks(distinct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each column's dense rank (0 for its lowest value) over (U, 2) distinct points in lexicographic order: -> (U,),
    (U,). Column 0 ascends already (no sort); column 1 is sorted."""
    x = distinct[:, 0]
    x_rank = np.cumsum(np.r_[True, x[1:] != x[:-1]]) - 1
    y_rank = np.unique(distinct[:, 1], return_inverse=True)[1].reshape(-1)
    return x_rank, y_rank


GROUP_SHARE = 64  # _fronts_2d groups by an objective with at most one distinct value per this many distinct points


def _fronts_sweep(distinct: np.ndarray) -> np.ndarray:
    """The front of each of (U, 2) distinct points in lexicographic order, one step per point: each is dominated by
    exactly the earlier ones whose second objective is no larger, so its front is the number of fronts whose lowest
    second objective so far is at or below its own (Kung et al.'s sweep; the fronts' lowest values ascend, a
    bisection finds it)."""
    lowest: list[float] = []  # per front: the lowest second objective among its points so far, ascending
    front = np.empty(len(distinct), dtype=np.int64)
    for i, y in enumerate(distinct[:, 1].tolist()):
        k = bisect.bisect_right(lowest, y)
        if k == len(lowest):
            lowest.append(y)
        else:
            lowest[k] = y
        front[i] = k
    return front


def _fronts_grouped(distinct: np.ndarray, by: int, ranks: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """The front of each of (U, 2) distinct points in lexicographic order, one vectorised step per distinct value of
    objective ``by`` (G of them: O(G * U)), ascending; ``ranks``: both columns' dense ranks (``_dense_ranks``). KV bytes
    per token take a few values in a sweep, the PPL one per trial.

    A point's front is one more than the largest front of the points dominating it. Those in earlier groups are the
    ones with the other objective ``y`` no larger: their largest front is a running maximum over ``y``'s ranks. In
    its own group a point is dominated by the points of smaller ``y`` (its group's points have distinct ``y``), so
    within a group sorted by ``y``, ``f[j] = max(f[j-1], below[j]) + 1``, that is ``j + cummax(below[j] + 1 - j)``.
    """
    g, rank = ranks[by], ranks[1 - by]
    # by group, then by y: the lexicographic order is that already when grouping by column 0; a stable sort of column 1
    # keeps column 0 ascending within each of its groups
    order = np.arange(len(distinct)) if by == 0 else np.argsort(g, kind="stable")
    best = np.full(int(rank.max()) + 1, -1, dtype=np.int64)  # per y rank: the largest front of the groups done so far
    front = np.empty(len(distinct), dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, g[order][1:] != g[order][:-1], True])
    for a, b in zip(starts[:-1], starts[1:]):
        members = order[a:b]  # one group, y ascending
        below = np.maximum.accumulate(best)[rank[members]]  # (n,): the largest front dominating each from earlier groups
        j = np.arange(b - a)
        front[members] = j + np.maximum.accumulate(below + 1 - j)
        best[rank[members]] = np.maximum(best[rank[members]], front[members])
    return front


def crowding_distances(points: np.ndarray) -> np.ndarray:
    """NSGA-II's crowding distance of each point of one front: (N, M) -> (N,), larger is more isolated.

    Per objective, the distance between a point's two neighbours in that objective over the objective's range
    in the front, summed; the points at either end of any objective whose range is not zero get ``inf``.
    Equal points get the distance of one of them (computed once, over the distinct points).
    """
    distinct, index = _distinct(np.asarray(points, dtype=np.float64))
    return _crowding_by_front(distinct, np.zeros(len(distinct), dtype=np.int64))[index]


def _crowding_by_front(values: np.ndarray, f: np.ndarray) -> np.ndarray:
    """``crowding_distances`` within each front at once: (U, M) distinct points in lexicographic order, (U,) their
    fronts -> (U,)."""
    u = len(values)
    dist = np.zeros(u)
    if u == 0:
        return dist
    two = values.shape[1] == 2  # a front's distinct points in lexicographic order ascend in the first objective and
    by_front = np.argsort(f, kind="stable") if two else None  # descend in the second: one order serves both
    for m in range(values.shape[1]):
        order = by_front if two else np.lexsort((values[:, m], f))  # by front, then by objective m (lexicographic among ties)
        v, fo = values[order, m], f[order]
        first = np.r_[True, fo[1:] != fo[:-1]]
        last = np.r_[fo[1:] != fo[:-1], True]
        at = np.arange(u)
        lo = np.maximum.accumulate(np.where(first, at, 0))  # each position's front's first and last positions
        hi = np.minimum.accumulate(np.where(last, at, u)[::-1])[::-1]
        span = v[hi] - v[lo]  # negative for the second of two objectives (descending), with the gaps: the same ratios
        moving = np.abs(span) > 0
        inner = moving & ~first & ~last
        gap = np.zeros(u)
        gap[inner] = (v[np.flatnonzero(inner) + 1] - v[np.flatnonzero(inner) - 1]) / span[inner]
        gap[moving & (first | last)] = np.inf
        dist[order] += gap
    size = np.bincount(f)  # distinct points per front
    dist[size[f] <= 2] = np.inf  # a front of at most two distinct points: all at its ends
    return dist


def pareto_places(points: Sequence[Sequence[float]]) -> np.ndarray:
    """Each point's place in the non-dominated order: the number of points ahead of it: (N, M) -> (N,) int.

    Ahead of a point are the points of earlier fronts and, in its front, those with a larger crowding distance;
    points with any objective NaN or infinite are behind every finite one and share the last place. The work is
    done over the distinct finite points, each counted as often as it occurs.
    """
    pts = np.asarray(points, dtype=np.float64)
    if len(pts) == 0:
        return np.zeros(0, dtype=np.int64)
    finite, distinct, count, index = _finite_distinct(pts)
    places = np.full(len(pts), int(finite.sum()), dtype=np.int64)  # non-finite: behind every finite point
    places[finite] = _distinct_places(distinct, count)[index]
    return places


def _finite_distinct(pts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(N, M) points -> which are finite (N,), their distinct finite points in lexicographic order (U, M), how often each
    occurs (U,), and each finite point's index among them."""
    finite = np.isfinite(pts).all(axis=1)
    distinct, index = _distinct(pts[finite])
    return finite, distinct, np.bincount(index, minlength=len(distinct)), index


def _distinct_places(distinct: np.ndarray, count: np.ndarray) -> np.ndarray:
    """``pareto_places`` of (U, M) distinct finite points in lexicographic order, each occurring ``count`` (U,) times:
    -> (U,), the points ahead of each."""
    front = _fronts_2d(distinct) if distinct.shape[1] == 2 else nondominated_fronts(distinct)
    crowd = _crowding_by_front(distinct, front)
    order = np.lexsort((-crowd, front))  # by front, then by crowding distance, largest first
    f, c = front[order], crowd[order]
    starts = np.r_[True, (f[1:] != f[:-1]) | (c[1:] != c[:-1])] if len(order) else np.zeros(0, dtype=bool)
    in_order = count[order]
    before = np.cumsum(in_order) - in_order  # the points ahead of each distinct point in the order
    place = np.empty(len(distinct), dtype=np.int64)  # per distinct point: the points ahead of the first of its run
    place[order] = np.maximum.accumulate(np.where(starts, before, 0))
    return place


class RungPoints:
    """One rung's recorded objectives for MOASHA's decisions, kept between them: the distinct finite points (U, 2) in
    lexicographic order with how often each occurs (U,), and the number of non-finite ones. Each record is added in
    O(U) (an insertion by bisection), so a decision does not sort all the rung's points again."""

    def __init__(self):
        self.distinct, self.count, self.nonfinite, self.rows = np.zeros((0, 2)), np.zeros(0, dtype=np.int64), 0, 0

    def update(self, values: np.ndarray) -> None:
        """Take in the rows of ``values`` ((N, 2), ``Rung.values``: records are only ever appended) added since the
        last call."""
        new = values[self.rows:]
        self.rows = len(values)
        if len(new) > REBUILD_ROWS:  # a stored rung read back: one sort
            finite, self.distinct, self.count, _index = _finite_distinct(values)
            self.nonfinite = int((~finite).sum())
            return
        for point in new:
            self.distinct, self.count, at = self.plus(point)
            self.nonfinite += at < 0

    def plus(self, point: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """The distinct points and their counts with ``point`` (2,) added, and its index among them (-1: not finite, not
        among them, and both arrays are this rung's own); otherwise the counts are a new array."""
        if not np.isfinite(point).all():
            return self.distinct, self.count, -1
        x, y = self.distinct[:, 0], self.distinct[:, 1]
        lo, hi = np.searchsorted(x, point[0], "left"), np.searchsorted(x, point[0], "right")
        at = int(lo + np.searchsorted(y[lo:hi], point[1], "left"))
        if at < hi and y[at] == point[1]:
            count = self.count.copy()
            count[at] += 1
            return self.distinct, count, at
        return np.insert(self.distinct, at, point, axis=0), np.insert(self.count, at, 1), at


REBUILD_ROWS = 32  # RungPoints.update sorts all the rung's records again when more than this many came at once


class MOASHA(DurableRungs):
    """Multi-objective ASHA on (the Tune metric, ``val_ppl``; ``kv_bytes_per_token``), both minimised, with the
    rungs, the LM rule and the durable state of ``DurableRungs`` (``kvsweep.tune.scheduler``); the decision is
    the module docstring's, over each rung's records kept in order between decisions (``RungPoints``: each record is
    inserted in lexicographic order as it comes, instead of a sort of all the points at each decision). Arguments and errors: ``DurableRungs``'s."""

    NAME = "moasha"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._points: dict[float, RungPoints] = {}  # per rung (its milestone): its records, sorted for the decisions

    def objectives(self, result: dict) -> tuple[float, ...] | None:
        value, size = self._metric_value(result), real(result.get(BYTES))
        return None if value is None or size is None else (value, size)

    def keeps(self, record: tuple[float, ...], rung: Rung) -> bool:
        points = self._points.setdefault(rung.milestone, RungPoints())
        points.update(rung.values())
        if not points.rows:
            return True
        distinct, count, at = points.plus(np.asarray(record, dtype=np.float64))
        return _newcomer_keeps(distinct, count, at, points.nonfinite, self._rf)


def _newcomer_keeps(distinct: np.ndarray, count: np.ndarray, at: int, nonfinite: int, reduction_factor: float) -> bool:
    """MOASHA's decision (``asha_keeps`` of the newcomer's place against the places of the rung's other records), with the
    crowding distances of the fronts that decide only: the newcomer's and those holding the cutoff's order statistics.

    Args:
        distinct, count: the rung's distinct finite points with the newcomer's (U, M), in lexicographic order, and how
            often each occurs (U,) (``RungPoints.plus``).
        at: the newcomer's index in ``distinct`` (-1: not finite).
        nonfinite: the rung's non-finite records (the newcomer's not among them).
    """
    others = count.copy()
    if at >= 0:
        others[at] -= 1
    n = int(others.sum()) + nonfinite  # the rung's records before the newcomer
    if n == 0:
        return True
    behind = int(count.sum())  # the place of a non-finite point: behind every finite one
    front = _fronts_2d(distinct) if distinct.shape[1] == 2 else nondominated_fronts(distinct)
    per_front = np.bincount(front, weights=count).astype(np.int64)
    ahead = np.cumsum(per_front) - per_front  # per front: the points (the newcomer's included) in the earlier fronts
    others_upto = np.cumsum(np.bincount(front, weights=others, minlength=len(per_front)).astype(np.int64))  # per front
    finite_others = int(others_upto[-1]) if len(others_upto) else 0
    fronts: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def members(k: int) -> tuple[np.ndarray, np.ndarray]:  # front k's distinct points (indices) and their crowding
        if k not in fronts:
            idx = np.flatnonzero(front == k)
            fronts[k] = idx, _crowding_by_front(distinct[idx], np.zeros(len(idx), dtype=np.int64))
        return fronts[k]

    def place(k: int, crowd: float) -> int:  # the place of a point of front k with crowding distance crowd
        idx, c = members(k)
        return int(ahead[k] + count[idx][c > crowd].sum())

    def nth(i: int) -> int:  # the i-th smallest (from 0) of the others' places
        if i >= finite_others:
            return behind
        k = int(np.searchsorted(others_upto, i, "right"))
        idx, c = members(k)
        order = np.argsort(-c, kind="stable")
        j = np.searchsorted(np.cumsum(others[idx][order]), i - (others_upto[k - 1] if k else 0), "right")
        return place(k, float(c[order][j]))

    mine = behind
    if at >= 0:
        idx, c = members(int(front[at]))
        mine = place(int(front[at]), float(c[np.searchsorted(idx, at)]))
    # the others' sorted places agree with this array at the order statistics around the cutoff's, so nanpercentile
    # reads the same two values (whatever its rounding of the index) and gives the cutoff it gives over all the places
    lo = int((n - 1) / reduction_factor)
    window = list(range(max(lo - 1, 0), min(lo + 2, n - 1) + 1))
    repeats = [window[0] + 1] + [1] * (len(window) - 1)
    repeats[-1] += n - 1 - window[-1]
    return asha_keeps(float(mine), np.repeat(np.array([nth(i) for i in window], dtype=np.float64), repeats), reduction_factor)
