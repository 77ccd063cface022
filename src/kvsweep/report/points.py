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
import pyarrow.compute as pc
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


def _codes(column: pa.ChunkedArray) -> NDArray[np.int64]:
    """Per row, a number that is equal for two rows exactly when their values are (null: -1; NaN equals NaN, as in the
    keys' JSON); through Arrow's dictionary encoding, or the values' JSON where a type has no such kernel."""
    try:
        encoded = pc.dictionary_encode(column).combine_chunks()
        return pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    except pa.ArrowNotImplementedError:
        seen: dict[str, int] = {}
        return np.array([seen.setdefault(json.dumps(v, sort_keys=True, default=str), len(seen)) for v in column.to_pylist()],
                        dtype=np.int64)


def _config_codes(column: pa.ChunkedArray) -> NDArray[np.int64]:
    """Per row, a number that is equal for two rows exactly when their configs less the seed are (``_without_seed``);
    each distinct config text is parsed once."""
    encoded = pc.dictionary_encode(column).combine_chunks()
    seen: dict[str, int] = {}
    text_code = np.array([seen.setdefault(json.dumps(_without_seed(t), sort_keys=True, default=str), len(seen))
                          for t in encoded.dictionary.to_pylist()] + [seen.setdefault("null", len(seen))], dtype=np.int64)
    return text_code[pc.fill_null(encoded.indices, len(encoded.dictionary)).to_numpy(zero_copy_only=False)]  # null: no config


def configuration_codes(trials: pa.Table, source_index: NDArray[np.intp], rows: NDArray[np.intp]) -> NDArray[np.intp]:
    """Per trial of ``rows`` (indices into ``trials``), a number that is equal for two of them exactly when they come from
    one results folder and differ at most by their seed (see the module's docstring)."""
    rows = np.asarray(rows, dtype=np.intp)
    names = [n for n in CONFIG_COLUMNS if n in trials.column_names] + sorted(option_column_names(trials.schema))
    names += ["config"] if "config" in trials.column_names else []
    tbl = trials.select(names).take(pa.array(rows))
    code = np.asarray(source_index, dtype=np.int64)[rows]
    for n in names:
        part = _config_codes(tbl.column(n)) if n == "config" else _codes(tbl.column(n))
        _u, code = np.unique(code * (int(part.max(initial=0)) + 2) + part + 1, return_inverse=True)  # 0 .. configurations - 1
    return code.astype(np.intp).ravel()


def group(rows: NDArray[np.intp], codes: NDArray[np.intp], seed: list) -> list[NDArray[np.intp]]:
    """The trials ``rows`` grouped by their ``codes`` (one per row); groups in the order of their first trial, members
    by seed (nulls last), then by index."""
    idx = np.asarray(rows, dtype=np.intp)
    if idx.size == 0:
        return []
    no_seed = np.array([seed[i] is None for i in idx.tolist()], dtype=bool)
    seed_value = np.array([0 if seed[i] is None else seed[i] for i in idx.tolist()], dtype=np.int64)
    code = np.asarray(codes)
    order = np.lexsort((idx, seed_value, no_seed, code))
    starts = np.flatnonzero(np.r_[True, code[order][1:] != code[order][:-1]])
    members = np.split(idx[order], starts[1:])
    first = np.minimum.reduceat(idx[order], starts)
    return [members[k] for k in np.argsort(first, kind="stable")]


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
    flat = np.concatenate(members) if members else np.zeros(0, dtype=np.intp)  # every point's trials, one point after another
    sizes = np.array([m.size for m in members], dtype=np.intp)

    def of_points(values: NDArray[np.float64]) -> Intervals:
        return Intervals.of_flat(values[flat], sizes)

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
        kv=of_points(kv).mean, fixed=of_points(fixed).mean, kv_base=of_points(kv_base).mean,  # the mean of the finite values, NaN without
        base_val=of_points(base_val).mean, base_test=of_points(base_test).mean, val=of_points(val), test=of_points(test),
    )
