"""What a sweep's driver prints at its end: trials by status, what the scheduler saved, the best trial, where
the results are, and the figures of this run (trials per hour, start-up times, packs' tokens/s)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from ..results import reports_of, scheduler_savings
from .store import join_uri
from .writer import TrialRecord


def _stamp(result: dict) -> float:
    t = result.get("timestamp")
    return float(t) if isinstance(t, (int, float)) and t == t else 0.0


def throughput(records: list[TrialRecord], fit_seconds: float, pack_stats: list[dict], since: float = 0.0) -> str:
    """Trials per hour of this run, the trials' start-up times and, for packs, their training tokens/s.

    Only what this run did counts: results stamped at or after ``since`` (seconds since the epoch), less
    the checkpoint's epoch a resumed trial reports again before it trains on.
    """
    fresh = [[rep for rep in reports_of(r for r in rec.results if _stamp(r) >= since) if not rep.resumed] for rec in records]
    ran = [rs for rs in fresh if rs]
    epochs = sum(len({rep.epoch for rep in rs if rep.error is None}) for rs in ran)
    startups = sorted(rep.startup_seconds for rs in ran for rep in rs if rep.startup_seconds is not None)
    records = ran
    parts = [f"this run: {fit_seconds:.0f} s for {len(records)} trials ({3600 * len(records) / max(fit_seconds, 1e-9):.0f} trials/h, "
             f"{epochs} epochs)"]
    if startups:
        parts.append(f"trial start-up (start to first training step): median {startups[len(startups) // 2]:.1f} s, "
                     f"max {startups[-1]:.1f} s")
    for i, st in enumerate(pack_stats):
        if st["step_seconds"] > 0:
            parts.append(f"pack {i} on {st['device']}: {st['trial_steps']} trial-steps in {st['steps']} steps "
                         f"({st['trial_steps'] / max(st['steps'], 1):.1f} trials per step), "
                         f"{st['tokens'] / st['step_seconds']:,.0f} training tokens/s in its steps")
    return "\n".join(parts)


def summarize(trials: pa.Table, results_uri: str, report: Path | None, timing: str = "") -> str:
    """Trials by status, what the scheduler saved, the best trial, where the results are."""
    rows = trials.to_pylist()
    by_status = {s: sum(r["status"] == s for r in rows) for s in ("completed", "early_stopped", "asha_stopped", "error", "running")}
    savings = scheduler_savings(rows)
    ok = [r for r in rows if r["status"] != "error" and r["best_val_ppl"] == r["best_val_ppl"]]
    best = min(ok, key=lambda r: r["best_val_ppl"]) if ok else None
    saved = (f"epochs run {savings.run} of the {savings.without_scheduler} these trials would have run without the scheduler: "
             f"it saved {savings.saved} ({savings.saved_pct:.0f}%)" if savings.saved else
             f"epochs run {savings.run}; the scheduler stopped no trial")
    parts = [f"{len(rows)} trials: " + ", ".join(f"{n} {s}" for s, n in by_status.items() if n), saved,
             f"best val PPL {best['best_val_ppl']:.4f} ({best['options']}, {best['variant'].split(' / ')[-1]}) vs base {best['base_val_ppl']:.4f}" if best else "",
             f"results: {join_uri(results_uri, 'trials.parquet')}, epochs.parquet, positions.parquet",
             f"report: {report}" if report else "", timing]
    return "\n".join(p for p in parts if p)
