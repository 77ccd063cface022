"""``kvsweep compact RESULTS``: merge a results folder's parts into its three tables.

A sweep compacts its results itself at its end; a sweep that was stopped (killed, out of space, interrupted)
leaves the trials that finished since in ``parts/`` (``kvsweep.results.parts``). Readers merge them at every
read; compacting once makes the folder three files again, which any Parquet reader takes as they are.
It is safe while the sweep runs: the tables are written (atomically) before the parts they hold are removed,
and a part written meanwhile stays.

    kvsweep compact ~/kvsweep_results/vdproj
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from ..atomic import atomic_path
from ..results import with_schema_version
from ..results.parts import PARTS, merge_sources, with_seq
from .errors import NoResultsError, ReportError
from .load import EPOCHS, POSITIONS, TRIALS, _last_row_per_id, _part_files, _read_source, open_source


@dataclass(frozen=True)
class Compacted:
    """What ``compact_results`` did: the parts' files it merged and removed, and the trials the tables hold."""

    files: int
    trials: int


def compact_results(source: str) -> Compacted:
    """Merge the parts of the results folder ``source`` (a local folder or a storage URI) into its ``trials``,
    ``epochs`` and ``positions`` tables, each trial once (its newest rows); then remove the parts merged.

    Raises:
        NoResultsError: ``source`` holds no results.
        ReportError: a file cannot be read or written (``NotResultsError``, ``SchemaError``: not kvsweep results).
    """
    filesystem, path = open_source(source)
    shown = source.rstrip("/")
    parts = _part_files(filesystem, f"{path}/{PARTS}")
    try:
        have = {n for n in (TRIALS, EPOCHS, POSITIONS) if filesystem.get_file_info(f"{path}/{n}").type == pafs.FileType.File}
    except OSError as e:
        raise ReportError(f"cannot list {source}: {e}") from None
    if not have and not parts:
        raise NoResultsError(f"no results at {source}: neither {TRIALS} nor {PARTS}/")
    sources = [_read_source(filesystem, path, {n: n for n in have}, shown)]
    sources += [_read_source(filesystem, f"{path}/{PARTS}", files, f"{shown}/{PARTS}") for files in parts.values()]
    if not parts:
        trials = sources[0][1].get("trials")
        return Compacted(0, trials.num_rows if trials is not None else 0)
    seq = max(s for s, _t in sources)
    merged = merge_sources(sources)
    if merged["trials"] is not None:
        merged["trials"] = _last_row_per_id(merged["trials"])[0]
    for name in (EPOCHS, POSITIONS, TRIALS):  # trials last: no trial's row before its epochs
        tbl = merged[name.removesuffix(".parquet")]
        if tbl is not None:
            _write(filesystem, f"{path}/{name}", with_schema_version(with_seq(tbl, seq)), f"{shown}/{name}")
    names = sorted((n for files in parts.values() for n in files.values()), key=lambda n: not n.startswith("trials-"))
    for n in names:  # trials first: no trial's row without its epochs
        try:
            filesystem.delete_file(f"{path}/{PARTS}/{n}")
        except FileNotFoundError:
            pass
        except OSError as e:
            raise ReportError(f"cannot remove {shown}/{PARTS}/{n}: {e}") from None
    trials = merged["trials"]
    return Compacted(len(names), trials.num_rows if trials is not None else 0)


def _write(filesystem: pafs.FileSystem, path: str, tbl: pa.Table, shown: str) -> None:
    """Replace ``path`` atomically (a local rename; an object store's single PUT)."""
    try:
        if isinstance(filesystem, pafs.LocalFileSystem):
            with atomic_path(path) as tmp:
                pq.write_table(tbl, tmp)
        else:
            sink = pa.BufferOutputStream()
            pq.write_table(tbl, sink)
            with filesystem.open_output_stream(path) as f:
                f.write(sink.getvalue())
    except OSError as e:
        raise ReportError(f"cannot write {shown}: {e}") from None


def add_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Add ``compact`` to the ``kvsweep`` command's subparsers; its ``func`` is ``cmd_compact``."""
    p = subparsers.add_parser(
        "compact", help="merge a results folder's parts/ (a running or stopped sweep's) into trials/epochs/positions.parquet",
        description="Merge the parts a running or stopped sweep appended (parts/*.parquet) into trials.parquet, epochs.parquet "
                    "and positions.parquet, each trial once, then remove the parts. Safe while the sweep runs.")
    p.add_argument("results", metavar="RESULTS", help="a results folder or a storage URI (s3://, gs://, file://)")
    p.set_defaults(func=cmd_compact)
    return p


def cmd_compact(a: argparse.Namespace) -> int:
    done = compact_results(a.results)
    print(f"{a.results}: {done.trials:,} trials; {done.files} part file(s) merged" if done.files else
          f"{a.results}: {done.trials:,} trials; no parts to merge")
    return 0
