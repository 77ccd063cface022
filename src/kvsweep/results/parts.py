"""A results folder while its sweep runs: the compacted tables and the parts appended since.

    <folder>/trials.parquet, epochs.parquet, positions.parquet   compacted: every trial up to some flush
    <folder>/parts/<table>-<first>-<last>.parquet                 the trials that finished in flushes first..last
    <folder>/parts/<table>-running.parquet                        the trials still running at the last flush

A finished trial's rows are final, so the driver appends them once, as a part, and rewrites only the small
running part (bounded by the trials running at once); parts are merged ``FAN_IN`` at a time into larger ones,
at most ``MERGE_LEVELS`` times per row, and compacted into the three single files at the sweep's end (and by
``kvsweep compact``). Each file carries the flush that wrote it (``kvsweep_seq`` in its metadata; a file
without one, from an older kvsweep, counts as -1): a trial's rows are those of the set of files (a *source*:
the compacted files, one part, or the running part) with the highest seq that holds the trial, so a reader
sees every trial once at any moment, whatever it lists between two writes. ``merge_sources`` does this for
readers; with pyarrow alone (no deduplication, which only matters while a trial appears in two sources)::

    files = [f"{folder}/trials.parquet", *glob(f"{folder}/parts/trials-*.parquet")]
    pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")  # option columns differ by part

or in DuckDB ``SELECT * FROM read_parquet(['<folder>/trials.parquet', '<folder>/parts/trials-*.parquet'],
union_by_name=true)``. Pure pyarrow: the report (no Ray, no torch) and the writer share it.
"""

from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.compute as pc

PARTS = "parts"  # the folder of the parts, inside the results folder
TABLES = ("trials", "epochs", "positions")
RUNNING = "running"
SEQ_KEY = b"kvsweep_seq"
FAN_IN = 16  # parts of one level merged into one of the next
MERGE_LEVELS = 2  # a row is rewritten at most this many times before the final compaction
_PART = re.compile(r"^(trials|epochs|positions)-(\d+)-(\d+)\.parquet$")
_SRC = "_kvsweep_source"


def part_name(table: str, first: int, last: int) -> str:
    """The path (inside the results folder) of the part of ``table`` written by flushes ``first`` to ``last``."""
    return f"{PARTS}/{table}-{first:08d}-{last:08d}.parquet"


def running_name(table: str) -> str:
    """The path (inside the results folder) of ``table``'s rows of the running trials."""
    return f"{PARTS}/{table}-{RUNNING}.parquet"


def parse_part(name: str) -> tuple[str, int, int] | None:
    """``(table, first, last)`` of a finished part's file name (no folder); ``None`` for any other name."""
    m = _PART.match(name)
    return (m[1], int(m[2]), int(m[3])) if m else None


def is_running_part(name: str) -> bool:
    return name in {f"{t}-{RUNNING}.parquet" for t in TABLES}


def with_seq(tbl: pa.Table, seq: int) -> pa.Table:
    """``tbl`` with the flush ``seq`` that writes it in its metadata."""
    return tbl.replace_schema_metadata({**(tbl.schema.metadata or {}), SEQ_KEY: str(seq).encode()})


def seq_of(metadata: dict | None) -> int:
    """The flush a file's Parquet metadata names; -1 for a file without one (an older kvsweep's)."""
    value = (metadata or {}).get(SEQ_KEY)
    try:
        return int(value) if value is not None else -1
    except ValueError:
        return -1


def merge_sources(sources: list[tuple[int, dict[str, pa.Table | None]]]) -> dict[str, pa.Table | None]:
    """One table each of ``TABLES`` from ``sources`` (``(seq, {table name: table or None})``): each trial's rows
    from the source with the highest seq that holds it in ``trials`` (a later source in the list on a tie); a
    trial with epochs or positions but no row in any ``trials`` (its trials file not written yet) keeps the rows
    of the last source that has them. Row order: by source, then as in the source. A trials table's option
    columns are the union of the sources' (nulls where a source lacks one).
    """
    ordered = [tables for _i, (_seq, tables) in sorted(enumerate(sources), key=lambda s: (s[1][0], s[0]))]
    if len(ordered) == 1:
        return {name: ordered[0].get(name) for name in TABLES}
    cat = {name: _concat(ordered, name) for name in TABLES}
    winners = _winners(cat["trials"]) if cat["trials"] is not None else None
    out: dict[str, pa.Table | None] = {}
    for name in TABLES:
        tbl = cat[name]
        if tbl is None:
            out[name] = None
            continue
        own = _winners(tbl)
        win = _source_of(tbl, own)
        if winners is not None and name != "trials":
            win = pc.coalesce(_source_of(tbl, winners), win)
        out[name] = tbl.filter(pc.equal(tbl[_SRC], win)).drop_columns([_SRC])
    return out


def _concat(ordered: list[dict[str, pa.Table | None]], name: str) -> pa.Table | None:
    tagged = [t[name].append_column(_SRC, pa.array([i] * t[name].num_rows, pa.int64()))
              for i, t in enumerate(ordered) if t.get(name) is not None]
    if not tagged:
        return None
    return pa.concat_tables(tagged, promote_options="default")


def _winners(tbl: pa.Table) -> tuple[pa.Array, pa.Array]:
    """Each trial id of ``tbl`` and the last source that holds it."""
    g = tbl.select(["trial_id", _SRC]).group_by("trial_id", use_threads=False).aggregate([(_SRC, "max")])
    return g["trial_id"].combine_chunks(), g[f"{_SRC}_max"].combine_chunks()


def _source_of(tbl: pa.Table, winners: tuple[pa.Array, pa.Array]) -> pa.ChunkedArray:
    """Per row of ``tbl``: the winning source of its trial id (null where ``winners`` lacks the id)."""
    ids, src = winners
    return pc.take(src, pc.index_in(tbl["trial_id"], value_set=ids, skip_nulls=False))
