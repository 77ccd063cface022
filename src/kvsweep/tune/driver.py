"""The sweep driver: check everything that can be checked before any work, then run, continue or grow the
sweep's Tune experiments and gather the results.

Before Ray starts: the search space against the model, the storage (writable, with room), the lock (one
driver per sweep), the data (tokenized once, on the driver) and the stored specification (a continued
sweep must be the same sweep; ``grow`` adds configurations). Then the base is evaluated once (and kept
in ``sweep.json``: a continued sweep compares its trials with the same base figures), and each round
that has work left runs as one Tune experiment; a round is resumed where it stopped, its finished
trials are not run again.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import pyarrow as pa
import ray
from ray import tune
from ray.tune import ResumeConfig
from ray.tune.schedulers import FIFOScheduler
from ray.tune.search import BasicVariantGenerator
from transformers.utils import logging as hf_logging

from ..config import ConfigError, SweepCfg
from ..data import Samples, load_samples
from ..evaluate import PositionStats, evaluate
from ..models import dims, load_base, model_config, resolve_model
from ..results import scheduler_savings
from ..train import autocast
from .guard import StorageGuard
from .local import start_local_ray
from .scheduler import DurableASHA
from .space import validate_space
from .spec import SWEEP_FILE, Plan, SpecificationError, SweepRecord, data_digest, plan, round_points, specification
from .store import StorageFullError, SweepStore, is_storage_full, join_uri
from .trainable import trainable
from .writer import ResultsWriter, TrialRecord, build_tables, has_experiment, load_records, records_from, write_tables

TUNE_FILES = ("experiment_state-", "tuner.pkl", "trials.parquet")  # what an older kvsweep left in a sweep folder


@dataclass
class SweepOutcome:
    results_uri: str
    experiment_path: str
    tables: dict[str, pa.Table]
    report: Path | None
    summary: str


def prepare_samples(sweep: SweepCfg, log: Callable[[str], None] = print) -> Samples:
    """Tokenize the data once, on the driver, for all trials."""
    base = load_base(replace(sweep.model, device="cpu"), log=log)
    if base.tokenizer is None:
        raise ConfigError(f"model {sweep.model.name} has no tokenizer; give one with --tokenizer")
    samples = load_samples(sweep.data, base.tokenizer, log=log)
    if sweep.train.batch_size > len(samples.train):
        raise ConfigError(f"batch_size {sweep.train.batch_size} is larger than the {len(samples.train)} train samples")
    return samples


def evaluate_base(sweep: SweepCfg, samples: Samples) -> PositionStats:
    """The base's validation statistics, on a trial's device and in its precision (runs as a Ray task)."""
    hf_logging.disable_progress_bar()
    base = load_base(replace(sweep.model, device="auto"), log=print)
    with autocast(base.device, sweep.train.amp, next(base.model.parameters()).dtype):
        return evaluate(base.model, samples.val, batch_size=sweep.train.eval_batch_size)


def _stored_record(store: SweepStore) -> SweepRecord | None:
    """The sweep's stored record; ``None`` for a new sweep.

    Raises:
        SpecificationError: the folder holds results of a sweep without a stored specification.
    """
    data = store.read_bytes(SWEEP_FILE)
    if data is not None:
        return SweepRecord.from_json(data.decode(errors="replace"), f"{store.uri}/{SWEEP_FILE}")
    older = [n for n in store.names() if n.startswith(TUNE_FILES)]
    if older:
        raise SpecificationError(f"{store.uri} holds the results of a sweep without a stored specification ({SWEEP_FILE}: "
                                 "an earlier kvsweep wrote them); it cannot be continued safely. Use another --name")
    return None


def run_sweep(sweep: SweepCfg, space: dict[str, list], *, grow: bool = False, log: Callable[[str], None] = print,
              callbacks: list | None = None) -> SweepOutcome:
    """Run, continue or (``grow``) grow a sweep; return where its results are and the gathered tables.

    Raises:
        ConfigError: a bad search-space value, before anything else.
        StorageError: the storage cannot be written (checked before any work).
        SweepBusyError: another driver runs this sweep.
        SpecificationError: the sweep was run with another specification (the fields are named).
        StorageFullError: the storage filled up; the sweep stopped cleanly and continues when run again.
    """
    hf_logging.disable_progress_bar()
    sweep = absolute_paths(sweep)
    validate_space(space, sweep)
    store = SweepStore(sweep.storage_uri, sweep.name)
    store.check_writable()
    with store.lock(log=log):
        guard = StorageGuard(store)
        short = guard.shortage()
        if short:
            raise StorageFullError(f"{short}; free some space and run the command again")
        stored = _stored_record(store)
        samples = prepare_samples(sweep, log=log)
        the_plan = plan(stored, specification(sweep, space, data_digest(samples)), space, sweep, grow=grow, where=store.uri)
        return _run(sweep, space, store, guard, samples, the_plan, log, callbacks or [])


def _run(sweep: SweepCfg, space: dict, store: SweepStore, guard: StorageGuard, samples: Samples, the_plan: Plan,
         log: Callable[[str], None], callbacks: list) -> SweepOutcome:
    record = the_plan.record
    log(f"sweep {sweep.name}: {the_plan.message}")
    base_stats = record.base_stats()
    this_run: list[TrialRecord] = []
    pack_stats: list[dict] = []
    fit_seconds = 0.0
    if the_plan.todo or base_stats is None:
        started_ray = not ray.is_initialized()
        if started_ray:
            address = sweep.address or os.environ.get("RAY_ADDRESS")
            if address is None:
                start_local_ray()
            else:
                ray.init(address=address, log_to_driver=True)
        servers: list = []
        try:
            if base_stats is None:  # once per sweep, with a trial's resources, so that base and trials are measured alike
                base_stats = ray.get(ray.remote(num_cpus=sweep.cpus_per_trial, num_gpus=sweep.gpus_per_trial)(evaluate_base)
                                     .remote(sweep, samples))
                record.set_base_stats(base_stats)
            log(f"base {sweep.model.name}: val PPL {base_stats.ppl:.4f} on {len(samples.val):,} samples "
                f"({samples.info['source']}); {len(samples.train):,} train samples")
            store.write_bytes(SWEEP_FILE, record.to_json().encode())
            _warn_scattered(sweep, store, log)
            earlier = [rec for r in record.rounds for rec in load_records(store, r.tune)]
            writer = ResultsWriter(sweep, base_stats, store, guard=guard, records=earlier, log=log)
            trainable_fn, max_concurrent, servers = _trainable(sweep, samples, base_stats, record, the_plan.todo, log)
            t_fit = time.perf_counter()
            for index in the_plan.todo:
                analysis = _fit_round(sweep, store, record, index, trainable_fn, max_concurrent, [writer, guard, *callbacks], log)
                this_run += records_from(analysis)
                record.rounds[index].finished = guard.full is None and all(t.status == "TERMINATED" for t in analysis.trials)
                store.write_bytes(SWEEP_FILE, record.to_json().encode())
                if guard.full is not None:
                    break
                if any(t.status not in ("TERMINATED", "ERROR") for t in analysis.trials):  # Ctrl+C: Tune stopped early
                    log("kvsweep: the sweep was interrupted; run the same command to continue it")
                    break
            fit_seconds = time.perf_counter() - t_fit
            pack_stats = _pack_stats(servers)
        except OSError as e:
            if not is_storage_full(e):
                raise
            guard.full = guard.full or f"a write to {store.uri} failed: {e}"
        finally:
            for s in servers:
                ray.kill(s)
            if started_ray:
                ray.shutdown()  # also lets the trials' last log lines arrive before the summary
    records = [rec for r in record.rounds for rec in load_records(store, r.tune)]
    tables = build_tables(records, sweep, base_stats)
    try:
        write_tables(tables, store)
    except OSError as e:
        if not is_storage_full(e):
            raise
        guard.full = guard.full or f"writing the results to {store.uri} failed: {e}"
    report = _write_report(sweep, store.uri, log) if guard.full is None else None
    summary = summarize(tables["trials"], store.uri, report, throughput(this_run, fit_seconds, pack_stats) if this_run else "")
    log(summary)
    if guard.full is not None:
        raise StorageFullError(f"{guard.full}. The sweep stopped; the results written so far are in {store.uri}. "
                               "Free some space and run the same command to continue it")
    return SweepOutcome(store.uri, join_uri(store.uri, record.rounds[-1].tune), tables, report, summary)


def _warn_scattered(sweep: SweepCfg, store: SweepStore, log: Callable[[str], None]) -> None:
    if store.local and len([n for n in ray.nodes() if n.get("Alive")]) > 1:
        log(f"kvsweep: warning: --storage {sweep.storage} is a local path on a cluster of several nodes; unless every "
            "node mounts it, checkpoints and results end up scattered: use s3://..., gs://... or a shared mount")


def _trainable(sweep: SweepCfg, samples: Samples, base_stats: PositionStats, record: SweepRecord, todo: list[int], log):
    """The Tune trainable with its resources, the concurrency limit, and the pack processes (packed sweeps)."""
    if sweep.pack <= 1:
        resources = {"cpu": sweep.cpus_per_trial, "gpu": sweep.gpus_per_trial}
        fn = tune.with_resources(tune.with_parameters(trainable, sweep=sweep, samples=samples, base_stats=base_stats), resources)
        return fn, sweep.max_concurrent, []
    from .packed import CLIENT_CPUS, packed_trainable, start_servers

    n_trials = sum(len(round_points(record, i, sweep) or []) or (record.rounds[i].num_samples or 0) for i in todo)
    n_packs = sweep.packs or _default_packs(sweep, max(1, n_trials))
    servers = start_servers(sweep, samples, base_stats, n_packs)
    max_concurrent = min(sweep.max_concurrent or n_packs * sweep.pack, n_packs * sweep.pack)
    log(f"packed: {n_packs} pack process(es) x up to {sweep.pack} trials, each pack with one copy of the base "
        f"({sweep.cpus_per_trial:g} CPU, {sweep.gpus_per_trial:g} GPU)")
    fn = tune.with_resources(tune.with_parameters(packed_trainable, sweep=sweep, servers=servers), {"cpu": CLIENT_CPUS})
    return fn, max_concurrent, servers


def _fit_round(sweep: SweepCfg, store: SweepStore, record: SweepRecord, index: int, trainable_fn, max_concurrent: int | None,
               callbacks: list, log: Callable[[str], None]):
    """Run (or resume) round ``index`` as one Tune experiment in ``<sweep>/tune-<index>``; its analysis."""
    r = record.rounds[index]
    points = round_points(record, index, sweep)
    config = {k: (tune.choice(list(v)) if len(v) > 1 else v[0]) for k, v in r.space.items()}
    if points is not None:  # a grid: exactly these configurations
        search = BasicVariantGenerator(points_to_evaluate=[dict(p) for p in points], max_concurrent=max_concurrent or 0)
        num_samples = len(points)
    else:  # random search: this many random picks
        search = BasicVariantGenerator(max_concurrent=max_concurrent or 0)
        num_samples = r.num_samples
    resume = has_experiment(store, r.tune)
    if resume:
        log(f"resuming {join_uri(store.uri, r.tune)} (finished trials are not run again)")
    elif num_samples:
        log(f"round {index} ({r.tune}): {num_samples} trials x up to {sweep.train.epochs} epochs")
    scheduler = (DurableASHA(store, max_t=sweep.train.epochs, grace_period=sweep.grace_period, reduction_factor=sweep.reduction_factor)
                 if sweep.asha else FIFOScheduler())
    return tune.run(
        trainable_fn, name=r.tune, storage_path=store.root, storage_filesystem=store.fs,
        config=config, num_samples=max(1, num_samples or 0) if not resume else num_samples or 1, search_alg=search,
        scheduler=scheduler, metric="val_ppl", mode="min", checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        max_failures=sweep.max_failures, callbacks=callbacks, raise_on_failed_trial=False, verbose=1,
        trial_dirname_creator=lambda trial: trial_dirname(trial, r.space),
        resume_config=ResumeConfig(unfinished=ResumeConfig.ResumeType.RESUME, errored=ResumeConfig.ResumeType.RESUME,
                                   finished=ResumeConfig.ResumeType.SKIP) if resume else None,
    )


def trial_dirname(trial, space: dict[str, list]) -> str:
    """``<trainable>_<trial id>_<the searched values>``, e.g. ``trainable_4d383_00002_init=random,rank=64``."""
    searched = ",".join(f"{k}={trial.config.get(k)}" for k in sorted(space) if len(space[k]) > 1)
    name = f"{trial.trainable_name}_{trial.trial_id}" + (f"_{searched}" if searched else "")
    return "".join(c if c.isalnum() or c in "._=,-" else "_" for c in name)[:120]


def _pack_stats(servers: list) -> list[dict]:
    out = []
    for s in servers:
        try:
            out.append(ray.get(s.stats.remote(), timeout=60))
        except (ray.exceptions.RayError, TimeoutError):  # figures only: never stop the results for them
            pass
    return out


def _default_packs(sweep: SweepCfg, n_trials: int) -> int:
    """One pack per ``--gpus-per-trial`` share of the cluster's GPUs (one on CPUs), at most one per K trials."""
    n = 1
    if sweep.gpus_per_trial > 0:
        n = max(1, int(ray.cluster_resources().get("GPU", 0) // sweep.gpus_per_trial))
    return max(1, min(n, math.ceil(n_trials / sweep.pack)))


def throughput(records: list[TrialRecord], fit_seconds: float, pack_stats: list[dict]) -> str:
    """Trials per hour of this run, the trials' start-up times and, for packs, their training tokens/s."""
    epochs = sum(len({r.get("epoch") for r in rec.results if not isinstance(r.get("trial_error"), str)}) for rec in records)
    startups = sorted(r["startup_seconds"] for rec in records for r in rec.results
                      if isinstance(r.get("startup_seconds"), (int, float)) and r["startup_seconds"] == r["startup_seconds"])
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
             f"best val PPL {best['best_val_ppl']:.4f} ({best['variant']}, rank {best['rank']}) vs base {best['base_val_ppl']:.4f}" if best else "",
             f"results: {join_uri(results_uri, 'trials.parquet')}, epochs.parquet, positions.parquet",
             f"report: {report}" if report else "", timing]
    return "\n".join(p for p in parts if p)


def _write_report(sweep: SweepCfg, results_uri: str, log) -> Path | None:
    if not sweep.report_dir:
        return None
    try:
        from ..report import build_report
    except ImportError:
        return None
    out = Path(sweep.report_dir) / sweep.name
    try:
        return Path(build_report([results_uri], out)).resolve()
    except Exception as e:  # the results are safe; a report can be rebuilt with `kvsweep report`
        log(f"kvsweep: the report could not be built ({e}); the results are complete, rebuild it with: kvsweep report {results_uri} -o {out}")
        return None


def absolute_paths(sweep: SweepCfg) -> SweepCfg:
    """Local model, tokenizer, corpus and data paths made absolute: Ray runs each trial in its own folder."""

    def absolute(value: str | None) -> str | None:
        if value is None:
            return None
        prefix = "tiny:" if value.startswith("tiny:") else ""
        path = Path(value[len(prefix):]).expanduser()
        return prefix + str(path.resolve()) if value[len(prefix):] and path.exists() else value

    model = replace(sweep.model, name=absolute(sweep.model.name), tokenizer=absolute(sweep.model.tokenizer))
    return replace(sweep, model=model, data=replace(sweep.data, source=absolute(sweep.data.source)))


def model_dims(sweep: SweepCfg):
    """Layers, width and heads of the sweep's base, read from its config (no weights loaded)."""
    return dims(model_config(resolve_model(sweep.model)))
