"""``frontier.csv``: the overall front's points, one row each, by cost, with raw values.

Each row holds every column of ``trials.parquet`` of the point's first trial (lowest seed: its config, its own
PPLs), then the point's own columns (``POINT_COLUMNS``): the trials and seeds it pools, the mean and 95%
t-interval of its validation and test PPL over them, whether its headline PPL is distinguishable from the base's,
its share of the base's cache, and memory at L with its break-even context. Empty cells are unknown values;
``break_even_context`` is ``inf`` for a point that never breaks even.
"""

from __future__ import annotations

import csv
import io
import math

import numpy as np
import pyarrow as pa
from numpy.typing import NDArray

from ..results import TRIAL_SCHEMA, option_column_names
from .analysis import Analysis
from .front_tables import flag
from .load import TEST_COLUMNS
from .memory import break_even, memory_at
from .tables import share_of_base

POINT_COLUMNS = (
    "trial_ids", "seeds", "n_seeds", "val_ppl_mean", "val_ppl_ci_low", "val_ppl_ci_high", "test_ppl_mean", "test_ppl_ci_low",
    "test_ppl_ci_high", "headline_split", "distinguishable_from_base", "kv_pct_of_base", "context_L", "memory_at_L_bytes",
    "base_memory_at_L_bytes", "break_even_context", "cost_axis",
)


def _cell(v: object) -> object:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, (float, np.floating)):
        return repr(float(v))
    return v


def frontier_csv(an: Analysis, idx: NDArray[np.intp]) -> str:
    """The points ``idx`` (the front, by cost) as CSV text: ``front_rank``, ``source``, the trial columns, ``POINT_COLUMNS``."""
    known = set(TRIAL_SCHEMA.names) | set(option_column_names(an.trials.schema)) | {n for n, _t in TEST_COLUMNS}
    columns = [n for n in an.trials.column_names if n in known]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["front_rank", "source"] + columns + list(POINT_COLUMNS))
    P, L = an.points, an.axis.context
    firsts = an.trials.select(columns).take(pa.array([P.first(int(p)) for p in idx], pa.int64())).to_pylist()  # the front's first trials
    for n, (p, trial) in enumerate(zip(idx, firsts), 1):
        share = share_of_base(P.kv[p], P.kv_base[p])
        distinct = flag(an, int(p))
        point = [
            ";".join(str(an.key[i]) for i in P.members[p]), ";".join("" if s is None else str(s) for s in P.seeds[p]), len(P.members[p]),
            P.val.mean[p], P.val.low[p], P.val.high[p], P.test.mean[p], P.test.low[p], P.test.high[p], an.headline,
            "" if distinct is None else distinct, share, L, float(memory_at(L, P.fixed[p], P.kv[p])), L * P.kv_base[p],
            float(break_even(P.fixed[p], P.kv[p], P.kv_base[p])), an.axis.kind,
        ]
        row = [n, an.results[P.source[p]].label] + [trial[c] for c in columns] + point
        w.writerow([_cell(v) for v in row])
    return buf.getvalue()
