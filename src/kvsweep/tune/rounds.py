"""One round of a sweep as one Tune experiment: the trials' trainable and resources, the search, the
scheduler, and ``tune.run`` started or resumed in ``<sweep>/tune-<index>``."""

from __future__ import annotations

import fnmatch
import functools
import math
import signal
import sys
import threading
from typing import Callable

import ray
from ray import cloudpickle, tune
from ray.tune import ResumeConfig
from ray.tune.schedulers import TrialScheduler
from ray.tune.search import BasicVariantGenerator

from ..adapters import external_methods
from ..config import SweepCfg
from ..data import Samples
from ..evaluate import SplitStats
from .console import ConsoleCallback, quiet_ray
from .fifo import FIFO
from .moasha import MOASHA
from .packed import CLIENT_CPUS, packed_trainable, start_servers
from .scheduler import DurableASHA
from .search import round_search
from .space import Space, space_values, trial_cfg
from .spec import SweepRecord, round_points
from .store import SweepStore, join_uri
from .tensorboard import TensorBoardCallback
from .trainable import trainable
from .tunefs import tune_filesystem
from .writer import TrialRecord, has_experiment

TRAINABLE = "trial"  # one name for unpacked and packed trials: a sweep continued with another --pack resumes its trials


def register_trials(sweep: SweepCfg, samples: Samples, base_stats: SplitStats, record: SweepRecord, todo: list[int],
               log: Callable[[str], None]) -> tuple[dict, int | None, list]:
    """Register the trials' trainable as ``TRAINABLE``; its resources per trial, the concurrency limit, and the
    pack processes (packed sweeps)."""
    methods = shipped_methods()
    if sweep.pack <= 1:
        tune.register_trainable(TRAINABLE, tune.with_parameters(trainable, sweep=sweep, samples=samples, base_stats=base_stats,
                                                                methods=methods))
        return {"cpu": sweep.cpus_per_trial, "gpu": sweep.gpus_per_trial}, sweep.max_concurrent, []
    n_trials = sum(len(round_points(record, i, sweep) or []) or (record.rounds[i].num_samples or 0) for i in todo)
    n_packs = sweep.packs or default_packs(sweep, max(1, n_trials))
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


def fit_round(sweep: SweepCfg, store: SweepStore, record: SweepRecord, index: int, resources: dict, max_concurrent: int | None,
               callbacks: list, log: Callable[[str], None], history: list[TrialRecord] = ()):
    """Run (or resume) round ``index`` as one Tune experiment in ``<sweep>/tune-<index>``; its analysis.
    ``history``: the trials of the earlier rounds (a multi-objective search starts from them)."""
    r = record.rounds[index]
    points = round_points(record, index, sweep)
    resume = has_experiment(store, r.tune)
    search, config = round_search(sweep, r.space, points, max_concurrent, history,
                                  variant_generator=resume and started_by_variant_generator(store, r.tune))
    num_samples = len(points) if points is not None else r.num_samples
    if resume:
        log(f"resuming {join_uri(store.uri, r.tune)} (finished trials are not run again)")
    elif num_samples:
        log(f"round {index} ({r.tune}): {num_samples} trials x up to {sweep.train.epochs} epochs")
    scheduler = make_scheduler(sweep, store)
    callbacks = [*callbacks, TensorBoardCallback()]  # replaces Tune's default TensorBoard logger
    if not sweep.verbose:  # Tune's status tables (verbose=1) otherwise
        callbacks.append(ConsoleCallback(sweep, searched_fields(r.space), experiment_uri=join_uri(store.uri, r.tune)))
    handlers = _signal_handlers()  # Tune installs its own for the run (Ctrl+C, SIGUSR1: stop and save); put ours back
    try:
        with quiet_ray(sweep.verbose):
            return tune.run(
                TRAINABLE, name=r.tune, storage_path=store.root, storage_filesystem=tune_filesystem(store.fs), resources_per_trial=resources,
                config=config, num_samples=max(1, num_samples or 0), search_alg=search,
                scheduler=scheduler, checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                max_failures=sweep.max_failures, callbacks=callbacks, raise_on_failed_trial=False, verbose=1 if sweep.verbose else 0,
                reuse_actors=True,  # a trial's process serves the next trial with its resources: no second import of torch, and
                # the base stays loaded (kvsweep.tune.trainable); Tune replaces a failed trial's process
                trial_dirname_creator=lambda trial: trial_dirname(trial, r.space),
                resume_config=ResumeConfig(unfinished=ResumeConfig.ResumeType.RESUME, errored=ResumeConfig.ResumeType.RESUME,
                                           finished=ResumeConfig.ResumeType.SKIP) if resume else None,
            )
    finally:
        _restore_signal_handlers(handlers)


def started_by_variant_generator(store: SweepStore, folder: str) -> bool:
    """Whether the Tune experiment in ``<sweep>/<folder>`` holds the state of Ray's variant generator (a grid round
    that an earlier kvsweep started: it continues with it, for the points it has not handed out yet)."""
    return any(fnmatch.fnmatch(n, BasicVariantGenerator.CKPT_FILE_TMPL.format("*")) for n in store.names(folder))


def lm_peak(config: dict, *, sweep: SweepCfg) -> float:
    """The peak of the LM weight schedule of the trial with Tune config ``config`` (the schedulers' LM rule)."""
    return trial_cfg(config, sweep).loss.lm.peak


def make_scheduler(sweep: SweepCfg, store: SweepStore) -> TrialScheduler:
    """The sweep's ``--scheduler``: ``MOASHA``, ``DurableASHA`` (both on ``epoch``, with the LM rule and their state
    in ``store``) or ``FIFO`` (Ray Tune's first-in first-out), on ``val_ppl`` minimised (``tune.run`` gets no metric: a
    multi-objective searcher has its own)."""
    if sweep.scheduler == "fifo":
        scheduler: TrialScheduler = FIFO()
    else:
        cls = MOASHA if sweep.scheduler == "moasha" else DurableASHA
        scheduler = cls(store, max_t=sweep.train.epochs, grace_period=sweep.grace_period, reduction_factor=sweep.reduction_factor,
                        lm_peak=functools.partial(lm_peak, sweep=sweep))
    scheduler.set_search_properties("val_ppl", "min")
    return scheduler


def _signal_handlers() -> dict:
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGUSR1)}


def _restore_signal_handlers(handlers: dict) -> None:
    for sig, handler in handlers.items():
        if handler is not None:
            signal.signal(sig, handler)


def searched_fields(space: Space) -> list[str]:
    """The search-space fields whose values differ between configurations, sorted."""
    values = space_values(space)
    return sorted(k for k in values if len(values[k]) > 1)


def trial_dirname(trial, space: Space) -> str:
    """``<trainable>_<trial id>_<the searched values>``, e.g. ``trial_4d3831f2_init=random,rank=64``."""
    searched = ",".join(f"{k}={trial.config.get(k)}" for k in searched_fields(space))
    name = f"{trial.trainable_name}_{trial.trial_id}" + (f"_{searched}" if searched else "")
    return "".join(c if c.isalnum() or c in "._=,-" else "_" for c in name)[:120]


def pack_stats_of(servers: list) -> list[dict]:
    out = []
    for s in servers:
        try:
            out.append(ray.get(s.stats.remote(), timeout=60))
        except (ray.exceptions.RayError, TimeoutError):  # figures only: never stop the results for them
            pass
    return out


def default_packs(sweep: SweepCfg, n_trials: int) -> int:
    """One pack per ``--gpus-per-trial`` share of the cluster's GPUs (one on CPUs), at most one per K trials."""
    n = 1
    if sweep.gpus_per_trial > 0:
        n = max(1, int(ray.cluster_resources().get("GPU", 0) // sweep.gpus_per_trial))
    return max(1, min(n, math.ceil(n_trials / sweep.pack)))


