"""Pareto fronts of (cost, val PPL), both minimised, and their hypervolume. Pure functions over numpy arrays.

Tie rule: a point is on the front unless another point is <= on both coordinates and < on at least
one. So exact duplicates of a front point are all on the front (neither beats the other), a point
with the same x and a larger y is off it, and so is one with the same y and a larger x.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray


def pareto_front(x: ArrayLike, y: ArrayLike) -> NDArray[np.intp]:
    """Indices of the points that no other point dominates, ordered by x ascending (then y, then index).

    O(n log n): sort by (x, y), then sweep the groups of equal x from left to right, keeping the
    smallest y seen at smaller x. In a group, only the points at the group's smallest y can be on the
    front, and they are exactly when that y is strictly below every y seen at smaller x (the leftmost
    group is always on the front). Points with NaN in either coordinate are ignored (never on the
    front, and they dominate nothing); +-inf are ordinary values.
    """
    xs = np.asarray(x, dtype=np.float64).ravel()
    ys = np.asarray(y, dtype=np.float64).ravel()
    if xs.shape != ys.shape:
        raise ValueError(f"x and y must have the same length, got {xs.size} and {ys.size}")
    idx = np.flatnonzero(~(np.isnan(xs) | np.isnan(ys)))
    if idx.size == 0:
        return idx
    order = idx[np.lexsort((idx, ys[idx], xs[idx]))]  # by x, then y, then index (stable output)
    sx, sy = xs[order], ys[order]
    new_group = np.empty(sx.size, dtype=bool)
    new_group[0] = True
    new_group[1:] = sx[1:] != sx[:-1]
    starts = np.flatnonzero(new_group)
    group_min = sy[starts]  # sorted by y inside each group, so its first y is its smallest
    best_left = np.empty_like(group_min)  # smallest y over all groups strictly to the left
    best_left[0] = np.inf
    if group_min.size > 1:
        best_left[1:] = np.minimum.accumulate(group_min[:-1])
    group_on = group_min < best_left
    group_on[0] = True
    group_of = np.cumsum(new_group) - 1
    on = group_on[group_of] & (sy == group_min[group_of])
    return order[on]


def pareto_front_brute(x: ArrayLike, y: ArrayLike) -> NDArray[np.intp]:
    """The same front by the definition, O(n^2); for tests. Returns indices in pareto_front's order."""
    xs = np.asarray(x, dtype=np.float64).ravel()
    ys = np.asarray(y, dtype=np.float64).ravel()
    keep = []
    valid = [i for i in range(xs.size) if not (np.isnan(xs[i]) or np.isnan(ys[i]))]
    for i in valid:
        beaten = any(
            xs[j] <= xs[i] and ys[j] <= ys[i] and (xs[j] < xs[i] or ys[j] < ys[i]) for j in valid if j != i
        )
        if not beaten:
            keep.append(i)
    return np.array(sorted(keep, key=lambda i: (xs[i], ys[i], i)), dtype=np.intp)


@dataclass(frozen=True)
class Eligibility:
    """Which trials are drawn (``mask``: not ``error``, both metrics finite) and which of them may be on a front
    (``candidate``: also of a front status, e.g. not stopped by the scheduler)."""

    mask: NDArray[np.bool_]
    candidate: NDArray[np.bool_]
    n_error: int  # status error (whatever their metrics)
    n_missing: int  # not error, but best_val_ppl or the cost NaN, null or infinite
    n_not_candidate: int  # drawn, but of a status that is no front candidate (stopped by the scheduler, running)


def eligible(status: ArrayLike, cost: ArrayLike, val_ppl: ArrayLike, front_statuses: Sequence[str] | None = None) -> Eligibility:
    """The trials' ``Eligibility``; every status but ``error`` is a front status when ``front_statuses`` is None."""
    st = np.asarray(status, dtype=object)
    xs = np.asarray(cost, dtype=np.float64)
    ys = np.asarray(val_ppl, dtype=np.float64)
    is_error = st == "error"
    finite = np.isfinite(xs) & np.isfinite(ys)
    mask = ~is_error & finite
    allowed = None if front_statuses is None else set(front_statuses)
    candidate = mask & np.array([allowed is None or s in allowed for s in st.tolist()], dtype=bool).reshape(mask.shape)
    return Eligibility(mask=mask, candidate=candidate, n_error=int(is_error.sum()), n_missing=int((~is_error & ~finite).sum()),
                       n_not_candidate=int((mask & ~candidate).sum()))


def fronts_by_group(groups: ArrayLike, x: ArrayLike, y: ArrayLike, mask: ArrayLike) -> dict[str, NDArray[np.intp]]:
    """``{group: indices of its front}`` over the points where ``mask`` holds, groups in sorted order."""
    g = np.asarray([str(v) for v in np.asarray(groups, dtype=object)], dtype=object)
    xs = np.asarray(x, dtype=np.float64)
    ys = np.asarray(y, dtype=np.float64)
    m = np.asarray(mask, dtype=bool)
    out: dict[str, NDArray[np.intp]] = {}
    if not m.any():
        return out
    names, inverse = np.unique(g[m], return_inverse=True)
    picked = np.flatnonzero(m)
    for k, name in enumerate(names):
        members = picked[inverse == k]
        out[str(name)] = members[pareto_front(xs[members], ys[members])]
    return out


def hypervolume(points: ArrayLike, reference: ArrayLike) -> float:
    """The area a set of points dominates up to ``reference``, both coordinates minimised (2-D hypervolume).

    ``points`` is (n, 2): (cost, PPL) per point, e.g. (KV bytes/token, validation PPL) of a front;
    ``reference`` is (cost, PPL), e.g. (the base's bytes, the base's PPL x 1.5). The area is that of the union of
    the boxes [x, rx] x [y, ry] over the points; a point at or beyond the reference on either coordinate adds
    nothing, NaN points are ignored, and dominated points add nothing (so any superset of a front gives the
    front's area). Sorted by x, the front's points make a staircase of disjoint slabs:
    ``sum_i (x_{i+1} - x_i) * (ry - y_i)`` with ``x_{n+1} = rx``. An empty set has 0. (Zitzler & Thiele 1998.)

    Raises:
        ValueError: ``points`` is not (n, 2), or ``reference`` is not two finite numbers.
    """
    p = np.asarray(points, dtype=np.float64)
    if p.size == 0:
        p = p.reshape(0, 2)
    if p.ndim != 2 or p.shape[1] != 2:
        raise ValueError(f"points must be an (n, 2) array of (cost, PPL), got shape {p.shape}")
    ref = np.asarray(reference, dtype=np.float64).ravel()
    if ref.size != 2 or not np.all(np.isfinite(ref)):
        raise ValueError(f"reference must be two finite numbers (cost, PPL), got {reference!r}")
    rx, ry = float(ref[0]), float(ref[1])
    inside = p[(p[:, 0] < rx) & (p[:, 1] < ry)]  # NaN compares False: left out
    if inside.size == 0:
        return 0.0
    front = inside[pareto_front(inside[:, 0], inside[:, 1])]  # x ascending, y strictly descending (duplicates aside)
    xs = np.r_[front[:, 0], rx]
    return float(np.sum(np.diff(xs) * (ry - front[:, 1])))


def normalised_hypervolume(points: ArrayLike, reference: ArrayLike) -> float:
    """``hypervolume`` with each coordinate divided by the reference's: the share of the box between the origin
    (0 cost, PPL 0) and the reference that the points dominate, in [0, 1]; free of units, so fronts of models of
    different sizes compare.

    Raises:
        ValueError: as ``hypervolume``, or a reference coordinate <= 0.
    """
    ref = np.asarray(reference, dtype=np.float64).ravel()
    if ref.size != 2 or not np.all(np.isfinite(ref)) or np.any(ref <= 0):
        raise ValueError(f"the normalised hypervolume needs a reference of two positive numbers, got {reference!r}")
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2) / ref
    return hypervolume(p, (1.0, 1.0))
