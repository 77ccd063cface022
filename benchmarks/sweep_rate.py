"""A sweep's trials per hour on this machine: the same sweep unpacked and packed, one after the other.

    python benchmarks/sweep_rate.py                                       # smoke sweep: unpacked vs --pack 4
    python benchmarks/sweep_rate.py --common "--smoke-test --epochs 3 --seeds 0,1,2,3" \\
        --unpacked "--gpus-per-trial 0.125" --packed "--pack 16 --gpus-per-trial 1"   # on one GPU

Each variant runs ``sweeps/vdproj.py`` in its own process with its own storage folder (so nothing is
continued) and Ray started in-process; the figures come from the sweep's own summary line ("this run:
... trials/h"), so they include Tune's scheduling, trial start-up, checkpoints and the scheduler. On one GPU the
trials/h are trials per GPU-hour. Both variants train the same configurations; the script checks that
they report the same best validation perplexity.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], storage: Path, timeout: float) -> tuple[dict, str]:
    cmd = [sys.executable, str(ROOT / "sweeps" / "vdproj.py"), "--storage", str(storage), "--report-dir", "", *args]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        sys.exit(f"{shlex.join(cmd)} did not finish in {timeout:.0f} s:\n{(e.stdout or b'')[-3000:]!r}")
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{shlex.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    out = proc.stdout
    m = re.search(r"this run: (\d+) s for (\d+) trials \((\d+) trials/h, (\d+) epochs\)", out)
    best = re.search(r"^best val PPL ([0-9.]+)", out, re.M)  # the summary's, not a trial's line
    startup = re.search(r"trial start-up .*: median ([0-9.]+) s, max ([0-9.]+) s", out)
    packs = re.findall(r"pack \d+ on (\S+): .* ([0-9,]+) training tokens/s", out)
    if m is None:
        sys.exit(f"no summary line in the output of {shlex.join(cmd)}:\n{out[-3000:]}")
    return {"fit_s": int(m[1]), "trials": int(m[2]), "per_h": int(m[3]), "epochs": int(m[4]), "process_s": wall,
            "best": best[1] if best else "-", "startup": f"{startup[1]} / {startup[2]}" if startup else "-",
            "pack_tok_s": ", ".join(t for _, t in packs) or "-"}, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--common", default="--smoke-test", help="arguments of both runs (default: --smoke-test)")
    p.add_argument("--unpacked", default="", help="arguments of the unpacked run only")
    p.add_argument("--packed", default="--pack 4 --cpus-per-trial 2", help="arguments of the packed run only")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run (default: 3600)")
    a = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvsweep-rate-") as tmp:
        for name, extra in (("unpacked", a.unpacked), ("packed", a.packed)):
            args = shlex.split(a.common) + shlex.split(extra) + ["--name", name]
            r, _ = run(args, Path(tmp) / name, a.timeout)
            rows.append((name, " ".join(shlex.split(extra)) or "(defaults)", r))
            print(f"{name}: {r['per_h']} trials/h ({r['fit_s']} s in Tune, {r['process_s']:.0f} s in all)", flush=True)
    print(f"\nsweeps/vdproj.py {a.common}; Tune's run time (trials/h from it), then the whole process (start, data, base, report)")
    print(f"| {'run':<8} | {'arguments':<32} | {'trials':>6} | {'epochs':>6} | {'Tune s':>6} | {'trials/h':>8} | {'process s':>9} | "
          f"{'start-up med/max s':>18} | {'pack tokens/s':>13} | {'best val PPL':>12} |")
    print(f"|{'-' * 10}|{'-' * 34}|{'-' * 8}|{'-' * 8}|{'-' * 8}|{'-' * 10}|{'-' * 11}|{'-' * 20}|{'-' * 15}|{'-' * 14}|")
    for name, extra, r in rows:
        print(f"| {name:<8} | {extra:<32} | {r['trials']:>6} | {r['epochs']:>6} | {r['fit_s']:>6} | {r['per_h']:>8} | "
              f"{r['process_s']:>9.0f} | {r['startup']:>18} | {r['pack_tok_s']:>13} | {r['best']:>12} |")
    base = rows[0][2]["per_h"]
    print(f"packed / unpacked trials per hour: {rows[1][2]['per_h'] / base:.2f}x" if base else "")
    if rows[0][2]["best"] != rows[1][2]["best"]:
        print(f"note: best val PPL differs ({rows[0][2]['best']} vs {rows[1][2]['best']}): the scheduler stopped different "
              "trials (it decides in the order results arrive) or rounding from the chunked loss")


if __name__ == "__main__":
    main()
