"""``kvsweep train``: one trial into a folder (trial.json, epochs.parquet, positions.parquet, its checkpoint)
and the seed's tables printed at its end."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable


from ..atomic import write_json
from ..checkpoint import has_checkpoint
from ..config import ConfigError
from ..results import TrialResult, epoch_table, position_table, write_parquet

from .cfg import TrialCfg, TrialError
from .loop import prepare, run_trial


def git_revision() -> str | None:
    """The commit of the kvsweep checkout this runs from (with ``+dirty`` for local changes), if any."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def run_trial_to_folder(cfg: TrialCfg, out: str | Path, *, resume: bool = False, overwrite: bool = False,
                        log: Callable[[str], None] = print) -> TrialResult:
    """``kvsweep train``: one trial with a progress bar; writes trial.json, epochs.parquet (epoch 0, the adapters at
    init, first), positions.parquet.

    ``out`` may be new or empty. One that holds an earlier trial (trial.json or checkpoint/) needs
    ``resume`` (continue from its checkpoint) or ``overwrite`` (replace it: its results and checkpoint are
    deleted once this trial's base and samples have loaded).

    Raises:
        ConfigError: ``out`` holds an earlier trial and neither ``resume`` nor ``overwrite`` is given (checked
            before any model loads), both are given, or ``out`` is a file.
        KvsweepError: whatever the trial raises (a bad model or data, TrialError, CheckpointError).
    """
    out = Path(out)
    ckpt = out / "checkpoint"
    outputs = ("trial.json", "epochs.parquet", "positions.parquet", "checkpoint")
    if resume and overwrite:
        raise ConfigError("resume and overwrite exclude each other: continue the trial in out, or replace it")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out: {out} is a file; give a folder for the trial's results")
    earlier = [name for name in ("trial.json", "checkpoint") if (out / name).exists()]
    if earlier and not (resume or overwrite):
        raise ConfigError(f"out: {out} already holds a trial ({' and '.join(earlier)}); continue it with --resume, "
                          "replace it with --overwrite, or give another --out")
    resume_from = ckpt if resume and has_checkpoint(ckpt) else None
    if resume and resume_from is None:
        log(f"no checkpoint in {ckpt}; starting from the beginning")
    base, samples = prepare(cfg, log=log)
    cfg = cfg.with_max_positions(base.max_positions)
    record = {"config": cfg.to_dict(), "git_revision": git_revision()}
    if overwrite and earlier:  # the new trial is under way: nothing of the old one may be mistaken for its own
        for name in outputs:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        log(f"replaced the earlier trial in {out}")
    try:
        result = run_trial(cfg, checkpoint_dir=ckpt, resume_from=resume_from, base=base, samples=samples, progress=True, log=log)
    except TrialError as e:
        write_json(out / "trial.json", {**record, "status": "error", "error": str(e)})
        raise
    trial_id = out.name
    final = result.history[-1].to_report() if result.history else None
    write_json(out / "trial.json", {**record, **result.to_json(), "final": final})
    write_parquet(epoch_table((trial_id, h.metrics) for h in result.history), out / "epochs.parquet")
    write_parquet(position_table((trial_id, p) for p in result.positions), out / "positions.parquet")
    log(format_trial(result))
    log(f"wrote {out / 'trial.json'}, epochs.parquet, positions.parquet")
    return result


def format_trial(result: TrialResult) -> str:
    """The seed's overall and position-wise tables for one trial against its base: test PPL (the headline: the best
    epoch's, chosen on validation) beside validation PPL, then per position bucket on test and on validation."""
    def row(name: str, val: float, test: float | None, base_test: float | None) -> str:
        if test is None or base_test is None:
            return f"| {name:>8} | {val:>10.4f} | {'-':>10} | {'':>9} | {'':>8} |"
        if name == "base":
            return f"| {name:>8} | {val:>10.4f} | {test:>10.4f} | {'':>9} | {'':>8} |"
        return f"| {name:>8} | {val:>10.4f} | {test:>10.4f} | {test - base_test:>+9.4f} | {100 * (test - base_test) / base_test:>+8.2f} |"

    lines = [
        f"status {result.status} after {result.epochs_run} epochs (best epoch {result.best_epoch}, chosen on validation; "
        f"evaluation samples of {result.eval_seq_len} tokens)",
        f"KV cache: {result.kv_bytes_per_token:,} bytes/token ({100 * result.kv_ratio:.1f}% of the base's "
        f"{result.kv_bytes_per_token_base:,}); trainable parameters {result.trainable_params:,} of {result.total_params:,}",
        "",
        f"| {'model':>8} | {'val PPL':>10} | {'test PPL':>10} | {'diff':>9} | {'degr. %':>8} |",
        f"|{'-' * 10}|{'-' * 12}|{'-' * 12}|{'-' * 11}|{'-' * 10}|",
        row("base", result.base_val_ppl, result.base_test_ppl, result.base_test_ppl),
        row("adapted", result.best_val_ppl, result.test_ppl, result.base_test_ppl),
    ]
    for split in ("test", "validation"):
        rows = [p for p in result.positions if p.split == split]
        if not rows:
            continue
        lines += ["", f"Position-wise perplexity ({split})",
                  f"| {'positions':>10} | {'base PPL':>10} | {'PPL':>10} | {'diff':>9} | {'degr. %':>8} |",
                  f"|{'-' * 12}|{'-' * 12}|{'-' * 12}|{'-' * 11}|{'-' * 10}|"]
        for p in rows:
            lines.append(f"| {str(p.lo) + '-' + str(p.hi):>10} | {p.base_ppl:>10.4f} | {p.ppl:>10.4f} | {p.diff:>+9.4f} | "
                         f"{p.degradation_pct:>+8.2f} |")
    return "\n".join(lines)
