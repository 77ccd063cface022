"""The ``kvsweep report`` subcommand.

    kvsweep report runs/vdproj/results -o reports/vdproj/
    kvsweep report runs/vdproj/results s3://bucket/sweeps/ka/results -o reports/compare/ --title "V-DProj against KA"
"""

from __future__ import annotations

import argparse


def add_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Add ``report`` to the ``kvsweep`` command's subparsers; its ``func`` is ``cmd_report``."""
    p = subparsers.add_parser(
        "report", help="Pareto report of val PPL against KV-cache size (Markdown, HTML, PNG, CSV) from sweep results",
        description="Read one or more results folders (trials.parquet, epochs.parquet, positions.parquet) and write "
                    "report.md, a self-contained report.html, PNG figures and frontier.csv into --out, atomically. "
                    "Several results put their sweeps on one front.",
    )
    p.add_argument("results", nargs="+", metavar="RESULTS",
                   help="a results folder or a storage URI (s3://, gs://, file://) holding trials.parquet")
    p.add_argument("-o", "--out", required=True, help="output folder, e.g. reports/<sweep>/ (new, empty, or an earlier report, which is replaced)")
    p.add_argument("--title", default=None, help="the report's title (default: 'kvsweep report: ' and the sweeps' names)")
    p.set_defaults(func=cmd_report)
    return p


def cmd_report(a: argparse.Namespace) -> int:
    from . import build_report

    out = build_report(a.results, a.out, title=a.title)
    print(f"wrote {out}/: {', '.join(sorted(p.name for p in out.iterdir()))}")
    print(f"open {out.resolve() / 'report.html'}")
    return 0
