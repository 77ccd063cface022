"""Trials that differ only by their seed are one point of the report: its PPL is their mean, with a t-interval.

A trial's configuration, less the seed, is what the report groups by: the configuration columns of
``trials.parquet`` (``CONFIG_COLUMNS``: sweep, variant, methods, family, options, schedule, epochs, evaluation
length, and the KV bytes/token, which a configuration determines: trials that differ in it are never pooled),
every method option column (``<method>.<option>``), and the trial's full config (the ``config`` JSON) without its
training seed (``train.seed``, or a top-level ``seed``). Trial identity and outcome columns (id, status, PPLs,
parameters, times, revision) are not part of it. Only trials of one results folder are grouped (two sweeps'
bases may differ). Trials of one configuration and one seed (a repeated run) are pooled too, and show as such.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from numpy.typing import NDArray

from ..results import option_column_names
from .stats import Intervals

CONFIG_COLUMNS = ("sweep", "variant", "adapters", "family", "options", "schedule", "max_epochs", "eval_seq_len", "kv_bytes_per_token")


def _without_seed(config: str | None) -> object:
    """The trial's config JSON less its training seed, as plain data (the text itself when it is not JSON)."""
    if not config:
        return None
    try:
        d = json.loads(config)
    except ValueError:
        return config
    if isinstance(d, dict):
        d.pop("seed", None)
        if isinstance(d.get("train"), dict):
            d["train"] = {k: v for k, v in d["train"].items() if k != "seed"}
    return d


def configuration_keys(trials: pa.Table, source_index: NDArray[np.intp]) -> list[str]:
    """One text per trial that is equal for two trials exactly when they come from one results folder and differ at
    most by their seed (see the module's docstring)."""
    names = [n for n in CONFIG_COLUMNS if n in trials.column_names] + sorted(option_column_names(trials.schema))
    columns = [trials.column(n).to_pylist() for n in names]
    configs = trials.column("config").to_pylist() if "config" in trials.column_names else [None] * trials.num_rows
    keys = []
    for k in range(trials.num_rows):
        row = {n: c[k] for n, c in zip(names, columns)}
        keys.append(json.dumps([int(source_index[k]), row, _without_seed(configs[k])], sort_keys=True, default=str))
    return keys


def group(keys: list[str], mask: NDArray[np.bool_], seed: list) -> list[NDArray[np.intp]]:
    """The trials where ``mask`` holds, grouped by key; groups in the order of their first trial, members by seed
    (nulls last), then by index."""
    groups: dict[str, list[int]] = {}
    for i in np.flatnonzero(mask):
        groups.setdefault(keys[i], []).append(int(i))
    out = []
    for members in groups.values():
        members.sort(key=lambda i: (seed[i] is None, seed[i] if seed[i] is not None else 0, i))
        out.append(np.array(members, dtype=np.intp))
    out.sort(key=lambda m: int(m.min()))
    return out


def _mean_known(values: NDArray[np.float64], members: list[NDArray[np.intp]]) -> NDArray[np.float64]:
    """Per group, the mean of its finite values (NaN when it has none)."""
    out = np.full(len(members), np.nan)
    for p, m in enumerate(members):
        v = values[m]
        v = v[np.isfinite(v)]
        if v.size:
            out[p] = float(v.mean())
    return out


@dataclass(frozen=True)
class Points:
    """The report's points: one per configuration (less the seed) of the front candidates, with its seeds' trials."""

    members: tuple[NDArray[np.intp], ...]  # trial indices of each point, by seed
    source: NDArray[np.intp]  # index into the analysis's results
    variant: NDArray[np.object_]
    family: NDArray[np.object_]  # its methods' families, e.g. "lowrank+quant", or "base"
    label: NDArray[np.object_]  # its first trial's key, and how many more seeds it has
    seeds: tuple[tuple, ...]
    kv: NDArray[np.float64]  # KV bytes/token (the same for every seed of a configuration; their mean)
    fixed: NDArray[np.float64]  # fixed bytes (NaN: unknown)
    kv_base: NDArray[np.float64]
    base_val: NDArray[np.float64]
    base_test: NDArray[np.float64]
    val: Intervals  # validation PPL of the best epoch over the seeds
    test: Intervals  # test PPL of the best epoch over the seeds (n 0 where the results have none)

    @property
    def n(self) -> int:
        return len(self.members)

    def first(self, p: int) -> int:
        """The point's first trial (lowest seed): the one drawn where a figure needs a single trial's rows."""
        return int(self.members[p][0])


def make_points(members: list[NDArray[np.intp]], *, key: NDArray[np.object_], source_index: NDArray[np.intp],
                variant: NDArray[np.object_], family: NDArray[np.object_], seed: list, kv: NDArray[np.float64], fixed: NDArray[np.float64],
                kv_base: NDArray[np.float64], base_val: NDArray[np.float64], base_test: NDArray[np.float64],
                val: NDArray[np.float64], test: NDArray[np.float64]) -> Points:
    """The points of the groups ``members`` (trial indices), from the trials' arrays."""
    def label(m: NDArray[np.intp]) -> str:
        more = m.size - 1
        return str(key[m[0]]) + (f" (+{more} seed{'s' if more > 1 else ''})" if more else "")

    return Points(
        members=tuple(members),
        source=np.array([source_index[m[0]] for m in members], dtype=np.intp),
        variant=np.array([variant[m[0]] for m in members], dtype=object),
        family=np.array([family[m[0]] for m in members], dtype=object),
        label=np.array([label(m) for m in members], dtype=object),
        seeds=tuple(tuple(seed[i] for i in m) for m in members),
        kv=_mean_known(kv, members), fixed=_mean_known(fixed, members), kv_base=_mean_known(kv_base, members),
        base_val=_mean_known(base_val, members), base_test=_mean_known(base_test, members),
        val=Intervals.of([val[m] for m in members]), test=Intervals.of([test[m] for m in members]),
    )
