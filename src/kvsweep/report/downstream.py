"""Downstream scores in the report: lm-evaluation-harness tasks of the base and of trials against KV bytes/token.

``kvsweep downstream`` writes ``downstream.parquet`` beside a sweep's results (``kvsweep.results.downstream``); the
report reads it with the results, maps each row to its trial's point (trials that differ only by seed are one point:
its score is their mean, with a 95% t-interval over seeds where two or more were evaluated, else lm-eval's standard
error) and draws, per task, the score against KV bytes/token with the base's score. Rows are kept apart by their
few-shot count and limit: a task evaluated two ways is two settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from .analysis import Analysis
from .figstyle import BASE_STYLE, literal_text, plain, png, variant_colours
from .stats import Interval, t_interval
from .tables import DASH, Table, count, share_of_base

PRIMARY = ("acc", "exact_match", "acc_norm", "f1", "mcc", "perplexity", "word_perplexity")  # the metric drawn per task
MAX_PANELS = 9


@dataclass(frozen=True)
class Score:
    """One model's score on one (task, metric, setting): a point (``point`` >= 0) over its evaluated seeds, or a base (-1)."""

    source: int
    point: int  # -1: the base of ``source``
    kv: float  # KV bytes/token
    value: Interval  # mean over seeds (n: seeds evaluated)
    stderr: float | None  # lm-eval's, where one seed was evaluated


@dataclass(frozen=True)
class Setting:
    task: str
    metric: str
    setting: str  # "" or e.g. "5-shot, limit 100"
    higher_is_better: bool | None
    scores: tuple[Score, ...]  # bases first, then points by KV bytes/token

    @property
    def title(self) -> str:
        return f"{self.task} {self.metric}" + (f" ({self.setting})" if self.setting else "")


def _setting(fewshot, limit) -> str:
    parts = ([f"{int(fewshot)}-shot"] if fewshot is not None else []) + ([f"limit {limit:g}"] if limit is not None else [])
    return ", ".join(parts)


def settings(an: Analysis) -> tuple[list[Setting], list[str]]:
    """Every (task, metric, setting) of the sources' ``downstream.parquet`` with the scores of bases and points; and the
    evaluated trials left out: not in the results, or no front candidate (stopped by the scheduler, failed)."""
    left: set[str] = set()
    groups: dict[tuple, dict[tuple[int, int], list]] = {}
    hib: dict[tuple, bool | None] = {}
    kvs: dict[tuple[int, int], float] = {}
    ids = an.column("trial_id")
    where = {(int(an.source_index[k]), ids[k]): k for k in range(an.n)}
    for s, r in enumerate(an.results):
        if r.downstream is None:
            continue
        for row in r.downstream.to_pylist():
            key = (row["task"], row["metric"], _setting(row["num_fewshot"], row["limit"]))
            if row["trial_id"] is None:
                who = (s, -1)
            else:
                k = where.get((s, row["trial_id"]))
                if k is None or an.point_of[k] < 0:
                    left.add(row["trial_id"])
                    continue
                who = (s, int(an.point_of[k]))
            groups.setdefault(key, {}).setdefault(who, []).append((row["value"], row["stderr"]))
            hib.setdefault(key, row["higher_is_better"])
            kvs[who] = float(row["kv_bytes_per_token"]) if who[1] < 0 else float(an.points.kv[who[1]])
    out = []
    for key in sorted(groups):
        scores = []
        for (s, p), vals in groups[key].items():
            values = [v for v, _e in vals if v is not None and math.isfinite(v)]
            stderr = vals[0][1] if len(vals) == 1 else None
            scores.append(Score(s, p, kvs[(s, p)], t_interval(values), stderr))
        scores.sort(key=lambda c: (c.point >= 0, c.kv, c.source, c.point))
        out.append(Setting(*key, hib[key], tuple(scores)))
    return out, sorted(left)


def _name(an: Analysis, c: Score) -> str:
    if c.point < 0:
        return "base" if len(an.results) == 1 else f"base ({an.results[c.source].label})"
    n = np.flatnonzero(an.front == c.point)
    return (f"#{int(n[0]) + 1} " if n.size else "") + f"{an.points.label[c.point]} ({an.points.variant[c.point]})"


def _spread(c: Score) -> str:
    if c.value.n >= 2:
        return f"{c.value.low:.4f} – {c.value.high:.4f}"
    return f"± {c.stderr:.4f}" if c.stderr is not None else DASH


def downstream_table(an: Analysis, items: list[Setting]) -> Table:
    """Task, metric, model, KV bytes/token (and % of the base's), score, its 95% CI over seeds or lm-eval's stderr, seeds."""
    kv_base = an.kv_base_common()
    rows = []
    for st in items:
        for c in st.scores:
            rows.append([st.title, _name(an, c), count(c.kv), f"{share_of_base(c.kv, kv_base):.1f}%" if kv_base else DASH,
                         f"{c.value.mean:.4f}" if c.value.n else DASH, _spread(c), "—" if c.point < 0 else str(c.value.n)])
    return Table.of([("task and metric", False), ("model", False), ("KV bytes/token", True), ("of base", True), ("score", True),
                     ("95% CI or ± stderr", True), ("seeds", True)], rows)


def drawn(items: list[Setting]) -> list[Setting]:
    """One setting per task and few-shot setting: its first metric in ``PRIMARY`` order (else its first), at most ``MAX_PANELS``."""
    chosen: dict[tuple[str, str], Setting] = {}
    rank = {m: i for i, m in enumerate(PRIMARY)}
    for st in items:
        k = (st.task, st.setting)
        if k not in chosen or rank.get(st.metric.split(",")[0], 99) < rank.get(chosen[k].metric.split(",")[0], 99):
            chosen[k] = st
    return list(chosen.values())[:MAX_PANELS]


@literal_text
def downstream_figure(an: Analysis, items: list[Setting]) -> bytes | None:
    """``draw_downstream`` as PNG; None without scores of points."""
    fig = draw_downstream(an, items)
    return png(fig) if fig is not None else None


def draw_downstream(an: Analysis, items: list[Setting]) -> Figure | None:
    """Per task (its primary metric), each point's score against its KV bytes/token (95% CI bars over seeds, or
    lm-eval's stderr for one seed) in its variant's colour; the star and dashed line are the base's."""
    panels = [st for st in drawn(items) if any(c.point >= 0 for c in st.scores)]
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.6 * cols, 3.6 * rows), layout="constrained")
    colours = variant_colours(an)
    for i, st in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for c in st.scores:
            if c.value.n == 0:
                continue
            if c.point < 0:
                ax.scatter([c.kv], [c.value.mean], **BASE_STYLE)
                ax.axhline(c.value.mean, color="0.4", linestyle="--", linewidth=1)
                continue
            err = ([c.value.mean - c.value.low], [c.value.high - c.value.mean]) if c.value.n >= 2 else \
                ([c.stderr], [c.stderr]) if c.stderr is not None else None
            colour = colours.get(an.points.variant[c.point], "C0")
            ax.errorbar([c.kv], [c.value.mean], yerr=err, fmt="o", color=colour, ecolor=colour, capsize=3, zorder=5)
        direction = "" if st.higher_is_better is None else (" (higher is better)" if st.higher_is_better else " (lower is better)")
        ax.set_title(st.title + direction, fontsize=9)
        ax.set_xlabel("KV bytes/token")
        ax.set_ylabel(st.metric)
        ax.xaxis.set_major_formatter(FuncFormatter(plain))
        ax.grid(alpha=0.3)
    return fig


def downstream_text(rows: pa.Table) -> str:
    """``kvsweep downstream``'s console table of its rows: per task and metric, each model's score and stderr."""
    lines = [f"{'task':<24} {'metric':<16} {'model':<20} {'KV B/token':>10} {'score':>10} {'stderr':>8}"]
    for r in sorted(rows.to_pylist(), key=lambda r: (r["task"], r["metric"], r["trial_id"] is not None, r["kv_bytes_per_token"])):
        err = f"{r['stderr']:.4f}" if r["stderr"] is not None else DASH
        lines.append(f"{r['task']:<24} {r['metric']:<16} {r['trial_id'] or 'base':<20} {r['kv_bytes_per_token']:>10,} "
                     f"{r['value']:>10.4f} {err:>8}")
    return "\n".join(lines)
