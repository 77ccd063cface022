"""What every figure of the report shares: PNG rendering on the Agg canvas, literal text, one colour per variant,
a line and marker of its own per point within a variant, number formats, the y scale and the front's staircase."""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from typing import Callable, ParamSpec, TypeVar

import numpy as np
from matplotlib import colormaps, rc_context
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

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


def literal_text(fn: Callable[P, R]) -> Callable[P, R]:
    """Draw with ``$`` taken literally: sweep, variant and trial names are not mathtext."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with rc_context({"text.parse_math": False}):
            return fn(*args, **kwargs)

    return wrapper


def png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def palette(n: int) -> list:
    """n distinguishable colours (tab10, tab20 beyond ten, repeating beyond twenty)."""
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(k % cmap.N) for k in range(max(n, 1))]


def variant_colours(an: Analysis) -> dict[str, tuple]:
    """Variant -> RGBA colour, over all of the analysis's trials; every figure colours a trial by its variant with it.
    With several families, a family is a hue (``family_colours``) and its variants are shades of it."""
    family_of: dict[str, str] = {}
    for v, f in dict.fromkeys(zip(an.variant.tolist(), an.family.tolist())):  # the distinct pairs, by first trial
        family_of.setdefault(v, f)
    names = sorted(family_of)
    hues = family_colours(an)
    if len(hues) < 2:
        return dict(zip(names, palette(len(names))))
    out = {}
    for fam, hue in hues.items():
        members = [v for v in names if family_of[v] == fam]
        for k, v in enumerate(members):
            out[v] = shade(hue, k, len(members))
    return out


def family_colours(an: Analysis) -> dict[str, tuple]:
    """Family -> RGBA colour (tab10 order by family name)."""
    names = sorted(set(an.family.tolist()))
    return dict(zip(names, palette(len(names))))


def shade(colour: tuple, k: int, n: int) -> tuple:
    """The k-th of n shades of ``colour``: the colour itself first, then alternately darker and lighter, up to 45%
    of the way to black or white."""
    if n <= 1 or k == 0:
        return tuple(colour)
    step = 0.45 * ((k + 1) // 2) / ((n - 1 + 1) // 2 or 1)
    target = 0.0 if k % 2 else 1.0
    r, g, b, alpha = colour
    return (r + (target - r) * step, g + (target - g) * step, b + (target - b) * step, alpha)


@dataclass(frozen=True)
class TrialStyle:
    """How one point (or trial) is drawn in a figure of several."""

    colour: tuple  # RGBA: the variant's
    line: str
    marker: str


def point_styles(an: Analysis, pts: list[int]) -> dict[int, TrialStyle]:
    """Point index -> its style in a figure of the points ``pts``: its variant's colour, and a line and marker of its
    own within the variant."""
    colours = variant_colours(an)
    seen: dict[str, int] = {}
    out = {}
    for p in pts:
        v = an.points.variant[p]
        k = seen[v] = seen.get(v, -1) + 1
        out[p] = TrialStyle(colours[v], TRIAL_LINES[k % len(TRIAL_LINES)], TRIAL_MARKERS[k % len(TRIAL_MARKERS)])
    return out


def point_label(an: Analysis, p: int) -> str:
    """A point's legend entry: its number on the front (if it is on it), label, variant and KV bytes/token."""
    n = int(np.flatnonzero(an.front == p)[0]) + 1 if (an.front == p).any() else None
    return f"{f'#{n} ' if n else ''}{an.points.label[p]} ({an.points.variant[p]}, {an.points.kv[p]:,.0f} B/token)"


def thousands(v: float, _pos: object = None) -> str:
    return f"{v:,.0f}"


def plain(v: float, _pos: object = None) -> str:
    return f"{v:,.0f}" if abs(v) >= 10 else f"{v:g}"


def y_scale(ax, values: np.ndarray) -> None:
    """Log scale with plain tick labels when the values span more than 5x, linear otherwise."""
    v = values[np.isfinite(values) & (values > 0)]
    if v.size and v.max() / v.min() > 5:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(plain))
        ax.yaxis.set_minor_locator(LogLocator(subs=(2, 5)))
        ax.yaxis.set_minor_formatter(FuncFormatter(plain) if v.max() / v.min() < 100 else NullFormatter())


def status_marker(status: str) -> str:
    return STATUS_MARKERS.get(status, OTHER_MARKER)


def front_step(xs: np.ndarray, ys: np.ndarray, x_end: float) -> tuple[np.ndarray, np.ndarray]:
    """The front as a staircase: right from each point at its PPL, then down to the next; on to ``x_end``."""
    return np.r_[xs, max(x_end, xs[-1])], np.r_[ys, ys[-1]]


