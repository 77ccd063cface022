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

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import pyarrow as pa
import ray
from transformers.utils import logging as hf_logging

from ..config import ConfigError, KvsweepError, SweepCfg
from ..data import Samples, load_samples
from ..evaluate import SplitStats, evaluate_splits
from ..models import load_base, load_base_tokenizer
from ..train import autocast
from .console import quiet_ray_start, ray_init_kwargs
from .guard import StorageGuard
from .lock import DriverLock
from .local import start_local_ray
from .rounds import fit_round, pack_stats_of, register_trials
from .space import Space, absolute_paths, canonical, validate_space, with_eval_len
from .spec import SWEEP_FILE, Plan, SpecificationError, SweepRecord, canonical_specification, data_digest, plan, specification
from .store import StorageFullError, SweepBusyError, SweepStore, is_storage_full, join_uri
from .summary import summarize, throughput
from .partwriter import ResultsWriter
from .writer import TrialRecord, build_tables, load_records, records_from, write_tables

TUNE_FILES = ("experiment_state-", "tuner.pkl", "trials.parquet")  # what an older kvsweep left in a sweep folder


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
    """Tokenize the data once, on the driver, for all trials (``sweep.data.eval_seq_len`` already set from the model).
    The driver loads the base's tokenizer and config only, never its weights."""
    tokenizer = load_base_tokenizer(sweep.model, log=log)
    if tokenizer is None:
        raise ConfigError(f"model {sweep.model.name} has no tokenizer; give one with --tokenizer")
    samples = load_samples(sweep.data, tokenizer, log=log)
    if sweep.train.batch_size > len(samples.train):
        raise ConfigError(f"batch_size {sweep.train.batch_size} is larger than the {len(samples.train)} train samples")
    return samples


def evaluate_base(sweep: SweepCfg, samples: Samples) -> SplitStats:
    """The base's validation and test statistics, on a trial's device and in its precision (runs as a Ray task)."""
    hf_logging.disable_progress_bar()
    base = load_base(replace(sweep.model, device="auto"), log=print)
    with autocast(base.device, sweep.train.amp, next(base.model.parameters()).dtype):
        return evaluate_splits(base.model, samples.val, samples.test, batch_size=sweep.train.eval_batch_size)


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


def run_sweep(sweep: SweepCfg, space: Space, *, grow: bool = False, log: Callable[[str], None] = print,
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
    sweep = with_eval_len(absolute_paths(sweep))
    validate_space(space, sweep)
    space = canonical(space)  # "rank" and "vdproj.rank" are one field, of one specification
    store = SweepStore(sweep.storage_uri, sweep.name)
    store.check_writable()
    with DriverLock(store, log=log) as lock:
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


def _run(sweep: SweepCfg, space: Space, store: SweepStore, guard: StorageGuard, samples: Samples, the_plan: Plan,
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
                with quiet_ray_start(sweep.verbose):
                    start_local_ray(metrics=sweep.metrics_port is not None, metrics_port=sweep.metrics_port or None,
                                    **ray_init_kwargs(sweep.verbose))
            else:
                ray.init(address=address, **ray_init_kwargs(sweep.verbose))
        servers: list = []
        try:
            if base_stats is None:  # once per sweep, with a trial's resources, so that base and trials are measured alike
                base_stats = ray.get(ray.remote(num_cpus=sweep.cpus_per_trial, num_gpus=sweep.gpus_per_trial)(evaluate_base)
                                     .remote(sweep, samples))
                record.set_base_stats(base_stats)
            test = f", test PPL {base_stats.test.ppl:.4f} on {len(samples.test):,}" if base_stats.test is not None else ", no test set"
            log(f"base {sweep.model.name}: val PPL {base_stats.val.ppl:.4f} on {len(samples.val):,} samples{test} "
                f"(of {samples.eval_len} tokens, {samples.info['source']}); {len(samples.train):,} train samples")
            _store_record(store, record)
            _warn_scattered(sweep, store, log)
            guard.seed(store)
            writer = ResultsWriter(sweep, base_stats, store, guard=guard, records=[rec for rs in by_round.values() for rec in rs],
                                   log=log)
            resources, max_concurrent, servers = register_trials(sweep, samples, base_stats, record, the_plan.todo, log)
            t_fit, since = time.perf_counter(), time.time()
            for index in the_plan.todo:
                earlier = [rec for r in record.rounds[:index] for rec in by_round.get(r.tune, [])]
                analysis = fit_round(sweep, store, record, index, resources, max_concurrent, [writer, guard, *callbacks], log,
                                     history=earlier)
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
            pack_stats = pack_stats_of(servers)
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
