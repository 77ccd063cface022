"""Benchmark: a report over 10,000 synthetic trials (with epochs and positions); target under 10 s on 2 cores.

    python benchmarks/report_bench.py [--trials 10000] [--keep DIR]

Writes synthetic results (not timed), then times ``build_report`` end to end: reading and checking
the Parquet files, the fronts, the tables, the figures (PNG), and writing report.md, report.html and
frontier.csv. Prints one line per phase and the total.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=10_000)
    p.add_argument("--keep", default=None, help="write the results and the report here (default: a temporary folder, removed)")
    a = p.parse_args(argv)

    t0 = time.perf_counter()
    from kvsweep.report import analyze, build_report
    from kvsweep.report.synthetic import write_synthetic
    t_import = time.perf_counter() - t0

    root = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="kvsweep-report-bench-"))
    try:
        results = write_synthetic(root / "results", a.trials, running=20, sweep="bench")
        sizes = {f.name: f.stat().st_size for f in results.iterdir()}
        import pyarrow.parquet as pq

        rows = {name: pq.ParquetFile(results / name).metadata.num_rows for name in sizes}
        print(f"synthetic results: {', '.join(f'{n} {rows[n]:,} rows' for n in sorted(rows))}")

        t = time.perf_counter()
        out = build_report([str(results)], root / "report")
        total = time.perf_counter() - t
        print(f"build_report end to end, cold (first call in this process, matplotlib loaded on the way): {total:.2f} s "
              f"(+ {t_import:.2f} s importing kvsweep.report) for {a.trials:,} trials -> {out}")

        from kvsweep.report import compose, load, render

        t = time.perf_counter()
        res = load.load_all([str(results)])
        t_load = time.perf_counter() - t
        t = time.perf_counter()
        an = analyze(res)
        t_front = time.perf_counter() - t
        t = time.perf_counter()
        built = compose.build(an, title="bench")
        t_build = time.perf_counter() - t
        t = time.perf_counter()
        render.markdown(built.doc), render.html_document(built.doc, built.images)
        t_render = time.perf_counter() - t
        print(f"  phases, warm: load+check {t_load:.2f} s, fronts {t_front:.2f} s, tables+figures {t_build:.2f} s, "
              f"render {t_render:.2f} s (front: {an.front.size} of {an.points.n:,} configurations of {an.n:,} trials)")
        print(f"target < 10 s: {'met' if total + t_import < 10 else 'MISSED'}")
        return 0 if total + t_import < 10 else 1
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
