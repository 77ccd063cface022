"""All sources of one report put together: trials, their points (configurations over seeds), fronts, and what is
missing or still running.

Front candidates are the trials that ran to their end or stopped by their own patience (``FRONT_STATUSES``)
with finite metrics. A trial the scheduler stopped (``asha_stopped``) has the PPL of its first epochs, which
does not compare with that of a trial trained to its end: it is drawn, counted and listed, but not on a front.
Trials still running (any other status) and failed ones are not on a front either.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numpy.typing import NDArray

from .load import Results
from .memory import CostAxis, default_context
from .pareto import Eligibility, eligible, fronts_by_group, pareto_front
from .points import Points, configuration_codes, group, make_points
from .stats import Interval, t_interval

NO_VARIANT = "(no variant)"
FRONT_STATUSES = ("completed", "early_stopped")


def _floats(tbl: pa.Table, name: str) -> NDArray[np.float64]:
    """A numeric column as float64, nulls as NaN."""
    return pc.cast(tbl.column(name), pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)


def _strings(tbl: pa.Table, name: str, null: str) -> NDArray[np.object_]:
    return np.array([null if v is None else v for v in tbl.column(name).to_pylist()], dtype=object)


@dataclass(frozen=True)
class BucketRow:
    """A point's PPL in one position bucket ``[lo, hi)`` over its seeds, against the base's."""

    lo: int
    hi: int
    tokens: int
    ppl: Interval
    base_ppl: float


@dataclass(frozen=True)
class Analysis:
    """The trials of every source in one table, their points, and the arrays and fronts the report is made of."""

    results: list[Results]
    trials: pa.Table  # TRIAL_SCHEMA columns of all sources, plus "source" (label) and "key" (unique trial name)
    source_index: NDArray[np.intp]  # per trial: index into results
    key: NDArray[np.object_]
    variant: NDArray[np.object_]
    family: NDArray[np.object_]  # the methods' families ("vdproj", "lowrank+quant", ...); "base" without methods
    status: NDArray[np.object_]
    kv_bytes: NDArray[np.float64]
    fixed: NDArray[np.float64]  # fixed bytes, NaN where unknown
    val_ppl: NDArray[np.float64]
    test_ppl: NDArray[np.float64]  # NaN where the results have no test PPL
    base_ppl: NDArray[np.float64]  # the base's validation PPL
    base_test: NDArray[np.float64]
    kv_base: NDArray[np.float64]
    axis: CostAxis
    cost: NDArray[np.float64]  # per trial: the axis's cost (KV bytes/token, or memory at L in bytes)
    eligibility: Eligibility  # mask: drawn (finite, not failed); candidate: may be on a front
    points: Points
    point_of: NDArray[np.intp]  # per trial: its point, -1 where it is no front candidate
    pcost: NDArray[np.float64]  # per point: the axis's cost
    front: NDArray[np.intp]  # point indices of the overall front, by cost ascending
    variant_fronts: dict[str, NDArray[np.intp]]  # point indices
    family_fronts: dict[str, NDArray[np.intp]]  # point indices
    source_fronts: dict[str, NDArray[np.intp]]  # point indices, keyed by source label
    running: list[list[str]]  # per source: trial ids with epochs but no row in trials.parquet
    headline: str  # "test" when the results have test PPL, else "validation"
    _curves: dict[int, pa.Table] = field(default_factory=dict, repr=False)
    _buckets: dict[int, pa.Table] = field(default_factory=dict, repr=False)

    @property
    def n(self) -> int:
        return self.trials.num_rows

    def column(self, name: str) -> list:
        return self.trials.column(name).to_pylist()

    def headline_interval(self, p: int) -> Interval:
        """Point p's PPL over its seeds in the headline split."""
        return self.points.test[p] if self.headline == "test" else self.points.val[p]

    def headline_base(self, p: int) -> float:
        return float(self.points.base_test[p] if self.headline == "test" else self.points.base_val[p])

    def epochs_of(self, i: int) -> pa.Table | None:
        """Trial i's rows of epochs.parquet sorted by epoch, or None when its source has none for it."""
        return self._lookup(i, "epochs", "epoch", self._curves)

    def positions_of(self, i: int) -> pa.Table | None:
        """Trial i's rows of positions.parquet (every split) sorted by bucket, or None when its source has none for it."""
        return self._lookup(i, "positions", "lo", self._buckets)

    def point_positions(self, p: int, split: str) -> list[BucketRow] | None:
        """Point p's PPL per position bucket in ``split``, over the seeds that have rows; None when none has."""
        by_bucket: dict[tuple[int, int], list[dict]] = {}
        for i in self.points.members[p]:
            tbl = self.positions_of(int(i))
            if tbl is not None:
                for r in tbl.filter(pc.equal(tbl.column("split"), split)).to_pylist():
                    by_bucket.setdefault((r["lo"], r["hi"]), []).append(r)
        if not by_bucket:
            return None
        return [BucketRow(lo, hi, rows[0]["tokens"], t_interval([r["ppl"] for r in rows]),
                          float(np.nanmean([r["base_ppl"] for r in rows])))
                for (lo, hi), rows in sorted(by_bucket.items())]

    def _lookup(self, i: int, attr: str, sort: str, memo: dict[int, pa.Table], split: str | None = None) -> pa.Table | None:
        if i not in memo:
            src = getattr(self.results[self.source_index[i]], attr)
            tid = self.trials.column("trial_id")[i].as_py()
            rows = None if src is None else src.filter(pc.equal(src.column("trial_id"), tid))
            if rows is not None and split is not None:
                rows = rows.filter(pc.equal(rows.column("split"), split))
            memo[i] = rows.sort_by(sort) if rows is not None and rows.num_rows else None
        return memo[i]

    def base_points(self) -> list[tuple[str, float, float, float]]:
        """Distinct (source label, base KV bytes/token, base val PPL, base test PPL or NaN) of the sources."""
        out: list[tuple[str, float, float, float]] = []
        for s, r in enumerate(self.results):
            m = (self.source_index == s) & np.isfinite(self.kv_base) & np.isfinite(self.base_ppl)
            if m.any():
                test = self.base_test[m]
                test = float(np.median(test[np.isfinite(test)])) if np.isfinite(test).any() else float("nan")
                point = (r.label, float(np.median(self.kv_base[m])), float(np.median(self.base_ppl[m])), test)
                if not any(abs(point[1] - p[1]) < 1e-9 and abs(point[2] - p[2]) < 1e-9 for p in out):
                    out.append(point)
        return out

    def base_cost(self, kv_base: float) -> float:
        """The base's cost on the axis (it adds no fixed bytes)."""
        return float(self.axis.cost(0.0, kv_base))

    def kv_base_common(self) -> float | None:
        """The base's KV bytes/token when every source agrees on it (the figure's % axis needs one)."""
        values = {p[1] for p in self.base_points()}
        return values.pop() if len(values) == 1 else None


def _running(r: Results) -> list[str]:
    if r.epochs is None or r.epochs.num_rows == 0:
        return []
    ids = pc.unique(r.epochs.column("trial_id").drop_null())
    return sorted(pc.filter(ids, pc.invert(pc.is_in(ids, value_set=r.trials.column("trial_id")))).to_pylist())


def analyze(results: list[Results], *, x: str = "bytes-per-token", context: int | None = None) -> Analysis:
    """Put the sources together, group seeds into points and compute the fronts (overall, per variant, per source)
    on the cost ``x`` (``bytes-per-token`` or ``memory-at-L``, L = ``context`` tokens, by default ``default_context``)
    and the validation PPL's mean over seeds.

    Raises:
        ValueError: an unknown ``x`` or a ``context`` below 1.
    """
    parts = []
    for s, r in enumerate(results):
        parts.append(r.trials.append_column("source", pa.array([r.label] * r.trials.num_rows, pa.string())))
    trials = pa.concat_tables(parts, promote_options="permissive")  # sources may differ in their methods' option columns
    source_index = np.concatenate([np.full(r.trials.num_rows, s, dtype=np.intp) for s, r in enumerate(results)])
    ids = np.array(trials.column("trial_id").to_pylist(), dtype=object)
    labels = np.array([results[s].label for s in source_index], dtype=object)
    unique_ids = len(set(ids.tolist())) == ids.size
    key = ids if unique_ids or len(results) == 1 else np.array([f"{l}/{t}" for l, t in zip(labels, ids)], dtype=object)
    trials = trials.append_column("key", pa.array(key.tolist(), pa.string()))

    L, where = (context, "given with --context") if context is not None else default_context(_floats(trials, "eval_seq_len"))
    axis = CostAxis(x, L, where)
    variant, status = _strings(trials, "variant", NO_VARIANT), _strings(trials, "status", "unknown")
    family = _strings(trials, "family", "base") if "family" in trials.column_names else np.full(trials.num_rows, "base", dtype=object)
    kv_bytes, fixed, val_ppl = _floats(trials, "kv_bytes_per_token"), _floats(trials, "fixed_bytes"), _floats(trials, "best_val_ppl")
    test_ppl, base_ppl, base_test = _floats(trials, "test_ppl"), _floats(trials, "base_val_ppl"), _floats(trials, "base_test_ppl")
    kv_base, cost = _floats(trials, "kv_bytes_per_token_base"), axis.cost(fixed, kv_bytes)
    elig = eligible(status, cost, val_ppl, FRONT_STATUSES)
    seed = trials.column("seed").to_pylist()
    rows = np.flatnonzero(elig.candidate)
    members = group(rows, configuration_codes(trials, source_index, rows), seed)
    points = make_points(members, key=key, source_index=source_index, variant=variant, family=family, seed=seed, kv=kv_bytes, fixed=fixed,
                         kv_base=kv_base, base_val=base_ppl, base_test=base_test, val=val_ppl, test=test_ppl)
    point_of = np.full(trials.num_rows, -1, dtype=np.intp)
    for p, m in enumerate(members):
        point_of[m] = p
    pcost, pval = axis.cost(points.fixed, points.kv), points.val.mean
    every = np.ones(points.n, dtype=bool)
    return Analysis(
        results=results, trials=trials, source_index=source_index, key=key, variant=variant, family=family, status=status,
        kv_bytes=kv_bytes, fixed=fixed, val_ppl=val_ppl, test_ppl=test_ppl, base_ppl=base_ppl, base_test=base_test, kv_base=kv_base,
        axis=axis, cost=cost, eligibility=elig, points=points, point_of=point_of, pcost=pcost,
        front=pareto_front(pcost, pval),
        variant_fronts=fronts_by_group(points.variant, pcost, pval, every),
        family_fronts=fronts_by_group(points.family, pcost, pval, every),
        source_fronts=fronts_by_group([results[s].label for s in points.source], pcost, pval, every) if len(results) > 1 else {},
        running=[_running(r) for r in results],
        headline="test" if np.isfinite(test_ppl[elig.candidate]).any() else "validation",
    )


def pick_evenly(indices: NDArray[np.intp], k: int) -> NDArray[np.intp]:
    """At most k of ``indices``, evenly spaced along them, both ends kept."""
    if indices.size <= k:
        return indices
    return indices[np.unique(np.round(np.linspace(0, indices.size - 1, k)).astype(int))]
