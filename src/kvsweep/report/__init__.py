"""``kvsweep report``: Pareto reports of perplexity against KV-cache size, from one or more sweeps' results.

    from kvsweep.report import build_report
    build_report(["runs/vdproj/results", "s3://bucket/sweeps/ka/results"], "reports/vdproj")

writes ``report.md``, a self-contained ``report.html``, PNG figures and ``frontier.csv`` into the output
folder, atomically (built beside it, then renamed into place). Bad input raises a ``ReportError`` (a
``KvsweepError``) with a message, before anything is written. Imports neither torch nor ray.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from ..atomic import atomic_path
from . import leaderboard
from .analysis import Analysis, analyze
from .errors import NoResultsError, NotResultsError, ReportError, SchemaError
from .load import Results, load_all, load_results
from .memory import AXES, DEFAULT_CONTEXT, break_even, memory_at
from .pareto import hypervolume, normalised_hypervolume, pareto_front
from .stats import t_interval

__all__ = [
    "build_report", "pareto_front", "hypervolume", "normalised_hypervolume", "t_interval", "memory_at", "break_even",
    "load_results", "analyze", "Analysis", "Results", "AXES", "DEFAULT_CONTEXT",
    "ReportError", "NoResultsError", "NotResultsError", "SchemaError", "REPORT_FILES",
]

REPORT_FILES = ("report.md", "report.html", "frontier.csv")
"""Besides these, a report folder holds only ``*.png`` figures."""


def _is_report_file(name: str) -> bool:
    return name in REPORT_FILES or name.endswith(".png")


def check_output(out: Path) -> None:
    """``out`` may be new, empty, or an earlier report (which it replaces); anything else is refused."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ReportError(f"cannot write the report to {out}: it is a file, not a folder")
    others = sorted(p.name for p in out.iterdir() if not (p.is_file() and _is_report_file(p.name)))
    if others:
        listed = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise ReportError(f"refusing to replace {out}: it holds {listed}, which a report does not write; "
                          "give a new or empty folder, or one holding an earlier report")


def default_title(results: list[Results]) -> str:
    return "kvsweep report: " + ", ".join(r.label for r in results)


def build_report(sources: Sequence[str | os.PathLike], out: str | os.PathLike, *, title: str | None = None,
                 x: str = "bytes-per-token", context: int | None = None, budgets: Sequence[float] | None = None,
                 decode: str | os.PathLike | None = None) -> Path:
    """Read every source, make the report and write it to ``out`` in one rename; returns ``out``.

    ``x`` is the cost the fronts minimise besides PPL: ``bytes-per-token`` (KV bytes/token) or ``memory-at-L``
    (fixed bytes + L x KV bytes/token); ``context`` is L in tokens (default: ``memory.default_context``). ``budgets``
    (shares of the base's KV bytes/token in (0, 1], default ``leaderboard.BUDGETS``) make the leaderboard; ``decode`` is
    the JSON file of ``benchmarks/decode.py --json``, whose decode speeds it shows per family.

    Raises:
        ReportError: bad input or output folder, an unknown ``x``, a ``context`` below 1, a budget outside (0, 1] or an
            unreadable ``decode`` file; nothing is written.
    """
    from .compose import build
    from .render import html_document, markdown

    if x not in AXES:
        raise ReportError(f"--x must be one of {', '.join(AXES)}, got {x!r}")
    if context is not None and (isinstance(context, bool) or not isinstance(context, int) or context < 1):
        raise ReportError(f"--context must be a whole number of tokens >= 1, got {context!r}")
    budgets = tuple(leaderboard.BUDGETS if budgets is None else budgets)
    if not budgets or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 < b <= 1 for b in budgets):
        raise ReportError(f"--budgets must be shares of the base's KV cache in (0, 1], e.g. 0.75,0.5; got {list(budgets)}")
    decode_figures = leaderboard.load_decode(decode) if decode is not None else None
    results = load_all([os.fspath(s) for s in sources])
    out = Path(out)
    check_output(out)
    built = build(analyze(results, x=x, context=context), title=title or default_title(results), budgets=budgets, decode=decode_figures)
    md, page = markdown(built.doc), html_document(built.doc, built.images)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for name, data in built.images.items():
            (tmp / name).write_bytes(data)
        (tmp / "frontier.csv").write_text(built.frontier_csv, encoding="utf-8")
        (tmp / "report.md").write_text(md, encoding="utf-8")
        (tmp / "report.html").write_text(page, encoding="utf-8")
    return out
