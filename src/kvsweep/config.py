"""Typed, validated configuration.

Every user-facing setting lives in a frozen dataclass here. A bad value raises ``ConfigError`` (a
``ValueError``) naming the field and its valid range when the dataclass is built, before any model or
data is loaded. This module imports neither torch nor ray.
"""

from __future__ import annotations

import codecs
import itertools
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Literal, Union

Count = Union[int, Literal["all"]]

DTYPES = ("float32", "bfloat16", "float16")
SEED_BUCKETS = (0, 16, 32, 64, 96, 128)
"""Bucket bounds of the seed's position-wise table: [0,16) [16,32) [32,64) [64,96) [96,128)."""
SCHEDULERS = ("moasha", "asha", "fifo")  # a sweep's trial schedulers; the first is the default
SEARCHES = ("grid", "random", "optuna")  # how a sweep picks its configurations
DEFAULT_TRAIN_SAMPLES = 10_000  # the seed's; the tiny preset's corpus holds fewer windows, so it trains on all of them


class KvsweepError(Exception):
    """An error caused by the user's input; the CLI prints its message without a traceback."""


class ConfigError(KvsweepError, ValueError):
    """A configuration value outside its valid range."""


class MissingFileError(KvsweepError, FileNotFoundError):
    """A file or folder the user named does not exist."""


def error_reason(e: BaseException) -> str:
    """The first line of an exception's message, for an error that wraps it."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(".")


def cache_dir() -> Path:
    """The folder of kvsweep's caches: ``$KVSWEEP_CACHE``, default ``~/.cache/kvsweep``."""
    return Path(os.environ.get("KVSWEEP_CACHE") or Path.home() / ".cache" / "kvsweep").expanduser()


def parse_count(name: str, value: object, *, allow_zero: bool = False) -> Count:
    """``"all"`` or a positive integer (zero too where ``allow_zero``); strings from the CLI accepted."""
    if isinstance(value, str):
        if value.strip().lower() == "all":
            return "all"
        try:
            value = int(value.replace("_", "").replace(",", ""))
        except ValueError:
            raise ConfigError(f"{name} must be an integer or 'all', got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer or 'all', got {value!r}")
    low = 0 if allow_zero else 1
    if value < low:
        raise ConfigError(f"{name} must be >= {low} or 'all', got {value}")
    return value


def default_train_samples(source: str) -> Count:
    """The train samples a trial of ``kvsweep train`` or a sweep asks for when none are given: ``"all"`` for the
    tiny preset's corpus (``tiny``, ``tiny:PATH``: fewer windows than the seed's number), else 10,000."""
    name = source.strip() if isinstance(source, str) else ""
    return "all" if name == "tiny" or name.startswith("tiny:") else DEFAULT_TRAIN_SAMPLES


def calibration_samples(adapter_options: Iterable[object]) -> int:
    """The most train samples any of these adapters calibrates on before training (0: none does), as each
    adapter's options declare it (``AdapterOptions.calibration_samples``)."""
    return max((int(getattr(options, "calibration_samples", 0)) for options in adapter_options), default=0)


def check_encoding(name: str, value: object) -> str:
    """The canonical name of text encoding ``value`` (``"latin1"`` -> ``"iso8859-1"``).

    Raises:
        ConfigError: ``value`` names no codec Python knows, or one that does not decode bytes to text.
    """
    hint = "a text encoding such as utf-8, latin-1, cp1252 or utf-16"
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{name} must be {hint}; got {value!r}")
    try:
        info = codecs.lookup(value.strip())
    except LookupError:
        raise ConfigError(f"{name}: unknown encoding {value!r}; give {hint}") from None
    if not getattr(info, "_is_text_encoding", True):  # rot13, base64, zlib ...: codecs, but not of text
        raise ConfigError(f"{name}: {value!r} is not a text encoding; give {hint}")
    return info.name


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_seed(seed: object) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")


def default_bucket_bounds(seq_len: int) -> tuple[int, ...]:
    """The seed's bounds for 128-token samples, cut to shorter samples and doubled beyond 128.

    ``seq_len=128`` -> (0, 16, 32, 64, 96, 128); ``64`` -> (0, 16, 32, 64); ``512`` -> (..., 128, 256, 512).
    """
    last = seq_len - 1  # predictions sit at positions 0 .. seq_len - 2; a bucket must start below `last`
    bounds = [b for b in SEED_BUCKETS[:-1] if b < last]
    b = SEED_BUCKETS[-1]
    while b < seq_len:
        if b < last:
            bounds.append(b)
        b *= 2
    bounds.append(seq_len)
    return tuple(bounds)


def position_buckets(seq_len: int, bounds: tuple[int, ...] | None = None) -> list[tuple[int, int]]:
    """Validated ``[lo, hi)`` buckets of prediction positions for samples of ``seq_len`` tokens.

    Position i is the prediction of token i+1 from tokens 0..i, so positions run 0 .. seq_len-2. A bucket
    may reach past the last position (the seed's ``[96, 128)`` holds 96..126 for 128-token samples) but
    must hold at least one position.
    """
    bounds = default_bucket_bounds(seq_len) if bounds is None else tuple(bounds)
    if len(bounds) < 2:
        raise ConfigError(f"buckets needs at least two bounds (one bucket), got {list(bounds)}")
    if any(isinstance(b, bool) or not isinstance(b, int) for b in bounds):
        raise ConfigError(f"buckets must be integers, got {list(bounds)}")
    if bounds[0] < 0:
        raise ConfigError(f"buckets must start at a position >= 0, got {bounds[0]}")
    for lo, hi in zip(bounds, bounds[1:]):
        if hi <= lo:
            raise ConfigError(f"buckets must be strictly increasing, got {list(bounds)} ({lo} then {hi})")
    last = seq_len - 2
    if bounds[-2] > last:
        raise ConfigError(
            f"buckets: bucket [{bounds[-2]}, {bounds[-1]}) holds no prediction; with seq_len {seq_len} "
            f"positions run 0..{last}, so every bucket must start at <= {last}"
        )
    return list(zip(bounds, bounds[1:]))


def parse_bounds(text: str) -> tuple[int, ...]:
    """``"0,16,32,64,96,128"`` -> (0, 16, 32, 64, 96, 128)."""
    try:
        return tuple(int(p) for p in re.split(r"[,\s]+", text.strip()) if p)
    except ValueError:
        raise ConfigError(f"buckets must be comma-separated integers like 0,16,32,64,96,128; got {text!r}") from None


@dataclass(frozen=True)
class ModelCfg:
    """Which frozen base to load and where to put it.

    ``name``: a preset (``tiny``, ``tiny:PATH`` for a tiny model pretrained on your own text,
    ``pythia-70m`` ... ``pythia-12b``, ``-deduped`` too), a hub id (``EleutherAI/pythia-70m``) or a
    local folder holding a saved GPT-NeoX model.
    """

    name: str = "tiny"
    revision: str | None = None
    random_init: bool = False
    tokenizer: str | None = None
    device: str = "auto"
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError("model must name a preset, a hub id or a local folder; got an empty name")
        _check_choice("dtype", self.dtype, DTYPES)
        if not isinstance(self.device, str) or not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps; got {self.device!r}")
        if self.revision is not None and (not isinstance(self.revision, str) or not self.revision.strip()):
            raise ConfigError(f"revision must be a branch, tag or commit (e.g. main, step143000); got {self.revision!r}")
        _check_seed(self.seed)


def _parse_eval_seq_len(value: object) -> int | str | None:
    """``eval_seq_len`` as ``DataCfg`` holds it: an integer >= 2 (strings from the CLI accepted), ``"max"`` or ``None``."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "max":
            return "max"
        try:
            value = int(text.replace("_", "").replace(",", ""))
        except ValueError:
            pass
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 2):
        raise ConfigError(f"eval_seq_len must be an integer >= 2, 'max' (the model's maximum context) or None (seq_len), got {value!r}")
    return value


@dataclass(frozen=True)
class DataCfg:
    """Where samples come from, how many, and how long.

    ``source``: ``tiny`` (or ``tiny:PATH``), ``wikitext-2`` / ``wikitext-103`` (hub presets), a hub
    dataset id (``Salesforce/wikitext``, with ``config_name``), or a local ``.txt``/``.raw``/``.md``,
    ``.jsonl``/``.json`` or ``.parquet`` file. Three disjoint sets of samples: train (``seq_len`` tokens
    each), validation and test (``eval_seq_len`` tokens each). Sources with splits give them from their
    ``train_split``, ``val_split`` and ``test_split``; a single file from three consecutive ranges of its
    tokens: train, then validation (``val_fraction`` of the file's evaluation windows), then test (the last
    ``test_fraction``). ``test_samples`` 0 (or ``test_fraction`` 0 for a file) leaves the test set out.
    ``eval_seq_len``: an integer, ``"max"`` (the model's maximum context, set by ``with_max_positions``
    once the model's config is known) or ``None`` (``seq_len``). ``seed`` picks which windows of each set
    become samples when fewer than all are asked for. ``encoding`` decodes text and JSON Lines files
    (Parquet and hub text is UTF-8 by definition).
    """

    source: str = "tiny"
    config_name: str | None = None
    revision: str | None = None
    train_split: str = "train"
    val_split: str = "validation"
    test_split: str = "test"
    text_field: str = "text"
    seq_len: int = 128
    eval_seq_len: int | Literal["max"] | None = None
    train_samples: Count = 0
    val_samples: Count = "all"
    test_samples: Count = "all"
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0
    encoding: str = "utf-8"

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise ConfigError("data must name a preset, a hub dataset or a local file; got an empty name")
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ConfigError(f"seq_len must be an integer >= 2 (one prediction needs two tokens), got {self.seq_len!r}")
        object.__setattr__(self, "eval_seq_len", _parse_eval_seq_len(self.eval_seq_len))
        object.__setattr__(self, "train_samples", parse_count("train_samples", self.train_samples, allow_zero=True))
        object.__setattr__(self, "val_samples", parse_count("val_samples", self.val_samples))
        object.__setattr__(self, "test_samples", parse_count("test_samples", self.test_samples, allow_zero=True))
        if isinstance(self.val_fraction, bool) or not isinstance(self.val_fraction, (int, float)) or not 0.0 < self.val_fraction <= 1.0:
            raise ConfigError(f"val_fraction must be a number in (0, 1], got {self.val_fraction!r}")
        if isinstance(self.test_fraction, bool) or not isinstance(self.test_fraction, (int, float)) or not 0.0 <= self.test_fraction < 1.0:
            raise ConfigError(f"test_fraction must be a number in [0, 1), got {self.test_fraction!r}")
        if self.val_fraction + self.test_fraction > 1.0 + 1e-12:
            raise ConfigError(f"val_fraction + test_fraction must be <= 1, got {self.val_fraction:g} + {self.test_fraction:g}")
        if self.val_fraction + self.test_fraction >= 1.0 - 1e-12 and self.train_samples != 0:
            raise ConfigError(f"val_fraction {self.val_fraction:g} and test_fraction {self.test_fraction:g} leave no windows for "
                              "training: set train_samples to 0 or lower them")
        _check_seed(self.seed)
        splits = {"train_split": self.train_split, "val_split": self.val_split, "test_split": self.test_split}
        for (a, x), (b, y) in itertools.combinations(splits.items(), 2):
            if x == y:
                raise ConfigError(f"{a} and {b} must differ, both are {x!r}")
        object.__setattr__(self, "encoding", check_encoding("encoding", self.encoding))

    @property
    def eval_len(self) -> int:
        """Tokens per validation and test sample.

        Raises:
            ConfigError: ``eval_seq_len`` is ``"max"`` and was not set from the model (``with_max_positions``).
        """
        if self.eval_seq_len == "max":
            raise ConfigError("eval_seq_len 'max' is the model's maximum context: set it with with_max_positions first")
        return self.seq_len if self.eval_seq_len is None else self.eval_seq_len

    def with_max_positions(self, max_positions: int) -> "DataCfg":
        """This config with ``eval_seq_len`` ``"max"`` set to ``max_positions`` (the model's maximum context)."""
        return replace(self, eval_seq_len=max_positions) if self.eval_seq_len == "max" else self


@dataclass(frozen=True)
class EvalCfg:
    """One evaluation of a frozen base on validation and test samples (of ``data.eval_len`` tokens)."""

    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    batch_size: int = 8
    buckets: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if self.data.eval_seq_len != "max":  # else once the model's maximum is known
            position_buckets(self.data.eval_len, self.buckets)  # validates

    @property
    def bucket_ranges(self) -> list[tuple[int, int]]:
        return position_buckets(self.data.eval_len, self.buckets)


def _check_number(name: str, value: object, *, low: float, low_inclusive: bool, high: float | None = None, integer: bool = False) -> None:
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or value != value:
        raise ConfigError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    too_low = value < low if low_inclusive else value <= low
    if too_low or (high is not None and value > high):
        lo = f">= {low}" if low_inclusive else f"> {low}"
        raise ConfigError(f"{name} must be {lo}{f' and <= {high}' if high is not None else ''}, got {value!r}")


@dataclass(frozen=True)
class TrainCfg:
    """One trial's optimisation: AdamW over adapter parameters only. Defaults are the seed's."""

    lr: float = 1e-4
    batch_size: int = 8
    epochs: int = 30
    patience: int = 3
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    eval_batch_size: int = 16
    cache_dtype: str = "float16"
    amp: str = "auto"
    loss_chunk: int = 0  # >0: the LM loss from hidden states, this many tokens' logits at a time (no KL)
    compile: str = "off"  # torch.compile mode of the training forward: off, default or reduce-overhead (CUDA graphs)

    def __post_init__(self) -> None:
        _check_number("loss_chunk", self.loss_chunk, low=0, low_inclusive=True, integer=True)
        _check_number("lr", self.lr, low=0, low_inclusive=False)
        _check_number("batch_size", self.batch_size, low=1, low_inclusive=True, integer=True)
        _check_number("epochs", self.epochs, low=0, low_inclusive=True, integer=True)
        _check_number("patience", self.patience, low=1, low_inclusive=True, integer=True)
        _check_number("weight_decay", self.weight_decay, low=0, low_inclusive=True)
        _check_number("grad_clip", self.grad_clip, low=0, low_inclusive=True)
        _check_number("eval_batch_size", self.eval_batch_size, low=1, low_inclusive=True, integer=True)
        _check_seed(self.seed)
        _check_choice("cache_dtype", self.cache_dtype, ("float16", "bfloat16", "float32"))
        _check_choice("amp", self.amp, ("auto", "bf16", "off"))
        _check_choice("compile", self.compile, ("off", "default", "reduce-overhead"))


@dataclass(frozen=True)
class SweepCfg:
    """A sweep: the shared base, data and training settings, where it runs and how its scheduler prunes it.

    ``scheduler``: ``moasha`` (multi-objective ASHA on validation PPL and KV bytes/token: the default),
    ``asha`` (on validation PPL alone) or ``fifo`` (every trial runs to its end, or its own early stop); the
    first two stop trials at rungs ``grace_period * reduction_factor**k`` epochs (``kvsweep.tune.scheduler``).

    The searched values (rank, schedule, init, KA variant, seed, ...) are the search space, given
    separately; every trial shares everything here.
    """

    name: str = "vdproj"
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=lambda: DataCfg(train_samples=default_train_samples("tiny")))
    train: TrainCfg = field(default_factory=TrainCfg)
    storage: str = "~/kvsweep_results"
    address: str | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int | None = None
    pack: int = 1  # trials trained together on one copy of the base (1: each trial in its own process)
    packs: int | None = None  # pack processes (None: one per GPU the trials' GPUs fit, else one)
    search: str = "grid"  # grid (every point once), random (num_samples picks) or optuna (num_samples, multi-objective)
    num_samples: int | None = None  # trials of a random or optuna search; None for the grid
    grace_period: int = 1
    reduction_factor: float = 2.0
    scheduler: str = "moasha"
    max_failures: int = 2
    report_dir: str | None = "reports"
    fail_once_at_epoch: int | None = None  # fault injection (tests): every trial crashes once after reporting this epoch
    metrics_port: int | None = None  # a local sweep's Ray exports its Prometheus metrics here (0: a free port); None: none
    verbose: bool = False  # Tune's status tables, Ray's info lines and the trials' own output on the console (not in the specification)
    benchmark_stub_epoch_seconds: float | None = None  # benchmarks/scale.py: no model; trials report synthetic epochs this far apart

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z0-9][\w.-]*", self.name):
            raise ConfigError(f"name must be letters, digits, '.', '_' or '-' (it names the results folder); got {self.name!r}")
        _check_number("cpus_per_trial", self.cpus_per_trial, low=0, low_inclusive=False)
        _check_number("gpus_per_trial", self.gpus_per_trial, low=0, low_inclusive=True)
        if self.max_concurrent is not None:
            _check_number("max_concurrent", self.max_concurrent, low=1, low_inclusive=True, integer=True)
        _check_number("pack", self.pack, low=1, low_inclusive=True, integer=True)
        if self.packs is not None:
            _check_number("packs", self.packs, low=1, low_inclusive=True, integer=True)
        if self.num_samples is not None:
            _check_number("num_samples", self.num_samples, low=1, low_inclusive=True, integer=True)
        _check_choice("search", self.search, SEARCHES)
        if (self.search == "grid") != (self.num_samples is None):
            raise ConfigError(f"num_samples is the budget of a random or optuna search, and the grid has none; got search "
                              f"{self.search!r} with num_samples {self.num_samples}")
        _check_choice("scheduler", self.scheduler, SCHEDULERS)
        _check_number("grace_period", self.grace_period, low=1, low_inclusive=True, integer=True)
        _check_number("reduction_factor", self.reduction_factor, low=1, low_inclusive=False)
        _check_number("max_failures", self.max_failures, low=0, low_inclusive=True, integer=True)
        if self.benchmark_stub_epoch_seconds is not None:
            _check_number("benchmark_stub_epoch_seconds", self.benchmark_stub_epoch_seconds, low=0, low_inclusive=True)
        if self.metrics_port is not None:
            _check_number("metrics_port", self.metrics_port, low=0, low_inclusive=True, high=65535, integer=True)
        if self.pack > 1 and self.train.compile != "off":
            raise ConfigError("compile must be 'off' with pack > 1: a compiled pack recompiles whenever its trials change "
                              "(use --compile for trials alone, or --pack)")
        if self.train.epochs < 1:
            raise ConfigError(f"epochs must be >= 1 for a sweep, got {self.train.epochs}")
        if self.scheduler != "fifo" and self.grace_period > self.train.epochs:
            raise ConfigError(f"grace_period must be in 1..epochs ({self.train.epochs}); got {self.grace_period}")

    @property
    def storage_uri(self) -> str:
        """``storage`` as Ray takes it: a URI stays, a local path becomes absolute."""
        if "://" in self.storage:
            return self.storage
        return str(Path(self.storage).expanduser().resolve())
