"""Benchmark: a report over synthetic trials (with epochs and positions); targets on 2 cores: 10,000 trials under 10 s,
100,000 trials under 30 s and 4 GiB.

    python benchmarks/report_bench.py [--trials 10000] [--keep DIR]

Writes synthetic results in a child process (not timed, and not in this process's peak memory), then times
``build_report`` end to end: reading and checking the Parquet files, the fronts, the tables, the figures (PNG), and
writing report.md, report.html and frontier.csv. Prints the wall and CPU time of each phase (CPU: this process's
user + system seconds, less sensitive than wall time to other work on a shared machine), the total and this process's
peak resident memory (``ru_maxrss``: the report alone, since this process only reads and reports).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 1024 ** 3
WRITE = "import sys; from kvsweep.report.synthetic import write_synthetic; write_synthetic(sys.argv[1], int(sys.argv[2]), running=20, sweep='bench')"


def peak_rss(who: int = resource.RUSAGE_SELF) -> int:
    """Peak resident memory in bytes of this process (or of its finished children)."""
    kib = resource.getrusage(who).ru_maxrss  # KiB on Linux
    return kib * (1 if sys.platform == "darwin" else 1024)


def target(trials: int) -> tuple[float, float]:
    """(seconds, bytes) a report of ``trials`` trials must stay under: 10 s up to 10,000 trials, else 30 s and 4 GiB."""
    return (10.0, 4 * GIB) if trials <= 10_000 else (30.0, 4 * GIB)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=10_000)
    p.add_argument("--keep", default=None, help="write the results and the report here (default: a temporary folder, removed)")
    a = p.parse_args(argv)

    root = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="kvsweep-report-bench-"))
    try:
        results = root / "results"
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", WRITE, str(results), str(a.trials)], check=True)
        t_write = time.perf_counter() - t

        t0 = time.perf_counter()
        import pyarrow.parquet as pq

        from kvsweep.report import analyze, build_report
        t_import = time.perf_counter() - t0

        rows = {f.name: pq.ParquetFile(f).metadata.num_rows for f in results.iterdir()}
        print(f"synthetic results ({t_write:.1f} s, peak {peak_rss(resource.RUSAGE_CHILDREN) / GIB:.2f} GiB, in a child process): "
              f"{', '.join(f'{n} {rows[n]:,} rows' for n in sorted(rows))}")

        t, c = time.perf_counter(), time.process_time()
        out = build_report([str(results)], root / "report")
        total, cpu = time.perf_counter() - t, time.process_time() - c
        cold_peak = peak_rss()
        print(f"build_report end to end, cold (first call in this process, matplotlib loaded on the way): {total:.2f} s, "
              f"CPU {cpu:.2f} s (+ {t_import:.2f} s importing kvsweep.report) for {a.trials:,} trials -> {out}")
        print(f"peak resident memory of this process after it: {cold_peak / GIB:.2f} GiB")

        from kvsweep.report import compose, load, render

        wall, cpu_s = {}, {}

        def timed(name: str, fn):
            t, c = time.perf_counter(), time.process_time()
            value = fn()
            wall[name], cpu_s[name] = time.perf_counter() - t, time.process_time() - c
            return value

        res = timed("load+check", lambda: load.load_all([str(results)]))
        an = timed("fronts", lambda: analyze(res))
        built = timed("tables+figures", lambda: compose.build(an, title="bench"))
        timed("render", lambda: (render.markdown(built.doc), render.html_document(built.doc, built.images)))
        print("  phases, warm: " + ", ".join(f"{k} {wall[k]:.2f} s (CPU {cpu_s[k]:.2f} s)" for k in wall)
              + f"; front: {an.front.size} of {an.points.n:,} configurations of {an.n:,} trials; peak resident memory {peak_rss() / GIB:.2f} GiB")
        seconds, memory = target(a.trials)
        met = total + t_import < seconds and cold_peak < memory
        print(f"target < {seconds:.0f} s and < {memory / GIB:.0f} GiB (cold, with the import): {'met' if met else 'MISSED'}")
        return 0 if met else 1
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
