"""The typed metrics train, pack and tune share: one ``EpochReport`` per epoch (``EpochMetrics``, the validation PPL
per position bucket, the trial's ``TrialConstants``) and a ``TrialResult`` at a trial's end. Ray Tune needs flat
dicts: ``EpochReport.to_report`` and ``from_report`` are the one place where the flat names are spelled."""

from __future__ import annotations

import functools
import math
import numbers
import re
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa


def _column(arrow: pa.DataType) -> dict:
    """Field metadata: the Arrow type of the field's column where it is not its Python type's default."""
    return {"arrow": arrow}


ARROW_TYPES = {int: pa.int64(), float: pa.float64(), str: pa.string(), bool: pa.bool_()}
"""The Arrow type of a column of each Python scalar type."""


def optional_inner(tp: Any) -> Any:
    """``int`` for ``int`` and ``int | None``; the one non-None type of an optional; other unions as they are."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def arrow_schema(cls: type, leading: Sequence[tuple[str, pa.DataType]] = (("trial_id", pa.string()),)) -> pa.Schema:
    """The Parquet schema of a dataclass of scalars: ``leading`` columns, then one column per field, in order.

    A field's Arrow type is its metadata's ``arrow`` or that of its Python type (int: int64, float: float64,
    str: string, bool: bool_), optional or not.

    Raises:
        TypeError: a field's type has no Arrow type (a list, say).
    """
    hints = typing.get_type_hints(cls)
    cols = list(leading)
    for f in fields(cls):
        base = optional_inner(hints[f.name])
        if "arrow" in f.metadata:
            cols.append((f.name, f.metadata["arrow"]))
        elif base in ARROW_TYPES:
            cols.append((f.name, ARROW_TYPES[base]))
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no Arrow type for {hints[f.name]}")
    return pa.schema(cols)


@dataclass(frozen=True)
class EpochMetrics:
    """One row of ``epochs.parquet``: a trial after an epoch (epoch 0: its adapters at init, before any step).

    PPLs are per token (exp of the mean NLL); ``loss*`` are the epoch's means over its steps of the loss and its
    components, ``w_*`` the loss weights at the epoch's end; ``None`` where there is nothing to measure
    (no training at epoch 0).
    """

    epoch: int = field(metadata=_column(pa.int32()))
    train_ppl: float | None = None
    val_ppl: float | None = None
    loss: float | None = None
    loss_lm: float | None = None
    loss_rec: float | None = None
    loss_kl: float | None = None
    w_lm: float | None = None
    w_rec: float | None = None
    w_kl: float | None = None
    lr: float | None = None
    steps: int | None = None  # optimizer steps so far
    seconds: float | None = None  # wall time of the epoch (training and evaluation)


SPLITS = ("validation", "test")
"""The evaluation sets a position row may be of (``PositionMetrics.split``)."""


@dataclass(frozen=True)
class PositionMetrics:
    """One row of ``positions.parquet``: PPL of the trial (at its best epoch, chosen on validation) and of the base on
    ``split`` (``validation`` or ``test``) in one position bucket ``[lo, hi)`` of ``tokens`` predictions;
    ``diff = ppl - base_ppl``, ``degradation_pct`` in %."""

    lo: int = field(metadata=_column(pa.int32()))
    hi: int = field(metadata=_column(pa.int32()))
    tokens: int
    ppl: float
    base_ppl: float
    diff: float
    degradation_pct: float
    split: str = "validation"

    @classmethod
    def of(cls, lo: int, hi: int, tokens: int, ppl: float, base_ppl: float, split: str = "validation") -> "PositionMetrics":
        return cls(lo, hi, tokens, ppl, base_ppl, ppl - base_ppl, 100 * (ppl - base_ppl) / base_ppl, split)


@dataclass(frozen=True)
class BucketPPL:
    """A trial's PPL (validation or test) in the position bucket ``[lo, hi)``."""

    lo: int
    hi: int
    ppl: float


BUCKET_PREFIXES = ("", "best_", "test_")
"""The flat names' prefixes of an ``EpochReport``'s buckets: the epoch's validation PPL, the best epoch's, its test PPL."""


def bucket_key(lo: int, hi: int, prefix: str = "") -> str:
    """The flat name of a bucket's PPL in a Tune result: ``<prefix>ppl_pos_<lo>_<hi>`` (a prefix of ``BUCKET_PREFIXES``)."""
    return f"{prefix}ppl_pos_{lo}_{hi}"


_BUCKET_KEYS = {prefix: re.compile(rf"{prefix}ppl_pos_(\d+)_(\d+)", re.ASCII) for prefix in BUCKET_PREFIXES}


def _flat_buckets(buckets: Sequence[BucketPPL], prefix: str) -> dict:
    return {bucket_key(b.lo, b.hi, prefix): b.ppl for b in buckets}


def _read_buckets(flat: Mapping[str, Any], prefix: str) -> tuple[BucketPPL, ...]:
    pattern = _BUCKET_KEYS[prefix]
    found = sorted((int(m.group(1)), int(m.group(2)), float(v)) for k, v in flat.items()
                   if (m := pattern.fullmatch(k)) and _number(v, float) is not None)
    return tuple(BucketPPL(lo, hi, ppl) for lo, hi, ppl in found)


def position_metrics(trial: Sequence[BucketPPL], base: Sequence[Mapping[str, Any]], split: str = "validation") -> list[PositionMetrics]:
    """The trial's PPL per bucket on ``split`` against the base's (``PositionStats.buckets``: ``lo``, ``hi``, ``tokens``,
    ``ppl``), in the base's buckets; NaN where the trial has no PPL for one."""
    ppl = {(b.lo, b.hi): b.ppl for b in trial}
    return [PositionMetrics.of(b["lo"], b["hi"], b["tokens"], ppl.get((b["lo"], b["hi"]), math.nan), b["ppl"], split) for b in base]


@dataclass(frozen=True)
class TrialConstants:
    """What a trial reports with every epoch, the same each time: the base's and the init's validation PPL (and the
    base's test PPL, ``None`` without a test set), KV
    cache bytes per token (accounted by ``kvsweep.kvcache``, and measured in a latent-cache decode), their ratio
    to the base's, and parameters (trainable: the adapters'; total: base and adapters). Read back from results of an
    older kvsweep (``EpochReport.from_report``), a field they lack is ``None``."""

    base_val_ppl: float
    init_val_ppl: float
    kv_bytes_per_token: int
    kv_bytes_per_token_measured: int
    kv_ratio: float
    trainable_params: int
    total_params: int
    fixed_bytes: int | None = None  # what the methods add that does not grow with the context (their weights, ...)
    base_test_ppl: float | None = None


def is_true(value: Any) -> bool:
    """``True`` for a reported flag that is set: a bool or numpy's; ``False`` for anything else (NaN where a
    result lacks the key, as results read back from Tune's files have it)."""
    return isinstance(value, (bool, np.bool_)) and bool(value)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _number(value: Any, kind: type) -> Any:
    """``value`` as ``kind`` (int or float); ``None`` for what is not a number (missing, None, a string), and for a
    NaN or infinite int (pandas' NaN where a result lacks the key). Floats keep NaN and infinities."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    if kind is int:
        return int(value) if math.isfinite(value) else None
    return float(value)


@functools.cache
def _kinds(cls: type) -> tuple[tuple[str, type], ...]:
    """Each field of the dataclass ``cls`` with the number type it holds (resolving the hints once per class: a
    driver parses every result of every trial)."""
    hints = typing.get_type_hints(cls)
    return tuple((f.name, optional_inner(hints[f.name])) for f in fields(cls))


def _parse(cls: type, flat: Mapping[str, Any]) -> dict:
    return {name: _number(flat.get(name), kind) for name, kind in _kinds(cls)}


def _flat(obj: Any) -> dict:
    return {f.name: getattr(obj, f.name) for f in fields(obj) if getattr(obj, f.name) is not None}


@dataclass(frozen=True)
class EpochReport:
    """What a trial reports after an epoch: its metrics, its validation PPL per position bucket, its constants,
    the best epoch so far (chosen on validation; the init, epoch 0, is a candidate) with its validation PPL overall
    and per bucket and its test PPL overall and per bucket (``None`` and empty without a test set), whether it stops
    early; in a sweep also its start-up time (first report) and whether the report repeats a checkpoint's epoch
    (``resumed``). A trial that fails reports only ``epoch``, ``val_ppl`` (inf) and ``error`` (``EpochReport.failed``).

    ``to_report()`` is the flat dict given to ``ray.tune.report`` (and kept in checkpoints); ``from_report`` reads
    one back, also from Tune's result files through pandas (NaN for missing keys, numpy bools).
    """

    metrics: EpochMetrics
    buckets: tuple[BucketPPL, ...] = ()
    trial: TrialConstants | None = None
    best_val_ppl: float | None = None
    early_stopped: bool | None = None
    error: str | None = None
    best_epoch: int | None = None
    best_buckets: tuple[BucketPPL, ...] = ()  # validation PPL per bucket at the best epoch
    test_ppl: float | None = None  # at the best epoch
    test_buckets: tuple[BucketPPL, ...] = ()  # test PPL per bucket at the best epoch
    first_step_at: float | None = None  # time.time() of the trial's first training step
    startup_seconds: float | None = None  # from the trial's start to its first training step
    resumed: bool = False

    @property
    def epoch(self) -> int:
        return self.metrics.epoch

    @property
    def val_ppl(self) -> float | None:
        return self.metrics.val_ppl

    @classmethod
    def failed(cls, epoch: int, error: str) -> "EpochReport":
        """The report of a trial that cannot go on at ``epoch`` (val PPL inf, so that no scheduler prefers it)."""
        return cls(EpochMetrics(epoch=epoch, val_ppl=math.inf), error=error)

    def to_report(self) -> dict:
        """The flat dict of this report: the metrics' fields, ``ppl_pos_<lo>_<hi>`` per bucket, the constants'
        fields, ``best_val_ppl``, ``best_epoch``, ``best_ppl_pos_<lo>_<hi>``, ``test_ppl``, ``test_ppl_pos_<lo>_<hi>``,
        ``early_stopped``, ``trial_error``, ``first_step_at``, ``startup_seconds``, ``resumed`` (only when set); ``None``
        values are left out."""
        out = _flat(self.metrics)
        out.update(_flat_buckets(self.buckets, ""))
        if self.trial is not None:
            out.update(_flat(self.trial))
        out.update(_flat_buckets(self.best_buckets, "best_"))
        out.update(_flat_buckets(self.test_buckets, "test_"))
        extra = {"best_val_ppl": self.best_val_ppl, "best_epoch": self.best_epoch, "test_ppl": self.test_ppl,
                 "early_stopped": self.early_stopped, "trial_error": self.error,
                 "first_step_at": self.first_step_at, "startup_seconds": self.startup_seconds,
                 "resumed": True if self.resumed else None}
        out.update({k: v for k, v in extra.items() if v is not None})
        return out

    @classmethod
    def from_report(cls, flat: Mapping[str, Any]) -> "EpochReport":
        """The report a flat dict holds (``to_report``'s, or a row of Tune's results); keys it lacks are ``None``.

        Raises:
            ValueError: the dict has no epoch (it is no report of a trial's epoch).
        """
        metrics = _parse(EpochMetrics, flat)
        if metrics["epoch"] is None:
            raise ValueError(f"no epoch in the result {dict(flat)!r:.200}")
        constants = _parse(TrialConstants, flat)
        trial = TrialConstants(**constants) if constants["base_val_ppl"] is not None and constants["base_val_ppl"] == constants["base_val_ppl"] else None
        early = flat.get("early_stopped")
        return cls(
            metrics=EpochMetrics(**metrics),
            buckets=_read_buckets(flat, ""),
            trial=trial,
            best_val_ppl=_number(flat.get("best_val_ppl"), float),
            early_stopped=None if early is None or (isinstance(early, float) and early != early) else is_true(early),
            error=_text(flat.get("trial_error")),
            best_epoch=_number(flat.get("best_epoch"), int),
            best_buckets=_read_buckets(flat, "best_"),
            test_ppl=_finite(flat.get("test_ppl")),
            test_buckets=_read_buckets(flat, "test_"),
            first_step_at=_finite(flat.get("first_step_at")),
            startup_seconds=_finite(flat.get("startup_seconds")),
            resumed=is_true(flat.get("resumed")),
        )


def _finite(value: Any) -> float | None:
    v = _number(value, float)
    return v if v is not None and math.isfinite(v) else None


def reports_of(results: Iterable[Mapping[str, Any]]) -> list[EpochReport]:
    """The epoch reports among ``results`` (Tune's rows of a trial), in order; rows without an epoch are left out."""
    out = []
    for r in results:
        try:
            out.append(EpochReport.from_report(r))
        except ValueError:
            continue
    return out


@dataclass(frozen=True)
class TrialResult:
    """A trial at its end: status (``completed``, ``early_stopped`` or ``error`` with ``error``), epochs trained, best
    epoch (chosen on validation; 0: the init) and its validation PPL, the base's and the init's, the best epoch's and
    the base's test PPL (``None`` without a test set), the evaluation samples' length, degradation in % (validation),
    KV cache bytes (per token: accounted and measured, and per layer; the base's), parameters, every epoch's report
    (``history``, epoch 0 first for a trial that started afresh), the best epoch's PPL per position bucket against the
    base's (validation rows, then test rows), and wall seconds."""

    status: str | None
    epochs_run: int
    best_epoch: int
    best_val_ppl: float
    base_val_ppl: float
    init_val_ppl: float
    test_ppl: float | None
    base_test_ppl: float | None
    eval_seq_len: int
    degradation_pct: float
    kv_bytes_per_token: int
    kv_bytes_per_token_measured: int
    kv_bytes_per_layer_measured: list[int]
    kv_bytes_per_token_base: int
    kv_ratio: float
    kv_bytes_per_layer: list[int]
    trainable_params: int
    total_params: int
    fixed_bytes: int
    history: list[EpochReport]
    positions: list[PositionMetrics]
    seconds: float = math.nan
    error: str | None = None

    def to_json(self) -> dict:
        """The result as plain data (without ``history``), as ``trial.json`` holds it."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("history", "positions")}
        out["positions"] = [_flat(p) for p in self.positions]
        return out


