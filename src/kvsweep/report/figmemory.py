"""Memory against context length: ``fixed bytes + L x KV bytes/token`` of the base and of front points, with each
point's break-even context marked and the report's L drawn, as PNG bytes."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from .analysis import Analysis
from .figstyle import SOURCE_STYLES, literal_text, png, point_label, point_styles
from .memory import break_even, memory_at

MIN_CONTEXT = 16  # tokens: the left end of the figure's context axis


@literal_text
def memory_figure(an: Analysis, idx: np.ndarray) -> bytes | None:
    """``draw_memory`` as PNG (None when no point of ``idx`` has known fixed bytes)."""
    fig = draw_memory(an, idx)
    return None if fig is None else png(fig)


@literal_text
def draw_memory(an: Analysis, idx: np.ndarray) -> Figure | None:
    """Memory (MB) of one sequence against its length L (tokens), both log-scaled: the base's line and each point's of
    ``idx`` with known fixed bytes; a point's break-even context (where its line crosses below the base's) as a
    diamond; the report's L as a vertical line. None when no point has known fixed bytes."""
    P = an.points
    known = [int(p) for p in idx if np.isfinite(P.fixed[p]) and np.isfinite(P.kv[p])]
    if not known:
        return None
    be = break_even(P.fixed[known], P.kv[known], P.kv_base[known])
    finite_be = be[np.isfinite(be)]
    right = max(4 * an.axis.context, 2 * float(finite_be.max()) if finite_be.size else 0.0)
    L = np.unique(np.geomspace(MIN_CONTEXT, right, 200).round())
    fig = Figure(figsize=(11.5, 5.8 + 0.2 * len(known)), layout="constrained")
    ax = fig.add_subplot()
    styles = point_styles(an, [int(p) for p in idx])
    for k, (label, kvb, _val, _test) in enumerate(an.base_points()):
        ax.plot(L, L * kvb / 1e6, color="black", lw=2.2, ls=SOURCE_STYLES[k % len(SOURCE_STYLES)] if k else "-", zorder=4,
                label=f"base{f' ({label})' if len(an.base_points()) > 1 else ''}: {kvb:,.0f} B/token, no fixed bytes")
    for p, b in zip(known, be):
        st = styles[p]
        shown_be = "never" if b == np.inf else f"{b:,.0f} tokens"
        ax.plot(L, (P.fixed[p] + L * P.kv[p]) / 1e6, color=st.colour, lw=1.5, ls=st.line, zorder=3,
                label=f"{point_label(an, p)}; fixed {P.fixed[p] / 1e6:,.2f} MB; break-even {shown_be}")
        if np.isfinite(b):
            ax.scatter([b], [float(memory_at(int(b), P.fixed[p], P.kv[p])) / 1e6], color=st.colour, marker="D", s=50,
                       edgecolors="black", zorder=5)
    ax.axvline(an.axis.context, color="0.4", lw=1.0, ls=":", zorder=1)
    ax.annotate(f"L = {an.axis.context:,}", (an.axis.context, 1.0), xycoords=("data", "axes fraction"), xytext=(4, -14),
                textcoords="offset points", fontsize=9, color="0.3")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:,.0f}"))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:,.3g}"))
    ax.set_xlabel("context length L (tokens of one sequence)")
    ax.set_ylabel("memory: fixed bytes + L x KV bytes/token (MB)")
    ax.grid(True, which="major", alpha=0.3)
    ax.set_title("Memory at L of the base and of front points (◆ break-even context: below the base from there on)", fontsize=11)
    fig.legend(loc="outside lower center", ncol=1, fontsize=8.5, frameon=False)
    return fig
