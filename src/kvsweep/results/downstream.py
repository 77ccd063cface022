"""``downstream.parquet``: lm-evaluation-harness scores of the base and of trials, beside a sweep's result tables.

One row per (trial, task, metric): the base's rows have no ``trial_id``. ``kvsweep downstream`` writes them
(``kvsweep.downstream``) and ``kvsweep report`` draws them against KV bytes/token. A later evaluation of the same
trial, task, metric, few-shot count and limit replaces the earlier row (``merge_downstream``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

import pyarrow as pa

from .metrics import arrow_schema

DOWNSTREAM_FILE = "downstream.parquet"


@dataclass(frozen=True)
class DownstreamRow:
    """One lm-eval metric of one model (the base, or a trial's adapters on it) on one task."""

    sweep: str | None  # the sweep's name (None: a kvsweep train folder)
    task: str  # lm-eval's task name, e.g. "lambada_openai"
    metric: str  # lm-eval's metric with its filter, e.g. "acc", "perplexity", "exact_match,strict-match" ("none" filter left out)
    value: float
    stderr: float | None  # lm-eval's standard error of the metric; None where it gives none (N/A)
    samples: int  # documents evaluated
    num_fewshot: int | None  # None: the task's own default
    limit: float | None  # lm-eval's --limit (documents, or a fraction below 1); None: every document
    kv_bytes_per_token: int  # of the model evaluated (the base's for the base)
    methods: str  # the methods and options ("" for the base)
    higher_is_better: bool | None  # lm-eval's direction of the metric
    lm_eval_version: str
    evaluated_at: str  # ISO 8601, UTC


DOWNSTREAM_SCHEMA = arrow_schema(DownstreamRow)  # trial_id first: null for the base
_KEY = ("trial_id", "task", "metric", "num_fewshot", "limit")


def downstream_table(rows: Iterable[tuple[str | None, DownstreamRow]]) -> pa.Table:
    """(trial id or None for the base, row) pairs as a table of ``DOWNSTREAM_SCHEMA``."""
    return pa.Table.from_pylist([{"trial_id": t, **asdict(r)} for t, r in rows], schema=DOWNSTREAM_SCHEMA)


def merge_downstream(old: pa.Table | None, new: pa.Table) -> pa.Table:
    """``old``'s rows that ``new`` does not evaluate again (same trial, task, metric, few-shot count and limit), then
    ``new``'s, cast to ``DOWNSTREAM_SCHEMA``."""
    if old is None or old.num_rows == 0:
        return new.cast(DOWNSTREAM_SCHEMA)
    old = old.select(DOWNSTREAM_SCHEMA.names).cast(DOWNSTREAM_SCHEMA)
    redone = set(zip(*(new.column(k).to_pylist() for k in _KEY)))
    keep = [k not in redone for k in zip(*(old.column(c).to_pylist() for c in _KEY))]
    return pa.concat_tables([old.filter(pa.array(keep, pa.bool_())), new.cast(DOWNSTREAM_SCHEMA)])
