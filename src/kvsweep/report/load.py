"""Read one results folder (a local path or a storage URI) and check it is kvsweep results of this schema.

A results folder holds ``trials.parquet`` (required), ``epochs.parquet`` and ``positions.parquet``
(either may be missing while a sweep runs), each written by ``kvsweep.results.write_parquet`` with
``kvsweep_schema`` in its metadata, and, where it is a sweep's folder, the sweep's ``sweep.json`` (its
scheduler and searcher). While a sweep runs (or after it was stopped before its end), the trials that finished
since the tables were last compacted are in ``parts/`` (``kvsweep.results.parts``): they are read too, each trial
once (the newest source that holds it). URIs (``s3://``, ``gs://``, ``file://``, ...) are read through
``pyarrow.fs.FileSystem.from_uri``.

Results before the test split (schema version 3 and older) have no test PPL and no evaluation length: their
``TEST_COLUMNS`` are read as nulls, and their positions, all of validation, get ``split`` "validation".
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, replace

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from ..config import error_reason
from ..results.downstream import DOWNSTREAM_FILE, DOWNSTREAM_SCHEMA
from ..results import EPOCH_SCHEMA, POSITION_SCHEMA, READABLE_VERSIONS, SCHEMA_VERSION, TRIAL_SCHEMA, option_column_names, upgrade
from ..results.parts import PARTS, SEQ_KEY, is_running_part, merge_sources, parse_part, seq_of
from .errors import NoResultsError, NotResultsError, ReportError, SchemaError
from .sweepinfo import SWEEP_FILE, SweepInfo, read_sweep_info

TRIALS, EPOCHS, POSITIONS = "trials.parquet", "epochs.parquet", "positions.parquet"
TEST_COLUMNS = (("test_ppl", pa.float64()), ("base_test_ppl", pa.float64()), ("eval_seq_len", pa.int64()))
"""Columns of trials.parquet since the test split (schema version 4): the best epoch's test PPL, the base's, and
the length of the evaluation samples; read as nulls from older results. The schema's own type wins where it has them."""
SPLIT = pa.field("split", pa.string())  # positions.parquet since schema version 4: "validation" or "test"
PART_RETRIES = 5
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True)
class Results:
    """One results folder: its tables cast to the schema, and what is missing or odd about it."""

    source: str  # as the user gave it
    label: str  # a short name, unique among the sources of one report (the sweep's name if it has one)
    trials: pa.Table  # TRIAL_SCHEMA and the methods' option columns; one row per trial_id (the last one where a folder repeats an id)
    epochs: pa.Table | None  # EPOCH_SCHEMA, or None when the file is missing
    positions: pa.Table | None  # POSITION_SCHEMA with "split", or None when the file is missing
    notes: tuple[str, ...] = ()
    sweep: SweepInfo | None = None  # from sweep.json, where the folder is a sweep's
    downstream: pa.Table | None = None  # DOWNSTREAM_SCHEMA: downstream.parquet (lm-eval scores), where the folder has one


def open_source(source: str) -> tuple[pafs.FileSystem, str]:
    """The file system and the path inside it of a local folder or a storage URI."""
    if _URI.match(source):
        try:
            filesystem, path = pafs.FileSystem.from_uri(source)
        except (pa.ArrowException, OSError, ValueError) as e:
            raise ReportError(f"cannot open {source}: {error_reason(e)}") from None
        return filesystem, path.rstrip("/") or "/"
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(source))


def read_table(filesystem: pafs.FileSystem, path: str, schema: pa.Schema, shown: str, name: str = "") -> pa.Table:
    """A Parquet file of kvsweep's ``schema``, checked for version and columns, upgraded from an older version this
    kvsweep reads, cast to the schema; a trials table keeps its method option columns (``<method>.<option>``)."""
    try:
        with filesystem.open_input_file(path) as f:
            tbl = pq.read_table(f)
    except pa.ArrowInvalid as e:
        raise NotResultsError(f"{shown} is not kvsweep results: not a Parquet file ({error_reason(e)})") from None
    except (OSError, pa.ArrowException) as e:
        raise ReportError(f"cannot read {shown}: {error_reason(e)}") from None
    version = (tbl.schema.metadata or {}).get(b"kvsweep_schema")
    if version is None:
        raise NotResultsError(f"{shown} is not kvsweep results: its metadata has no kvsweep_schema version")
    version = version.decode(errors="replace")
    if version not in READABLE_VERSIONS:
        raise SchemaError(f"{shown} has results schema version {version!r}, but this kvsweep reads versions "
                          f"{', '.join(repr(v) for v in READABLE_VERSIONS)}: make the report with the kvsweep version that wrote the results")
    try:
        tbl = upgrade(name, tbl, version)
    except (pa.ArrowException, ValueError, KeyError) as e:
        raise SchemaError(f"{shown}: cannot read results schema version {version} ({error_reason(e)})") from None
    if name == "trials":
        options = [tbl.schema.field(n) for n in option_column_names(tbl.schema) if n not in schema.names]
        extra = [pa.field(n, t) for n, t in TEST_COLUMNS if n not in schema.names]
        schema = pa.schema(list(schema) + options + extra)
        tbl = _with_nulls(tbl, schema, [n for n, _t in TEST_COLUMNS])  # also where the schema has them and the file predates them
    elif name == "positions":
        if SPLIT.name not in schema.names:
            schema = schema.append(SPLIT)
        if SPLIT.name not in tbl.column_names:
            tbl = tbl.append_column(SPLIT, pa.array(["validation"] * tbl.num_rows, pa.string()))
    missing = [n for n in schema.names if n not in tbl.column_names]
    if missing:
        raise SchemaError(f"{shown} lacks column(s) {', '.join(missing)} of results schema version {SCHEMA_VERSION}")
    seq = (tbl.schema.metadata or {}).get(SEQ_KEY)
    try:
        out = tbl.select(schema.names).cast(schema)
        return out.replace_schema_metadata({SEQ_KEY: seq}) if seq is not None else out  # which flush wrote it (parts)
    except (pa.ArrowException, ValueError) as e:
        raise SchemaError(f"{shown}: column types differ from results schema version {SCHEMA_VERSION} ({error_reason(e)})") from None


def _with_nulls(tbl: pa.Table, schema: pa.Schema, names: list[str]) -> pa.Table:
    """``tbl`` with a null column for each of ``names`` it lacks (typed as in ``schema``)."""
    for n in names:
        if n not in tbl.column_names:
            tbl = tbl.append_column(schema.field(n), pa.nulls(tbl.num_rows, schema.field(n).type))
    return tbl


def _last_row_per_id(tbl: pa.Table) -> tuple[pa.Table, list[str]]:
    ids = tbl.column("trial_id").to_pylist()
    notes = []
    nulls = sum(i is None for i in ids)
    if nulls:
        notes.append(f"{nulls} row(s) of trials.parquet have no trial_id and are left out")
    last = {i: k for k, i in enumerate(ids) if i is not None}
    repeated = sum(c > 1 for c in Counter(i for i in ids if i is not None).values())
    if repeated:
        notes.append(f"{repeated} trial id(s) appear more than once in trials.parquet; the last row of each is used")
    if nulls or repeated:
        tbl = tbl.take(sorted(last.values()))
    return tbl, notes


def load_results(source: str) -> Results:
    """Read and check one results folder; raises a ``ReportError`` with a message for bad input."""
    filesystem, path = open_source(source)
    try:
        info = filesystem.get_file_info(path)
        listing = filesystem.get_file_info(pafs.FileSelector(path)) if info.type == pafs.FileType.Directory else []
    except OSError as e:
        raise ReportError(f"cannot list {source}: {error_reason(e)}") from None
    if info.type == pafs.FileType.NotFound:
        raise NoResultsError(f"no results at {source}: no such folder")
    if info.type != pafs.FileType.Directory:
        raise NotResultsError(f"{source} is a file, not a results folder (give the folder that holds {TRIALS})")
    entries = {e.base_name: e for e in listing}
    if not entries:
        raise NoResultsError(f"{source} is empty: no results yet")
    parts = _part_files(filesystem, f"{path}/{PARTS}") if PARTS in entries else {}
    if TRIALS not in entries and not any(TRIALS in files for files in parts.values()):
        if EPOCHS in entries or parts:
            raise NoResultsError(f"{source} holds {EPOCHS} but no {TRIALS} yet: no trial has finished, so there is no front to report")
        listed = ", ".join(sorted(entries)[:5]) + (", ..." if len(entries) > 5 else "")
        raise NotResultsError(f"{source} is not a kvsweep results folder: it has no {TRIALS} (it holds {listed})")
    shown = source.rstrip("/")
    notes: list[str] = []
    sources = [_read_source(filesystem, path, {n: n for n in (TRIALS, EPOCHS, POSITIONS) if n in entries}, shown)]
    for attempt in range(PART_RETRIES):  # a part merged away while it is read: list again
        try:
            parts_read = [_read_source(filesystem, f"{path}/{PARTS}", files, f"{shown}/{PARTS}") for files in parts.values()]
            break
        except ReportError:
            gone = [n for files in parts.values() for n in files.values()
                    if filesystem.get_file_info(f"{path}/{PARTS}/{n}").type == pafs.FileType.NotFound]
            if not gone or attempt == PART_RETRIES - 1:
                raise
            parts = _part_files(filesystem, f"{path}/{PARTS}")
            sources[0] = _read_source(filesystem, path, {n: n for n in (TRIALS, EPOCHS, POSITIONS) if n in entries}, shown)
    sources += parts_read
    if parts:
        notes.append(f"{sum(map(len, parts.values()))} file(s) in {PARTS}/ read with the tables (a running sweep, or one stopped "
                     f"before its end; `kvsweep compact {shown}` merges them)")
    merged = merge_sources(sources)
    tables: dict[str, pa.Table | None] = {}
    for name in (TRIALS, EPOCHS, POSITIONS):
        tables[name] = merged[name.removesuffix(".parquet")]
        if tables[name] is None:
            notes.append(f"{name} is missing")
    trials, dup_notes = _last_row_per_id(tables[TRIALS])
    notes += dup_notes
    if trials.num_rows == 0:
        raise NoResultsError(f"{shown}/{TRIALS} holds no trials yet")
    sweeps = {s for s in trials.column("sweep").to_pylist() if s}
    label = sweeps.pop() if len(sweeps) == 1 else (os.path.basename(path.rstrip("/")) or shown)
    info = None
    if SWEEP_FILE in entries:
        info, note = read_sweep_info(filesystem, f"{path}/{SWEEP_FILE}")
        notes += [note] if note else []
    downstream = None
    if DOWNSTREAM_FILE in entries:
        downstream = read_table(filesystem, f"{path}/{DOWNSTREAM_FILE}", DOWNSTREAM_SCHEMA, f"{shown}/{DOWNSTREAM_FILE}", "downstream")
    return Results(source=source, label=label, trials=trials, epochs=tables[EPOCHS], positions=tables[POSITIONS],
                   notes=tuple(notes), sweep=info, downstream=downstream)


def _part_files(filesystem: pafs.FileSystem, folder: str) -> dict[str, dict[str, str]]:
    """The parts in ``folder``, by source (a finished part's flushes, or the running part): their files by table file name."""
    try:
        listing = filesystem.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    except OSError:
        return {}
    out: dict[str, dict[str, str]] = {}
    for e in listing:
        part = parse_part(e.base_name)
        if part is not None:
            out.setdefault(f"{part[1]}-{part[2]}", {})[f"{part[0]}.parquet"] = e.base_name
        elif is_running_part(e.base_name):
            out.setdefault("running", {})[e.base_name.split("-")[0] + ".parquet"] = e.base_name
    return out


def _read_source(filesystem: pafs.FileSystem, folder: str, files: dict[str, str], shown: str) -> tuple[int, dict[str, pa.Table]]:
    """One source's tables (by table name) and its seq: its trials file's (or, without one, its newest file's)."""
    tables = {}
    for name, schema in ((TRIALS, TRIAL_SCHEMA), (EPOCHS, EPOCH_SCHEMA), (POSITIONS, POSITION_SCHEMA)):
        if name in files:
            tables[name.removesuffix(".parquet")] = read_table(filesystem, f"{folder}/{files[name]}", schema, f"{shown}/{files[name]}",
                                                               name.removesuffix(".parquet"))
    seqs = {n: seq_of(t.schema.metadata) for n, t in tables.items()}
    return seqs.get("trials", max(seqs.values(), default=-1)), tables


def load_all(sources: list[str]) -> list[Results]:
    """Every source read and checked (the first bad one raises), with labels made unique."""
    if not sources:
        raise NoResultsError("no results given: name at least one results folder or URI")
    results = [load_results(s) for s in sources]
    seen: Counter[str] = Counter()
    out = []
    for r in results:
        seen[r.label] += 1
        label = r.label if seen[r.label] == 1 else f"{r.label}#{seen[r.label]}"
        out.append(replace(r, label=label))
    return out
