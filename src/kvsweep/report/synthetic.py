"""Synthetic results in the real schemas, for tests, the benchmark and trying the report without a sweep.

The numbers imitate a V-DProj / KA sweep on Pythia-70M (6 layers, width 512, base cache 12,288
bytes/token, base PPL about 62.6): PPL rises as the rank falls, ASHA stops weak trials after 1, 3 or
9 epochs (never at or after ``max_epochs``), some trials early-stop, a fraction fail.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..config import SEED_BUCKETS
from ..results import EPOCH_SCHEMA, POSITION_SCHEMA, trial_schema, write_parquet

OPTION_COLUMNS = [("vdproj.rank", pa.int64()), ("vdproj.target", pa.string()), ("vdproj.init", pa.string())]

VARIANTS = (
    ("vdproj", None, "rec_to_lm"),
    ("vdproj", None, "lm"),
    ("vdproj+ka_gated", "ka_gated", "rec_to_lm"),
    ("ka_residual", "ka_residual", "lm"),
)
BUCKET_SHAPE = np.array([1.55, 1.12, 0.97, 0.91, 0.88])  # the base's PPL per seed bucket, relative to overall


def synthetic_tables(
    n_trials: int, *, seed: int = 0, sweep: str = "synthetic", layers: int = 6, hidden: int = 512, base_ppl: float = 62.58,
    max_epochs: int = 30, error_fraction: float = 0.02, running: int = 0, epochs: bool = True, positions: bool = True,
    start: datetime = datetime(2025, 11, 20, 8, 0, tzinfo=timezone.utc),
) -> tuple[pa.Table, pa.Table | None, pa.Table | None]:
    """(trials, epochs, positions) of ``n_trials`` synthetic trials, plus ``running`` trials that have epochs only."""
    rng = np.random.default_rng(seed)
    n = n_trials
    v = rng.integers(0, len(VARIANTS), n)
    adapters = np.array([VARIANTS[k][0] for k in v], dtype=object)
    ka = np.array([VARIANTS[k][1] for k in v], dtype=object)
    schedule = np.array([VARIANTS[k][2] for k in v], dtype=object)
    has_vd = adapters != "ka_residual"
    rank = np.where(has_vd, rng.integers(1, hidden // 32 + 1, n) * 32, 0)
    kv_base = layers * 2 * hidden * 2
    kv = np.where(has_vd, layers * (hidden + rank) * 2, kv_base) + np.where(ka != None, 2 * hidden * 2, 0)  # noqa: E711
    loss = np.where(has_vd, 1.4 * (1 - rank / hidden) ** 2, 0.0) * np.where(schedule == "rec_to_lm", 0.8, 1.0)
    loss = loss - np.where(ka == "ka_gated", 0.02, 0.0) + np.where(ka == "ka_residual", 0.03, 0.0)
    noise = rng.gamma(2.0, 0.02, n)
    best = base_ppl * (1.0 + loss + noise)

    roll = rng.random(n)
    status = np.where(roll < 0.55, "asha_stopped", np.where(roll < 0.8, "early_stopped", "completed")).astype(object)
    status[rng.random(n) < error_fraction] = "error"
    short = max(max_epochs - 1, 1)  # stopped trials end before the last epoch (short sweeps: after the first)
    asha_epochs = np.minimum(rng.choice([1, 3, 9], n, p=[0.5, 0.3, 0.2]), short)
    patience_lo = min(5, short)
    epochs_run = np.where(status == "asha_stopped", asha_epochs,
                          np.where(status == "early_stopped", rng.integers(patience_lo, max(max_epochs, patience_lo + 1), n),
                                   np.where(status == "error", np.minimum(rng.integers(0, 4, n), max_epochs), max_epochs)))
    best = np.where(status == "asha_stopped", best * (1 + 0.6 / np.sqrt(np.maximum(epochs_run, 1))), best)
    best_epoch = np.where(status == "early_stopped", np.maximum(epochs_run - 3, 1), np.maximum(epochs_run, 1))
    is_err = status == "error"
    best = np.where(is_err, np.nan, best)
    ids = [f"{sweep}_{k:05d}" for k in range(n)]
    finished = [(start + timedelta(seconds=float(s))).isoformat(timespec="seconds") for s in np.sort(rng.uniform(0, 86400, n))]
    variant = [f"{a} / {s}" for a, s in zip(adapters, schedule)]
    config = [f'{{"adapters": "{a}", "rank": {int(r) if h else "null"}, "schedule": "{s}", "lr": 0.0001, "seed": {k % 3}}}'
              for a, r, h, s, k in zip(adapters, rank, has_vd, schedule, range(n))]
    deg = 100.0 * (best - base_ppl) / base_ppl
    init = [("pca" if k % 2 else "random") if h else None for k, h in enumerate(has_vd)]
    trials = pa.table({
        "trial_id": ids, "sweep": [sweep] * n, "variant": variant, "adapters": adapters.tolist(),
        "family": ["+".join((["vdproj"] if h else []) + (["ka"] if k else [])) for h, k in zip(has_vd, ka)],
        "options": [" + ".join(([f"vdproj rank={int(r)}" + (" init=pca" if i == "pca" else "")] if h else []) + ([k] if k else []))
                    for r, h, i, k in zip(rank, has_vd, init, ka)],
        "vdproj.rank": [int(r) if h else None for r, h in zip(rank, has_vd)],
        "vdproj.target": ["v" if h else None for h in has_vd], "vdproj.init": init,
        "schedule": schedule.tolist(), "seed": [k % 3 for k in range(n)], "config": config,
        "status": status.tolist(), "error": ["CUDA out of memory (synthetic)" if e else None for e in is_err],
        "epochs_run": epochs_run.tolist(), "max_epochs": [max_epochs] * n, "best_epoch": [None if e else int(b) for e, b in zip(is_err, best_epoch)],
        "best_val_ppl": best.tolist(), "base_val_ppl": [base_ppl] * n, "init_val_ppl": (best * 3.0).tolist(),
        "test_ppl": (best * 1.02).tolist(), "base_test_ppl": [base_ppl * 1.02] * n, "eval_seq_len": [2048] * n,
        "degradation_pct": deg.tolist(), "kv_bytes_per_token": kv.tolist(),
        "kv_bytes_per_token_accounted": kv.tolist(), "kv_bytes_per_token_base": [kv_base] * n,
        "kv_ratio": (kv / kv_base).tolist(), "trainable_params": (2 * rank * hidden * layers + 800_000 * (ka != None)).tolist(),  # noqa: E711
        "fixed_bytes": (2 * (2 * rank * hidden * layers + 800_000 * (ka != None))).tolist(),  # noqa: E711  (weights at fp16)
        "total_params": [70_426_624] * n, "wall_seconds": (epochs_run * 95.0).tolist(), "git_revision": ["0" * 40] * n,
        "finished_at": finished,
    }, schema=trial_schema(OPTION_COLUMNS))

    ep_tbl = pos_tbl = None
    if epochs:
        run_ids = ids + [f"{sweep}_running_{k:03d}" for k in range(running)]
        counts = np.r_[epochs_run, rng.integers(1, 5, running)]
        final = np.r_[np.where(is_err, base_ppl * 2.5, best), base_ppl * (1.3 + rng.random(running))]
        bepoch = np.r_[best_epoch, counts[n:]]
        tid = np.repeat(np.array(run_ids, dtype=object), counts)
        ep = np.concatenate([np.arange(1, c + 1) for c in counts]) if counts.sum() else np.zeros(0, int)
        f, b = np.repeat(final, counts), np.repeat(bepoch, counts)
        val = f * (1 + 2.0 * np.maximum(np.exp(-ep / 2.5) - np.exp(-b / 2.5), 0) + 0.01 * np.maximum(ep - b, 0))  # best at epoch b
        train = val * (0.92 + 0.03 * np.exp(-ep / 4))
        m = ep.size
        ep_tbl = pa.table({
            "trial_id": tid.tolist(), "epoch": ep.astype(np.int32), "train_ppl": train, "val_ppl": val,
            "loss": np.log(train), "loss_lm": np.log(train), "loss_rec": 0.1 * np.exp(-ep / 5), "loss_kl": np.zeros(m),
            "w_lm": np.ones(m), "w_rec": np.zeros(m), "w_kl": np.zeros(m), "lr": np.full(m, 1e-4),
            "steps": ep.astype(np.int64) * 1250, "seconds": np.full(m, 95.0),
        }, schema=EPOCH_SCHEMA)
    if positions:
        ok = np.flatnonzero(~is_err)
        lo, hi = np.array(SEED_BUCKETS[:-1]), np.array(SEED_BUCKETS[1:])
        k = len(lo)
        base_b = np.tile(base_ppl * BUCKET_SHAPE, ok.size)
        slope = np.linspace(1.15, 0.95, k)  # early positions suffer more from a compressed cache
        ratio = np.repeat(best[ok] / base_ppl, k)
        ppl = base_b * (1 + (ratio - 1) * np.tile(slope, ok.size))
        pos_tbl = pa.table({
            "trial_id": np.repeat(np.array(ids, dtype=object)[ok], k).tolist(), "lo": np.tile(lo, ok.size).astype(np.int32),
            "hi": np.tile(hi, ok.size).astype(np.int32), "tokens": np.tile(np.array([16, 16, 32, 32, 31]) * 113, ok.size).astype(np.int64),
            "ppl": ppl, "base_ppl": base_b, "diff": ppl - base_b, "degradation_pct": 100 * (ppl - base_b) / base_b,
            "split": ["validation"] * (k * ok.size),
        }, schema=POSITION_SCHEMA)
    return trials, ep_tbl, pos_tbl


def write_synthetic(folder: str | Path, n_trials: int, **kwargs) -> Path:
    """Write synthetic ``trials.parquet``, ``epochs.parquet`` and ``positions.parquet`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    trials, epochs, positions = synthetic_tables(n_trials, **kwargs)
    write_parquet(trials, folder / "trials.parquet")
    if epochs is not None:
        write_parquet(epochs, folder / "epochs.parquet")
    if positions is not None:
        write_parquet(positions, folder / "positions.parquet")
    return folder
