"""kvsweep.report's pure functions against hand computations: t-intervals over seeds, hypervolume, memory at L and break-even."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest

from kvsweep.report import break_even, hypervolume, memory_at, normalised_hypervolume, t_interval
from kvsweep.report.memory import DEFAULT_CONTEXT, CostAxis, default_context
from kvsweep.report.stats import Interval, Intervals, distinguishable, t_quantile

# Student's t, two-sided 95% (the 0.975 quantile), from printed tables: 1 dof 12.706, 2 dof 4.303, 4 dof 2.776.
T_1, T_2, T_4 = 12.7062047, 4.3026527, 2.7764451


# --- t-intervals -----------------------------------------------------------------------------------

def test_t_quantiles_are_the_tables():
    assert t_quantile(1) == pytest.approx(T_1, rel=1e-7)
    assert t_quantile(2) == pytest.approx(T_2, rel=1e-7)
    assert t_quantile(4) == pytest.approx(T_4, rel=1e-7)


def test_interval_of_three_seeds_by_hand():
    # 60.0, 61.0, 62.5: mean 183.5 / 3 = 61.1667; squared deviations 1.36111 + 0.02778 + 1.77778 = 3.16667, / 2 = 1.58333,
    # s = 1.258306; s / sqrt(3) = 0.726483; half width 4.3026527 * 0.726483 = 3.125805.
    iv = t_interval([60.0, 61.0, 62.5])
    assert iv.n == 3 and iv.has_interval
    assert iv.mean == pytest.approx(61.166667, abs=1e-6)
    assert iv.low == pytest.approx(61.166667 - 3.125805, abs=1e-5)
    assert iv.high == pytest.approx(61.166667 + 3.125805, abs=1e-5)


def test_interval_of_one_two_and_five_values_by_hand():
    iv = t_interval([1.0, 2.0, 3.0])  # s = 1: 2 -+ 4.30265 / sqrt(3) = 2 -+ 2.48414
    assert (iv.low, iv.high) == (pytest.approx(2 - 2.48414, abs=1e-5), pytest.approx(2 + 2.48414, abs=1e-5))
    iv = t_interval([10.0, 12.0])  # s = sqrt(2), s / sqrt(2) = 1: 11 -+ 12.7062
    assert (iv.low, iv.high) == (pytest.approx(11 - T_1, abs=1e-5), pytest.approx(11 + T_1, abs=1e-5))
    iv = t_interval([2.0, 4.0, 4.0, 4.0, 6.0])  # mean 4, s^2 = 8 / 4 = 2, s / sqrt(5) = 0.632456: 4 -+ 1.75597
    assert (iv.low, iv.high) == (pytest.approx(4 - 1.75597, abs=1e-5), pytest.approx(4 + 1.75597, abs=1e-5))


def test_one_seed_has_no_interval_rather_than_zero_width():
    iv = t_interval([55.0])
    assert iv.mean == 55.0 and iv.n == 1 and not iv.has_interval
    assert math.isnan(iv.low) and math.isnan(iv.high)
    assert iv.contains(55.0) is None and distinguishable(iv, 55.0) is None


def test_non_finite_values_are_left_out_and_none_gives_nothing():
    assert t_interval([1.0, float("nan"), 2.0, 3.0, float("inf")]) == t_interval([1.0, 2.0, 3.0])
    empty = t_interval([float("nan")])
    assert empty.n == 0 and math.isnan(empty.mean)


def test_equal_seeds_give_a_zero_width_interval():
    iv = t_interval([50.0, 50.0])
    assert (iv.low, iv.high, iv.n) == (50.0, 50.0, 2)
    assert distinguishable(iv, 50.0) is False and distinguishable(iv, 50.001) is True


def test_distinguishable_from_the_base_is_the_base_outside_the_interval():
    iv = Interval(mean=51.0, low=49.5, high=52.5, n=3)
    assert distinguishable(iv, 50.0) is False  # the base's PPL lies in the interval
    assert distinguishable(iv, 49.5) is False  # on its edge too
    assert distinguishable(iv, 49.0) is True
    assert distinguishable(iv, float("nan")) is None


# --- hypervolume -----------------------------------------------------------------------------------

def test_hypervolume_of_a_hand_made_front():
    # Boxes [1, 4] x [3, 4] (area 3) and [2, 4] x [1, 4] (area 6) overlap in [2, 4] x [3, 4] (area 2): 3 + 6 - 2 = 7.
    assert hypervolume([(1, 3), (2, 1)], (4, 4)) == pytest.approx(7.0)
    assert hypervolume([(2, 1), (1, 3)], (4, 4)) == pytest.approx(7.0)  # order does not matter


def test_points_beyond_the_reference_dominated_and_nan_add_nothing():
    pts = [(1, 3), (2, 1), (3, 3.5), (2, 1),  # a dominated point and a duplicate
           (5, 0.5), (0.5, 4.5), (4, 0.2), (0.1, 4),  # beyond or on the reference, in x or in y
           (float("nan"), 0.1)]
    assert hypervolume(pts, (4, 4)) == pytest.approx(7.0)


def test_hypervolume_of_one_point_none_and_all_outside():
    assert hypervolume([(2, 2)], (4, 4)) == pytest.approx(4.0)
    assert hypervolume([], (4, 4)) == 0.0
    assert hypervolume(np.zeros((0, 2)), (4, 4)) == 0.0
    assert hypervolume([(5, 5), (4, 1)], (4, 4)) == 0.0


def test_normalised_hypervolume_is_the_share_of_the_reference_box():
    assert normalised_hypervolume([(1, 3), (2, 1)], (4, 4)) == pytest.approx(7 / 16)
    assert normalised_hypervolume([(0, 0)], (12288, 93.87)) == pytest.approx(1.0)  # the ideal point fills the box
    assert normalised_hypervolume([(6144, 62.58)], (12288, 93.87)) == pytest.approx(0.5 * (1 - 62.58 / 93.87))


def test_bad_hypervolume_input_is_an_error():
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        hypervolume([1, 2, 3], (4, 4))
    with pytest.raises(ValueError, match="reference"):
        hypervolume([(1, 1)], (4, float("nan")))
    with pytest.raises(ValueError, match="positive"):
        normalised_hypervolume([(1, 1)], (0, 4))


def _cells(points: list[tuple[int, int]], rx: int, ry: int) -> int:
    """The dominated area by counting unit cells: cell [i, i+1] x [j, j+1] is dominated when some point is <= (i, j)."""
    return sum(any(px <= i and py <= j for px, py in points) for i, j in itertools.product(range(rx), range(ry)))


@pytest.mark.parametrize("seed", range(20))
def test_hypervolume_matches_counting_cells_on_random_integer_points(seed):
    rng = random.Random(seed)
    pts = [(rng.randint(0, 14), rng.randint(0, 14)) for _ in range(rng.randint(0, 12))]
    assert hypervolume(pts, (12, 12)) == pytest.approx(_cells(pts, 12, 12))


# --- memory at L and break-even context ----------------------------------------------------------

def test_break_even_of_vdproj_r320_on_pythia_70m():
    # V-DProj at r = 320 on all 6 layers: down and up, 2 x 512 x 320 weights per layer = 1,966,080 parameters, 3,932,160 bytes at
    # fp16; the cache shrinks from 12,288 to 9,984 bytes/token, 2,304 saved per token: 3,932,160 / 2,304 = 1,706.67.
    fixed, kv, base = 2 * 2 * 512 * 320 * 6, 6 * (512 + 320) * 2, 6 * (512 + 512) * 2
    assert (fixed, kv, base) == (3_932_160, 9_984, 12_288)
    assert break_even(fixed, kv, base) == 1707
    assert memory_at(1706, fixed, kv) > 1706 * base and memory_at(1707, fixed, kv) < 1707 * base


def test_break_even_edges():
    assert break_even(0, 500, 1000) == 1  # no fixed bytes: smaller from the first token
    assert break_even(5000, 500, 1000) == 11  # equal at L = 10, below from 11
    assert break_even(1, 1000, 1000) == np.inf and break_even(0, 1200, 1000) == np.inf  # never smaller per token
    assert math.isnan(break_even(float("nan"), 500, 1000))  # fixed bytes unknown
    assert break_even(float("nan"), 1200, 1000) == np.inf  # a larger cache never breaks even, whatever its fixed bytes
    assert break_even([0, 5000, 1], [500, 500, 1000], 1000).tolist() == [1, 11, np.inf]


def test_memory_at_l():
    assert memory_at(2048, 3_932_160, 9_984) == 3_932_160 + 2048 * 9_984
    assert memory_at(10, [0, 100], [1, 2]).tolist() == [10, 120]
    assert math.isnan(memory_at(10, float("nan"), 1))


def test_default_context_is_pythias_unless_the_results_evaluated_longer():
    assert default_context([])[0] == DEFAULT_CONTEXT == 2048
    assert default_context([128, float("nan")])[0] == 2048
    L, why = default_context([128, 4096])
    assert L == 4096 and "eval_seq_len" in why


def test_cost_axis_checks_its_values():
    axis = CostAxis("memory-at-L", 100, "given")
    assert axis.cost([1000], [10]).tolist() == [2000] and axis.shown(2e6) == 2.0
    assert CostAxis("bytes-per-token", 100, "given").cost([1000], [10]).tolist() == [10]
    with pytest.raises(ValueError, match="cost axis"):
        CostAxis("bytes", 100, "")
    with pytest.raises(ValueError, match="context"):
        CostAxis("memory-at-L", 0, "")


def test_intervals_of_many_groups_are_each_groups_t_interval():
    rng = np.random.default_rng(3)
    groups = []
    for k in [0, 1, 2, 3, 5, 8, 9, 13] * 4:  # numpy sums 8 and more values pairwise: those counts too
        g = rng.gamma(2.0, 30.0, k)
        g[rng.random(k) < 0.15] = np.nan
        if k and rng.random() < 0.2:
            g[0] = np.inf
        groups.append(g)
    iv = Intervals.of(groups)
    for k, g in enumerate(groups):
        one = t_interval(g)
        assert iv.n[k] == one.n
        for got, want in ((iv.mean[k], one.mean), (iv.low[k], one.low), (iv.high[k], one.high)):
            assert got == want or (math.isnan(got) and math.isnan(want))  # the same numbers, not just close ones
    flat = Intervals.of_flat([1.0, 2.0, 3.0, 7.0], [3, 0, 1])
    assert flat[0] == t_interval([1.0, 2.0, 3.0]) and flat.n.tolist() == [3, 0, 1] and flat.mean[2] == 7.0
    with pytest.raises(ValueError, match="add up"):
        Intervals.of_flat([1.0, 2.0], [1])
