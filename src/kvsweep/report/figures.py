"""The report's front figures as PNG bytes. Uses matplotlib's object API on the Agg canvas (no pyplot, no global state).

Each figure is drawn by a ``draw_*`` function that returns the matplotlib ``Figure`` and rendered by the
``*_figure`` function of the same name as PNG bytes. A colour means a variant in every figure
(``variant_colours``). The x axis is the analysis's cost (KV bytes/token, or memory at L in MB); the fronts are
of points (configurations over seeds: mean PPL, with their 95% interval as error bars). The figures of single
points are in ``figcurves``, the memory-at-L figure in ``figmemory``.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter

from .analysis import Analysis
from .figcurves import draw_learning, draw_positions, learning_figure, positions_figure
from .figmemory import draw_memory, memory_figure
from .figstyle import (BASE_STYLE, SOURCE_STYLES, STATUS_MARKERS, family_colours, front_step, literal_text, plain, png, point_label, point_styles,
                       status_marker, variant_colours, y_scale)

__all__ = [  # every figure of the report, here in one place, and the styles the tests check them by
    "front_figure", "draw_front", "variant_fronts_figure", "draw_variant_fronts", "family_fronts_figure", "draw_family_fronts", "front_test_figure", "draw_front_test",
    "learning_figure", "draw_learning", "positions_figure", "draw_positions", "memory_figure", "draw_memory",
    "variant_colours", "family_colours", "point_label", "point_styles",
]


def _cost_axis(ax, an: Analysis) -> None:
    """The x axis: the cost's label and format, and a second axis in % of the base's cost when the sources share a base."""
    ax.xaxis.set_major_formatter(FuncFormatter(plain))
    ax.set_xlabel(an.axis.label)
    kvb = an.kv_base_common()
    if kvb:
        base = an.axis.shown(an.base_cost(kvb))
        sec = ax.secondary_xaxis("top", functions=(lambda b: 100.0 * b / base, lambda q: q * base / 100.0))
        sec.set_xlabel(f"{an.axis.short} (% of the base's)")
        sec.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:.0f}%"))


def _error_bars(ax, an: Analysis, idx: np.ndarray, test: bool = False) -> None:
    """The 95% interval of each point of ``idx`` that has one, as a vertical bar in its variant's colour."""
    colours = variant_colours(an)
    iv = an.points.test if test else an.points.val
    for p in idx:
        if iv.n[p] >= 2:
            x = an.axis.shown(an.pcost[p])
            ax.errorbar([x], [iv.mean[p]], yerr=[[iv.mean[p] - iv.low[p]], [iv.high[p] - iv.mean[p]]], fmt="none",
                        ecolor=colours[an.points.variant[p]], elinewidth=1.6, capsize=4, zorder=4.8)


@literal_text
def front_figure(an: Analysis, *, title: str = "") -> bytes:
    """``draw_front`` as PNG."""
    return png(draw_front(an, title=title))


@literal_text
def draw_front(an: Analysis, *, title: str = "") -> Figure:
    """Trials with finite metrics that did not fail (colour by variant, marker by status), the front of the points as a
    step line with 95% error bars, the base."""
    fig = Figure(figsize=(11.5, 6.5), layout="constrained")
    ax = fig.add_subplot()
    colours = variant_colours(an)
    shown = an.eligibility.mask & (an.val_ppl > 0)  # failed trials' numbers mislead
    cost = an.axis.shown(an.cost)
    many = shown.sum() > 500
    for variant, colour in colours.items():
        for status in sorted(set(an.status[shown].tolist())):
            m = shown & (an.variant == variant) & (an.status == status)
            if m.any():
                ax.scatter(cost[m], an.val_ppl[m], s=12 if many else 30, color=colour, marker=status_marker(status),
                           alpha=0.3 if many else 0.7, linewidths=0, zorder=2 if many else 4.2, rasterized=many)
    bases = an.base_points()
    base_x = [an.axis.shown(an.base_cost(b[1])) for b in bases]
    xs_all = np.r_[cost[shown], base_x]
    x_end = float(np.nanmax(xs_all)) if xs_all.size else 1.0
    handles: list = []
    pcost = an.axis.shown(an.pcost)
    if len(an.results) > 1:
        for k, (label, idx) in enumerate(an.source_fronts.items()):
            if idx.size:
                sx, sy = front_step(pcost[idx], an.points.val.mean[idx], x_end)
                ax.step(sx, sy, where="post", color="0.35", lw=1.1, ls=SOURCE_STYLES[k % len(SOURCE_STYLES)], zorder=3)
                handles.append(Line2D([], [], color="0.35", lw=1.1, ls=SOURCE_STYLES[k % len(SOURCE_STYLES)], label=f"front of {label}"))
    if an.front.size:
        fx, fy = pcost[an.front], an.points.val.mean[an.front]
        sx, sy = front_step(fx, fy, x_end)
        ax.step(sx, sy, where="post", color="black", lw=1.8, zorder=4)
        _error_bars(ax, an, an.front)
        ax.scatter(fx, fy, s=70, color=[colours[v] for v in an.points.variant[an.front]], edgecolors="black", linewidths=1.2, zorder=5,
                   marker="o")
        if an.front.size <= 30:
            labels: dict[tuple[float, float], list[str]] = {}
            for n, (x, y) in enumerate(zip(fx, fy), 1):
                labels.setdefault((float(x), float(y)), []).append(str(n))  # exact duplicates share one label
            for (x, y), ns in labels.items():
                ax.annotate(",".join(ns), (x, y), xytext=(5, 5), textcoords="offset points", fontsize=8, zorder=6)
        handles.insert(0, Line2D([], [], color="black", lw=1.8, marker="o", mfc="white", mec="black",
                                 label="Pareto front: mean over seeds, 95% CI bars (# as in the table)"))
    for (label, _kvb, bppl, _test), bx in zip(bases, base_x):
        ax.scatter([bx], [bppl], **BASE_STYLE)
        ax.axhline(bppl, color="0.5", lw=0.8, ls=":", zorder=1)
        handles.append(Line2D([], [], ls="", marker="*", ms=14, mfc="gold", mec="black", label=f"base{f' ({label})' if len(bases) > 1 else ''}: PPL {bppl:,.2f}"))
    handles.append(Line2D([], [], ls="", label=" "))
    handles += [Line2D([], [], ls="", marker="o", ms=7, color=c, label=v) for v, c in colours.items()]
    handles.append(Line2D([], [], ls="", label=" "))
    statuses = sorted(set(an.status[shown].tolist()), key=lambda s: list(STATUS_MARKERS).index(s) if s in STATUS_MARKERS else 99)
    not_candidate = set(an.status[shown & ~an.eligibility.candidate].tolist())
    handles += [Line2D([], [], ls="", marker=status_marker(s), ms=7, color="0.4",
                       label=s.replace("_", " ") + (" (no front candidate)" if s in not_candidate else "")) for s in statuses]
    y_scale(ax, np.r_[an.val_ppl[shown], [b[2] for b in bases]])
    _cost_axis(ax, an)
    ax.set_ylabel("validation perplexity (PPL, best epoch)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8.5, frameon=False)
    fig.suptitle(f"{title}\nval PPL against {an.axis.short}: {int(shown.sum()):,} trials, {an.points.n:,} configurations, "
                 f"{an.front.size} on the Pareto front", fontsize=11)
    return fig


@literal_text
def variant_fronts_figure(an: Analysis) -> bytes:
    """``draw_variant_fronts`` as PNG."""
    return png(draw_variant_fronts(an))


@literal_text
def draw_variant_fronts(an: Analysis) -> Figure:
    """Each variant's own front of points as a step line in the variant's colour, with error bars and the base."""
    return _draw_group_fronts(an, an.variant_fronts, variant_colours(an), "variant", "Pareto front of each variant")


@literal_text
def family_fronts_figure(an: Analysis) -> bytes:
    """``draw_family_fronts`` as PNG."""
    return png(draw_family_fronts(an))


@literal_text
def draw_family_fronts(an: Analysis) -> Figure:
    """Each family's own front of points as a step line in the family's colour, with error bars and the base."""
    return _draw_group_fronts(an, an.family_fronts, family_colours(an), "family", "Pareto front of each family")


def _draw_group_fronts(an: Analysis, fronts: dict, colours: dict, what: str, title: str) -> Figure:
    fig = Figure(figsize=(11.5, 6.0), layout="constrained")
    ax = fig.add_subplot()
    bases = an.base_points()
    pcost = an.axis.shown(an.pcost)
    xs_all = np.r_[pcost, [an.axis.shown(an.base_cost(b[1])) for b in bases]]
    x_end = float(np.nanmax(xs_all)) if xs_all.size else 1.0
    ys = []
    for name, idx in fronts.items():
        if idx.size:
            sx, sy = front_step(pcost[idx], an.points.val.mean[idx], x_end)
            ax.step(sx, sy, where="post", color=colours[name], lw=1.6, zorder=3)
            _error_bars(ax, an, idx)
            ax.scatter(pcost[idx], an.points.val.mean[idx], color=colours[name], s=28, zorder=4, label=f"{name} ({idx.size})")
            ys.append(an.points.val.mean[idx])
    for label, kvb, bppl, _test in bases:
        ax.scatter([an.axis.shown(an.base_cost(kvb))], [bppl], **BASE_STYLE, label=f"base{f' ({label})' if len(bases) > 1 else ''}")
        ys.append(np.array([bppl]))
    y_scale(ax, np.concatenate(ys) if ys else np.array([]))
    _cost_axis(ax, an)
    ax.set_ylabel("validation perplexity (PPL, best epoch, mean over seeds)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8.5, frameon=False, title=f"{what} (points on its front)", title_fontsize=9)
    ax.set_title(title, fontsize=11)
    return fig


@literal_text
def front_test_figure(an: Analysis) -> bytes | None:
    """``draw_front_test`` as PNG (None without test PPL)."""
    fig = draw_front_test(an)
    return None if fig is None else png(fig)


@literal_text
def draw_front_test(an: Analysis) -> Figure | None:
    """The front's points (chosen on validation) at their test PPL, mean over seeds with 95% error bars, against the
    base's test PPL (None when no front point has a test PPL)."""
    idx = an.front[np.isfinite(an.points.test.mean[an.front])]
    if not idx.size:
        return None
    fig = Figure(figsize=(11.5, 5.5), layout="constrained")
    ax = fig.add_subplot()
    colours = variant_colours(an)
    x, y = an.axis.shown(an.pcost[idx]), an.points.test.mean[idx]
    ax.plot(x, y, color="black", lw=1.0, ls="--", zorder=3)
    _error_bars(ax, an, idx, test=True)
    ax.scatter(x, y, s=70, color=[colours[v] for v in an.points.variant[idx]], edgecolors="black", linewidths=1.2, zorder=5)
    for n, p in enumerate(an.front, 1):
        if p in idx:
            ax.annotate(str(n), (an.axis.shown(an.pcost[p]), an.points.test.mean[p]), xytext=(5, 5), textcoords="offset points", fontsize=8)
    ys = [y]
    for label, kvb, _val, btest in an.base_points():
        if np.isfinite(btest):
            ax.scatter([an.axis.shown(an.base_cost(kvb))], [btest], **BASE_STYLE)
            ax.axhline(btest, color="0.5", lw=0.8, ls=":", zorder=1)
            ys.append(np.array([btest]))
    y_scale(ax, np.concatenate(ys))
    _cost_axis(ax, an)
    ax.set_ylabel("test perplexity (PPL, best epoch by validation)")
    ax.grid(True, alpha=0.3)
    ax.set_title("The front's points on the test samples (# as in the front table; the star is the base)", fontsize=11)
    return fig
