"""Synthetic results in the real schemas, for tests, the benchmark and trying the report without a sweep.

The numbers imitate a V-DProj / KA sweep on Pythia-70M (6 layers, width 512, base cache 12,288
bytes/token, base PPL about 62.6): PPL rises as the rank falls, ASHA stops weak trials after 1, 3 or
9 epochs (never at or after ``max_epochs``), some trials early-stop, a fraction fail; configurations may repeat over
seeds; by default the results have the test split's columns (schema version 4: ``test_ppl``, ``base_test_ppl``,
``eval_seq_len``, positions with ``split``), added to the installed schema where it lacks them.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..config import SEED_BUCKETS
from ..results import EPOCH_SCHEMA, POSITION_SCHEMA, trial_schema, write_parquet
from .load import SPLIT, TEST_COLUMNS

OPTION_COLUMNS = [("vdproj.rank", pa.int64()), ("vdproj.target", pa.string()), ("vdproj.init", pa.string())]

VARIANTS = (
    ("vdproj", None, "rec_to_lm"),
    ("vdproj", None, "lm"),
    ("vdproj+ka_gated", "ka_gated", "rec_to_lm"),
    ("ka_residual", "ka_residual", "lm"),
)
BUCKET_SHAPE = np.array([1.55, 1.12, 0.97, 0.91, 0.88])  # the base's PPL per seed bucket, relative to overall


def _conform(data: dict, schema: pa.Schema, n: int) -> pa.Table:
    """``data`` (column -> values) as a table of ``schema``; a schema column it lacks is null."""
    return pa.table({f.name: data[f.name] if f.name in data else pa.nulls(n, f.type) for f in schema}, schema=schema)


def trials_schema(splits: bool) -> pa.Schema:
    """The trials schema of synthetic results: ``trial_schema`` with V-DProj's option columns and, with ``splits``, the
    test-split columns (``load.TEST_COLUMNS``) that the installed schema does not have yet."""
    schema = trial_schema(OPTION_COLUMNS)
    extra = [pa.field(name, t) for name, t in TEST_COLUMNS if splits and name not in schema.names]
    return pa.schema(list(schema) + extra)


def positions_schema(splits: bool) -> pa.Schema:
    """``POSITION_SCHEMA``, with ``split`` where the installed schema does not have it yet and ``splits`` asks for it."""
    return POSITION_SCHEMA.append(SPLIT) if splits and SPLIT.name not in POSITION_SCHEMA.names else POSITION_SCHEMA


def synthetic_tables(
    n_trials: int, *, seed: int = 0, sweep: str = "synthetic", layers: int = 6, hidden: int = 512, base_ppl: float = 62.58,
    max_epochs: int = 30, error_fraction: float = 0.02, running: int = 0, epochs: bool = True, positions: bool = True,
    seeds: int = 1, splits: bool = True, eval_seq_len: int = 128,
    start: datetime = datetime(2025, 11, 20, 8, 0, tzinfo=timezone.utc),
) -> tuple[pa.Table, pa.Table | None, pa.Table | None]:
    """(trials, epochs, positions) of ``n_trials`` synthetic trials, plus ``running`` trials that have epochs only.

    Trial k runs configuration ``k // seeds`` with seed ``k % seeds``: each configuration (variant, rank, init, lr) is
    repeated over ``seeds`` seeds, whose PPLs differ by noise. With ``splits`` the results are of schema version 4's
    shape: a test PPL per trial and for the base, the evaluation length, and positions of both splits.
    """
    rng = np.random.default_rng(seed)
    n = n_trials
    configs = -(-n // seeds)
    of = np.arange(n) // seeds  # the configuration of each trial
    v = rng.integers(0, len(VARIANTS), configs)[of]
    adapters = np.array([VARIANTS[k][0] for k in v], dtype=object)
    ka = np.array([VARIANTS[k][1] for k in v], dtype=object)
    schedule = np.array([VARIANTS[k][2] for k in v], dtype=object)
    has_vd = adapters != "ka_residual"
    rank = np.where(has_vd, rng.integers(1, hidden // 32 + 1, configs)[of] * 32, 0)
    lr = np.round(10 ** rng.uniform(-4.5, -3.0, configs), 8)[of]
    init = np.where(has_vd, np.where(rng.random(configs)[of] < 0.5, "pca", "random"), None)
    kv_base = layers * 2 * hidden * 2
    kv = np.where(has_vd, layers * (hidden + rank) * 2, kv_base) + np.where(ka != None, 2 * hidden * 2, 0)  # noqa: E711
    loss = np.where(has_vd, 1.4 * (1 - rank / hidden) ** 2, 0.0) * np.where(schedule == "rec_to_lm", 0.8, 1.0)
    loss = loss - np.where(ka == "ka_gated", 0.02, 0.0) + np.where(ka == "ka_residual", 0.03, 0.0)
    noise = rng.gamma(2.0, 0.02, n)
    best = base_ppl * (1.0 + loss + noise)
    base_test = base_ppl * 1.04  # the test samples are a little harder
    test = best * 1.04 * (1.0 + rng.normal(0.0, 0.004, n))

    roll = rng.random(n)
    status = np.where(roll < 0.55, "asha_stopped", np.where(roll < 0.8, "early_stopped", "completed")).astype(object)
    status[rng.random(n) < error_fraction] = "error"
    short = max(max_epochs - 1, 1)  # stopped trials end before the last epoch (short sweeps: after the first)
    asha_epochs = np.minimum(rng.choice([1, 3, 9], n, p=[0.5, 0.3, 0.2]), short)
    patience_lo = min(5, short)
    epochs_run = np.where(status == "asha_stopped", asha_epochs,
                          np.where(status == "early_stopped", rng.integers(patience_lo, max(max_epochs, patience_lo + 1), n),
                                   np.where(status == "error", np.minimum(rng.integers(0, 4, n), max_epochs), max_epochs)))
    stopped_by = 1 + 0.6 / np.sqrt(np.maximum(epochs_run, 1))
    best = np.where(status == "asha_stopped", best * stopped_by, best)
    test = np.where(status == "asha_stopped", test * stopped_by, test)
    best_epoch = np.where(status == "early_stopped", np.maximum(epochs_run - 3, 1), np.maximum(epochs_run, 1))
    is_err = status == "error"
    best = np.where(is_err, np.nan, best)
    test = np.where(is_err, np.nan, test)
    ids = [f"{sweep}_{k:05d}" for k in range(n)]
    finished = [(start + timedelta(seconds=float(s))).isoformat(timespec="seconds") for s in np.sort(rng.uniform(0, 86400, n))]
    variant = [f"{a} / {s}" for a, s in zip(adapters, schedule)]
    trial_seed = (np.arange(n) % seeds).tolist()
    config = [json.dumps({"adapters": a, "rank": int(r) if h else None, "init": i, "schedule": s, "train": {"lr": float(l), "seed": k}},
                         sort_keys=True) for a, r, h, i, s, l, k in zip(adapters, rank, has_vd, init, schedule, lr, trial_seed)]
    deg = 100.0 * (best - base_ppl) / base_ppl
    trainable = 2 * rank * hidden * layers + 800_000 * (ka != None)  # noqa: E711
    data = {
        "trial_id": ids, "sweep": [sweep] * n, "variant": variant, "adapters": adapters.tolist(),
        "family": ["+".join((["vdproj"] if h else []) + (["ka"] if k else [])) for h, k in zip(has_vd, ka)],
        "options": [" + ".join(([f"vdproj rank={int(r)}" + (" init=pca" if i == "pca" else "")] if h else []) + ([k] if k else []))
                    for r, h, i, k in zip(rank, has_vd, init, ka)],
        "vdproj.rank": [int(r) if h else None for r, h in zip(rank, has_vd)],
        "vdproj.target": ["v" if h else None for h in has_vd], "vdproj.init": init.tolist(),
        "schedule": schedule.tolist(), "seed": trial_seed, "config": config,
        "status": status.tolist(), "error": ["CUDA out of memory (synthetic)" if e else None for e in is_err],
        "epochs_run": epochs_run.tolist(), "max_epochs": [max_epochs] * n, "best_epoch": [None if e else int(b) for e, b in zip(is_err, best_epoch)],
        "best_val_ppl": best.tolist(), "base_val_ppl": [base_ppl] * n, "init_val_ppl": (best * 3.0).tolist(),
        "test_ppl": (best * 1.02).tolist(), "base_test_ppl": [base_ppl * 1.02] * n, "eval_seq_len": [2048] * n,
        "degradation_pct": deg.tolist(), "kv_bytes_per_token": kv.tolist(),
        "kv_bytes_per_token_accounted": kv.tolist(), "kv_bytes_per_token_base": [kv_base] * n,
        "kv_ratio": (kv / kv_base).tolist(), "trainable_params": trainable.tolist(),
        "fixed_bytes": (2 * trainable).tolist(),  # the adapters' weights at fp16
        "total_params": [70_426_624] * n, "wall_seconds": (epochs_run * 95.0).tolist(), "git_revision": ["0" * 40] * n,
        "finished_at": finished,
    }
    if splits:
        data.update({"test_ppl": test.tolist(), "base_test_ppl": [base_test] * n, "eval_seq_len": [eval_seq_len] * n})
    trials = _conform(data, trials_schema(splits), n)

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
        slope = np.linspace(1.15, 0.95, k)  # early positions suffer more from a compressed cache
        parts = []
        for split, trial_ppl, base in (("validation", best, base_ppl), ("test", test, base_test))[:2 if splits else 1]:
            base_b = np.tile(base * BUCKET_SHAPE, ok.size)
            ratio = np.repeat(trial_ppl[ok] / base, k)
            ppl = base_b * (1 + (ratio - 1) * np.tile(slope, ok.size))
            m = ok.size * k
            parts.append(_conform({
                "trial_id": np.repeat(np.array(ids, dtype=object)[ok], k).tolist(), "lo": np.tile(lo, ok.size).astype(np.int32),
                "hi": np.tile(hi, ok.size).astype(np.int32), "tokens": np.tile(np.array([16, 16, 32, 32, 31]) * 113, ok.size).astype(np.int64),
                "ppl": ppl, "base_ppl": base_b, "diff": ppl - base_b, "degradation_pct": 100 * (ppl - base_b) / base_b,
                **({"split": [split] * m} if splits else {}),
            }, positions_schema(splits), m))
        pos_tbl = pa.concat_tables(parts)
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
