"""Load a trained trial for inference: its base and its adapters with the best epoch's weights.

A trial is either a ``kvsweep train --out DIR`` folder (``trial.json`` and ``checkpoint/``) or one trial of a
sweep's results folder (``<storage>/<name>/``: ``trials.parquet`` names it by ``trial_id``; its checkpoints are
``tune-<k>/trial_<trial_id>_.../checkpoint_<n>/``, of which the newest holds the best epoch's weights).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import pyarrow as pa

from ..adapters import Adapter, AdapterSpec, check_combination, make_adapter
from ..checkpoint import CheckpointError, has_checkpoint, load_best_adapter_states
from ..config import ConfigError, KvsweepError, MissingFileError, ModelCfg
from ..models import Base, Dims, dims, load_base, model_config, resolve_model
from ..report.errors import NotResultsError
from ..report.load import TRIALS, load_results
from ..results.parts import PARTS

TRIAL_FILE = "trial.json"
_CHECKPOINT = re.compile(r"checkpoint_([0-9]+)")
_TUNE = re.compile(r"tune-([0-9]+)")


class UnknownTrialError(KvsweepError, LookupError):
    """A trial id that a sweep's results do not hold."""


class NoCheckpointError(MissingFileError):
    """A trial whose adapters have weights left no checkpoint (never trained, or stopped before its first epoch)."""


@dataclass(frozen=True)
class TrialFigures:
    """What a trial recorded (``trial.json`` of ``kvsweep train``, or its row of ``trials.parquet``); ``None`` where the
    record lacks a figure. PPLs are per token (exp of the mean NLL); bytes are of the cache dtype's KV cache."""

    status: str | None = None
    epochs_run: int | None = None
    best_epoch: int | None = None
    best_val_ppl: float | None = None
    base_val_ppl: float | None = None
    init_val_ppl: float | None = None
    test_ppl: float | None = None
    base_test_ppl: float | None = None
    eval_seq_len: int | None = None  # tokens per validation and test sample
    kv_bytes_per_token: int | None = None
    kv_bytes_per_token_base: int | None = None
    fixed_bytes: int | None = None
    trainable_params: int | None = None
    git_revision: str | None = None

    @classmethod
    def of(cls, record: Mapping[str, Any]) -> "TrialFigures":
        return cls(**{name: record.get(name) for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class TrialRecord:
    """Where one trial's weights are and what it recorded."""

    source: Path  # the kvsweep train folder, or the sweep's results folder
    trial_id: str  # the train folder's name, or the sweep's trial id
    sweep: str | None  # the sweep's name; None for a kvsweep train folder
    config: dict  # the trial's ``TrialCfg.to_dict()``
    checkpoint: Path | None  # the checkpoint folder with the best epoch's weights; None where the trial left none
    figures: TrialFigures


def trial_specs(config: dict) -> tuple[ModelCfg, tuple[AdapterSpec, ...]]:
    """The base and the adapter specs of a trial from its ``TrialCfg.to_dict()``."""
    try:
        model = ModelCfg(**config["model"])
        specs = tuple(AdapterSpec.parse(d["name"], **{k: v for k, v in d.items() if k != "name"}) for d in config["adapters"])
    except (KeyError, TypeError) as e:
        raise ConfigError(f"trial config is not one kvsweep train wrote: {e}") from None
    check_combination(specs)
    return model, specs


def train_record(folder: str | Path) -> TrialRecord:
    """The trial of a ``kvsweep train --out`` folder.

    Raises:
        MissingFileError: no ``trial.json`` in ``folder``.
        ConfigError: ``trial.json`` is not one ``kvsweep train`` wrote.
    """
    folder = Path(folder).expanduser()
    path = folder / TRIAL_FILE
    if not path.is_file():
        raise MissingFileError(f"trial: {path} not found (give a folder written by kvsweep train --out DIR)")
    try:
        record = json.loads(path.read_text())
        config = record["config"]
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"trial: {path} is not one kvsweep train wrote ({e})") from None
    ckpt = folder / "checkpoint"
    return TrialRecord(folder, folder.name, None, config, ckpt if has_checkpoint(ckpt) else None, TrialFigures.of(record))


def is_sweep_results(folder: Path) -> bool:
    """Whether ``folder`` holds a sweep's results: its compacted ``trials.parquet``, or the parts a running (or killed)
    sweep has appended since (``kvsweep.results.parts``)."""
    return (folder / TRIALS).is_file() or (folder / PARTS).is_dir()


def sweep_record(results: str | Path, trial_id: str, *, trials: pa.Table | None = None) -> TrialRecord:
    """Trial ``trial_id`` (as in ``trials.parquet``, or its trial folder's name ``trial_<id>_...``) of the sweep results
    folder ``results``, with its newest checkpoint (over every ``tune-<k>`` folder of the sweep).

    Raises:
        NotResultsError: ``results`` holds no ``trials.parquet`` (or is not a folder).
        UnknownTrialError: no trial of that id (a few known ids are named).
        ReportError: ``trials.parquet`` is damaged or of a schema this kvsweep does not read.

    ``trials``: the folder's trials as ``load_results`` read them, for a caller that looks up several (read once).
    """
    results = Path(results).expanduser()
    if not is_sweep_results(results):
        raise NotResultsError(f"{results} is not a sweep's results folder: it has no {TRIALS} (a kvsweep train folder "
                              "holds trial.json instead; give that folder without a trial id)")
    table = trials if trials is not None else load_results(str(results)).trials
    rows = {r["trial_id"]: r for r in table.to_pylist()}
    wanted = trial_id.strip().rstrip("/").rsplit("/", 1)[-1]
    found = rows.get(wanted) or next((r for i, r in rows.items() if wanted.startswith(f"trial_{i}_") or wanted == f"trial_{i}"), None)
    if found is None:
        known = sorted(rows)
        more = f", ... ({len(known)} in all)" if len(known) > 5 else ""
        raise UnknownTrialError(f"no trial {trial_id!r} in {results / TRIALS}; its trials include {', '.join(known[:5])}{more}")
    tid = found["trial_id"]
    try:
        config = json.loads(found["config"])
    except (TypeError, ValueError) as e:
        raise ConfigError(f"trial {tid} of {results / TRIALS}: its config is not JSON ({e})") from None
    return TrialRecord(results, tid, found.get("sweep"), config, newest_checkpoint(results, tid), TrialFigures.of(found))


def newest_checkpoint(results: Path, trial_id: str) -> Path | None:
    """The newest ``checkpoint_<n>`` of trial ``trial_id`` under ``results/tune-<k>/trial_<id>_*/`` (the highest k, then n);
    ``None`` when it left none."""
    found = []
    for tune in results.glob("tune-*"):
        k = _TUNE.fullmatch(tune.name)
        if k is None:
            continue
        for trial in [*tune.glob(f"trial_{trial_id}_*"), tune / f"trial_{trial_id}"]:
            for ckpt in trial.glob("checkpoint_*") if trial.is_dir() else ():
                n = _CHECKPOINT.fullmatch(ckpt.name)
                if n is not None and has_checkpoint(ckpt):
                    found.append(((int(k[1]), int(n[1])), ckpt))
    return max(found)[1] if found else None


def find_trial(source: str | Path, trial_id: str | None = None) -> TrialRecord:
    """The trial of a ``kvsweep train --out`` folder (``trial_id`` None), or trial ``trial_id`` of a sweep's results folder.

    Raises:
        MissingFileError: ``source`` holds neither ``trial.json`` nor ``trials.parquet``.
        ConfigError: a sweep's results without ``trial_id`` (its trials are named), or a train folder with one.
        UnknownTrialError, NotResultsError, ReportError: as ``sweep_record``.
    """
    source = Path(source).expanduser()
    if (source / TRIAL_FILE).is_file():
        if trial_id is not None:
            raise ConfigError(f"{source} is a kvsweep train folder of one trial: give it without a trial id (got {trial_id!r})")
        return train_record(source)
    if is_sweep_results(source):
        if trial_id is None:
            ids = sorted(r for r in load_results(str(source)).trials.column("trial_id").to_pylist())
            more = f", ... ({len(ids)} in all)" if len(ids) > 5 else ""
            raise ConfigError(f"{source} is a sweep's results folder: name one of its trials (e.g. {', '.join(ids[:5])}{more})")
        return sweep_record(source, trial_id)
    raise MissingFileError(f"{source} holds neither {TRIAL_FILE} (a kvsweep train --out folder) nor {TRIALS} "
                           "(a sweep's results folder)")


def trial_adapters(record: TrialRecord, d: Dims) -> list[Adapter]:
    """The trial's adapters for a base of dims ``d`` (on the CPU, in eval mode) with the best epoch's weights (else the
    last epoch's) from its checkpoint; shapes a calibration allocated come from the weights (no calibration runs).

    Raises:
        NoCheckpointError: the trial left no checkpoint, and its adapters have weights (training-free ones without any need none).
        CheckpointError: the checkpoint is damaged, does not fit the trial's adapters, or is an older kvsweep's pickle
            (refused unread: unpickling can run code).
        ConfigError: the config is not one kvsweep wrote, or has no adapters.
    """
    _, specs = trial_specs(record.config)
    where = _where(record)
    if not specs:
        raise ConfigError(f"{where} has no adapters")
    adapters = [make_adapter(spec, d) for spec in specs]
    if record.checkpoint is None:
        if any(a.state_dict() for a in adapters):
            status = f" (status {record.figures.status})" if record.figures.status else ""
            raise NoCheckpointError(f"{where}{status}: no checkpoint with its weights (was it trained? a trial stopped before "
                                    "its first epoch has none)")
        return [a.eval() for a in adapters]  # training-free methods (no weights): nothing to load
    states, _ = load_best_adapter_states(record.checkpoint)
    if len(states) != len(adapters):
        raise CheckpointError(f"{where}: the checkpoint holds {len(states)} adapters, the config {len(adapters)}")
    for a, spec, sd in zip(adapters, specs, states):
        try:
            a.load_state_dict(sd)
        except RuntimeError as e:  # missing, unexpected or differently shaped weights
            raise CheckpointError(f"{where}: the checkpoint's weights do not fit {spec.name}: {e}") from None
    return [a.eval() for a in adapters]


def _where(record: TrialRecord) -> str:
    return f"trial {record.trial_id}" + (f" of {record.source}" if record.sweep is not None else f" ({record.source})")


def load_record(record: TrialRecord, *, device: str | None = None, log: Callable[[str], None] = print) -> tuple[Base, list[Adapter], dict]:
    """The frozen base, the trial's adapters (``trial_adapters``) on its device and the trial's config. ``device``
    overrides the trial's.

    Raises:
        NoCheckpointError, CheckpointError, ConfigError: as ``trial_adapters``.
    """
    model_cfg, specs = trial_specs(record.config)
    if device is not None:
        model_cfg = replace(model_cfg, device=device)
    adapters = trial_adapters(record, dims(model_config(resolve_model(model_cfg))))  # before the base's weights load
    base = load_base(model_cfg, log=log)
    adapters = [a.to(base.device) for a in adapters]
    names = ", ".join(s.name for s in specs)
    log(f"{names}: no weights, no checkpoint needed" if record.checkpoint is None
        else f"loaded the best epoch's weights of {names} from {record.checkpoint}")
    return base, adapters, record.config


def load_trial(folder: str | Path, *, device: str | None = None, log: Callable[[str], None] = print) -> tuple[Base, list[Adapter], dict]:
    """The frozen base, the adapters with their best epoch's weights and the config of a ``kvsweep train --out`` folder
    (see ``load_record``).

    Raises:
        MissingFileError: no ``trial.json``; NoCheckpointError (a MissingFileError): no checkpoint for adapters with weights.
        CheckpointError, ConfigError: as ``load_record``.
    """
    return load_record(train_record(folder), device=device, log=log)


def load_sweep_trial(results: str | Path, trial_id: str, *, device: str | None = None,
                     log: Callable[[str], None] = print) -> tuple[Base, list[Adapter], dict]:
    """The frozen base, the adapters with the best epoch's weights (from the trial's newest checkpoint) and the config
    (``TrialCfg.to_dict()``) of trial ``trial_id`` (or its trial folder's name) of a sweep's results folder.

    Raises:
        NotResultsError: ``results`` has no ``trials.parquet``.
        UnknownTrialError: the results hold no such trial (a few known ids are named).
        NoCheckpointError: the trial left no checkpoint (e.g. stopped before its first epoch) and its adapters have weights.
        CheckpointError, ConfigError, ReportError: as ``load_record`` and ``sweep_record``.
    """
    return load_record(sweep_record(results, trial_id), device=device, log=log)


def load_any(source: str | Path, trial_id: str | None = None, *, device: str | None = None,
             log: Callable[[str], None] = print) -> tuple[Base, list[Adapter], dict]:
    """``load_trial`` of a ``kvsweep train --out`` folder, or ``load_sweep_trial`` of a sweep's results folder and ``trial_id``.

    Raises:
        MissingFileError: ``source`` is neither; ConfigError: a sweep without ``trial_id`` or a train folder with one;
        and what ``load_trial`` and ``load_sweep_trial`` raise.
    """
    return load_record(find_trial(source, trial_id), device=device, log=log)
