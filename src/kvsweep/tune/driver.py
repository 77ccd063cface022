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
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import pyarrow as pa
import ray
from ray import cloudpickle, tune
from ray.tune import ResumeConfig
from ray.tune.schedulers import FIFOScheduler
from ray.tune.search import BasicVariantGenerator
from transformers.utils import logging as hf_logging

from ..adapters import external_methods
from ..adapters.options import canonical_space
from ..config import ConfigError, KvsweepError, SweepCfg
from ..data import Samples, load_samples
from ..evaluate import PositionStats, evaluate
from ..models import load_base
from ..train import autocast
from .guard import StorageGuard
from .local import start_local_ray
from .packed import CLIENT_CPUS, packed_trainable, start_servers
from .scheduler import DurableASHA
from .space import absolute_paths, validate_space
from .spec import SWEEP_FILE, Plan, SpecificationError, SweepRecord, canonical_specification, data_digest, plan, round_points, specification
from .store import StorageFullError, SweepBusyError, SweepStore, is_storage_full, join_uri
from .summary import summarize, throughput
from .trainable import trainable
from .writer import ResultsWriter, TrialRecord, build_tables, has_experiment, load_records, records_from, write_tables

TUNE_FILES = ("experiment_state-", "tuner.pkl", "trials.parquet")  # what an older kvsweep left in a sweep folder
TRAINABLE = "trial"  # one name for unpacked and packed trials: a sweep continued with another --pack resumes its trials


class SweepInterrupted(KvsweepError):
    """The sweep was stopped before its end (Ctrl+C, SIGUSR1): running the same command continues it."""


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
        record = SweepRecord.from_json(data.decode(errors="replace"), f"{store.uri}/{SWEEP_FILE}")
        record.specification = canonical_specification(record.specification)  # its rounds keep the keys they ran with
        return record
    older = [n for n in store.names() if n.startswith(TUNE_FILES)]
    if older:
        raise SpecificationError(f"{store.uri} holds the results of a sweep without a stored specification ({SWEEP_FILE}: "
                                 "an earlier kvsweep wrote them); it cannot be continued safely. Use another --name")
    return None


def _store_record(store: SweepStore, record: SweepRecord) -> None:
    store.write_bytes(SWEEP_FILE, record.to_json().encode())


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
    space = canonical_space(space)  # "rank" and "vdproj.rank" are one field, of one specification
    store = SweepStore(sweep.storage_uri, sweep.name)
    store.check_writable()
    with store.lock(log=log) as lock:
        guard = StorageGuard(store)
        lock.on_lost = lambda why: guard.stop(why, SweepBusyError)  # an object store's lease taken by another driver
        short = guard.shortage()
        if short:
            raise StorageFullError(f"{short}; free some space and run the command again")
        stored = _stored_record(store)
        if stored is not None:  # every field but the data's digest, before the base loads and the data is tokenized
            plan(stored, specification(sweep, space, stored.specification.get("data.digest")), space, sweep, grow=grow,
                 where=store.uri)
        samples = prepare_samples(sweep, log=log)
        the_plan = plan(stored, specification(sweep, space, data_digest(samples)), space, sweep, grow=grow, where=store.uri)
        return _run(sweep, space, store, guard, samples, the_plan, log, callbacks or [])


def _run(sweep: SweepCfg, space: dict, store: SweepStore, guard: StorageGuard, samples: Samples, the_plan: Plan,
         log: Callable[[str], None], callbacks: list) -> SweepOutcome:
    record = the_plan.record
    log(f"sweep {sweep.name}: {the_plan.message}")
    base_stats = record.base_stats()
    by_round = {r.tune: load_records(store, r.tune) for r in record.rounds}  # read once; a round run here is replaced
    this_run: list[TrialRecord] = []
    pack_stats: list[dict] = []
    fit_seconds, since, interrupted = 0.0, 0.0, False
    if not the_plan.todo and base_stats is not None and the_plan.changed:
        _store_record(store, record)  # a grown specification with nothing new to run
    if the_plan.todo or base_stats is None:
        started_ray = not ray.is_initialized()
        if started_ray:
            address = sweep.address or os.environ.get("RAY_ADDRESS")
            if address is None:
                start_local_ray(metrics=sweep.metrics_port is not None, metrics_port=sweep.metrics_port or None)
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
            _store_record(store, record)
            _warn_scattered(sweep, store, log)
            guard.seed(store)
            writer = ResultsWriter(sweep, base_stats, store, guard=guard, records=[rec for rs in by_round.values() for rec in rs],
                                   log=log)
            resources, max_concurrent, servers = _trainable(sweep, samples, base_stats, record, the_plan.todo, log)
            t_fit, since = time.perf_counter(), time.time()
            for index in the_plan.todo:
                analysis = _fit_round(sweep, store, record, index, resources, max_concurrent, [writer, guard, *callbacks], log)
                by_round[record.rounds[index].tune] = ran = records_from(analysis)
                this_run += ran
                record.rounds[index].finished = guard.full is None and all(t.status == "TERMINATED" for t in analysis.trials)
                _store_record(store, record)
                if guard.full is not None:
                    break
                if any(t.status not in ("TERMINATED", "ERROR") for t in analysis.trials):  # Ctrl+C: Tune stopped early
                    interrupted = True
                    break
            fit_seconds = time.perf_counter() - t_fit
            pack_stats = _pack_stats(servers)
        except OSError as e:
            if not is_storage_full(e):
                raise
            guard.full = guard.full or f"a write to {store.uri} failed: {e}"
            by_round.update({record.rounds[i].tune: load_records(store, record.rounds[i].tune) for i in the_plan.todo})
        finally:
            for s in servers:
                ray.kill(s)
            if started_ray:
                ray.shutdown()  # also lets the trials' last log lines arrive before the summary
    tables = build_tables([rec for rs in by_round.values() for rec in rs], sweep, base_stats)
    try:
        write_tables(tables, store)
    except OSError as e:
        if not is_storage_full(e):
            raise
        guard.full = guard.full or f"writing the results to {store.uri} failed: {e}"
    report = _write_report(sweep, store.uri, log) if guard.full is None else None
    summary = summarize(tables["trials"], store.uri, report, throughput(this_run, fit_seconds, pack_stats, since) if this_run else "")
    log(summary)
    if guard.full is not None:
        hint = ". Free some space and run the same command to continue it" if guard.error is StorageFullError else ""
        raise guard.error(f"{guard.full}. The sweep stopped; the results written so far are in {store.uri}{hint}")
    if interrupted:
        raise SweepInterrupted(f"the sweep was interrupted; the results so far are in {store.uri}: run the same command to continue it")
    return SweepOutcome(store.uri, join_uri(store.uri, record.rounds[-1].tune), tables, report, summary)


def _warn_scattered(sweep: SweepCfg, store: SweepStore, log: Callable[[str], None]) -> None:
    if store.local and len([n for n in ray.nodes() if n.get("Alive")]) > 1:
        log(f"kvsweep: warning: --storage {sweep.storage} is a local path on a cluster of several nodes; unless every "
            "node mounts it, checkpoints and results end up scattered: use s3://..., gs://... or a shared mount")


def _trainable(sweep: SweepCfg, samples: Samples, base_stats: PositionStats, record: SweepRecord, todo: list[int],
               log: Callable[[str], None]) -> tuple[dict, int | None, list]:
    """Register the trials' trainable as ``TRAINABLE``; its resources per trial, the concurrency limit, and the
    pack processes (packed sweeps)."""
    methods = shipped_methods()
    if sweep.pack <= 1:
        tune.register_trainable(TRAINABLE, tune.with_parameters(trainable, sweep=sweep, samples=samples, base_stats=base_stats,
                                                                methods=methods))
        return {"cpu": sweep.cpus_per_trial, "gpu": sweep.gpus_per_trial}, sweep.max_concurrent, []
    n_trials = sum(len(round_points(record, i, sweep) or []) or (record.rounds[i].num_samples or 0) for i in todo)
    n_packs = sweep.packs or _default_packs(sweep, max(1, n_trials))
    servers = start_servers(sweep, samples, base_stats, n_packs, methods)
    max_concurrent = min(sweep.max_concurrent or n_packs * sweep.pack, n_packs * sweep.pack)
    log(f"packed: {n_packs} pack process(es) x up to {sweep.pack} trials, each pack with one copy of the base "
        f"({sweep.cpus_per_trial:g} CPU, {sweep.gpus_per_trial:g} GPU)")
    tune.register_trainable(TRAINABLE, tune.with_parameters(packed_trainable, sweep=sweep, servers=servers))
    return {"cpu": CLIENT_CPUS, "gpu": 0}, max_concurrent, servers


def shipped_methods() -> dict:
    """The methods registered here but defined outside kvsweep, pickled by value so that trial processes that
    cannot import their module still get them (the trials register them with ``ensure_registered``)."""
    methods = external_methods()
    for cls in methods.values():
        module = sys.modules.get(cls.__module__)
        if module is not None and cls.__module__ != "__main__":
            cloudpickle.register_pickle_by_value(module)
    return methods


def _tune_value(value):
    """A search-space value as Tune's config holds it: a list of layer indices as ``"0,1,2"`` (Tune's variant
    generator takes lists in a config for nested search spaces)."""
    return ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else value


def _fit_round(sweep: SweepCfg, store: SweepStore, record: SweepRecord, index: int, resources: dict, max_concurrent: int | None,
               callbacks: list, log: Callable[[str], None]):
    """Run (or resume) round ``index`` as one Tune experiment in ``<sweep>/tune-<index>``; its analysis."""
    r = record.rounds[index]
    points = round_points(record, index, sweep)
    space = {k: [_tune_value(v) for v in values] for k, values in r.space.items()}
    config = {k: (tune.choice(v) if len(v) > 1 else v[0]) for k, v in space.items()}
    if points is not None:  # a grid: exactly these configurations
        search = BasicVariantGenerator(points_to_evaluate=[{k: _tune_value(v) for k, v in p.items()} for p in points],
                                       max_concurrent=max_concurrent or 0)
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
    handlers = _signal_handlers()  # Tune installs its own for the run (Ctrl+C, SIGUSR1: stop and save); put ours back
    try:
        return tune.run(
            TRAINABLE, name=r.tune, storage_path=store.root, storage_filesystem=store.fs, resources_per_trial=resources,
            config=config, num_samples=max(1, num_samples or 0), search_alg=search,
            scheduler=scheduler, metric="val_ppl", mode="min", checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            max_failures=sweep.max_failures, callbacks=callbacks, raise_on_failed_trial=False, verbose=1,
            trial_dirname_creator=lambda trial: trial_dirname(trial, r.space),
            resume_config=ResumeConfig(unfinished=ResumeConfig.ResumeType.RESUME, errored=ResumeConfig.ResumeType.RESUME,
                                       finished=ResumeConfig.ResumeType.SKIP) if resume else None,
        )
    finally:
        _restore_signal_handlers(handlers)


def _signal_handlers() -> dict:
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGUSR1)}


def _restore_signal_handlers(handlers: dict) -> None:
    for sig, handler in handlers.items():
        if handler is not None:
            signal.signal(sig, handler)


def trial_dirname(trial, space: dict[str, list]) -> str:
    """``<trainable>_<trial id>_<the searched values>``, e.g. ``trial_4d383_00002_init=random,rank=64``."""
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
