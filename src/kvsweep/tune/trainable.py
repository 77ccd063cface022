"""The trainable of an unpacked sweep: one ``run_trial`` in a Ray Tune trial, reporting each epoch with its
checkpoint; a restarted trial resumes from its last checkpoint."""

from __future__ import annotations

import random
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import torch
from ray import tune
from transformers.utils import logging as hf_logging

from ..adapters import ensure_registered
from ..checkpoint import saved_progress
from ..config import SweepCfg, position_buckets
from ..data import Samples
from ..evaluate import SplitStats
from ..models import Base, load_base
from ..results import BucketPPL, EpochMetrics, EpochReport, TrialConstants
from ..train import TrialError, run_trial
from .space import trial_cfg

_BASES: dict = {}  # a reused worker keeps its base


def resumed_report(checkpoint: Path) -> int:
    """Report the checkpoint's epoch again before a resumed trial trains on; return that epoch.

    A driver killed after a trial's checkpoint but before Tune saved the trial's result would otherwise lose that
    result, and with it the scheduler's decision on it: the scheduler sees the epoch again (a trial it had stopped is
    stopped here, before it trains) and the result tables count each epoch once.
    """
    epoch, metrics = saved_progress(checkpoint)
    if metrics is not None:
        tune.report(replace(EpochReport.from_report(metrics), resumed=True).to_report())
    return epoch


def trainable(config: dict, *, sweep: SweepCfg, samples: Samples, base_stats: SplitStats, methods: dict | None = None) -> None:
    """Train the configuration ``config`` (a point of the search space) as one Tune trial; ``methods``: the
    sweep's methods defined outside kvsweep, registered here first."""
    t_start = time.time()
    if sweep.benchmark_stub_epoch_seconds is not None:
        for rep in stub_reports(config, sweep, base_stats):
            tune.report(rep.to_report())
        return
    ensure_registered(methods or {})
    hf_logging.disable_progress_bar()
    torch.set_num_threads(max(1, int(sweep.cpus_per_trial)))
    cfg = trial_cfg(config, sweep)
    key = repr(sweep.model)
    if key not in _BASES:
        _BASES[key] = load_base(replace(sweep.model, device="auto"), log=print)
    base: Base = _BASES[key]
    checkpoint = tune.get_checkpoint()
    fail_at = sweep.fail_once_at_epoch
    last_epoch = {"n": 0}
    with tempfile.TemporaryDirectory(prefix="kvsweep-trial-") as work:
        resume_from = None
        if checkpoint is not None:
            resume_from = Path(work) / "resume"
            checkpoint.to_directory(str(resume_from))
            last_epoch["n"] = resumed_report(resume_from)

        def report(rep: EpochReport, ckpt_dir: Path | None) -> None:
            startup = rep.first_step_at - t_start if rep.first_step_at is not None and resume_from is None else None
            rep = replace(rep, first_step_at=None, startup_seconds=startup)
            last_epoch["n"] = rep.epoch
            ckpt = tune.Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir is not None else None
            tune.report(rep.to_report(), checkpoint=ckpt)
            if fail_at is not None and resume_from is None and rep.epoch == fail_at:
                raise RuntimeError(f"injected fault after epoch {fail_at} (--inject-fault-at-epoch)")

        try:
            run_trial(cfg, report, checkpoint_dir=Path(work) / "checkpoint", resume_from=resume_from, base=base,
                      samples=samples, base_stats=base_stats, log=print)
        except TrialError as e:  # deterministic: end the trial as an error instead of retrying it
            tune.report(EpochReport.failed(last_epoch["n"] + 1, str(e)).to_report())


def stub_reports(config: dict, sweep: SweepCfg, base_stats: SplitStats) -> Iterator[EpochReport]:
    """``benchmarks/scale.py``'s trial: no model, no data; one synthetic ``EpochReport`` per epoch (every key a real
    trial reports, with its position buckets and constants), ``sweep.benchmark_stub_epoch_seconds`` apart, its
    figures drawn from the configuration (the same ones for the same configuration)."""
    rng = random.Random(repr(sorted(config.items())))
    base = base_stats.val.ppl
    ranges = position_buckets(sweep.data.eval_len, None)
    constants = TrialConstants(base_val_ppl=base, init_val_ppl=base * (1.5 + rng.random()), kv_bytes_per_token=rng.randrange(64, 1024, 64),
                               kv_bytes_per_token_measured=0, kv_ratio=0.5, trainable_params=rng.randrange(1, 10**6),
                               total_params=10**7, fixed_bytes=0, base_test_ppl=base_stats.test.ppl if base_stats.test else None)
    constants = replace(constants, kv_bytes_per_token_measured=constants.kv_bytes_per_token)
    best = (0, constants.init_val_ppl)
    for epoch in range(1, sweep.train.epochs + 1):
        time.sleep(sweep.benchmark_stub_epoch_seconds)
        ppl = base * (1 + rng.random() / epoch)
        best = min(best, (epoch, ppl), key=lambda b: b[1])
        buckets = tuple(BucketPPL(lo, hi, ppl * (1 + 0.01 * k)) for k, (lo, hi) in enumerate(ranges))
        best_buckets = tuple(BucketPPL(lo, hi, best[1] * (1 + 0.01 * k)) for k, (lo, hi) in enumerate(ranges))
        metrics = EpochMetrics(epoch=epoch, train_ppl=ppl * 0.9, val_ppl=ppl, loss=3.0, loss_lm=3.0, loss_rec=0.0, loss_kl=0.0,
                               w_lm=1.0, w_rec=0.0, w_kl=0.0, lr=sweep.train.lr, steps=epoch, seconds=sweep.benchmark_stub_epoch_seconds)
        yield EpochReport(metrics, buckets, constants, best_val_ppl=best[1], early_stopped=False, best_epoch=best[0],
                          best_buckets=best_buckets, test_ppl=best[1] * 1.05 if constants.base_test_ppl else None,
                          test_buckets=best_buckets if constants.base_test_ppl else ())
