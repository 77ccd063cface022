"""All sources of one report put together: trials, fronts, and what is missing or still running."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numpy.typing import NDArray

from .load import Results
from .pareto import Eligibility, eligible, fronts_by_group, pareto_front

NO_VARIANT = "(no variant)"


def _floats(tbl: pa.Table, name: str) -> NDArray[np.float64]:
    """A numeric column as float64, nulls as NaN."""
    return pc.cast(tbl.column(name), pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)


def _strings(tbl: pa.Table, name: str, null: str) -> NDArray[np.object_]:
    return np.array([null if v is None else v for v in tbl.column(name).to_pylist()], dtype=object)


@dataclass(frozen=True)
class Analysis:
    """The trials of every source in one table, with the arrays and fronts the report is made of."""

    results: list[Results]
    trials: pa.Table  # TRIAL_SCHEMA columns of all sources, plus "source" (label) and "key" (unique trial name)
    source_index: NDArray[np.intp]  # per trial: index into results
    key: NDArray[np.object_]
    variant: NDArray[np.object_]
    status: NDArray[np.object_]
    kv_bytes: NDArray[np.float64]
    val_ppl: NDArray[np.float64]
    base_ppl: NDArray[np.float64]
    kv_base: NDArray[np.float64]
    eligibility: Eligibility
    front: NDArray[np.intp]  # the overall front, by KV bytes ascending
    variant_fronts: dict[str, NDArray[np.intp]]
    source_fronts: dict[str, NDArray[np.intp]]  # keyed by source label
    running: list[list[str]]  # per source: trial ids with epochs but no row in trials.parquet
    _curves: dict[int, pa.Table] = field(default_factory=dict, repr=False)
    _buckets: dict[int, pa.Table] = field(default_factory=dict, repr=False)

    @property
    def n(self) -> int:
        return self.trials.num_rows

    def column(self, name: str) -> list:
        return self.trials.column(name).to_pylist()

    def epochs_of(self, i: int) -> pa.Table | None:
        """Trial i's rows of epochs.parquet sorted by epoch, or None when its source has none for it."""
        return self._lookup(i, "epochs", "epoch", self._curves)

    def positions_of(self, i: int) -> pa.Table | None:
        """Trial i's validation rows of positions.parquet sorted by bucket, or None when its source has none for it."""
        return self._lookup(i, "positions", "lo", self._buckets, split="validation")

    def _lookup(self, i: int, attr: str, sort: str, memo: dict[int, pa.Table], split: str | None = None) -> pa.Table | None:
        if i not in memo:
            src = getattr(self.results[self.source_index[i]], attr)
            tid = self.trials.column("trial_id")[i].as_py()
            rows = None if src is None else src.filter(pc.equal(src.column("trial_id"), tid))
            if rows is not None and split is not None:
                rows = rows.filter(pc.equal(rows.column("split"), split))
            memo[i] = rows.sort_by(sort) if rows is not None and rows.num_rows else None
        return memo[i]

    def base_points(self) -> list[tuple[str, float, float]]:
        """Distinct (source label, base KV bytes/token, base val PPL) of the sources, NaN-free."""
        out: list[tuple[str, float, float]] = []
        for s, r in enumerate(self.results):
            m = (self.source_index == s) & np.isfinite(self.kv_base) & np.isfinite(self.base_ppl)
            if m.any():
                point = (r.label, float(np.median(self.kv_base[m])), float(np.median(self.base_ppl[m])))
                if not any(abs(point[1] - p[1]) < 1e-9 and abs(point[2] - p[2]) < 1e-9 for p in out):
                    out.append(point)
        return out

    def kv_base_common(self) -> float | None:
        """The base's KV bytes/token when every source agrees on it (the figure's % axis needs one)."""
        values = {p[1] for p in self.base_points()}
        return values.pop() if len(values) == 1 else None


def _running(r: Results) -> list[str]:
    if r.epochs is None or r.epochs.num_rows == 0:
        return []
    ids = pc.unique(r.epochs.column("trial_id").drop_null())
    return sorted(pc.filter(ids, pc.invert(pc.is_in(ids, value_set=r.trials.column("trial_id")))).to_pylist())


def analyze(results: list[Results]) -> Analysis:
    """Put the sources together and compute the fronts (overall, per variant, per source)."""
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

    variant = _strings(trials, "variant", NO_VARIANT)
    status = _strings(trials, "status", "unknown")
    kv_bytes, val_ppl = _floats(trials, "kv_bytes_per_token"), _floats(trials, "best_val_ppl")
    elig = eligible(status, kv_bytes, val_ppl)
    picked = np.flatnonzero(elig.mask)
    front = picked[pareto_front(kv_bytes[picked], val_ppl[picked])]
    return Analysis(
        results=results, trials=trials, source_index=source_index, key=key, variant=variant, status=status,
        kv_bytes=kv_bytes, val_ppl=val_ppl, base_ppl=_floats(trials, "base_val_ppl"), kv_base=_floats(trials, "kv_bytes_per_token_base"),
        eligibility=elig, front=front,
        variant_fronts=fronts_by_group(variant, kv_bytes, val_ppl, elig.mask),
        source_fronts=fronts_by_group(labels, kv_bytes, val_ppl, elig.mask) if len(results) > 1 else {},
        running=[_running(r) for r in results],
    )


def pick_evenly(indices: NDArray[np.intp], k: int) -> NDArray[np.intp]:
    """At most k of ``indices``, evenly spaced along them, both ends kept."""
    if indices.size <= k:
        return indices
    return indices[np.unique(np.round(np.linspace(0, indices.size - 1, k)).astype(int))]
