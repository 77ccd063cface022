"""The ``kvsweep report`` subcommand.

    kvsweep report runs/vdproj/results -o reports/vdproj/
    kvsweep report runs/vdproj/results s3://bucket/sweeps/ka/results -o reports/compare/ --title "V-DProj against KA"
    kvsweep report runs/vdproj/results -o reports/vdproj-mem/ --x memory-at-L --context 4096
"""

from __future__ import annotations

import argparse

from .memory import AXES, DEFAULT_CONTEXT


def add_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Add ``report`` to the ``kvsweep`` command's subparsers; its ``func`` is ``cmd_report``."""
    p = subparsers.add_parser(
        "report", help="Pareto report of PPL against KV-cache size or memory at L (Markdown, HTML, PNG, CSV) from sweep results",
        description="Read one or more results folders (trials.parquet, epochs.parquet, positions.parquet) and write "
                    "report.md, a self-contained report.html, PNG figures and frontier.csv into --out, atomically. "
                    "Several results put their sweeps on one front.",
    )
    p.add_argument("results", nargs="+", metavar="RESULTS",
                   help="a results folder or a storage URI (s3://, gs://, file://) holding trials.parquet")
    p.add_argument("-o", "--out", required=True, help="output folder, e.g. reports/<sweep>/ (new, empty, or an earlier report, which is replaced)")
    p.add_argument("--title", default=None, help="the report's title (default: 'kvsweep report: ' and the sweeps' names)")
    p.add_argument("--x", choices=AXES, default="bytes-per-token",
                   help="the cost the fronts minimise besides PPL: KV bytes/token (default), or memory at L = fixed bytes + L x KV bytes/token")
    p.add_argument("--context", type=_tokens, default=None, metavar="L",
                   help=f"L, tokens of one sequence, for memory at L and the break-even table (default: {DEFAULT_CONTEXT:,}, "
                        "Pythia's maximum context, or the results' longest evaluation length if longer)")
    p.add_argument("--budgets", type=_budgets, default=None, metavar="B,B,...",
                   help="the leaderboard's budgets, shares of the base's KV bytes/token (default: 0.75,0.5,0.25,0.125)")
    p.add_argument("--decode", default=None, metavar="FILE",
                   help="decode speeds per family for the leaderboard: the JSON file of benchmarks/decode.py --json")
    p.set_defaults(func=cmd_report)
    return p


def _tokens(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a whole number of tokens >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"a whole number of tokens >= 1, got {text!r}")
    return value


def _budgets(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"shares of the base's KV cache in (0, 1], comma-separated, e.g. 0.5,0.25; got {text!r}")
    return values


def cmd_report(a: argparse.Namespace) -> int:
    from . import build_report

    out = build_report(a.results, a.out, title=a.title, x=a.x, context=a.context, budgets=a.budgets, decode=a.decode)
    print(f"wrote {out}/: {', '.join(sorted(p.name for p in out.iterdir()))}")
    print(f"open {out.resolve() / 'report.html'}")
    return 0
