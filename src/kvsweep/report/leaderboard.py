"""The leaderboard: for each budget of the base's KV cache, the best point of each family within it.

A budget is a share of the base's KV bytes/token (``BUDGETS``: 75%, 50%, 25% and 12.5%); a point is within it
when its KV bytes/token are at most that share of its own base's. Within a budget, each family's entry is its
point of the lowest mean validation PPL (validation makes every choice; ties: the smaller cache), shown at its
test PPL over seeds with a 95% CI (the headline) beside its validation PPL, its memory at L and, given the decode
benchmark's figures (``benchmarks/decode.py --json``), the decode speed on the benchmark's model of the row timed at
that budget with the point's own methods (as its variant names them), else of that family's first row there; the
table names the row timed. Families are the report's grouping of methods (the ``family`` column of ``trials.parquet``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .analysis import Analysis
from .errors import ReportError
from .memory import megabytes, memory_at
from .tables import DASH, Table, ci, count, ppl, share_of_base

BUDGETS = (0.75, 0.5, 0.25, 0.125)
SLACK = 1e-9  # a point at exactly the budget is within it


@dataclass(frozen=True)
class Entry:
    """A family's best point within one budget (``point`` None: the family has none within it)."""

    budget: float
    family: str
    point: int | None


def leaderboard(an: Analysis, budgets: tuple[float, ...] = BUDGETS) -> list[Entry]:
    """For each budget (largest first) and each family (by name), the family's best point within the budget."""
    share = an.points.kv / an.points.kv_base  # NaN where the base's bytes are unknown: within no budget
    val = an.points.val.mean
    out = []
    for b in sorted(budgets, reverse=True):
        for fam in sorted(set(an.points.family.tolist())):
            idx = np.flatnonzero((an.points.family == fam) & (share <= b + SLACK) & np.isfinite(val))
            best = None
            if idx.size:
                best = int(idx[np.lexsort((an.points.kv[idx], val[idx]))[0]])
            out.append(Entry(b, fam, best))
    return out


@dataclass(frozen=True)
class DecodeRow:
    """One row of ``benchmarks/decode.py --json``: a method's decode speed on the benchmark's model."""

    family: str
    method: str  # the benchmark's name of the row
    methods: str | None  # the methods as a trial's variant names them, e.g. "lowrank[g8,svd]+quant[kv,4b,G32,R128]"
    budget: float | None
    kv_bytes_per_token: int
    tokens_per_s: float
    base_tokens_per_s: float
    base_kv_bytes_per_token: int


@dataclass(frozen=True)
class DecodeFigures:
    """What ``benchmarks/decode.py --json`` wrote: where it ran and one row per method."""

    setting: str  # e.g. "pythia-70m (random weights), context 2048, cpu"
    rows: tuple[DecodeRow, ...]

    def speed(self, family: str, budget: float, methods: str | None = None) -> DecodeRow | None:
        """The row at ``budget`` of the methods ``methods``, else the family's first row at ``budget``; None without."""
        at = [r for r in self.rows if r.family == family and r.budget is not None and math.isclose(r.budget, budget)]
        return next((r for r in at if methods is not None and r.methods == methods), at[0] if at else None)


def load_decode(path: str | Path) -> DecodeFigures:
    """Read ``benchmarks/decode.py --json``'s file.

    Raises:
        ReportError: the file is missing or not such a file.
    """
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
        rows = tuple(DecodeRow(str(r["family"]), str(r["method"]), r.get("methods"), None if r.get("budget") is None else float(r["budget"]),
                               int(r["kv_bytes_per_token"]), float(r["tokens_per_s"]), float(d["base"]["tokens_per_s"]),
                               int(d["base"]["kv_bytes_per_token"])) for r in d["rows"])
        return DecodeFigures(str(d["setting"]), rows)
    except FileNotFoundError:
        raise ReportError(f"--decode: no such file: {path}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ReportError(f"--decode: {path} is not the JSON of benchmarks/decode.py --json ({type(e).__name__}: {e})") from None


def leaderboard_table(an: Analysis, entries: list[Entry], decode: DecodeFigures | None = None) -> Table:
    """One row per budget and family: its best point, bytes, memory at L, test and validation PPL (95% CI) and, with
    ``decode``, that family's decode speed at the budget."""
    L = an.axis.context
    test = an.headline == "test"
    cols = [("budget (of the base's KV)", True), ("family", False), ("point", False), ("variant", False), ("KV bytes/token", True),
            ("% of base", True), (f"memory at L = {L:,}", True)]
    cols += ([("test PPL", True), ("95% CI", False)] if test else []) + [("val PPL", True), ("95% CI", False), ("seeds", True)]
    if decode is not None:
        cols += [("decode tok/s", True), ("× base", True), ("timed", False)]
    rows = []
    for e in entries:
        head = [f"≤ {100 * e.budget:g}%", e.family]
        if e.point is None:
            cells = [DASH] * (len(cols) - 2)
        else:
            p = e.point
            mem = float(memory_at(L, an.points.fixed[p], an.points.kv[p]))
            cells = [str(an.points.label[p]), str(an.points.variant[p]), count(an.points.kv[p]),
                     f"{share_of_base(an.points.kv[p], an.points.kv_base[p]):.1f}%", megabytes(mem)]
            if test:
                cells += [ppl(an.points.test[p].mean), ci(an.points.test[p])]
            cells += [ppl(an.points.val[p].mean), ci(an.points.val[p]), str(len(an.points.members[p]))]
            if decode is not None:
                row = decode.speed(e.family, e.budget, str(an.points.variant[p]).split(" / ")[0])
                cells += [f"{row.tokens_per_s:,.1f}", f"{row.tokens_per_s / row.base_tokens_per_s:.2f}", row.method] if row else [DASH] * 3
        rows.append(head + cells)
    return Table.of(cols, rows)


def decode_table(decode: DecodeFigures) -> Table:
    """The decode benchmark's rows: family, method, budget, bytes/token and decode speed against the base's."""
    cols = [("family", False), ("method", False), ("budget", True), ("KV bytes/token", True), ("% of base", True),
            ("decode tok/s", True), ("× base", True)]
    rows = [["base", "base", DASH, count(decode.rows[0].base_kv_bytes_per_token) if decode.rows else DASH, "100.0%",
             f"{decode.rows[0].base_tokens_per_s:,.1f}" if decode.rows else DASH, "1.00"]]
    for r in decode.rows:
        rows.append([r.family, r.method, DASH if r.budget is None else f"{100 * r.budget:g}%", count(r.kv_bytes_per_token),
                     f"{100 * r.kv_bytes_per_token / r.base_kv_bytes_per_token:.1f}%", f"{r.tokens_per_s:,.1f}",
                     f"{r.tokens_per_s / r.base_tokens_per_s:.2f}"])
    return Table.of(cols, rows)
