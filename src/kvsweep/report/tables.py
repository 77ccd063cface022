"""The report's tables, computed from an ``Analysis``: cells are formatted strings, ready to render.

Degradation % is ``100 * (trial PPL - base PPL) / base PPL``; difference is ``trial PPL - base PPL``.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pyarrow as pa

from ..results import TRIAL_SCHEMA, TRIAL_STATUSES, option_column_names, scheduler_savings
from .analysis import Analysis

DASH = "—"
CURVE_COLUMNS = 5  # at most this many epochs in the learning-curve table, besides the best epoch
NICE_STEPS = (1, 2, 5)  # epochs between the table's middle columns: 1, 2, 5, 10, 20, 50, ...


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


def _many_sources(an: Analysis) -> bool:
    return len(an.results) > 1


def status_table(an: Analysis) -> Table:
    """Trials by status per source (and in all), with trials still running and trials on the front."""
    statuses = list(TRIAL_STATUSES) + sorted(set(an.status.tolist()) - set(TRIAL_STATUSES))
    cols = [("sweep", False), ("trials", True)] + [(s.replace("_", " "), True) for s in statuses] + [("running", True), ("on the front", True)]
    on_front = np.zeros(an.n, dtype=bool)
    on_front[an.front] = True
    rows = []
    groups = [(r.label, an.source_index == s, len(an.running[s])) for s, r in enumerate(an.results)]
    if _many_sources(an):
        groups.append(("all", np.ones(an.n, dtype=bool), sum(len(x) for x in an.running)))
    for label, m, running in groups:
        rows.append([label, count(m.sum())] + [count((m & (an.status == s)).sum()) for s in statuses] + [count(running), count((m & on_front).sum())])
    return Table.of(cols, rows)


def asha_table(an: Analysis) -> Table:
    """Epochs run against the epochs the same trials would have run without the scheduler's stops.

    Only trials the scheduler stopped (status ``asha_stopped``) saved epochs, each ``max_epochs - epochs_run``
    (``kvsweep.results.scheduler_savings``); early stops by a trial's own patience and errors are not the scheduler's.
    """
    cols = [("sweep", False), ("trials", True), ("stopped by the scheduler", True), ("epochs run", True),
            ("epochs without the scheduler", True), ("epochs saved", True), ("% saved", True)]
    groups = [(r.label, an.source_index == s) for s, r in enumerate(an.results)]
    if _many_sources(an):
        groups.append(("all", np.ones(an.n, dtype=bool)))
    rows = []
    for label, m in groups:
        sv = scheduler_savings(an.trials.filter(pa.array(m)))
        stopped = (m & (an.status == "asha_stopped")).sum()
        share = f"{sv.saved_pct:.1f}%" if sv.without_scheduler > 0 else DASH
        rows.append([label, count(m.sum()), count(stopped), count(sv.run), count(sv.without_scheduler), count(sv.saved), share])
    return Table.of(cols, rows)


def _trial_cols(an: Analysis) -> list[tuple[str, bool]]:
    return [("trial", False)] + ([("sweep", False)] if _many_sources(an) else []) + [("variant", False)]


def _trial_cells(an: Analysis, i: int) -> list[str]:
    return [str(an.key[i])] + ([an.results[an.source_index[i]].label] if _many_sources(an) else []) + [str(an.variant[i])]


def frontier_table(an: Analysis, idx: np.ndarray) -> Table:
    """The front's trials by KV bytes/token: cache size, PPL against the base, status, epochs."""
    options = an.column("options")
    epochs_run, best_epoch = an.column("epochs_run"), an.column("best_epoch")
    cols = [("#", True)] + _trial_cols(an) + [("methods", False), ("KV bytes/token", True), ("% of base", True),
                                             ("val PPL", True), ("degradation", True), ("status", False), ("epochs (best)", True)]
    rows = []
    for n, i in enumerate(idx, 1):
        share = share_of_base(an.kv_bytes[i], an.kv_base[i])
        rows.append([str(n)] + _trial_cells(an, i) + [
            text(options[i]), count(an.kv_bytes[i]), f"{share:.1f}%" if _finite(share) else DASH,
            ppl(an.val_ppl[i]), pct(degradation(an.val_ppl[i], an.base_ppl[i])), str(an.status[i]),
            f"{count(epochs_run[i])} ({count(best_epoch[i])})",
        ])
    return Table.of(cols, rows)


def variant_fronts_table(an: Analysis) -> Table:
    """Each variant's own front: the trials no trial of the same variant beats."""
    cols = [("variant", False), ("trial", False), ("KV bytes/token", True), ("% of base", True), ("val PPL", True), ("degradation", True), ("on overall front", False)]
    overall = set(an.front.tolist())
    rows = []
    for variant, idx in an.variant_fronts.items():
        for i in idx:
            share = share_of_base(an.kv_bytes[i], an.kv_base[i])
            rows.append([variant, str(an.key[i]), count(an.kv_bytes[i]), f"{share:.1f}%" if _finite(share) else DASH,
                         ppl(an.val_ppl[i]), pct(degradation(an.val_ppl[i], an.base_ppl[i])), "yes" if i in overall else ""])
    return Table.of(cols, rows)


def overall_ppl_table(an: Analysis, idx: np.ndarray) -> Table:
    """The seed's overall table: base against each front trial."""
    cols = _trial_cols(an) + [("KV bytes/token", True), ("base PPL", True), ("trial PPL", True), ("difference", True), ("degradation", True)]
    rows = []
    for i in idx:
        base, val = an.base_ppl[i], an.val_ppl[i]
        rows.append(_trial_cells(an, i) + [count(an.kv_bytes[i]), ppl(base), ppl(val), signed(val - base), pct(degradation(val, base))])
    return Table.of(cols, rows)


def position_table(an: Analysis, idx: np.ndarray) -> tuple[Table, list[str]]:
    """The seed's position-wise table per front trial; also the keys of front trials without rows."""
    cols = [("trial", False), ("positions", True), ("tokens", True), ("base PPL", True), ("trial PPL", True), ("difference", True), ("degradation", True)]
    rows, missing = [], []
    for i in idx:
        tbl = an.positions_of(int(i))
        if tbl is None:
            missing.append(str(an.key[i]))
            continue
        for p in tbl.to_pylist():
            base, val = p["base_ppl"], p["ppl"]
            diff = val - base if _finite(val) and _finite(base) else math.nan
            rows.append([str(an.key[i]), f"{p['lo']}-{p['hi']}", count(p["tokens"]), ppl(base), ppl(val), signed(diff), pct(degradation(val, base))])
    return Table.of(cols, rows), missing


def curve_epochs(epochs: Iterable[int], columns: int = CURVE_COLUMNS) -> tuple[int, ...]:
    """The epochs the learning-curve table shows: the first, a few evenly spread ones, the last; all from ``epochs``.

    Epoch 0 (the adapters at init) is left out when there are trained epochs. With at most ``columns``
    epochs, all of them; otherwise the multiples of a round step (1, 2, 5, 10, 20, 50, ...) that puts at
    most ``columns - 2`` between the first and the last, each replaced by the nearest epoch that exists,
    leaving out those within half a step of the first or the last.
    """
    have = sorted({int(e) for e in epochs})
    trained = [e for e in have if e >= 1]
    have = trained or have
    if len(have) <= columns:
        return tuple(have)
    first, last = have[0], have[-1]
    steps = (m * k for m in (10 ** p for p in range(20)) for k in NICE_STEPS)
    step = next(s for s in steps if (last - 1) // s - first // s <= columns - 2)  # multiples of s strictly between first and last
    picked = [first]
    for target in range(step * (first // step + 1), last, step):
        if target - first < step / 2 or last - target < step / 2:
            continue
        e = min(have, key=lambda h: (abs(h - target), h))
        if e not in picked and e != last:
            picked.append(e)
    return tuple(picked + [last])


def learning_table(an: Analysis, idx: np.ndarray) -> tuple[Table, list[str]]:
    """The learning-curve excerpt: train/val PPL at the epochs of ``curve_epochs`` and at the best epoch.

    The epochs are those the given trials have rows for; a column that would be empty for every trial is left out.
    """
    best_epoch = an.column("best_epoch")
    by_trial, missing = [], []
    for i in idx:
        tbl = an.epochs_of(int(i))
        if tbl is None:
            missing.append(str(an.key[i]))
        else:
            by_trial.append((int(i), {r["epoch"]: r for r in tbl.to_pylist()}))
    shown = curve_epochs(e for _i, by_epoch in by_trial for e, r in by_epoch.items() if _finite(r["train_ppl"]) or _finite(r["val_ppl"]))
    cols = [("trial", False)]
    for e in shown:
        cols += [(f"train PPL @{e}", True), (f"val PPL @{e}", True)]
    cols += [("best epoch", True), ("train PPL @best", True), ("val PPL @best", True)]
    rows = []
    for i, by_epoch in by_trial:
        row = [str(an.key[i])]
        for e in shown:
            r = by_epoch.get(e, {})
            row += [ppl(r.get("train_ppl")), ppl(r.get("val_ppl"))]
        b = best_epoch[i]
        rb = by_epoch.get(b, {})
        row += [count(b), ppl(rb.get("train_ppl")), ppl(rb.get("val_ppl", an.val_ppl[i]))]
        rows.append(row)
    keep = [k for k, (name, _n) in enumerate(cols) if "PPL @" not in name or not rows or any(r[k] != DASH for r in rows)]
    return Table.of([cols[k] for k in keep], [[r[k] for k in keep] for r in rows]), missing


def history_table(an: Analysis) -> Table:
    """One row per results folder, by date: its best trial (lowest val PPL on the front) against the base."""
    finished = an.column("finished_at")
    cols = [("date", False), ("sweep", False), ("results", False), ("trials", True), ("best trial", False), ("variant", False),
            ("KV bytes/token", True), ("val PPL", True), ("base PPL", True), ("degradation", True)]
    rows = []
    for s, r in enumerate(an.results):
        m = an.source_index == s
        dates = sorted(d for d, k in zip(finished, m) if k and d)
        date = dates[-1][:10] if dates else DASH
        sweeps = sorted({v for v, k in zip(an.column("sweep"), m) if k and v})
        cand = np.flatnonzero(m & an.eligibility.mask)
        if cand.size:
            i = cand[np.lexsort((an.kv_bytes[cand], an.val_ppl[cand]))[0]]
            base, val = an.base_ppl[i], an.val_ppl[i]
            best = [str(an.key[i]), str(an.variant[i]), count(an.kv_bytes[i]), ppl(val), ppl(base), pct(degradation(val, base))]
        else:
            best = [DASH] * 6
        rows.append([date, ", ".join(sweeps) or DASH, r.source, count(m.sum())] + best)
    rows.sort(key=lambda row: row[0])
    return Table.of(cols, rows)


def frontier_csv(an: Analysis, idx: np.ndarray) -> str:
    """The front's trials with their full configs, raw values: one CSV row per trial, by KV bytes/token."""
    columns = [n for n in an.trials.column_names if n in TRIAL_SCHEMA.names or n in option_column_names(an.trials.schema)]
    names = ["front_rank", "source"] + columns + ["kv_pct_of_base"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(names)
    cols = {n: an.column(n) for n in columns}
    for n, i in enumerate(idx, 1):
        share = share_of_base(an.kv_bytes[i], an.kv_base[i])
        row = [n, an.results[an.source_index[i]].label] + [cols[c][i] for c in columns] + [share if _finite(share) else None]
        w.writerow(["" if v is None else repr(float(v)) if isinstance(v, float) else v for v in row])
    return buf.getvalue()
