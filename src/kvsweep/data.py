"""Samples: loading documents, tokenizing, cutting into windows, and the tokenized cache.

Documents (a text file is one document; a dataset's rows are documents) are tokenized whole, joined by
the tokenizer's EOS token and concatenated; the stream is cut into consecutive non-overlapping windows
(``seq_len`` tokens for training, ``eval_seq_len`` for validation and test) and the remainder dropped.
Sources with splits (hub datasets, ``tiny``) give train, validation and test samples from their three
splits; a single local file gives them from three disjoint, consecutive ranges of its tokens (train, then
validation, then test: ``load_samples``). When fewer samples than windows are asked for, ``seed`` picks
which.

The windows of each (tokenizer, source, split, seq_len) are tokenized once and cached as an Arrow IPC
file under ``$KVSWEEP_CACHE/data``; later loads memory-map it, so a sweep tokenizes once and every
trial shares the pages. Selecting samples by seed is an index operation on the mapped windows.

Text and JSON Lines files are decoded with ``DataCfg.encoding`` (UTF-8 unless told otherwise), which is
part of the cache key; a byte that does not decode is an error naming the file, the byte's offset and
its line. Hub datasets are fetched only after a quick probe finds the hub answering; otherwise they come
from the local datasets cache, or fail at once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

from .atomic import atomic_path
from .config import ConfigError, DataCfg, KvsweepError, error_reason, MissingFileError, cache_dir
from .corpus import tiny_corpus
from .hub import HUB_PROBE_SECONDS, hub_endpoint, hub_reachable

CACHE_FORMAT = 1
TEXT_SUFFIXES = (".txt", ".raw", ".md", ".rst", ".text")
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
# Hub presets: name -> (dataset id, config). WikiText's rows are the lines of its articles (each ending
# in "\n"), not documents; joined back they give the raw release's text, one document per split.
HUB_PRESETS = {
    "wikitext-2": ("Salesforce/wikitext", "wikitext-2-raw-v1"),
    "wikitext-103": ("Salesforce/wikitext", "wikitext-103-raw-v1"),
}


class DataError(KvsweepError, ValueError):
    """The data cannot give what was asked of it."""


@dataclass(frozen=True)
class DataSource:
    """A resolved data source. ``kind``: ``tiny``, ``hub``, ``text``, ``jsonl`` or ``parquet``."""

    kind: str
    ref: str  # tiny corpus path ("" = built-in), hub dataset id, or absolute file path
    config_name: str | None = None
    revision: str | None = None
    encoding: str | None = None  # of a text or JSON Lines file; None where the format fixes it

    @property
    def has_splits(self) -> bool:
        return self.kind in ("tiny", "hub")

    def describe(self) -> str:
        if self.kind == "tiny":
            return f"tiny:{self.ref}" if self.ref else "tiny"
        if self.kind == "hub":
            return f"{self.ref}" + (f" ({self.config_name})" if self.config_name else "")
        return self.ref


def resolve_source(cfg: DataCfg) -> DataSource:
    """Map ``cfg.source`` to a source; raise for a missing file or an unknown preset."""
    name = cfg.source.strip()
    if name == "tiny" or name.startswith("tiny:"):
        corpus = name[len("tiny:"):]
        if corpus and not Path(corpus).expanduser().is_file():
            raise MissingFileError(f"data: tiny corpus file not found: {corpus}")
        return DataSource("tiny", str(Path(corpus).expanduser().resolve()) if corpus else "")
    if name in HUB_PRESETS:
        ds, conf = HUB_PRESETS[name]
        return DataSource("hub", ds, cfg.config_name or conf, cfg.revision)
    path = Path(name).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        for kind, suffixes in (("text", TEXT_SUFFIXES), ("jsonl", JSON_SUFFIXES), ("parquet", PARQUET_SUFFIXES)):
            if suffix in suffixes:
                return DataSource(kind, str(path.resolve()), encoding=None if kind == "parquet" else cfg.encoding)
        raise ConfigError(
            f"data: cannot tell the format of {name}; valid suffixes: text {', '.join(TEXT_SUFFIXES)}; "
            f"JSON Lines {', '.join(JSON_SUFFIXES)}; Parquet {', '.join(PARQUET_SUFFIXES)}"
        )
    if path.is_dir():
        raise ConfigError(f"data: {name} is a folder; name a file (text, JSON Lines or Parquet)")
    if path.suffix.lower() in TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES or name.startswith((".", "/", "~")):
        raise MissingFileError(f"data: file not found: {name}")
    if "/" in name and name.count("/") == 1:
        return DataSource("hub", name, cfg.config_name, cfg.revision)
    if name == "wikitext":
        return DataSource("hub", "Salesforce/wikitext", cfg.config_name or "wikitext-2-raw-v1", cfg.revision)
    raise ConfigError(
        f"data: unknown preset {name!r}; valid presets: tiny, tiny:PATH, {', '.join(HUB_PRESETS)}; "
        "or a hub dataset id (owner/name) or a local file"
    )


# --------------------------------------------------------------------------- documents


def load_documents(source: DataSource, split: str | None, text_field: str = "text") -> list[str]:
    """The documents of one split (``None`` for a single-file source).

    Raises:
        DataError: a file's bytes do not decode in its encoding, a JSON line does not parse or lacks
            ``text_field``, or a hub dataset cannot be loaded.
    """
    if source.kind == "tiny":
        return list(tiny_corpus(source.ref or None)[split])
    encoding = source.encoding or "utf-8"
    if source.kind == "text":
        try:
            return [Path(source.ref).read_text(encoding=encoding)]
        except UnicodeDecodeError:
            raise _decode_error(source.ref, encoding) from None
    if source.kind == "jsonl":
        docs = []
        try:
            with open(source.ref, encoding=encoding) as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        docs.append(_text_of(_json_row(line, source.ref, n), text_field, f"{source.ref} line {n}"))
        except UnicodeDecodeError:
            raise _decode_error(source.ref, encoding) from None
        return docs
    if source.kind == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(source.ref)
        if text_field not in table.column_names:
            raise DataError(f"data: {source.ref} has no column {text_field!r} (text_field); columns: {table.column_names}")
        return [t for t in table.column(text_field).to_pylist() if t is not None]
    return _hub_documents(source, split, text_field)


def _decode_error(path: str, encoding: str) -> DataError:
    """The error for a file whose bytes do not decode: the first bad byte's offset (bytes from the start) and line."""
    raw = Path(path).read_bytes()
    try:
        raw.decode(encoding)
    except UnicodeDecodeError as e:
        before = raw[: e.start].decode(encoding, errors="replace")  # the bytes before the first bad one
        line = before.count("\n") + before.count("\r") - before.count("\r\n") + 1
        return DataError(
            f"data: {path} is not {encoding} text: byte 0x{raw[e.start]:02x} at offset {e.start} (line {line}) "
            f"cannot be decoded ({e.reason}); give the file's encoding with --encoding (e.g. --encoding latin-1 or cp1252)"
        )
    return DataError(f"data: {path} does not decode as {encoding}; give the file's encoding with --encoding")


def _json_row(line: str, path: str, n: int) -> object:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"data: {path} line {n} is not JSON ({e.msg} at column {e.colno}); JSON Lines hold one object per line") from None


def _text_of(row: dict, text_field: str, where: str) -> str:
    if not isinstance(row, dict) or text_field not in row:
        raise DataError(f"data: {where} has no field {text_field!r} (text_field)")
    return str(row[text_field])


def _hub_documents(source: DataSource, split: str, text_field: str) -> list[str]:
    """A hub dataset's split; with the hub unreachable (a quick probe, unless offline) from the local cache only."""
    import datasets

    offline = datasets.config.HF_HUB_OFFLINE
    unreachable = not offline and not hub_reachable()
    try:
        datasets.config.HF_HUB_OFFLINE = offline or unreachable  # read at each call: the cache alone, no retries
        ds = datasets.load_dataset(source.ref, source.config_name, split=split, revision=source.revision)
    except Exception as e:
        reason = (f"the hub at {hub_endpoint()} cannot be reached (no answer within {HUB_PROBE_SECONDS:g} s) and the local "
                  "datasets cache does not hold it") if unreachable else error_reason(e)
        raise DataError(
            f"data: cannot load split {split!r} of {source.describe()} from the Hugging Face hub: {reason}. "
            "Without the hub, use a local file (--data PATH: text, JSON Lines or Parquet) or --data tiny."
        ) from e
    finally:
        datasets.config.HF_HUB_OFFLINE = offline
    if text_field not in ds.column_names:
        raise DataError(f"data: {source.describe()} has no column {text_field!r} (text_field); columns: {ds.column_names}")
    rows = ds[text_field]
    if source.ref.endswith("wikitext"):
        return ["".join(rows)]  # rows are lines; the split's text is one document
    return rows


def source_fingerprint(source: DataSource, split: str | None, text_field: str) -> str:
    """A digest that changes whenever the documents of this split would change (the file's encoding included)."""
    key = [source.kind, source.ref, source.config_name, source.revision, split, text_field]
    h = hashlib.sha256(json.dumps(key + ([source.encoding] if source.encoding is not None else [])).encode())
    if source.kind in ("text", "jsonl", "parquet"):
        with open(source.ref, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    elif source.kind == "tiny":
        for doc in tiny_corpus(source.ref or None)[split]:
            h.update(doc.encode())
            h.update(b"\0")
    return h.hexdigest()


# --------------------------------------------------------------------------- tokenization


def tokenizer_fingerprint(tokenizer) -> str:
    """A digest of the tokenizer's full definition (vocabulary, merges, normalisation) and its EOS."""
    backend = tokenizer.backend_tokenizer.to_str()
    return hashlib.sha256(f"{backend}\0{tokenizer.eos_token_id}".encode()).hexdigest()


def tokenize_stream(documents, tokenizer) -> np.ndarray:
    """Token ids of the documents, each tokenized whole, joined by EOS: (n_tokens,) int32."""
    if tokenizer.eos_token_id is None:
        raise ConfigError("tokenizer has no EOS token; kvsweep joins documents with it")
    eos = np.array([tokenizer.eos_token_id], dtype=np.int32)
    parts: list[np.ndarray] = []
    for i, enc in enumerate(tokenizer.backend_tokenizer.encode_batch(list(documents), add_special_tokens=False)):
        if i:
            parts.append(eos)
        parts.append(np.asarray(enc.ids, dtype=np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def to_windows(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """Consecutive non-overlapping windows, the remainder dropped: (n_tokens,) -> (n_windows, seq_len)."""
    n = len(stream) // seq_len
    return stream[: n * seq_len].reshape(n, seq_len)


# --------------------------------------------------------------------------- cache


@dataclass
class Windows:
    """All windows of one split, memory-mapped from the cache: ``ids`` is (n_windows, seq_len) int32."""

    ids: np.ndarray
    tokens: int  # tokens in the stream before the remainder was dropped
    path: Path
    cache_hit: bool


def load_windows(source: DataSource, split: str | None, text_field: str, tokenizer, seq_len: int,
                 *, log: Callable[[str], None] = print) -> Windows:
    """The split's windows from the cache, tokenizing (once) on a miss."""
    key = hashlib.sha256(
        json.dumps([CACHE_FORMAT, tokenizer_fingerprint(tokenizer), source_fingerprint(source, split, text_field), seq_len]).encode()
    ).hexdigest()[:24]
    path = cache_dir() / "data" / f"{key}.arrow"
    hit = path.is_file()
    if not hit:
        from filelock import FileLock

        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            if not path.is_file():  # another process may have written it while we waited
                docs = load_documents(source, split, text_field)
                stream = tokenize_stream(docs, tokenizer)
                _write_windows(path, to_windows(stream, seq_len), len(stream), source, split)
                log(f"tokenized {source.describe()}{f' [{split}]' if split else ''}: {len(docs):,} documents, "
                    f"{len(stream):,} tokens, {len(stream) // seq_len:,} windows of {seq_len} -> {path}")
            else:
                hit = True
    ids, tokens = _read_windows(path, seq_len)
    return Windows(ids=ids, tokens=tokens, path=path, cache_hit=hit)


def _write_windows(path: Path, windows: np.ndarray, tokens: int, source: DataSource, split: str | None) -> None:
    n, seq_len = windows.shape
    flat = pa.array(np.ascontiguousarray(windows).reshape(-1), type=pa.int32())
    column = pa.FixedSizeListArray.from_arrays(flat, seq_len)
    meta = {"kvsweep_format": str(CACHE_FORMAT), "tokens": str(tokens), "source": source.describe(), "split": str(split)}
    table = pa.table({"input_ids": column}).replace_schema_metadata(meta)
    with atomic_path(path) as tmp:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)


def _read_windows(path: Path, seq_len: int) -> tuple[np.ndarray, int]:
    table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    tokens = int(table.schema.metadata[b"tokens"])
    column = table.column("input_ids").combine_chunks()
    if len(column) == 0:
        return np.zeros((0, seq_len), dtype=np.int32), tokens
    ids = column.flatten().to_numpy(zero_copy_only=True).reshape(-1, seq_len)  # (n_windows, seq_len), mapped
    return ids, tokens


# --------------------------------------------------------------------------- samples


@dataclass
class Samples:
    """Train, validation and test samples, int32: ``train`` (N_train, T), ``val`` (N_val, E), ``test`` (N_test, E), with
    T the train length (``seq_len``) and E the evaluation length (``eval_seq_len``); ``test`` is (0, E) when the test
    set is left out."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.test is None:
            self.test = np.zeros((0, self.val.shape[1]), dtype=np.int32)

    @property
    def eval_len(self) -> int:
        """Tokens per validation and test sample."""
        return int(self.val.shape[1])


def select(n_windows: int, count, seed: int, stream: int) -> np.ndarray:
    """Indices of ``count`` windows out of ``n_windows``, picked by ``seed``; all of them for ``"all"``."""
    if count == "all":
        return np.arange(n_windows)
    rng = np.random.default_rng([seed, stream])
    return np.sort(rng.permutation(n_windows)[:count])


_TRAIN, _VAL, _TEST = 0, 1, 2  # the random streams that pick each set's samples


def _check_enough(what: str, count, n: int, tokens: int, seq_len: int, where: str, hint: str = "") -> None:
    """Raise when ``where`` (with ``n`` windows from ``tokens`` tokens) cannot give ``count`` samples."""
    asked = max(n, 1) if count == "all" else count
    if asked > n:
        raise DataError(
            f"data: {where} has {tokens:,} tokens ({n:,} windows of {seq_len}), but {asked:,} {what} samples "
            f"of {seq_len} tokens ({asked * seq_len:,} tokens) were asked for; ask for at most {n:,}{hint}"
        )


def _train_samples(ids: np.ndarray, n: int, tokens: int, cfg: DataCfg, used: int | None, where: str) -> np.ndarray:
    """The train samples out of the train windows ``ids[:n]`` (``tokens`` tokens); see ``load_samples``."""
    T = cfg.seq_len
    if used is None:
        _check_enough("train", cfg.train_samples, n, tokens, T, where)
        return ids[select(n, cfg.train_samples, cfg.seed, _TRAIN)]
    if n == 0:
        raise DataError(f"data: {where} has no windows of {T} tokens, but calibrating the adapters takes up to {used:,} "
                        "train samples; use a longer source, a shorter seq_len, or an init that needs no data")
    count = n if cfg.train_samples == "all" else min(cfg.train_samples, n)
    return ids[select(n, count, cfg.seed, _TRAIN)[:used]]  # the first of the samples a trained run selects


def _held_out(ids: np.ndarray, lo: int, hi: int, count, stream: int, cfg: DataCfg, what: str, where: str, hint: str = "") -> np.ndarray:
    """``count`` samples of a validation or test set out of the evaluation windows ``ids[lo:hi]``."""
    E = ids.shape[1]
    _check_enough(what, count, hi - lo, (hi - lo) * E, E, where, hint)
    return ids[lo + select(hi - lo, count, cfg.seed, stream)]


def load_samples(cfg: DataCfg, tokenizer, *, log: Callable[[str], None] = print, train_used: int | None = None) -> Samples:
    """Train, validation and test samples as DESIGN.md defines them, through the tokenized cache.

    Train samples are windows of ``cfg.seq_len`` tokens, validation and test samples windows of
    ``cfg.eval_len``. A source with splits gives each set from its own split. A single file is cut into three
    consecutive ranges of tokens: its ``E``-token evaluation windows (E = ``eval_len``) are counted, the last
    ``test_fraction`` of them are the test range, the ``val_fraction`` before those the validation range, and the
    tokens before that are the train range (cut into ``seq_len``-token windows); a window never crosses from one
    range into another. The ranges depend on the fractions only, not on how many samples are asked for; with
    ``test_samples`` 0 (or ``test_fraction`` 0) the test set is empty. ``seed`` picks the samples of each set
    independently.

    ``train_used``: for a trial that uses only the first train samples (one that evaluates without
    training calibrates on at most this many), the same samples are selected as without it and the
    first ``train_used`` kept: fewer when the source has fewer, none loaded when it is 0.

    ``info`` says where the samples came from: ``source``, ``seq_len``, ``eval_seq_len``, ``seed``, the splits
    (``train_split``, ``val_split``, ``test_split``, ``val_windows``, ``test_windows``) or, for a single file,
    ``val_range`` and ``test_range`` (in evaluation windows, [lo, hi)), ``eval_windows``, ``train_range`` (in
    train windows) and ``total_tokens``; and the number of samples of each set.

    Raises:
        DataError: the source has fewer windows than asked for (a single file: in its range), a file does
            not decode, or a hub dataset cannot be loaded (a missing test split: with a hint to leave it out).
        MissingFileError, ConfigError: from ``resolve_source``; ``eval_seq_len`` still ``"max"``.
    """
    source = resolve_source(cfg)
    T, E = cfg.seq_len, cfg.eval_len
    info: dict = {"source": source.describe(), "seq_len": T, "eval_seq_len": E, "seed": cfg.seed}
    none = np.zeros((0, T), dtype=np.int32)
    test = np.zeros((0, E), dtype=np.int32)
    wants_train = cfg.train_samples != 0 and train_used != 0
    if source.has_splits:
        val_w = load_windows(source, cfg.val_split, cfg.text_field, tokenizer, E, log=log)
        val = _held_out(val_w.ids, 0, len(val_w.ids), cfg.val_samples, _VAL, cfg, "validation",
                        f"{source.describe()} [{cfg.val_split}]")
        hits = [val_w.cache_hit]
        info.update(val_split=cfg.val_split, val_windows=len(val_w.ids), test_split=None, test_windows=0)
        if cfg.test_samples != 0:
            try:
                test_w = load_windows(source, cfg.test_split, cfg.text_field, tokenizer, E, log=log)
            except DataError as e:
                raise DataError(f"{e} (to evaluate without a test set, give test_samples 0: --test-samples 0)") from e
            test = _held_out(test_w.ids, 0, len(test_w.ids), cfg.test_samples, _TEST, cfg, "test",
                             f"{source.describe()} [{cfg.test_split}]")
            hits.append(test_w.cache_hit)
            info.update(test_split=cfg.test_split, test_windows=len(test_w.ids))
        train = none
        if wants_train:
            train_w = load_windows(source, cfg.train_split, cfg.text_field, tokenizer, T, log=log)
            train = _train_samples(train_w.ids, len(train_w.ids), train_w.tokens, cfg, train_used,
                                   f"{source.describe()} [{cfg.train_split}]")
            hits.append(train_w.cache_hit)
        info.update(train_split=cfg.train_split)
    else:
        ev = load_windows(source, None, cfg.text_field, tokenizer, E, log=log)
        n = len(ev.ids)
        n_val = min(n, max(1, round(n * cfg.val_fraction))) if n else 0  # validation first: a trial needs it, test it may lack
        n_test = min(n - n_val, max(1, round(n * cfg.test_fraction))) if n > n_val and cfg.test_fraction > 0 else 0
        lo, hi = n - n_test - n_val, n - n_test  # evaluation windows [0, lo) train, [lo, hi) validation, [hi, n) test
        whole = cfg.val_fraction == 1
        where = source.describe() if whole else \
            f"the validation range ({cfg.val_fraction:g} of the windows of {E}, before the test range) of {source.describe()}"
        val = _held_out(ev.ids, lo, hi, cfg.val_samples, _VAL, cfg, "validation", where, "" if whole else " (or raise val_fraction)")
        if cfg.test_samples != 0 and cfg.test_fraction > 0:
            test = _held_out(ev.ids, hi, n, cfg.test_samples, _TEST, cfg, "test",
                             f"the test range (the last {cfg.test_fraction:g} of the windows of {E}) of {source.describe()}",
                             " (or raise test_fraction)")
        hits = [ev.cache_hit]
        train, n_train = none, (lo * E) // T  # the train windows that end before the validation range starts
        if wants_train:
            tw = ev if T == E else load_windows(source, None, cfg.text_field, tokenizer, T, log=log)
            train = _train_samples(tw.ids, n_train, n_train * T, cfg, train_used,
                                   f"the train range (the first {1 - cfg.val_fraction - cfg.test_fraction:g} of the file) "
                                   f"of {source.describe()}")
            hits.append(tw.cache_hit)
        info.update(val_range=[lo, hi], test_range=[hi, n], eval_windows=n, train_range=[0, n_train], total_tokens=ev.tokens)
    info.update(train_samples=len(train), val_samples=len(val), test_samples=len(test), cache_hit=all(hits))
    return Samples(train=train, val=val, test=test, info=info)
