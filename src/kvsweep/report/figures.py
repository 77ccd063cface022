"""The report's figures as PNG bytes. Uses matplotlib's object API on the Agg canvas (no pyplot, no global state).

Each figure is drawn by a ``draw_*`` function that returns the matplotlib ``Figure`` and rendered by
the ``*_figure`` function of the same name as PNG bytes. A colour means a variant in every figure
(``variant_colours``); in the figures of single trials, line and marker styles tell the trials of one
variant apart (``trial_styles``) and the legend names each trial.
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass
from typing import Callable, ParamSpec, TypeVar

import numpy as np
from matplotlib import colormaps, rc_context
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, PercentFormatter, LogLocator, NullFormatter

from .analysis import Analysis

DPI = 110
STATUS_MARKERS = {"completed": "o", "early_stopped": "s", "asha_stopped": "v", "error": "X"}
OTHER_MARKER = "P"
BASE_STYLE = dict(marker="*", s=260, c="gold", edgecolors="black", linewidths=1.0, zorder=4.5)  # under the front's points
P = ParamSpec("P")
R = TypeVar("R")
SOURCE_STYLES = ["--", "-.", ":", (0, (5, 1, 1, 1, 1, 1))]
TRIAL_LINES = ("-", "--", ":", "-.")  # the k-th trial of a variant in a figure: line TRIAL_LINES[k % 4], marker TRIAL_MARKERS[k % 8]
TRIAL_MARKERS = ("o", "s", "^", "v", "<", ">", "p", "h")  # not "D" (best epoch) nor "*" (the base)


def _literal_text(fn: Callable[P, R]) -> Callable[P, R]:
    """Draw with ``$`` taken literally: sweep, variant and trial names are not mathtext."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with rc_context({"text.parse_math": False}):
            return fn(*args, **kwargs)

    return wrapper


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def palette(n: int) -> list:
    """n distinguishable colours (tab10, tab20 beyond ten, repeating beyond twenty)."""
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(k % cmap.N) for k in range(max(n, 1))]


def variant_colours(an: Analysis) -> dict[str, tuple]:
    """Variant -> RGBA colour, over all of the analysis's trials; every figure colours a trial by its variant with it."""
    names = sorted(set(an.variant.tolist()))
    return dict(zip(names, palette(len(names))))


@dataclass(frozen=True)
class TrialStyle:
    """How one trial is drawn in a figure of several trials."""

    colour: tuple  # RGBA: the variant's
    line: str
    marker: str


def trial_styles(an: Analysis, trials: list[int]) -> dict[int, TrialStyle]:
    """Trial index -> its style in a figure of ``trials``: its variant's colour, and a line and marker of its own within the variant."""
    colours = variant_colours(an)
    seen: dict[str, int] = {}
    out = {}
    for i in trials:
        v = an.variant[i]
        k = seen[v] = seen.get(v, -1) + 1
        out[i] = TrialStyle(colours[v], TRIAL_LINES[k % len(TRIAL_LINES)], TRIAL_MARKERS[k % len(TRIAL_MARKERS)])
    return out


def _thousands(v: float, _pos: object = None) -> str:
    return f"{v:,.0f}"


def _plain(v: float, _pos: object = None) -> str:
    return f"{v:,.0f}" if abs(v) >= 10 else f"{v:g}"


def _y_scale(ax, values: np.ndarray) -> None:
    """Log scale with plain tick labels when the values span more than 5x, linear otherwise."""
    v = values[np.isfinite(values) & (values > 0)]
    if v.size and v.max() / v.min() > 5:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(_plain))
        ax.yaxis.set_minor_locator(LogLocator(subs=(2, 5)))
        ax.yaxis.set_minor_formatter(FuncFormatter(_plain) if v.max() / v.min() < 100 else NullFormatter())


def _status_marker(status: str) -> str:
    return STATUS_MARKERS.get(status, OTHER_MARKER)


def _front_step(xs: np.ndarray, ys: np.ndarray, x_end: float) -> tuple[np.ndarray, np.ndarray]:
    """The front as a staircase: right from each point at its PPL, then down to the next; on to ``x_end``."""
    return np.r_[xs, max(x_end, xs[-1])], np.r_[ys, ys[-1]]


@_literal_text
def front_figure(an: Analysis, *, title: str = "") -> bytes:
    """``draw_front`` as PNG."""
    return _png(draw_front(an, title=title))


@_literal_text
def draw_front(an: Analysis, *, title: str = "") -> Figure:
    """Trials with finite metrics that did not fail (colour by variant, marker by status), the front as a step line, the base."""
    fig = Figure(figsize=(11.5, 6.5), layout="constrained")
    ax = fig.add_subplot()
    colours = variant_colours(an)
    shown = np.isfinite(an.kv_bytes) & np.isfinite(an.val_ppl) & (an.val_ppl > 0) & (an.status != "error")  # failed trials' numbers mislead
    many = shown.sum() > 500
    for variant, colour in colours.items():
        for status in sorted(set(an.status[shown].tolist())):
            m = shown & (an.variant == variant) & (an.status == status)
            if m.any():
                ax.scatter(an.kv_bytes[m], an.val_ppl[m], s=12 if many else 30, color=colour, marker=_status_marker(status),
                           alpha=0.3 if many else 0.7, linewidths=0, zorder=2 if many else 4.2, rasterized=many)
    bases = an.base_points()
    x_end = float(np.nanmax(np.r_[an.kv_bytes[shown], [b[1] for b in bases]])) if shown.any() or bases else 1.0
    handles: list = []
    if len(an.results) > 1:
        for k, (label, idx) in enumerate(an.source_fronts.items()):
            if idx.size:
                sx, sy = _front_step(an.kv_bytes[idx], an.val_ppl[idx], x_end)
                ax.step(sx, sy, where="post", color="0.35", lw=1.1, ls=SOURCE_STYLES[k % len(SOURCE_STYLES)], zorder=3)
                handles.append(Line2D([], [], color="0.35", lw=1.1, ls=SOURCE_STYLES[k % len(SOURCE_STYLES)], label=f"front of {label}"))
    if an.front.size:
        fx, fy = an.kv_bytes[an.front], an.val_ppl[an.front]
        sx, sy = _front_step(fx, fy, x_end)
        ax.step(sx, sy, where="post", color="black", lw=1.8, zorder=4)
        ax.scatter(fx, fy, s=70, color=[colours[v] for v in an.variant[an.front]], edgecolors="black", linewidths=1.2, zorder=5,
                   marker="o")
        if an.front.size <= 30:
            labels: dict[tuple[float, float], list[str]] = {}
            for n, (x, y) in enumerate(zip(fx, fy), 1):
                labels.setdefault((float(x), float(y)), []).append(str(n))  # exact duplicates share one label
            for (x, y), ns in labels.items():
                ax.annotate(",".join(ns), (x, y), xytext=(5, 5), textcoords="offset points", fontsize=8, zorder=6)
        handles.insert(0, Line2D([], [], color="black", lw=1.8, marker="o", mfc="white", mec="black", label="Pareto front (# as in the table)"))
    for label, kvb, bppl in bases:
        ax.scatter([kvb], [bppl], **BASE_STYLE)
        ax.axhline(bppl, color="0.5", lw=0.8, ls=":", zorder=1)
        handles.append(Line2D([], [], ls="", marker="*", ms=14, mfc="gold", mec="black", label=f"base{f' ({label})' if len(bases) > 1 else ''}: PPL {bppl:,.2f}"))
    handles.append(Line2D([], [], ls="", label=" "))
    handles += [Line2D([], [], ls="", marker="o", ms=7, color=c, label=v) for v, c in colours.items()]
    handles.append(Line2D([], [], ls="", label=" "))
    statuses = sorted(set(an.status[shown].tolist()), key=lambda s: list(STATUS_MARKERS).index(s) if s in STATUS_MARKERS else 99)
    handles += [Line2D([], [], ls="", marker=_status_marker(s), ms=7, color="0.4", label=s.replace("_", " ")) for s in statuses]
    _y_scale(ax, np.r_[an.val_ppl[shown], [b[2] for b in bases]])
    ax.xaxis.set_major_formatter(FuncFormatter(_thousands))
    ax.set_xlabel("KV cache (bytes/token)")
    ax.set_ylabel("validation perplexity (PPL, best epoch)")
    kvb = an.kv_base_common()
    if kvb:
        sec = ax.secondary_xaxis("top", functions=(lambda b: 100.0 * b / kvb, lambda p: p * kvb / 100.0))
        sec.set_xlabel("KV cache (% of the base's)")
        sec.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:.0f}%"))
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8.5, frameon=False)
    fig.suptitle(f"{title}\nval PPL against KV cache: {int(shown.sum()):,} trials, {an.front.size} on the Pareto front", fontsize=11)
    return fig


@_literal_text
def variant_fronts_figure(an: Analysis) -> bytes:
    """``draw_variant_fronts`` as PNG."""
    return _png(draw_variant_fronts(an))


@_literal_text
def draw_variant_fronts(an: Analysis) -> Figure:
    """Each variant's own front as a step line in the variant's colour, with the base."""
    fig = Figure(figsize=(11.5, 6.0), layout="constrained")
    ax = fig.add_subplot()
    colours = variant_colours(an)
    bases = an.base_points()
    xs_all = np.r_[an.kv_bytes[an.eligibility.mask], [b[1] for b in bases]]
    x_end = float(np.nanmax(xs_all)) if xs_all.size else 1.0
    ys = []
    for variant, idx in an.variant_fronts.items():
        if idx.size:
            sx, sy = _front_step(an.kv_bytes[idx], an.val_ppl[idx], x_end)
            ax.step(sx, sy, where="post", color=colours[variant], lw=1.6, zorder=3)
            ax.scatter(an.kv_bytes[idx], an.val_ppl[idx], color=colours[variant], s=28, zorder=4, label=f"{variant} ({idx.size})")
            ys.append(an.val_ppl[idx])
    for label, kvb, bppl in bases:
        ax.scatter([kvb], [bppl], **BASE_STYLE, label=f"base{f' ({label})' if len(bases) > 1 else ''}")
        ys.append(np.array([bppl]))
    _y_scale(ax, np.concatenate(ys) if ys else np.array([]))
    ax.xaxis.set_major_formatter(FuncFormatter(_thousands))
    ax.set_xlabel("KV cache (bytes/token)")
    ax.set_ylabel("validation perplexity (PPL, best epoch)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8.5, frameon=False, title="variant (trials on its front)", title_fontsize=9)
    ax.set_title("Pareto front of each variant", fontsize=11)
    return fig


def trial_label(an: Analysis, i: int) -> str:
    """A trial's legend entry: its number on the front (if it is on it), key, variant and KV bytes/token."""
    n = int(np.flatnonzero(an.front == i)[0]) + 1 if (an.front == i).any() else None
    return f"{f'#{n} ' if n else ''}{an.key[i]} ({an.variant[i]}, {an.kv_bytes[i]:,.0f} B/token)"


@_literal_text
def learning_figure(an: Analysis, idx: np.ndarray) -> bytes | None:
    """``draw_learning`` as PNG (None when none of the trials has epochs)."""
    fig = draw_learning(an, idx)
    return None if fig is None else _png(fig)


@_literal_text
def draw_learning(an: Analysis, idx: np.ndarray) -> Figure | None:
    """Train and val PPL per epoch of the given trials, in ``trial_styles`` (None when none of them has epochs)."""
    curves = [(int(i), an.epochs_of(int(i))) for i in idx]
    curves = [(i, t) for i, t in curves if t is not None]
    if not curves:
        return None
    fig = Figure(figsize=(11.5, 5.2 + 0.22 * len(curves)), layout="constrained")
    axes = fig.subplots(1, 2)
    styles = trial_styles(an, [int(i) for i in idx])  # as in the other figures of idx
    best_epoch = an.column("best_epoch")
    for i, tbl in curves:
        st = styles[i]
        epoch = tbl.column("epoch").to_numpy(zero_copy_only=False).astype(float)
        for ax, col in zip(axes, ("train_ppl", "val_ppl")):
            y = tbl.column(col).to_numpy(zero_copy_only=False).astype(float)
            ok = np.isfinite(y)
            ax.plot(epoch[ok], y[ok], color=st.colour, lw=1.5, ls=st.line, marker=st.marker, ms=4,
                    label=trial_label(an, i) if col == "val_ppl" else None)
        b = best_epoch[i]
        if b is not None and math.isfinite(an.val_ppl[i]):
            axes[1].scatter([b], [an.val_ppl[i]], color=st.colour, marker="D", s=45, edgecolors="black", zorder=5)
    bases = an.base_points()
    for k, (label, _kvb, bppl) in enumerate(bases):
        ls = SOURCE_STYLES[k % len(SOURCE_STYLES)]
        axes[1].axhline(bppl, color="black", lw=1.0, ls=ls, zorder=1)
        axes[0].plot([], [], color="black", lw=1.0, ls=ls, label=f"base{f' ({label})' if len(bases) > 1 else ''}: val PPL {bppl:,.2f}")
    for ax, name in zip(axes, ("train", "validation")):
        vals = np.concatenate([t.column("train_ppl" if name == "train" else "val_ppl").to_numpy(zero_copy_only=False).astype(float) for _i, t in curves])
        _y_scale(ax, vals)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{name} perplexity (PPL)")
        ax.set_title(f"{name} PPL per epoch" + (" (◆ best epoch)" if name == "validation" else ""), fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.legend(loc="outside lower center", ncol=2 if len(curves) > 1 else 1, fontsize=8.5, frameon=False)
    fig.suptitle("Learning curves of front trials", fontsize=11)
    return fig


@_literal_text
def positions_figure(an: Analysis, idx: np.ndarray) -> bytes | None:
    """``draw_positions`` as PNG (None when none of the trials has position rows)."""
    fig = draw_positions(an, idx)
    return None if fig is None else _png(fig)


@_literal_text
def draw_positions(an: Analysis, idx: np.ndarray) -> Figure | None:
    """PPL per position bucket of the given trials (in ``trial_styles``) against the base, and their degradation % (None without rows)."""
    rows = [(int(i), an.positions_of(int(i))) for i in idx]
    rows = [(i, t) for i, t in rows if t is not None]
    if not rows:
        return None
    buckets = sorted({(lo, hi) for _i, t in rows for lo, hi in zip(t.column("lo").to_pylist(), t.column("hi").to_pylist())})
    pos = {b: k for k, b in enumerate(buckets)}
    fig = Figure(figsize=(11.5, 5.2 + 0.22 * len(rows)), layout="constrained")
    ax, ax2 = fig.subplots(1, 2)
    styles = trial_styles(an, [int(i) for i in idx])  # as in the other figures of idx
    drawn_bases: list[tuple[np.ndarray, np.ndarray]] = []  # (bucket positions, base PPL) already drawn
    all_ppl = []
    for i, t in rows:
        st = styles[i]
        x = np.array([pos[(lo, hi)] for lo, hi in zip(t.column("lo").to_pylist(), t.column("hi").to_pylist())])
        y = t.column("ppl").to_numpy(zero_copy_only=False).astype(float)
        base = t.column("base_ppl").to_numpy(zero_copy_only=False).astype(float)
        src = int(an.source_index[i])
        if not any(xs.shape == x.shape and np.all(xs == x) and np.allclose(bs, base, equal_nan=True) for xs, bs in drawn_bases):
            label = f"base{f' ({an.results[src].label})' if len(an.base_points()) > 1 else ''}"
            ax.plot(x, base, color="black", lw=2.4, ls=SOURCE_STYLES[len(drawn_bases) % len(SOURCE_STYLES)], marker="*", ms=11,
                    mfc="gold", zorder=4, label=label)
            drawn_bases.append((x, base))
        ax.plot(x, y, color=st.colour, lw=1.5, ls=st.line, marker=st.marker, ms=5, label=trial_label(an, i))
        ax2.plot(x, 100.0 * (y - base) / base, color=st.colour, lw=1.5, ls=st.line, marker=st.marker, ms=5)
        all_ppl += [y, base]
    ax2.axhline(0.0, color="black", lw=1.0, ls="--")
    for a in (ax, ax2):
        a.set_xticks(range(len(buckets)), [f"{lo}-{hi}" for lo, hi in buckets])
        a.set_xlabel("position bucket [lo, hi) of the prediction (tokens)")
        a.grid(True, alpha=0.3)
    _y_scale(ax, np.concatenate(all_ppl))
    ax.set_ylabel("validation perplexity (PPL)")
    ax.set_title("PPL by position: front trials against the base", fontsize=10)
    ax2.set_ylabel("degradation against the base (%)")
    ax2.yaxis.set_major_formatter(PercentFormatter(decimals=None))  # as many decimals as the tick spacing needs
    ax2.set_title("degradation by position, 100 * (trial - base) / base", fontsize=10)
    fig.legend(loc="outside lower center", ncol=2 if len(rows) > 1 else 1, fontsize=8.5, frameon=False)
    return fig
