"""The Pareto front: hand-made points (ties, duplicates, NaN) and a property test against the O(n^2) definition."""

from __future__ import annotations

import random

import numpy as np
import pytest

from kvsweep.report import pareto_front
from kvsweep.report.pareto import eligible, fronts_by_group, pareto_front_brute


def front(points: list[tuple[float, float]]) -> list[int]:
    x, y = zip(*points) if points else ((), ())
    return pareto_front(np.array(x, dtype=float), np.array(y, dtype=float)).tolist()


def test_single_point_is_the_front():
    assert front([(3.0, 7.0)]) == [0]


def test_empty_input_gives_an_empty_front():
    assert front([]) == []


def test_all_dominated_but_one():
    assert front([(5, 5), (1, 1), (2, 3), (1, 2), (4, 1), (9, 9)]) == [1]


def test_a_trade_off_curve_is_all_on_the_front_in_x_order():
    assert front([(3, 1), (1, 3), (2, 2)]) == [1, 2, 0]


def test_exact_duplicates_both_stay():
    assert front([(1, 2), (2, 1), (1, 2)]) == [0, 2, 1]


def test_duplicates_of_a_dominated_point_both_go():
    assert front([(1, 1), (2, 2), (2, 2)]) == [0]


def test_same_x_larger_y_is_dominated():
    assert front([(1, 5), (1, 4), (2, 1)]) == [1, 2]


def test_same_y_larger_x_is_dominated():
    assert front([(1, 5), (2, 5), (3, 1)]) == [0, 2]


def test_nan_points_are_ignored_and_dominate_nothing():
    assert front([(float("nan"), 0.0), (1, 1), (0.0, float("nan")), (2, 0.5)]) == [1, 3]
    assert front([(float("nan"), float("nan"))]) == []


def test_infinities_are_ordinary_values():
    inf = float("inf")
    assert front([(1, inf), (2, 3)]) == [0, 1]
    assert front([(1, inf), (2, inf)]) == [0]
    assert front([(-inf, 5), (0, 1)]) == [0, 1]


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="same length"):
        pareto_front([1, 2], [1])


def test_error_status_and_nan_metrics_are_not_eligible_and_counted():
    e = eligible(["completed", "error", "asha_stopped", "early_stopped", "error"],
                 [1, 2, float("nan"), 4, float("nan")], [1, 2, 3, float("inf"), 5])
    assert e.mask.tolist() == [True, False, False, False, False]
    assert (e.n_error, e.n_missing) == (2, 2)


def test_fronts_by_group_computes_each_groups_own_front():
    groups = ["a", "b", "a", "b", "a"]
    x = [1, 1, 2, 2, 3]
    y = [3, 1, 2, 0.5, 3]
    fronts = fronts_by_group(groups, x, y, [True, True, True, True, False])
    assert {k: v.tolist() for k, v in fronts.items()} == {"a": [0, 2], "b": [1, 3]}


@pytest.mark.parametrize("grid", [3, 10, None])
def test_matches_the_brute_force_definition_on_random_points(grid):
    """Random point sets (on a small integer grid to force ties and duplicates, or continuous, with some NaN)."""
    rng = random.Random(1234 + (grid or 0))
    for _ in range(300):
        n = rng.randint(0, 40)
        if grid:
            pts = [(float(rng.randint(0, grid)), float(rng.randint(0, grid))) for _ in range(n)]
        else:
            pts = [(rng.random(), rng.random()) for _ in range(n)]
        pts = [(float("nan"), y) if rng.random() < 0.05 else (x, y) for x, y in pts]
        x = np.array([p[0] for p in pts], dtype=float)
        y = np.array([p[1] for p in pts], dtype=float)
        fast = pareto_front(x, y)
        assert fast.tolist() == pareto_front_brute(x, y).tolist(), pts
        perm = list(range(n))
        rng.shuffle(perm)
        again = pareto_front(x[perm], y[perm])
        assert sorted(np.array(perm, dtype=int)[again].tolist()) == sorted(fast.tolist())


def test_large_input_is_fast_and_monotone():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 1000, 200_000).astype(float)
    y = rng.random(200_000)
    idx = pareto_front(x, y)
    fx, fy = x[idx], y[idx]
    assert np.all(np.diff(fx) >= 0) and np.all(np.diff(fy) <= 0)
    assert not np.any((np.diff(fx) > 0) & (np.diff(fy) == 0))  # a same-y point further right would be dominated
