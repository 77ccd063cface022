"""Hand-made results folders for the report tests (helpers and fixtures, no tests of their own)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import pyarrow as pa

from kvsweep.results import EPOCH_SCHEMA, POSITION_SCHEMA, table, trial_schema, write_parquet

BASE_PPL = 50.0
TRIALS = trial_schema([("vdproj.rank", pa.int64()), ("vdproj.target", pa.string()), ("vdproj.init", pa.string())])
KV_BASE = 1000


def trial(trial_id: str, kv: int | None, ppl: float | None, *, variant: str = "vdproj / lm", status: str = "completed",
          epochs_run: int = 20, max_epochs: int = 20, best_epoch: int | None = None, sweep: str = "hand",
          finished_at: str = "2025-11-20T10:00:00+00:00", error: str | None = None, rank: int | None = 8, seed: int = 0,
          config: dict | None = None, fixed_bytes: int | None = None) -> dict:
    """A trials.parquet row; its config is ``config`` with ``train.seed`` set to ``seed`` (default: one naming the trial, so
    that no two trials are one configuration)."""
    cfg = {"trial": trial_id, "rank": rank, "lr": 1e-4} if config is None else {**config, "train": {**config.get("train", {}), "seed": seed}}
    return {
        "trial_id": trial_id, "sweep": sweep, "variant": variant, "adapters": variant.split(" / ")[0],
        "family": variant.split(" / ")[0], "options": f"vdproj rank={rank} init=pca" if rank is not None else variant.split(" / ")[0],
        "vdproj.rank": rank, "vdproj.target": "v" if rank is not None else None, "vdproj.init": "pca" if rank is not None else None,
        "schedule": "lm", "seed": seed,
        "config": json.dumps(cfg), "status": status, "error": error,
        "epochs_run": epochs_run, "max_epochs": max_epochs, "best_epoch": best_epoch if best_epoch is not None else epochs_run,
        "best_val_ppl": ppl, "base_val_ppl": BASE_PPL, "init_val_ppl": 2 * BASE_PPL,
        "degradation_pct": None if ppl is None else 100 * (ppl - BASE_PPL) / BASE_PPL,
        "kv_bytes_per_token": kv, "kv_bytes_per_token_base": KV_BASE, "kv_ratio": None if kv is None else kv / KV_BASE,
        "fixed_bytes": fixed_bytes, "trainable_params": 1000, "total_params": 100_000, "wall_seconds": 1.0, "git_revision": "abc", "finished_at": finished_at,
    }


def curve(trial_id: str, epochs: int, best: float, best_epoch: int | None = None) -> list[dict]:
    """Val PPL falling to ``best`` at ``best_epoch`` (default: the last), rising by 1% per epoch after it."""
    b = best_epoch or epochs
    rows = []
    for e in range(1, epochs + 1):
        val = best * (1 + 0.5 * max(b - e, 0) / b + 0.01 * max(e - b, 0))
        rows.append({"trial_id": trial_id, "epoch": e, "train_ppl": 0.9 * val, "val_ppl": val, "loss": math.log(val), "steps": 10 * e})
    return rows


def buckets(trial_id: str, ppl: float) -> list[dict]:
    rows = []
    for lo, hi, shape in ((0, 16, 1.5), (16, 32, 1.0), (32, 64, 0.8)):
        base = BASE_PPL * shape
        p = ppl * shape
        rows.append({"trial_id": trial_id, "lo": lo, "hi": hi, "tokens": 100, "ppl": p, "base_ppl": base,
                     "diff": p - base, "degradation_pct": 100 * (p - base) / base, "split": "validation"})
    return rows


def write_results(folder: Path, trials: list[dict], epochs: list[dict] | None = None, positions: list[dict] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_parquet(table(trials, TRIALS), folder / "trials.parquet")
    if epochs is not None:
        write_parquet(table(epochs, EPOCH_SCHEMA), folder / "epochs.parquet")
    if positions is not None:
        write_parquet(table(positions, POSITION_SCHEMA), folder / "positions.parquet")
    return folder


# The hand-made sweep: its front is t1 and t8 (exact duplicates), t2, t4, in that order.
HAND_TRIALS = [
    trial("t1", 500, 60.0, best_epoch=18),
    trial("t2", 700, 55.0, status="early_stopped", epochs_run=12, best_epoch=9),
    trial("t3", 700, 58.0, status="asha_stopped", epochs_run=1),  # same x as t2, worse y
    trial("t4", 1200, 49.0, variant="ka_gated / lm", rank=None),
    trial("t5", 1300, 49.0, variant="ka_gated / lm", status="asha_stopped", epochs_run=3, rank=None),  # same y as t4, larger x
    trial("t6", 400, None, status="error", epochs_run=0, error="boom: CUDA out of memory"),
    trial("t7", 300, float("nan")),  # no finite PPL
    trial("t8", 500, 60.0, best_epoch=18, finished_at="2025-11-21T09:30:00+00:00"),  # duplicate of t1
    trial("t9", 100, 10.0, status="error", epochs_run=2, error="diverged"),  # would beat all, but failed
]
HAND_FRONT = ["t1", "t8", "t2", "t4"]


@pytest.fixture
def hand_results(tmp_path: Path) -> Path:
    """A partly failed, still running sweep: errors, a NaN, ties, duplicates, and a trial with epochs only (t10)."""
    epochs = (curve("t1", 20, 60.0, 18) + curve("t2", 12, 55.0, 9) + curve("t3", 1, 58.0) + curve("t4", 20, 49.0)
              + curve("t5", 3, 49.0) + curve("t8", 20, 60.0, 18) + curve("t10", 2, 70.0))
    positions = buckets("t1", 60.0) + buckets("t2", 55.0) + buckets("t4", 49.0) + buckets("t8", 60.0)
    return write_results(tmp_path / "results", HAND_TRIALS, epochs, positions)
