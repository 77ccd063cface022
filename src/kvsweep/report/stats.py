"""Confidence intervals over seeds: the mean of a configuration's runs and its two-sided t-interval.

A configuration run with n seeds gives n PPLs x_1..x_n. Its interval at confidence c (0.95) is

    mean +- t_{(1+c)/2, n-1} * s / sqrt(n),    s = the sample standard deviation (ddof 1)

(Student's t-distribution with n - 1 degrees of freedom; the quantile is ``scipy.stats.t.ppf``). One
seed gives a mean and no interval (low and high NaN: unknown, not zero width). Non-finite values are
left out before anything is counted.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import t as student_t

CONFIDENCE = 0.95


@functools.lru_cache(maxsize=256)
def t_quantile(dof: int, confidence: float = CONFIDENCE) -> float:
    """The two-sided t quantile ``t_{(1+c)/2, dof}``, e.g. 4.3027 for 2 degrees of freedom at 95%.

    Raises:
        ValueError: ``dof`` < 1 or ``confidence`` not in (0, 1).
    """
    if dof < 1 or not 0.0 < confidence < 1.0:
        raise ValueError(f"t quantile needs dof >= 1 and 0 < confidence < 1, got {dof} and {confidence}")
    return float(student_t.ppf(0.5 + confidence / 2.0, dof))


@dataclass(frozen=True)
class Interval:
    """The mean of n values and its t-interval; ``low``/``high`` NaN when n < 2 (no interval), all NaN when n == 0."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def has_interval(self) -> bool:
        return self.n >= 2

    def contains(self, value: float) -> bool | None:
        """Whether ``value`` lies in [low, high]; None without an interval (one seed) or for a non-finite value."""
        if not self.has_interval or not math.isfinite(value):
            return None
        return self.low <= value <= self.high


def t_interval(values: ArrayLike, confidence: float = CONFIDENCE) -> Interval:
    """Mean and two-sided t-interval of the finite ``values`` (e.g. one configuration's PPL over its seeds).

    E.g. ``[1, 2, 3]``: mean 2, s = 1, t_{0.975, 2} = 4.3027, so 2 -+ 4.3027 / sqrt(3) = [-0.484, 4.484].
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    n = int(v.size)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(v.mean())
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1)
    half = t_quantile(n - 1, confidence) * float(v.std(ddof=1)) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


@dataclass(frozen=True)
class Intervals:
    """``t_interval`` of many groups, as arrays (one entry per group)."""

    mean: NDArray[np.float64]
    low: NDArray[np.float64]
    high: NDArray[np.float64]
    n: NDArray[np.intp]

    @staticmethod
    def of(groups: Sequence[ArrayLike], confidence: float = CONFIDENCE) -> "Intervals":
        arrays = [np.asarray(g, dtype=np.float64).ravel() for g in groups]
        values = np.concatenate(arrays) if arrays else np.zeros(0)
        return Intervals.of_flat(values, np.array([a.size for a in arrays], dtype=np.intp), confidence)

    @staticmethod
    def of_flat(values: ArrayLike, sizes: ArrayLike, confidence: float = CONFIDENCE) -> "Intervals":
        """``t_interval`` of each group of ``values`` (the groups' values one after another, ``sizes[k]`` of group k),
        with numpy's reductions over all groups of one count of finite values at once: the same numbers as
        ``t_interval`` group by group (a row of a C-ordered matrix is reduced as the same values alone are).

        Raises:
            ValueError: ``sizes`` do not add up to the number of ``values``, or a size is negative.
        """
        v = np.asarray(values, dtype=np.float64).ravel()
        sizes = np.asarray(sizes, dtype=np.intp).ravel()
        if (sizes < 0).any() or int(sizes.sum()) != v.size:
            raise ValueError(f"group sizes must be >= 0 and add up to the {v.size} values, got a sum of {int(sizes.sum())}")
        finite = np.isfinite(v)
        group = np.repeat(np.arange(sizes.size), sizes)[finite]  # per finite value: its group, nondecreasing
        v = v[finite]
        counts = np.bincount(group, minlength=sizes.size)
        starts = np.cumsum(counts) - counts  # where each group's finite values begin in v
        mean, low, high = (np.full(sizes.size, np.nan) for _ in range(3))
        for n in np.unique(counts[counts > 0]).tolist():
            of_n = np.flatnonzero(counts == n)
            rows = v[starts[of_n][:, None] + np.arange(n)]  # (groups with n values, n)
            mean[of_n] = rows.mean(axis=1)
            if n >= 2:
                half = t_quantile(n - 1, confidence) * rows.std(axis=1, ddof=1) / math.sqrt(n)
                low[of_n], high[of_n] = mean[of_n] - half, mean[of_n] + half
        return Intervals(mean, low, high, counts.astype(np.intp))

    def __getitem__(self, k: int) -> Interval:
        return Interval(float(self.mean[k]), float(self.low[k]), float(self.high[k]), int(self.n[k]))


def distinguishable(interval: Interval, base: float) -> bool | None:
    """Whether a configuration's PPL is distinguishable from the base's: False when its interval holds the base's PPL
    (the base, a frozen model on fixed samples, has one value and no interval of its own), True when it does not, None
    without an interval (one seed) or without a base PPL."""
    inside = interval.contains(base)
    return None if inside is None else not inside
