"""Pareto fronts of (KV bytes/token, val PPL), both minimised. Pure functions over numpy arrays.

Tie rule: a point is on the front unless another point is <= on both coordinates and < on at least
one. So exact duplicates of a front point are all on the front (neither beats the other), a point
with the same x and a larger y is off it, and so is one with the same y and a larger x.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    """Which trials may be on a front: not ``error`` and both metrics finite."""

    mask: NDArray[np.bool_]
    n_error: int  # status error (whatever their metrics)
    n_missing: int  # not error, but best_val_ppl or kv_bytes_per_token NaN, null or infinite


def eligible(status: ArrayLike, kv_bytes: ArrayLike, val_ppl: ArrayLike) -> Eligibility:
    st = np.asarray(status, dtype=object)
    xs = np.asarray(kv_bytes, dtype=np.float64)
    ys = np.asarray(val_ppl, dtype=np.float64)
    is_error = st == "error"
    finite = np.isfinite(xs) & np.isfinite(ys)
    return Eligibility(mask=~is_error & finite, n_error=int(is_error.sum()), n_missing=int((~is_error & ~finite).sum()))


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
