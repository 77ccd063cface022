"""What the scheduler saves: the same search space on `tiny`, once under --scheduler (moasha or asha) and once
with every trial run to its end.

    python benchmarks/asha_savings.py [--scheduler moasha] [--epochs 4] [--train-samples 128] [--storage DIR]

Prints epochs and trial-seconds each mode spent, their ratio, and for each rank the best val PPL each
mode found (and whether they agree).
"""

from __future__ import annotations

import argparse
import tempfile
import time

from kvsweep.config import DataCfg, SweepCfg, TrainCfg
from kvsweep.tune import run_sweep


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--train-samples", type=int, default=128)
    p.add_argument("--val-samples", type=int, default=32)
    p.add_argument("--storage", default=None)
    p.add_argument("--scheduler", choices=("moasha", "asha"), default="moasha")
    a = p.parse_args()
    storage = a.storage or tempfile.mkdtemp(prefix="kvsweep-asha-")
    space = {"vdproj.rank": [16, 32, 64], "vdproj.init": ["random", "pca"], "schedule": ["lm", "rec_to_lm"], "lr": [1e-3]}
    runs = {}
    pruned = a.scheduler
    for mode, scheduler in ((pruned, pruned), ("full", "fifo")):
        sweep = SweepCfg(name=f"bench-{mode}", storage=storage, report_dir=None, scheduler=scheduler, grace_period=1, reduction_factor=2,
                         data=DataCfg(train_samples=a.train_samples, val_samples=a.val_samples),
                         train=TrainCfg(epochs=a.epochs, patience=a.epochs))
        t0 = time.perf_counter()
        outcome = run_sweep(sweep, space, log=lambda m: None)
        runs[mode] = (outcome.tables["trials"].to_pylist(), time.perf_counter() - t0)

    print(f"\n{len(runs[pruned][0])} trials x {a.epochs} epochs on tiny ({a.train_samples} train samples); storage {storage}")
    print(f"| {'mode':>5} | {'epochs':>6} | {'trial-seconds':>13} | {'wall s':>7} | statuses")
    stats = {}
    for mode, (rows, wall) in runs.items():
        epochs, secs = sum(r["epochs_run"] for r in rows), sum(r["wall_seconds"] for r in rows)
        stats[mode] = (epochs, secs)
        statuses = {s: sum(r["status"] == s for r in rows) for s in sorted({r["status"] for r in rows})}
        print(f"| {mode:>5} | {epochs:>6} | {secs:>13.1f} | {wall:>7.1f} | {statuses}")
    print(f"{pruned} / full: epochs {stats[pruned][0] / stats['full'][0]:.2f}, trial-seconds {stats[pruned][1] / stats['full'][1]:.2f}")
    print(f"\n| {'rank':>4} | {'best PPL, ' + pruned:>16} | {'best PPL, full':>14} | agree")
    for rank in space["vdproj.rank"]:
        best = {m: min((r for r in rows if r["vdproj.rank"] == rank), key=lambda r: r["best_val_ppl"]) for m, (rows, _) in runs.items()}
        same = best[pruned]["variant"] == best["full"]["variant"]
        close = abs(best[pruned]["best_val_ppl"] - best["full"]["best_val_ppl"]) / best["full"]["best_val_ppl"] < 0.005
        print(f"| {rank:>4} | {best[pruned]['best_val_ppl']:>16.4f} | {best['full']['best_val_ppl']:>14.4f} | "
              f"{'same config' if same else 'different config'}{', within 0.5%' if close else ''}")


if __name__ == "__main__":
    main()
