"""The seed's per-point tables: PPL per position bucket, the learning curves and the history of the sweeps.

Position-wise PPL is that of the headline split (test when the results have test rows, else validation) averaged
over each point's seeds, with its 95% interval; learning curves are those of each point's first seed.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
from numpy.typing import NDArray

from .analysis import Analysis
from .tables import DASH, Table, _finite, ci, count, degradation, pct, ppl, signed

CURVE_COLUMNS = 5  # at most this many epochs in the learning-curve table, besides the best epoch
NICE_STEPS = (1, 2, 5)  # epochs between the table's middle columns: 1, 2, 5, 10, 20, 50, ...


def position_split(an: Analysis, idx: NDArray[np.intp]) -> str:
    """The split of the position-wise figures: the headline split where a point of ``idx`` has rows of it, else validation."""
    if an.headline == "test" and any(an.point_positions(int(p), "test") is not None for p in idx):
        return "test"
    return "validation"


def position_table(an: Analysis, idx: NDArray[np.intp]) -> tuple[Table, list[str]]:
    """The seed's position-wise table per front point (mean over its seeds, in ``position_split``); also the labels of
    front points without rows."""
    split = position_split(an, idx)
    cols = [("point", False), ("positions", True), ("tokens", True), ("base PPL", True), (f"{split} PPL", True), ("95% CI", False),
            ("difference", True), ("degradation", True)]
    rows, missing = [], []
    for p in idx:
        buckets = an.point_positions(int(p), split)
        if buckets is None:
            missing.append(str(an.points.label[p]))
            continue
        for b in buckets:
            val = b.ppl.mean
            diff = val - b.base_ppl if _finite(val) and _finite(b.base_ppl) else math.nan
            rows.append([str(an.points.label[p]), f"{b.lo}-{b.hi}", count(b.tokens), ppl(b.base_ppl), ppl(val), ci(b.ppl), signed(diff),
                         pct(degradation(val, b.base_ppl))])
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


def learning_table(an: Analysis, idx: NDArray[np.intp]) -> tuple[Table, list[str]]:
    """The learning-curve excerpt of the points ``idx`` (each point's first seed): train/val PPL at the epochs of
    ``curve_epochs`` and at the best epoch; also the labels of points without epochs.

    The epochs are those the given trials have rows for; a column that would be empty for every trial is left out.
    """
    best_epoch = an.column("best_epoch")
    by_trial, missing = [], []
    for p in idx:
        i = an.points.first(int(p))
        tbl = an.epochs_of(i)
        if tbl is None:
            missing.append(str(an.points.label[p]))
        else:
            by_trial.append((i, {r["epoch"]: r for r in tbl.to_pylist()}))
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
    """One row per results folder, by date: its best point (lowest mean val PPL, then fewest bytes) against the base,
    with its headline PPL."""
    finished = an.column("finished_at")
    test = an.headline == "test"
    cols = ([("date", False), ("sweep", False), ("results", False), ("trials", True), ("best point", False), ("variant", False),
             ("KV bytes/token", True), ("val PPL", True), ("base val PPL", True), ("degradation", True)]
            + ([("test PPL", True), ("base test PPL", True), ("test degradation", True)] if test else []))
    rows = []
    for s, r in enumerate(an.results):
        m = an.source_index == s
        dates = sorted(d for d, k in zip(finished, m) if k and d)
        date = dates[-1][:10] if dates else DASH
        sweeps = sorted({v for v, k in zip(an.column("sweep"), m) if k and v})
        pts = np.flatnonzero(an.points.source == s)
        if pts.size:
            P = an.points
            p = pts[np.lexsort((P.kv[pts], P.val.mean[pts]))[0]]
            best = [str(P.label[p]), str(P.variant[p]), count(P.kv[p]), ppl(P.val.mean[p]), ppl(P.base_val[p]),
                    pct(degradation(P.val.mean[p], P.base_val[p]))]
            best += [ppl(P.test.mean[p]), ppl(P.base_test[p]), pct(degradation(P.test.mean[p], P.base_test[p]))] if test else []
        else:
            best = [DASH] * (9 if test else 6)
        rows.append([date, ", ".join(sweeps) or DASH, r.source, count(m.sum())] + best)
    rows.sort(key=lambda row: row[0])
    return Table.of(cols, rows)
