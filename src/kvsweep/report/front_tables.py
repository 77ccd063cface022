"""The tables of the fronts' points: the front, each variant's front, overall PPL over seeds, memory at L and break-even
context, hypervolume. A point is one configuration over its seeds (``points``); its PPL is their mean with a 95%
t-interval; "not distinguishable from the base" where that interval holds the base's PPL."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from .analysis import Analysis
from .memory import break_even, megabytes, memory_at
from .pareto import hypervolume, normalised_hypervolume
from .stats import distinguishable
from .tables import DASH, Table, ci, count, degradation, many_sources, pct, ppl, share_of_base, signed, text, versus_base

HV_PPL_FACTOR = 1.5  # the hypervolume's reference: the base's PPL x 1.5 and the base's cost


def point_cols(an: Analysis) -> list[tuple[str, bool]]:
    return [("point", False)] + ([("sweep", False)] if many_sources(an) else []) + [("variant", False)]


def point_cells(an: Analysis, p: int) -> list[str]:
    return [str(an.points.label[p])] + ([an.results[an.points.source[p]].label] if many_sources(an) else []) + [str(an.points.variant[p])]


def _range(values: list) -> str:
    v = sorted({int(x) for x in values if x is not None})
    return DASH if not v else str(v[0]) if len(v) == 1 else f"{v[0]}–{v[-1]}"


def flag(an: Analysis, p: int) -> bool | None:
    """Whether point p's headline PPL is distinguishable from the base's (None: one seed, or no base PPL)."""
    return distinguishable(an.headline_interval(p), an.headline_base(p))


def seeds_cell(an: Analysis, p: int) -> str:
    seeds = an.points.seeds[p]
    return f"{len(seeds)} ({', '.join('—' if s is None else str(s) for s in seeds)})"


def frontier_table(an: Analysis, idx: NDArray[np.intp]) -> Table:
    """The front's points by cost: seeds, cache size, headline PPL with its interval, degradation, status, epochs."""
    options, epochs_run, best_epoch = an.column("options"), an.column("epochs_run"), an.column("best_epoch")
    split = an.headline
    cols = ([("#", True)] + point_cols(an) + [("methods", False), ("seeds", True), ("KV bytes/token", True), ("% of base", True)]
            + ([(f"memory at {an.axis.context:,}", True)] if an.axis.is_memory else [])
            + [(f"{split} PPL", True), ("95% CI", False), ("degradation", True), ("vs the base", False)]
            + ([("val PPL", True)] if split == "test" else []) + [("status", False), ("epochs (best)", True)])
    rows = []
    for n, p in enumerate(idx, 1):
        m = an.points.members[p]
        iv = an.headline_interval(p)
        share = share_of_base(an.points.kv[p], an.points.kv_base[p])
        statuses = ", ".join(sorted({str(an.status[i]) for i in m}))
        rows.append([str(n)] + point_cells(an, p) + [text(options[m[0]]), seeds_cell(an, p), count(an.points.kv[p]),
                     f"{share:.1f}%" if np.isfinite(share) else DASH]
                    + ([megabytes(an.pcost[p])] if an.axis.is_memory else [])
                    + [ppl(iv.mean), ci(iv), pct(degradation(iv.mean, an.headline_base(p))), versus_base(flag(an, p))]
                    + ([ppl(an.points.val.mean[p])] if split == "test" else [])
                    + [statuses, f"{_range([epochs_run[i] for i in m])} ({_range([best_epoch[i] for i in m])})"])
    return Table.of(cols, rows)


def variant_fronts_table(an: Analysis) -> Table:
    """Each variant's own front: the points that no point of the same variant beats (on validation, as every choice)."""
    cols = [("variant", False), ("point", False), (an.axis.short, True), ("% of base", True), ("val PPL", True), ("95% CI", False),
            ("degradation", True), ("on overall front", False)]
    overall = set(an.front.tolist())
    rows = []
    for variant, idx in an.variant_fronts.items():
        for p in idx:
            share = share_of_base(an.points.kv[p], an.points.kv_base[p])
            cost = megabytes(an.pcost[p]) if an.axis.is_memory else count(an.pcost[p])
            iv = an.points.val[p]
            rows.append([variant, str(an.points.label[p]), cost, f"{share:.1f}%" if np.isfinite(share) else DASH, ppl(iv.mean), ci(iv),
                         pct(degradation(iv.mean, an.points.base_val[p])), "yes" if p in overall else ""])
    return Table.of(cols, rows)


def overall_ppl_table(an: Analysis, idx: NDArray[np.intp]) -> Table:
    """The seed's overall table over seeds: the base against each front point, test (when the results have it) then
    validation: the mean, its 95% interval, difference, degradation, and whether it is distinguishable from the base."""
    splits = ("test", "validation") if an.headline == "test" else ("validation",)
    cols = point_cols(an) + [("KV bytes/token", True), ("seeds", True)]
    for split in splits:
        s = "test" if split == "test" else "val"
        cols += [(f"base {s} PPL", True), (f"{s} PPL", True), (f"{s} 95% CI", False), (f"{s} difference", True), (f"{s} degradation", True),
                 (f"{s}: vs the base", False)]
    rows = []
    for p in idx:
        row = point_cells(an, p) + [count(an.points.kv[p]), str(len(an.points.members[p]))]
        for split in splits:
            iv = an.points.test[p] if split == "test" else an.points.val[p]
            base = float(an.points.base_test[p] if split == "test" else an.points.base_val[p])
            row += [ppl(base), ppl(iv.mean), ci(iv), signed(iv.mean - base), pct(degradation(iv.mean, base)),
                    versus_base(distinguishable(iv, base))]
        rows.append(row)
    return Table.of(cols, rows)


def memory_table(an: Analysis, idx: NDArray[np.intp]) -> Table:
    """The base and each front point: KV bytes/token, fixed bytes, memory at L (one sequence of L tokens) against the
    base's, and the break-even context (the smallest L at which its memory is below the base's)."""
    L = an.axis.context
    cols = point_cols(an) + [("KV bytes/token", True), ("fixed bytes", True), (f"memory at L = {L:,}", True),
                             ("% of the base's", True), ("break-even context (tokens)", True)]
    rows = []
    for label, kvb, _val, _test in an.base_points():
        rows.append([f"base{f' ({label})' if len(an.base_points()) > 1 else ''}"] + ([DASH] if many_sources(an) else []) + [DASH, count(kvb), "0",
                    megabytes(kvb * L), "100.0%", DASH])
    for p in idx:
        mem = float(memory_at(L, an.points.fixed[p], an.points.kv[p]))
        share = share_of_base(mem, L * an.points.kv_base[p])
        be = float(break_even(an.points.fixed[p], an.points.kv[p], an.points.kv_base[p]))
        rows.append(point_cells(an, p) + [count(an.points.kv[p]), count(an.points.fixed[p]), megabytes(mem),
                    f"{share:.1f}%" if np.isfinite(share) else DASH,
                    "never" if be == np.inf else count(be) if np.isfinite(be) else "unknown (no fixed bytes)"])
    return Table.of(cols, rows)


@dataclass(frozen=True)
class FrontVolume:
    """The hypervolume of one front's points on one split, with its reference (the base's cost, its PPL x 1.5)."""

    label: str
    split: str
    points: int
    reference: tuple[float, float]
    volume: float
    normalised: float


def front_volumes(an: Analysis) -> list[FrontVolume]:
    """Each source's front (and the overall one when the sources share a base) measured by its hypervolume, on
    validation and, when the results have it, on test (the same points, chosen on validation)."""
    fronts = [(r.label, an.source_fronts.get(r.label, an.front), np.flatnonzero(an.points.source == s)) for s, r in enumerate(an.results)]
    if many_sources(an) and len(an.base_points()) == 1:
        fronts.append(("all", an.front, np.arange(an.points.n)))
    out = []
    for label, front, pts in fronts:
        for split in ("validation", "test") if an.headline == "test" else ("validation",):
            iv, base = (an.points.val, an.points.base_val) if split == "validation" else (an.points.test, an.points.base_test)
            b = base[pts][np.isfinite(base[pts])]
            kvb = an.points.kv_base[pts][np.isfinite(an.points.kv_base[pts])]
            if not b.size or not kvb.size:
                continue
            ref = (an.base_cost(float(np.median(kvb))), HV_PPL_FACTOR * float(np.median(b)))
            xy = np.c_[an.pcost[front], iv.mean[front]]
            out.append(FrontVolume(label, split, int(front.size), ref, hypervolume(xy, ref), normalised_hypervolume(xy, ref)))
    return out


def hypervolume_table(an: Analysis) -> Table:
    """``front_volumes`` as a table."""
    cost = "MB" if an.axis.is_memory else "bytes/token"
    cols = [("front", False), ("split", False), ("points", True), (f"reference ({cost}, PPL)", True), ("hypervolume", True),
            ("normalised", True)]
    rows = []
    for v in front_volumes(an):
        rx = an.axis.shown(v.reference[0])
        vol = an.axis.shown(v.volume)
        rows.append([v.label, v.split, count(v.points), f"{rx:,.{2 if an.axis.is_memory else 0}f}, {v.reference[1]:,.3f}",
                     f"{vol:,.{3 if an.axis.is_memory else 1}f}", f"{v.normalised:.4f}"])
    return Table.of(cols, rows)
