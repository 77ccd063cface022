"""The benchmark scripts run end to end on the CPU (tiny preset, a step or two): their figures are for
people to read, so only that they run and print their table is checked here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_throughput_benchmark_prints_its_table(tiny_folder):
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--device", "cpu", "--steps", "1",
                           "--warmup", "0", "--pack", "2", "--ray", "2", "--val-samples", "4", "--batch", "2", "--seq-len", "32"],
                          capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "failed" not in out, out
    for row in ("eager fp32", "bf16 base", "chunked loss", "2 Ray workers", "packed 2", "packed 2, bf16 base, chunked loss"):
        assert f"| {row}" in out, row
    assert "trial start-up to the first training step: alone" in out and "joining a running pack" in out
