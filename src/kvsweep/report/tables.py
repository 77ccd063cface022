"""The report's tables, computed from an ``Analysis``: cells are formatted strings, ready to render. This module:
the ``Table``, the cell formats, and the tables of the trials' statuses, the scheduler and the searcher
(``front_tables``: the fronts' points; ``trial_tables``: the seed's per-trial tables).

Degradation % is ``100 * (trial PPL - base PPL) / base PPL``; difference is ``trial PPL - base PPL``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from numpy.typing import NDArray

from ..results import TRIAL_STATUSES, scheduler_savings
from .analysis import Analysis
from .load import Results
from .stats import Interval

DASH = "—"


@dataclass(frozen=True)
class Table:
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    numeric: tuple[bool, ...]  # right-aligned columns

    @staticmethod
    def of(columns: list[tuple[str, bool]], rows: list[list[str]]) -> "Table":
        return Table(tuple(c for c, _ in columns), tuple(tuple(r) for r in rows), tuple(n for _, n in columns))


def _finite(v: object) -> bool:
    return v is not None and isinstance(v, (int, float, np.integer, np.floating)) and math.isfinite(float(v))


def ppl(v: object) -> str:
    return f"{float(v):,.3f}" if _finite(v) else DASH


def signed(v: object, digits: int = 3) -> str:
    return f"{float(v):+,.{digits}f}" if _finite(v) else DASH


def pct(v: object) -> str:
    return f"{float(v):+.2f}%" if _finite(v) else DASH


def count(v: object) -> str:
    return f"{int(v):,}" if _finite(v) else DASH


def text(v: object) -> str:
    return DASH if v is None or v == "" else str(v)


def degradation(trial: float, base: float) -> float:
    return 100.0 * (trial - base) / base if _finite(trial) and _finite(base) and base != 0 else math.nan


def share_of_base(kv: float, kv_base: float) -> float:
    return 100.0 * kv / kv_base if _finite(kv) and _finite(kv_base) and kv_base > 0 else math.nan


def ci(iv: Interval) -> str:
    """A 95% interval as ``low – high``; ``n/a (1 seed)`` without one (one seed: unknown, not zero width)."""
    if iv.n == 0:
        return DASH
    return f"{iv.low:,.3f} – {iv.high:,.3f}" if iv.has_interval else "n/a (1 seed)"


def versus_base(flag: bool | None) -> str:
    """The cell of ``stats.distinguishable``."""
    return {True: "distinguishable", False: "not distinguishable from the base", None: "n/a (1 seed)"}[flag]


def many_sources(an: Analysis) -> bool:
    return len(an.results) > 1


def _groups(an: Analysis) -> list[tuple[str, NDArray[np.bool_], int]]:
    """(label, trial mask, trials running) per source, and "all" when there are several."""
    groups = [(r.label, an.source_index == s, len(an.running[s])) for s, r in enumerate(an.results)]
    if many_sources(an):
        groups.append(("all", np.ones(an.n, dtype=bool), sum(len(x) for x in an.running)))
    return groups


def status_table(an: Analysis) -> Table:
    """Trials by status per source (and in all), with trials still running, front candidates and trials on the front."""
    statuses = list(TRIAL_STATUSES) + sorted(set(an.status.tolist()) - set(TRIAL_STATUSES))
    cols = ([("sweep", False), ("trials", True)] + [(s.replace("_", " "), True) for s in statuses]
            + [("running", True), ("front candidates", True), ("on the front", True)])
    on_front = np.isin(an.point_of, an.front) & (an.point_of >= 0)
    rows = []
    for label, m, running in _groups(an):
        rows.append([label, count(m.sum())] + [count((m & (an.status == s)).sum()) for s in statuses]
                    + [count(running), count((m & an.eligibility.candidate).sum()), count((m & on_front).sum())])
    return Table.of(cols, rows)


def _scheduler_name(r: Results, stopped: int) -> str:
    if r.sweep is not None and r.sweep.scheduler:
        params = [f"{k} {v:g}" for k, v in (("grace period", r.sweep.grace_period), ("reduction factor", r.sweep.reduction_factor)) if v is not None]
        return r.sweep.scheduler + (f" ({', '.join(params)})" if params else "")
    return "stops trials (no sweep.json)" if stopped else "— (no sweep.json)"


def scheduler_table(an: Analysis) -> Table:
    """The scheduler of each sweep, and the epochs run against those the same trials would have run without its stops.

    Only trials the scheduler stopped (status ``asha_stopped``) saved epochs, each ``max_epochs - epochs_run``
    (``kvsweep.results.scheduler_savings``); early stops by a trial's own patience and errors are not the scheduler's.
    """
    cols = [("sweep", False), ("scheduler", False), ("trials", True), ("stopped by the scheduler", True), ("epochs run", True),
            ("epochs without the scheduler", True), ("epochs saved", True), ("% saved", True)]
    rows = []
    for s, (label, m, _running) in enumerate(_groups(an)):
        sv = scheduler_savings(an.trials.filter(pa.array(m)))
        stopped = int((m & (an.status == "asha_stopped")).sum())
        name = _scheduler_name(an.results[s], stopped) if s < len(an.results) else DASH
        share = f"{sv.saved_pct:.1f}%" if sv.without_scheduler > 0 else DASH
        rows.append([label, name, count(m.sum()), count(stopped), count(sv.run), count(sv.without_scheduler), count(sv.saved), share])
    return Table.of(cols, rows)


def search_table(an: Analysis) -> Table:
    """The searcher of each sweep (from its sweep.json) and the trials it ran against the configurations of the search
    space's grid (the product of its value lists): a grid runs them all; random and model-based search run
    ``num_samples`` of them, saving the rest."""
    cols = [("sweep", False), ("searcher", False), ("trials", True), ("configurations in the grid", True),
            ("trials saved against the grid", True), ("% saved", True)]
    rows = []
    for s, r in enumerate(an.results):
        n = int((an.source_index == s).sum())
        info = r.sweep
        if info is None:
            rows.append([r.label, "— (no sweep.json)", count(n), DASH, DASH, DASH])
            continue
        name = info.search + (f" ({count(info.num_samples)} samples)" if info.num_samples is not None else "")
        name += " (inferred: the specification predates its search field)" if info.search_inferred else ""
        grid = info.grid_size
        saved = grid - n if grid is not None and grid >= n else None
        rows.append([r.label, name, count(n), count(grid), count(saved),
                     f"{100.0 * saved / grid:.1f}%" if saved is not None and grid else DASH])
    return Table.of(cols, rows)
