"""Ray Tune sweeps with ASHA. The only kvsweep module that imports ray.

``run_sweep(sweep, space)`` validates the whole search space before Ray starts, tokenizes the data and
evaluates the base once on the driver, runs one ``run_trial`` per configuration as a Tune trial
(ASHA on ``val_ppl``, one report and checkpoint per epoch, failed trials restarted from their last
checkpoint), and gathers the results into ``trials.parquet``, ``epochs.parquet`` and
``positions.parquet`` beside the experiment. Running the same sweep again continues it: finished
trials are not run again.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from ..adapters import AdapterSpec, make_adapter
from ..config import ConfigError, SweepCfg, position_buckets
from ..data import Samples, load_samples, resolve_source
from ..evaluate import PositionStats, evaluate
from ..losses import LossCfg
from ..models import Base, check_seq_len, dims, load_base, model_config, resolve_model
from ..results import EPOCH_SCHEMA, POSITION_SCHEMA, SCHEMA_VERSION, TRIAL_SCHEMA, table
from ..train import TrialCfg, TrialError, bucket_key, epoch_rows, git_revision, run_trial

SPACE_FIELDS = {
    "rank": "V-DProj rank (None: no V-DProj)",
    "target": "V-DProj target: v, k or kv",
    "init": "V-DProj init: random, pca or identity",
    "layers": "V-DProj layers: 'all' or indices",
    "ka": "KA variant: none, ka_residual, ka_replace or ka_gated",
    "ka_layers": "KA layers: 'last' or indices",
    "schedule": "named loss schedule",
    "kl_weight": "constant KL weight",
    "seed": "adapter init and batch order",
    "lr": "learning rate",
}
DEFAULT_POINT: dict[str, Any] = {"rank": None, "target": "v", "init": "random", "layers": None, "ka": "none",
                                 "ka_layers": None, "schedule": "lm", "kl_weight": 0.0, "seed": 0, "lr": None}


# --------------------------------------------------------------------------- search space


def trial_cfg(point: dict, sweep: SweepCfg) -> TrialCfg:
    """The typed trial config of one point of the search space (Ray's flat config dict)."""
    unknown = sorted(k for k in point if k not in SPACE_FIELDS)
    if unknown:
        raise ConfigError(f"search space: unknown field {unknown[0]!r}; valid fields: {', '.join(SPACE_FIELDS)}")
    p = {**DEFAULT_POINT, **point}
    specs = []
    if p["rank"] is not None:
        specs.append(AdapterSpec.parse("vdproj", rank=p["rank"], target=p["target"], init=p["init"], layers=p["layers"]))
    if p["ka"] not in (None, "none"):
        specs.append(AdapterSpec.parse(p["ka"], layers=p["ka_layers"]))
    train = replace(sweep.train, seed=p["seed"], lr=p["lr"] if p["lr"] is not None else sweep.train.lr)
    return TrialCfg(model=sweep.model, data=sweep.data, adapters=tuple(specs),
                    loss=LossCfg.named(p["schedule"], kl=p["kl_weight"]), train=train)


def grid_points(space: dict[str, list]) -> list[dict]:
    keys = list(space)
    return [dict(zip(keys, values)) for values in itertools.product(*(space[k] for k in keys))]


def validate_space(space: dict[str, list], sweep: SweepCfg) -> list[TrialCfg]:
    """Check every value of every field, then every combination, against the model; before Ray starts."""
    for key, values in space.items():
        if key not in SPACE_FIELDS:
            raise ConfigError(f"search space: unknown field {key!r}; valid fields: {', '.join(SPACE_FIELDS)}")
        if not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(f"search space: {key} must be a non-empty list of values, got {values!r}")
    source = resolve_model(sweep.model)
    resolve_source(sweep.data)
    config = model_config(source)
    check_seq_len(config, sweep.data.seq_len, sweep.model.name)
    d = dims(config)
    first = {k: v[0] for k, v in space.items()}
    for key, values in space.items():
        for value in values:
            try:
                for spec in trial_cfg({**first, key: value}, sweep).adapters:
                    make_adapter(spec, d)
            except ConfigError as e:
                raise ConfigError(f"search space: {key}={value!r}: {e}") from None
    cfgs = []
    for point in grid_points(space):
        try:
            cfgs.append(trial_cfg(point, sweep))
        except ConfigError as e:
            raise ConfigError(f"search space: the combination {point}: {e}") from None
    return cfgs


def param_space(space: dict[str, list], sweep: SweepCfg) -> dict:
    """Ray's search space: a grid, or random choices when ``num_samples`` is set."""
    if sweep.num_samples is None:
        return {k: tune.grid_search(list(v)) if len(v) > 1 else v[0] for k, v in space.items()}
    return {k: tune.choice(list(v)) if len(v) > 1 else v[0] for k, v in space.items()}


def variant_name(cfg: TrialCfg) -> str:
    """Adapters and schedule, without rank and seed: the colour of a trial in the report."""
    parts = []
    for s in cfg.adapters:
        o = s.options
        parts.append(f"vdproj[{o.target},{o.init}]" if s.name == "vdproj" else s.name)
    return f"{'+'.join(parts) or 'base'} / {cfg.loss.name}"


# --------------------------------------------------------------------------- the trainable (runs in a Ray worker)

_BASES: dict = {}


def _trainable(config: dict, *, sweep: SweepCfg, samples: Samples, base_stats: PositionStats) -> None:
    t_start = time.time()
    import torch

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(max(1, int(sweep.cpus_per_trial)))
    cfg = trial_cfg(config, sweep)
    key = repr(sweep.model)
    if key not in _BASES:  # a reused actor keeps its base
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
            last_epoch["n"] = int(torch.load(resume_from / "state.pt", map_location="cpu", weights_only=False)["state"]["epoch"])

        def report(metrics: dict, ckpt_dir: Path | None) -> None:
            first_step_at = metrics.pop("first_step_at", None)
            if first_step_at is not None and resume_from is None:
                metrics["startup_seconds"] = first_step_at - t_start
            last_epoch["n"] = metrics["epoch"]
            ckpt = tune.Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir is not None else None
            tune.report(dict(metrics), checkpoint=ckpt)
            if fail_at is not None and resume_from is None and metrics["epoch"] == fail_at:
                raise RuntimeError(f"injected fault after epoch {fail_at} (--inject-fault-at-epoch)")

        try:
            run_trial(cfg, report, checkpoint_dir=Path(work) / "checkpoint", resume_from=resume_from, base=base,
                      samples=samples, base_stats=base_stats, log=print)
        except TrialError as e:  # deterministic: end the trial as an error instead of retrying it
            tune.report({"epoch": last_epoch["n"] + 1, "val_ppl": math.inf, "trial_error": str(e)})


# --------------------------------------------------------------------------- results


@dataclass
class TrialRecord:
    """What Tune knows of one trial: its config, every result it reported, and its error, if any."""

    trial_id: str
    config: dict
    results: list[dict] = field(default_factory=list)
    error: str | None = None
    finished: bool = True  # False while Tune still runs (or may resume) the trial


def _status(rec: TrialRecord, max_epochs: int) -> tuple[str, str | None]:
    last = rec.results[-1] if rec.results else {}
    if last.get("trial_error"):
        return "error", str(last["trial_error"])
    if rec.error:
        return "error", rec.error
    if not rec.finished:
        return "running", None
    if last.get("early_stopped"):
        return "early_stopped", None
    if last.get("epoch", 0) >= max_epochs:
        return "completed", None
    return "asha_stopped", None


def _finished_at(rec: TrialRecord) -> str | None:
    """When the trial last reported (ISO 8601, UTC), from Tune's ``timestamp``; ``None`` if it never did."""
    stamps = [r["timestamp"] for r in rec.results if isinstance(r.get("timestamp"), (int, float)) and r["timestamp"] == r["timestamp"]]
    if not stamps:
        return None
    return dt.datetime.fromtimestamp(max(stamps), dt.timezone.utc).isoformat(timespec="seconds")


def build_tables(records: list[TrialRecord], sweep: SweepCfg, base_stats: PositionStats) -> dict[str, pa.Table]:
    """trials, epochs and positions tables of DESIGN.md's schema; each trial exactly once."""
    ranges = position_buckets(sweep.data.seq_len, None)
    base_buckets = base_stats.buckets(ranges)
    trials, epochs, positions = [], [], []
    revision = git_revision()
    seen: set[str] = set()
    for rec in sorted(records, key=lambda r: r.trial_id):  # a stable order, whatever order Tune gives
        if rec.trial_id in seen:
            continue
        seen.add(rec.trial_id)
        cfg = trial_cfg(rec.config, sweep)
        by_epoch: dict[int, dict] = {}
        for r in rec.results:
            if r.get("trial_error") or r.get("epoch") is None or (isinstance(r.get("epoch"), float) and math.isnan(r["epoch"])):
                continue
            by_epoch[int(r["epoch"])] = r  # a restarted trial's repeated epoch counts once
        history = [by_epoch[e] for e in sorted(by_epoch)]
        status, error = _status(rec, sweep.train.epochs)
        best = min(history, key=lambda m: m["val_ppl"]) if history else None
        vd = next((s.options for s in cfg.adapters if s.name == "vdproj"), None)
        ka = next((s.name for s in cfg.adapters if s.name != "vdproj"), None)
        last = history[-1] if history else {}
        trials.append({
            "trial_id": rec.trial_id, "sweep": sweep.name, "variant": variant_name(cfg),
            "adapters": "+".join(s.name for s in cfg.adapters) or "base",
            "rank": vd.rank if vd else None, "target": vd.target if vd else None, "init": vd.init if vd else None,
            "ka": ka, "schedule": cfg.loss.name, "seed": cfg.train.seed,
            "config": json.dumps(cfg.to_dict(), sort_keys=True), "status": status, "error": error,
            "epochs_run": len(history), "max_epochs": sweep.train.epochs,
            "best_epoch": int(best["epoch"]) if best else None,
            "best_val_ppl": best["val_ppl"] if best else math.nan,
            "base_val_ppl": base_stats.ppl,
            "init_val_ppl": last.get("init_val_ppl", math.nan),
            "degradation_pct": 100 * (best["val_ppl"] - base_stats.ppl) / base_stats.ppl if best else math.nan,
            "kv_bytes_per_token": last.get("kv_bytes_per_token_measured", last.get("kv_bytes_per_token")),
            "kv_bytes_per_token_accounted": last.get("kv_bytes_per_token"),
            "kv_bytes_per_token_base": round(last["kv_bytes_per_token"] / last["kv_ratio"]) if last else None,
            "kv_ratio": last.get("kv_ratio"),
            "trainable_params": last.get("trainable_params"),
            "total_params": last.get("total_params"),
            "wall_seconds": float(sum(m.get("seconds", 0.0) for m in history)),
            "git_revision": revision,
            "finished_at": _finished_at(rec),
        })
        epochs += epoch_rows(rec.trial_id, history)
        if best:
            for b in base_buckets:
                ppl = best.get(bucket_key(b["lo"], b["hi"]), math.nan)
                positions.append({"trial_id": rec.trial_id, "lo": b["lo"], "hi": b["hi"], "tokens": b["tokens"], "ppl": ppl,
                                  "base_ppl": b["ppl"], "diff": ppl - b["ppl"], "degradation_pct": 100 * (ppl - b["ppl"]) / b["ppl"]})
    return {"trials": table(trials, TRIAL_SCHEMA), "epochs": table(epochs, EPOCH_SCHEMA), "positions": table(positions, POSITION_SCHEMA)}


def write_tables(tables: dict[str, pa.Table], results_uri: str) -> None:
    """Write each table as ``<name>.parquet`` under ``results_uri`` (a folder or s3:// / gs:// URI)."""
    fs, root = pafs.FileSystem.from_uri(results_uri)
    fs.create_dir(root, recursive=True)
    for name, tbl in tables.items():
        tbl = tbl.replace_schema_metadata({**(tbl.schema.metadata or {}), b"kvsweep_schema": SCHEMA_VERSION.encode()})
        final = f"{root}/{name}.parquet"
        if isinstance(fs, pafs.LocalFileSystem):
            tmp = f"{root}/.{name}.parquet.{os.getpid()}.tmp"
            pq.write_table(tbl, tmp, filesystem=fs)
            fs.move(tmp, final)  # a rename: readers see the old file or the new one
        else:
            pq.write_table(tbl, final, filesystem=fs)  # object stores replace an object in one PUT


class ResultsWriter(tune.Callback):
    """Keeps the Parquet results current while the sweep runs (at most every ``every`` seconds)."""

    def __init__(self, sweep: SweepCfg, base_stats: PositionStats, results_uri: str, every: float = 10.0):
        self.sweep, self.base_stats, self.results_uri, self.every = sweep, base_stats, results_uri, every
        self.records: dict[str, TrialRecord] = {}
        self._last = 0.0

    def get_state(self) -> dict:  # saved with the experiment, so a continued sweep keeps earlier trials
        return {"records": self.records}

    def set_state(self, state: dict) -> None:
        self.records = dict(state.get("records", {}))

    def _record(self, trial) -> TrialRecord:
        rec = self.records.get(trial.trial_id)
        if rec is None:
            rec = self.records[trial.trial_id] = TrialRecord(trial.trial_id, dict(trial.config), finished=False)
        return rec

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._record(trial).results.append(dict(result))
        self._flush()

    def on_trial_error(self, iteration, trials, trial, **info):
        rec = self._record(trial)
        rec.error, rec.finished = "trial failed; see its error file", True
        self._flush(force=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._record(trial).finished = True
        self._flush(force=True)

    def _flush(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.every:
            return
        self._last = now
        try:
            write_tables(build_tables(list(self.records.values()), self.sweep, self.base_stats), self.results_uri)
        except Exception as e:  # never let bookkeeping stop the sweep; the final gather writes again
            print(f"kvsweep: could not update partial results: {e}")


def records_from(grid) -> list[TrialRecord]:
    # Tune's own trial states tell finished trials from those an interrupted fit() left running or pending.
    trials = getattr(getattr(grid, "_experiment_analysis", None), "trials", None)
    states = [t.status for t in trials] if trials is not None and len(trials) == len(grid) else [None] * len(grid)
    out = []
    for r, state in zip(grid, states):
        df = r.metrics_dataframe
        rows = df.to_dict("records") if df is not None and len(df) else ([dict(r.metrics)] if r.metrics else [])
        trial_id = (r.metrics or {}).get("trial_id") or Path(str(r.path)).name
        error = None
        if r.error is not None:
            error = (str(r.error).strip().splitlines() or [type(r.error).__name__])[-1]
        finished = state in (None, "TERMINATED", "ERROR") or r.error is not None
        out.append(TrialRecord(str(trial_id), dict(r.config), rows, error, finished))
    return out


# --------------------------------------------------------------------------- the driver


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
    from transformers.utils import logging as hf_logging

    from ..train import autocast

    hf_logging.disable_progress_bar()
    base = load_base(replace(sweep.model, device="auto"), log=print)
    with autocast(base.device, sweep.train.amp, next(base.model.parameters()).dtype):
        return evaluate(base.model, samples.val, batch_size=sweep.train.eval_batch_size)


def run_sweep(sweep: SweepCfg, space: dict[str, list], *, log: Callable[[str], None] = print,
              callbacks: list | None = None) -> SweepOutcome:
    """Run (or continue) a sweep; return where its results are and the gathered tables."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    sweep = absolute_paths(sweep)
    cfgs = validate_space(space, sweep)  # before Ray starts
    n_trials = sweep.num_samples or len(cfgs)
    log(f"sweep {sweep.name}: {n_trials} trials x up to {sweep.train.epochs} epochs on {sweep.model.name}")
    samples = prepare_samples(sweep, log=log)

    started_ray = not ray.is_initialized()
    if started_ray:
        address = sweep.address or os.environ.get("RAY_ADDRESS")
        ray.init(address=address, log_to_driver=True, include_dashboard=False if address is None else None)
    # once per sweep, with a trial's resources, so that base and trials are measured alike
    base_stats = ray.get(ray.remote(num_cpus=sweep.cpus_per_trial, num_gpus=sweep.gpus_per_trial)(evaluate_base)
                         .remote(sweep, samples))
    log(f"base {sweep.model.name}: val PPL {base_stats.ppl:.4f} on {len(samples.val):,} samples "
        f"({samples.info['source']}); {len(samples.train):,} train samples")
    storage = sweep.storage_uri
    if "://" not in storage and len([n for n in ray.nodes() if n.get("Alive")]) > 1:
        log(f"kvsweep: warning: --storage {storage} is a local path on a cluster of several nodes; unless every "
            "node mounts it, checkpoints and results end up scattered: use s3://..., gs://... or a shared mount")
    experiment_path = f"{storage.rstrip('/')}/{sweep.name}"
    results_uri = experiment_path
    servers: list = []
    max_concurrent = sweep.max_concurrent
    if sweep.pack > 1:
        from .packed import CLIENT_CPUS, packed_trainable, start_servers

        n_packs = sweep.packs or _default_packs(sweep, n_trials)
        servers = start_servers(sweep, samples, base_stats, n_packs)
        max_concurrent = min(max_concurrent or n_packs * sweep.pack, n_packs * sweep.pack)
        log(f"packed: {n_packs} pack process(es) x up to {sweep.pack} trials, each pack with one copy of the base "
            f"({sweep.cpus_per_trial:g} CPU, {sweep.gpus_per_trial:g} GPU)")
        trainable = tune.with_resources(tune.with_parameters(packed_trainable, sweep=sweep, servers=servers),
                                        {"cpu": CLIENT_CPUS})
    else:
        resources = {"cpu": sweep.cpus_per_trial, "gpu": sweep.gpus_per_trial}
        trainable = tune.with_resources(
            tune.with_parameters(_trainable, sweep=sweep, samples=samples, base_stats=base_stats), resources)
    writer = ResultsWriter(sweep, base_stats, results_uri)
    run_config = tune.RunConfig(
        name=sweep.name, storage_path=storage,
        failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        callbacks=[writer, *(callbacks or [])], verbose=1,
    )
    if tune.Tuner.can_restore(experiment_path):
        log(f"continuing the sweep in {experiment_path} (finished trials are not run again)")
        tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   param_space=param_space(space, sweep))
    else:
        scheduler = (ASHAScheduler(time_attr="epoch", max_t=sweep.train.epochs, grace_period=sweep.grace_period,
                                   reduction_factor=sweep.reduction_factor) if sweep.asha else FIFOScheduler())
        tuner = tune.Tuner(
            trainable, param_space=param_space(space, sweep),
            tune_config=tune.TuneConfig(metric="val_ppl", mode="min", scheduler=scheduler,
                                        num_samples=sweep.num_samples or 1, max_concurrent_trials=max_concurrent),
            run_config=run_config,
        )
    t_fit = time.perf_counter()
    grid = tuner.fit()
    fit_seconds = time.perf_counter() - t_fit
    pack_stats = []
    for s in servers:
        try:
            pack_stats.append(ray.get(s.stats.remote(), timeout=60))
        except (ray.exceptions.RayError, TimeoutError):  # figures only: never stop the results for them
            pass
        ray.kill(s)
    if started_ray:
        ray.shutdown()  # also lets the trials' last log lines arrive before the summary
    records = records_from(grid)
    tables = build_tables(records, sweep, base_stats)
    write_tables(tables, results_uri)
    report = _write_report(sweep, results_uri, log)
    summary = summarize(tables["trials"], results_uri, report, throughput(records, fit_seconds, pack_stats))
    log(summary)
    return SweepOutcome(results_uri, experiment_path, tables, report, summary)


def _default_packs(sweep: SweepCfg, n_trials: int) -> int:
    """One pack per ``--gpus-per-trial`` share of the cluster's GPUs (one on CPUs), at most one per K trials."""
    n = 1
    if sweep.gpus_per_trial > 0:
        n = max(1, int(ray.cluster_resources().get("GPU", 0) // sweep.gpus_per_trial))
    return max(1, min(n, math.ceil(n_trials / sweep.pack)))


def throughput(records: list[TrialRecord], fit_seconds: float, pack_stats: list[dict]) -> str:
    """Trials per hour of this run, the trials' start-up times and, for packs, their training tokens/s."""
    epochs = sum(len({r.get("epoch") for r in rec.results if "trial_error" not in r}) for rec in records)
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
    rows = trials.to_pylist()
    by_status = {s: sum(r["status"] == s for r in rows) for s in ("completed", "early_stopped", "asha_stopped", "error")}
    run, grid = sum(r["epochs_run"] for r in rows), sum(r["max_epochs"] for r in rows)
    ok = [r for r in rows if r["status"] != "error" and r["best_val_ppl"] == r["best_val_ppl"]]
    best = min(ok, key=lambda r: r["best_val_ppl"]) if ok else None
    parts = [f"{len(rows)} trials: " + ", ".join(f"{n} {s}" for s, n in by_status.items() if n),
             f"epochs run {run} of {grid} a full grid would run ({100 * run / grid:.0f}%)" if grid else "",
             f"best val PPL {best['best_val_ppl']:.4f} ({best['variant']}, rank {best['rank']}) vs base {best['base_val_ppl']:.4f}" if best else "",
             f"results: {results_uri}/trials.parquet, epochs.parquet, positions.parquet",
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
