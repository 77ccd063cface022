"""``kvsweep downstream``: lm-evaluation-harness tasks on the base and on trials' adapters, into ``downstream.parquet``.

    run_downstream("~/kvsweep_results/vdproj", DownstreamCfg(tasks=("lambada_openai", "piqa")))       # the base and the front
    run_downstream("runs/r64", DownstreamCfg(tasks=("kvsweep_cloze",), include_path="tests/data/lm_eval"))  # a train folder

The trials are a sweep's Pareto front (every seed of each front point, as ``kvsweep report`` finds it) or named
ones, or the one trial of a ``kvsweep train`` folder. Scoring tasks run the adapted forward, generation tasks the
latent cache (``harness.KvsweepLM``). Source: EleutherAI, lm-evaluation-harness (``lm_eval.simple_evaluate``).
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import lm_eval
import pyarrow as pa
import pyarrow.parquet as pq
from lm_eval.tasks import TaskManager

from ..adapters.options import describe
from ..config import ConfigError, MissingFileError, ModelCfg
from ..latent.trial import TRIAL_FILE, TrialRecord, find_trial, is_sweep_results, sweep_record, trial_adapters, trial_specs
from ..models import dims, load_base
from ..report import Analysis, analyze, load_all
from ..report.load import TRIALS
from ..results import write_parquet
from ..results.downstream import DOWNSTREAM_FILE, DownstreamRow, downstream_table, merge_downstream
from .harness import KvsweepLM

_SKIP = {"alias", "name", "sample_len", " ", ""}


@dataclass(frozen=True)
class DownstreamCfg:
    """What lm-eval runs: ``tasks`` (its names, or those of YAML tasks under ``include_path``), with ``num_fewshot``
    (None: each task's own), ``limit`` (documents per task, or a fraction below 1; None: all), ``batch_size`` (scoring
    requests per forward), on ``device`` (None: each trial's own), the latent cache at ``cache_dtype``.

    Raises:
        ConfigError: no tasks, a batch size below 1, a limit <= 0, a negative few-shot count.
        MissingFileError: ``include_path`` is not a folder.
    """

    tasks: tuple[str, ...]
    include_path: str | None = None
    num_fewshot: int | None = None
    limit: float | None = None
    batch_size: int = 8
    device: str | None = None
    cache_dtype: str = "float16"
    seed: int = 0

    def __post_init__(self):
        if not self.tasks or any(not t.strip() for t in self.tasks):
            raise ConfigError(f"tasks: name at least one lm-eval task, e.g. lambada_openai,piqa; got {list(self.tasks)}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.limit is not None and not self.limit > 0:
            raise ConfigError(f"limit must be > 0 (documents per task, or a fraction below 1), got {self.limit}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ConfigError(f"num_fewshot must be >= 0, got {self.num_fewshot}")
        if self.include_path is not None and not Path(self.include_path).expanduser().is_dir():
            raise MissingFileError(f"include_path: {self.include_path} is not a folder of lm-eval task YAML files")


def task_manager(cfg: DownstreamCfg) -> TaskManager:
    """lm-eval's tasks, with those under ``cfg.include_path``; every name in ``cfg.tasks`` checked.

    Raises:
        ConfigError: a task lm-eval does not know (the closest names are suggested).
    """
    tm = TaskManager(include_path=str(Path(cfg.include_path).expanduser()) if cfg.include_path else None)
    known = set(tm.all_tasks)
    for t in cfg.tasks:
        if t not in known:
            close = difflib.get_close_matches(t, sorted(known), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"lm-eval knows no task {t!r}{hint}; a task of your own: its YAML under --include-path")
    return tm


def score(lm: KvsweepLM, cfg: DownstreamCfg, tm: TaskManager) -> list[dict]:
    """lm-eval's results for ``lm``: one dict per (task or group, metric) with value, stderr, samples, higher_is_better."""
    out = lm_eval.simple_evaluate(model=lm, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot, limit=cfg.limit,
                                  task_manager=tm, log_samples=False, random_seed=cfg.seed, numpy_random_seed=cfg.seed,
                                  torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed, verbosity="ERROR")
    rows = []
    for task, metrics in out["results"].items():
        n = out.get("n-samples", {}).get(task, {}).get("effective")
        hib = out.get("higher_is_better", {}).get(task, {})
        for key, value in metrics.items():
            if key in _SKIP or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            name, _, filt = key.partition(",")
            stderr = metrics.get(f"{name}_stderr,{filt}")
            rows.append({"task": task, "metric": name if filt in ("none", "") else f"{name},{filt}", "value": float(value),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None,
                         "samples": int(n) if n is not None else 0, "higher_is_better": hib.get(name)})
    return rows


def _records(source: str | Path, trials: Sequence[str] | None, front: bool) -> tuple[Path, list[TrialRecord], ModelCfg, str | None]:
    """The folder, the trials to evaluate (checked before any model loads), the base's config and the sweep's name."""
    folder = Path(source).expanduser()
    if (folder / TRIAL_FILE).is_file():
        if trials:
            raise ConfigError(f"{folder} is one trial (a kvsweep train folder): give no trial ids")
        record = find_trial(folder)
        return folder, [record], trial_specs(record.config)[0], None
    if not is_sweep_results(folder):
        raise MissingFileError(f"{source}: neither a sweep's results folder ({TRIALS}) nor a kvsweep train folder ({TRIAL_FILE})")
    results = load_all([str(folder)])  # read once (a running sweep's parts too): the front, the trials, the base
    table = results[0].trials
    ids = list(trials) if trials else list(_front_ids(analyze(results))) if front else []
    records = [sweep_record(folder, t, trials=table) for t in ids]
    if records:
        return folder, records, trial_specs(records[0].config)[0], records[0].sweep
    return folder, [], trial_specs(json.loads(table.column("config")[0].as_py()))[0], table.column("sweep")[0].as_py()


def front_trials(results: str | Path) -> tuple[str, ...]:
    """The trial ids of every seed of each point on the results' Pareto front (val PPL against KV bytes/token), by cost."""
    return _front_ids(analyze(load_all([str(results)])))


def _front_ids(an: Analysis) -> tuple[str, ...]:
    ids = an.column("trial_id")
    return tuple(ids[int(i)] for p in an.front for i in an.points.members[int(p)])


def _rows(scores: list[dict], lm: KvsweepLM, cfg: DownstreamCfg, sweep: str | None, methods: str) -> list[DownstreamRow]:
    kv = lm.kv_bytes_per_token()
    at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return [DownstreamRow(sweep=sweep, task=s["task"], metric=s["metric"], value=s["value"], stderr=s["stderr"], samples=s["samples"],
                          num_fewshot=cfg.num_fewshot, limit=cfg.limit, kv_bytes_per_token=kv, methods=methods,
                          higher_is_better=s["higher_is_better"], lm_eval_version=lm_eval.__version__, evaluated_at=at)
            for s in scores]


def run_downstream(source: str | Path, cfg: DownstreamCfg, *, trials: Sequence[str] | None = None, front: bool = True,
                   base: bool = True, log: Callable[[str], None] = print) -> tuple[Path, pa.Table]:
    """Evaluate ``cfg.tasks`` on the base (``base``) and on the trials — ``trials`` by id, else the front (``front``) —
    of ``source`` (a sweep's results folder, or a ``kvsweep train`` folder); merge the rows into
    ``<source>/downstream.parquet`` (atomically; rows of other trials and tasks are kept). Returns the file and the rows
    of this run.

    Raises:
        ConfigError: an unknown task, trial ids for a train folder, or nothing to evaluate.
        UnknownTrialError: a trial id the results do not hold (checked before any model loads).
        MissingFileError: ``source`` is neither results nor a trial folder; NoCheckpointError (one): a trial with weights
            left no checkpoint (stopped before its first epoch).
        CheckpointError: a trial's checkpoint is damaged.
    """
    folder, records, model, sweep = _records(source, trials, front)
    if not records and not base:
        raise ConfigError("nothing to evaluate: no trials chosen and the base left out")
    tm = task_manager(cfg)
    b = load_base(model if cfg.device is None else replace(model, device=cfg.device), log=log)  # one base for every trial
    pairs: list[tuple[str | None, DownstreamRow]] = []
    if base:
        lm = KvsweepLM(b, [], batch_size=cfg.batch_size, cache_dtype=cfg.cache_dtype)
        rows = _rows(score(lm, cfg, tm), lm, cfg, sweep, "")
        pairs += [(None, r) for r in rows]
        log(f"downstream: base {b.name}: {_brief(rows)}")
    for rec in records:
        adapters = [a.to(b.device) for a in trial_adapters(rec, dims(b.config))]
        lm = KvsweepLM(b, adapters, batch_size=cfg.batch_size, cache_dtype=cfg.cache_dtype)
        rows = _rows(score(lm, cfg, tm), lm, cfg, sweep, describe([a.spec for a in adapters]))
        pairs += [(rec.trial_id, r) for r in rows]
        log(f"downstream: trial {rec.trial_id} ({rows[0].methods if rows else ''}): {_brief(rows)}")
    new = downstream_table(pairs)
    path = folder / DOWNSTREAM_FILE
    old = pq.read_table(path) if path.is_file() else None
    write_parquet(merge_downstream(old, new), path)
    return path, new


def _brief(rows: list[DownstreamRow]) -> str:
    return ", ".join(f"{r.task} {r.metric} {r.value:.4g}" for r in rows)


__all__ = ["DownstreamCfg", "front_trials", "run_downstream", "score", "task_manager"]
