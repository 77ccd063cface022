"""The benchmark scripts run end to end on the CPU (tiny preset, a step or two): their figures are for
people to read, so only that they run and print their tables is checked here."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_step_on_the_cpu(tiny_folder, tmp_path):
    """``benchmarks/gpu_check.sh --dry-run``: the gpu-marked tests on the CPU, the throughput and decode
    benchmarks at tiny sizes and a packed smoke sweep, each step's log and the summary in one folder."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("KVSWEEP_TEST_DEVICE", None)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=1200, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    summary = (tmp_path / "summary.txt").read_text()
    for step in ("env", "tests", "tiny", "sweep", "throughput", "decode"):
        assert f"{step} rc=0 " in summary, summary
    tests = (tmp_path / "tests.txt").read_text()
    assert " passed" in tests and "skipped" not in tests and "deselected" not in tests, tests
    out = (tmp_path / "throughput.txt").read_text()
    assert "failed" not in out, out
    for row in ("eager fp32", "bf16 base", "chunked loss", "2 Ray workers", "packed 2", "packed 2, bf16 base, chunked loss"):
        assert f"| {row}" in out, row
    assert "trial start-up to the first training step: alone" in out and "joining a running pack" in out
    decode = (tmp_path / "decode.txt").read_text()
    assert "| base " in decode and "vdproj kv r=256 (50%)" in decode and "quant 4 bits (25%)" in decode, decode
    rows = json.loads((tmp_path / "decode.json").read_text())["rows"]  # for kvsweep report --decode
    assert {r["family"] for r in rows} >= {"vdproj", "lowrank", "quant"} and {r["budget"] for r in rows} == {0.5, 0.25}
    assert (tmp_path / "sweep" / "gpu-check" / "trials.parquet").is_file()
    assert (tmp_path / "reports" / "gpu-check" / "report.md").is_file()


@pytest.mark.slow
def test_scale_benchmark_runs_the_writer_and_the_scheduler_alone_and_both_drivers(tiny_folder):
    """``benchmarks/scale.py``: the results writer alone, the rung scheduler alone, then kvsweep's driver and plain Tune on
    a few stub trials."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    alone = subprocess.run(["python", str(ROOT / "benchmarks" / "scale.py"), "--writer-only", "--trials", "40"], capture_output=True,
                           text=True, env=env, timeout=600, cwd=ROOT)
    assert alone.returncode == 0 and "| 40 | " in alone.stdout, alone.stdout[-3000:] + alone.stderr[-3000:]
    rungs = subprocess.run(["python", str(ROOT / "benchmarks" / "scale.py"), "--scheduler-only", "--trials", "40"], capture_output=True,
                           text=True, env=env, timeout=600, cwd=ROOT)
    assert rungs.returncode == 0 and "| 40 | " in rungs.stdout, rungs.stdout[-3000:] + rungs.stderr[-3000:]
    both = subprocess.run(["python", str(ROOT / "benchmarks" / "scale.py"), "--trials", "4", "--epochs", "2", "--concurrency", "2",
                           "--repeats", "2"],
                          capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert both.returncode == 0 and "| 4 | " in both.stdout, both.stdout[-3000:] + both.stderr[-3000:]
    assert "4 trials, run 2/2: kvsweep" in both.stdout and "medians of 2 runs per size" in both.stdout
    per_run = re.search(r"4 trials, loop thread CPU kvsweep / plain Tune in each run: ([\d.]+), ([\d.]+)$", both.stdout, re.M)
    assert per_run and all(float(x) > 0 for x in per_run.groups()), both.stdout[-3000:]
    header = next(line for line in both.stdout.splitlines() if line.startswith("| trials |"))
    row = next(line for line in both.stdout.splitlines() if line.startswith("| 4 | "))
    hooks = [c.strip() for c in header.split("|")].index("kvsweep's hooks' CPU ms/trial")
    assert float(row.split("|")[hooks]) > 0  # kvsweep's scheduler and callbacks were timed
    loop = [c.strip() for c in header.split("|")].index("loop thread CPU ms/trial, kvsweep / plain (ratio)")
    mine, plain = re.fullmatch(r" ([\d.]+) / ([\d.]+) \([\d.]+\) ", row.split("|")[loop]).groups()
    assert float(mine) > 0 and float(plain) > 0  # Tune's loop thread, on both sides
