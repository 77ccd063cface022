"""The durable state of a sweep's rung scheduler (``kvsweep.tune.scheduler``): a snapshot and a journal of the
changes since it, so that the driver's work per change stays the same however large the sweep grows.

The scheduler writes each change (a trial recorded at a rung, passed at a rung, stopped) before it takes effect.
Rewriting the whole state each time costs the driver work that grows with the sweep: at 10,000 trials, some
30,000 rewrites of a file of about a megabyte. Instead each change is one small journal entry,
``scheduler/<seq>.json``, and the snapshot, ``scheduler.json``, is rewritten (and the entries it now holds deleted)
only once the journal holds ``1/COMPACT_SHARE`` as many changes as the snapshot, and at least ``COMPACT_MIN``:
constant work per change, amortised. Every file is written atomically (``SweepStore.write_json``: a rename on a
local disk, one PUT on an object store); a reader takes the snapshot and folds in the entries numbered after the
one it holds (``read_state``). A driver killed between a snapshot and the deletion of the entries it holds leaves
entries that readers skip and the next snapshot deletes.

Changes, as journal events: ``["record", milestone, trial_id, [objectives]]``, ``["pass", milestone, trial_id]``,
``["stop", trial_id, epoch]``.
"""

from __future__ import annotations

from typing import Callable

from ..config import KvsweepError
from .store import SweepStore

SCHEDULER_FILE = "scheduler.json"
JOURNAL = "scheduler"  # the journal's folder, beside the snapshot
FORMAT = 3  # 1: kvsweep's ASHA before moasha; 2: the whole state rewritten at each change; 3: a snapshot and a journal
COMPACT_MIN = 256  # changes in the journal before a snapshot replaces them, at the least
COMPACT_SHARE = 4  # ... and at least the snapshot's changes over this


def entry_name(seq: int) -> str:
    return f"{JOURNAL}/{seq:010d}.json"


def _entries(store: SweepStore) -> list[int]:
    """The journal's entries, by number, ascending."""
    return sorted(int(n[:-5]) for n in store.names(JOURNAL) if n.endswith(".json") and n[:-5].isdigit())


def _normalised(state: dict, where: str) -> dict:
    """A snapshot of any format this kvsweep reads, as format 3's (with ``journal``, the last entry it holds)."""
    if state.get("format") == 1:  # kvsweep's ASHA before moasha: one bracket of Ray's rewards, the negated records
        rungs = [{"milestone": r["milestone"], "recorded": {k: [-float(v)] for k, v in r["recorded"].items()}, "passed": []}
                 for bracket in state.get("brackets", [])[:1] for r in bracket]
        return {"scheduler": "asha", "rungs": rungs, "stopped": dict(state.get("stopped", {})), "journal": 0}
    if state.get("format") in (2, FORMAT):
        rungs = [{"milestone": r["milestone"], "recorded": dict(r.get("recorded", {})), "passed": list(r.get("passed", []))}
                 for r in state.get("rungs", [])]
        return {"scheduler": state.get("scheduler"), "rungs": rungs, "stopped": dict(state.get("stopped", {})),
                "journal": int(state.get("journal", 0))}
    raise KvsweepError(f"{where} has format {state.get('format')!r}; this kvsweep reads formats 1 to {FORMAT}")


def _apply(state: dict, event: list, where: str) -> None:
    """Fold one journal event into a state of ``read_state``'s form whose rungs hold their passed trials as dicts
    while it folds (a trial passed twice is kept once, each in O(1)).

    Raises:
        KvsweepError: the event names a rung the state lacks, or is no event.
    """
    kind = event[0] if event else None
    if kind == "stop":
        state["stopped"][event[1]] = int(event[2])
        return
    rung = next((r for r in state["rungs"] if kind in ("record", "pass") and round(r["milestone"], 9) == round(event[1], 9)), None)
    if rung is None:
        raise KvsweepError(f"{where}: the journal event {event!r:.120} names no rung of the scheduler's state")
    if kind == "record":
        rung["recorded"][event[2]] = list(event[3])
    else:
        rung["passed"][event[2]] = None


def read_state(store: SweepStore) -> dict | None:
    """The scheduler state in a sweep's folder, its journal folded in: ``{"scheduler": name, "rungs": [{"milestone",
    "recorded": {trial id: [objectives, each minimised]}, "passed": [trial ids]}], "stopped": {trial id: epoch},
    "journal": the last entry folded in, "entries": how many entries were folded in}``; ``None`` when the sweep has
    none (a new sweep, or ``fifo``).

    Raises:
        KvsweepError: a format this kvsweep does not read, journal entries without their snapshot, or a bad entry.
        StorageError: the storage cannot be read.
    """
    where = f"{store.uri}/{SCHEDULER_FILE}"
    for _attempt in range(5):  # a snapshot written (and entries deleted) while this read: read again
        raw = store.read_json(SCHEDULER_FILE)
        entries = _entries(store)
        if raw is None:
            if entries:
                raise KvsweepError(f"{store.uri}/{JOURNAL}/ holds scheduler journal entries but {where} is missing")
            return None
        state = _normalised(raw, where)
        events = []
        for seq in (s for s in entries if s > state["journal"]):
            entry = store.read_json(entry_name(seq))
            if entry is None:
                break
            events.append((seq, entry.get("events", [])))
        else:
            for r in state["rungs"]:
                r["passed"] = dict.fromkeys(r["passed"])
            for seq, evs in events:
                for ev in evs:
                    _apply(state, ev, f"{store.uri}/{entry_name(seq)}")
                state["journal"] = seq
            for r in state["rungs"]:
                r["passed"] = list(r["passed"])
            state["entries"] = len(events)
            return state
    raise KvsweepError(f"{where}: its journal kept changing while it was read; is another driver running this sweep?")


class Journal:
    """Writes a scheduler's changes to its sweep's folder (see the module).

    Args:
        store: the sweep's folder.
        state: what ``read_state`` read there (``None``: nothing yet).
    """

    def __init__(self, store: SweepStore, state: dict | None):
        self.store = store
        self.seq = state["journal"] if state else 0
        self.snapshot_seq = self.seq if state else None  # the last entry the snapshot holds; None: no snapshot yet
        self.changes = _changes(state) if state else 0  # in the state as a whole
        # changes in entries after the snapshot (read back as if an entry held one: a compaction soon)
        self.journaled = min(self.changes, state.get("entries", 0)) if state else 0

    def write(self, events: list[list], snapshot: Callable[[], dict]) -> None:
        """Write ``events`` (one change or a few, before they take effect): as a journal entry, or as a new snapshot
        (``snapshot()``: the whole state, these events in) when the journal has grown enough or there is none yet."""
        if not events:
            return
        self.seq += 1
        self.changes += len(events)
        if self.snapshot_seq is None or self.journaled + len(events) >= max(COMPACT_MIN, self.changes // COMPACT_SHARE):
            self.store.write_json(SCHEDULER_FILE, {"format": FORMAT, **snapshot(), "journal": self.seq})
            self.snapshot_seq, self.journaled = self.seq, 0
            for seq in _entries(self.store):
                if seq <= self.seq:
                    self.store.delete(entry_name(seq))
        else:
            self.store.write_json(entry_name(self.seq), {"events": events})
            self.journaled += len(events)


def _changes(state: dict) -> int:
    return sum(len(r["recorded"]) + len(r["passed"]) for r in state["rungs"]) + len(state["stopped"])
