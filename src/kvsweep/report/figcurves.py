"""The figures of single points: learning curves (of each point's first seed) and PPL per position bucket (the mean
over its seeds, with the 95% interval as a band where it has one), as PNG bytes. A point is drawn in its variant's
colour, with a line and marker of its own (``figstyle.point_styles``); the legend names each point."""

from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from .analysis import Analysis
from .figstyle import SOURCE_STYLES, literal_text, png, point_label, point_styles, y_scale


@literal_text
def learning_figure(an: Analysis, idx: np.ndarray) -> bytes | None:
    """``draw_learning`` as PNG (None when none of the points has epochs)."""
    fig = draw_learning(an, idx)
    return None if fig is None else png(fig)


@literal_text
def draw_learning(an: Analysis, idx: np.ndarray) -> Figure | None:
    """Train and val PPL per epoch of the first seed of each point of ``idx`` (None when none of them has epochs)."""
    curves = [(int(p), an.points.first(int(p))) for p in idx]
    curves = [(p, i, t) for p, i in curves if (t := an.epochs_of(i)) is not None]
    if not curves:
        return None
    fig = Figure(figsize=(11.5, 5.2 + 0.22 * len(curves)), layout="constrained")
    axes = fig.subplots(1, 2)
    styles = point_styles(an, [int(p) for p in idx])  # as in the other figures of idx
    best_epoch = an.column("best_epoch")
    for p, i, tbl in curves:
        st = styles[p]
        epoch = tbl.column("epoch").to_numpy(zero_copy_only=False).astype(float)
        for ax, col in zip(axes, ("train_ppl", "val_ppl")):
            y = tbl.column(col).to_numpy(zero_copy_only=False).astype(float)
            ok = np.isfinite(y)
            ax.plot(epoch[ok], y[ok], color=st.colour, lw=1.5, ls=st.line, marker=st.marker, ms=4,
                    label=point_label(an, p) if col == "val_ppl" else None)
        b = best_epoch[i]
        if b is not None and math.isfinite(an.val_ppl[i]):
            axes[1].scatter([b], [an.val_ppl[i]], color=st.colour, marker="D", s=45, edgecolors="black", zorder=5)
    bases = an.base_points()
    for k, (label, _kvb, bppl, _test) in enumerate(bases):
        ls = SOURCE_STYLES[k % len(SOURCE_STYLES)]
        axes[1].axhline(bppl, color="black", lw=1.0, ls=ls, zorder=1)
        axes[0].plot([], [], color="black", lw=1.0, ls=ls, label=f"base{f' ({label})' if len(bases) > 1 else ''}: val PPL {bppl:,.2f}")
    for ax, name in zip(axes, ("train", "validation")):
        vals = np.concatenate([t.column("train_ppl" if name == "train" else "val_ppl").to_numpy(zero_copy_only=False).astype(float)
                               for _p, _i, t in curves])
        y_scale(ax, vals)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{name} perplexity (PPL)")
        ax.set_title(f"{name} PPL per epoch" + (" (◆ best epoch)" if name == "validation" else ""), fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.legend(loc="outside lower center", ncol=2 if len(curves) > 1 else 1, fontsize=8.5, frameon=False)
    fig.suptitle("Learning curves of front points (first seed of each)", fontsize=11)
    return fig


@literal_text
def positions_figure(an: Analysis, idx: np.ndarray, split: str) -> bytes | None:
    """``draw_positions`` as PNG (None when none of the points has position rows)."""
    fig = draw_positions(an, idx, split)
    return None if fig is None else png(fig)


@literal_text
def draw_positions(an: Analysis, idx: np.ndarray, split: str) -> Figure | None:
    """PPL per position bucket in ``split`` of the points ``idx`` (mean over seeds, 95% band where there are several)
    against the base, and their degradation % (None without rows)."""
    rows = [(int(p), an.point_positions(int(p), split)) for p in idx]
    rows = [(p, b) for p, b in rows if b is not None]
    if not rows:
        return None
    buckets = sorted({(b.lo, b.hi) for _p, bs in rows for b in bs})
    pos = {b: k for k, b in enumerate(buckets)}
    fig = Figure(figsize=(11.5, 5.2 + 0.22 * len(rows)), layout="constrained")
    ax, ax2 = fig.subplots(1, 2)
    styles = point_styles(an, [int(p) for p in idx])  # as in the other figures of idx
    drawn_bases: list[tuple[np.ndarray, np.ndarray]] = []  # (bucket positions, base PPL) already drawn
    all_ppl = []
    for p, bs in rows:
        st = styles[p]
        x = np.array([pos[(b.lo, b.hi)] for b in bs])
        y = np.array([b.ppl.mean for b in bs])
        lo, hi = np.array([b.ppl.low for b in bs]), np.array([b.ppl.high for b in bs])
        base = np.array([b.base_ppl for b in bs])
        if not any(xs.shape == x.shape and np.all(xs == x) and np.allclose(b0, base, equal_nan=True) for xs, b0 in drawn_bases):
            label = f"base{f' ({an.results[an.points.source[p]].label})' if len(an.base_points()) > 1 else ''}"
            ax.plot(x, base, color="black", lw=2.4, ls=SOURCE_STYLES[len(drawn_bases) % len(SOURCE_STYLES)], marker="*", ms=11,
                    mfc="gold", zorder=4, label=label)
            drawn_bases.append((x, base))
        ax.plot(x, y, color=st.colour, lw=1.5, ls=st.line, marker=st.marker, ms=5, label=point_label(an, p))
        if np.isfinite(lo).any():
            ax.fill_between(x, lo, hi, color=st.colour, alpha=0.15, lw=0)
        ax2.plot(x, 100.0 * (y - base) / base, color=st.colour, lw=1.5, ls=st.line, marker=st.marker, ms=5)
        all_ppl += [y, base]
    ax2.axhline(0.0, color="black", lw=1.0, ls="--")
    for a in (ax, ax2):
        a.set_xticks(range(len(buckets)), [f"{lo}-{hi}" for lo, hi in buckets])
        a.set_xlabel("position bucket [lo, hi) of the prediction (tokens)")
        a.grid(True, alpha=0.3)
    y_scale(ax, np.concatenate(all_ppl))
    ax.set_ylabel(f"{split} perplexity (PPL)")
    ax.set_title(f"{split} PPL by position: front points against the base", fontsize=10)
    ax2.set_ylabel("degradation against the base (%)")
    ax2.yaxis.set_major_formatter(PercentFormatter(decimals=None))  # as many decimals as the tick spacing needs
    ax2.set_title("degradation by position, 100 * (point - base) / base", fontsize=10)
    fig.legend(loc="outside lower center", ncol=2 if len(rows) > 1 else 1, fontsize=8.5, frameon=False)
    return fig
