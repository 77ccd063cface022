"""A sweep's specification, stored with its results, and what continuing or growing the sweep may change.

``<storage>/<name>/sweep.json`` holds what the sweep was run with (model, data and a digest of its
samples, training, scheduler, search space), the base's validation and test statistics, and the sweep's
rounds: its first run, then one more per ``--grow``. Each round is one Tune experiment, in the
folder ``tune-<k>/`` of the sweep. Running the same command again continues the unfinished rounds;
a specification that differs in any field is refused before any work, one line per field; ``--grow``
may change only the search space (to a superset: every configuration already run stays in it) or raise
``--num-samples``, and runs only the configurations that are new. No Ray here.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..adapters.options import canonical_key
from ..config import KvsweepError, SweepCfg
from ..data import Samples
from ..evaluate import PositionStats, SplitStats
from .space import RUN_ONLY_TRAIN, Space, grid_points, point_key, space_parts

SWEEP_FILE = "sweep.json"
FORMAT = 1
_MISSING = object()


class SpecificationError(KvsweepError):
    """A continued sweep whose specification differs from the stored one, or a sweep.json that cannot be read."""


def data_digest(samples: Samples) -> str:
    """SHA-256 of the train, validation and test token ids: any change of file, tokenizer, split, length or selection
    shows."""
    h = hashlib.sha256()
    for name, ids in (("train", samples.train), ("val", samples.val), ("test", samples.test)):
        arr = np.ascontiguousarray(ids, dtype=np.int32)  # (N, T)
        h.update(f"{name}:{arr.shape}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value))  # tuples become lists, as they come back from sweep.json


def specification(sweep: SweepCfg, space: Space, digest: str) -> dict[str, Any]:
    """The fields a sweep's results depend on, flat: ``{"train.epochs": 30, "space.rank": [64, 128], ...}``; a union
    of grids is one field, ``space``: its parts, each as such a dict, in a canonical order.

    Settings of where and how trials run (storage, resources, packing, compile, loss chunking) are left
    out: they change no result.
    """
    spec: dict[str, Any] = {}
    for section, cfg in (("model", sweep.model), ("data", sweep.data), ("train", sweep.train)):
        for key, value in asdict(cfg).items():
            if (section, key) in {("model", "device")} or (section == "train" and key in RUN_ONLY_TRAIN):
                continue
            spec[f"{section}.{key}"] = _plain(value)
    spec["data.digest"] = digest
    spec["scheduler"] = sweep.scheduler  # sweeps stored before moasha hold "asha" or "fifo": the same names
    if sweep.scheduler != "fifo":
        spec["scheduler.grace_period"] = sweep.grace_period
        spec["scheduler.reduction_factor"] = sweep.reduction_factor
    spec["search"] = sweep.search
    spec["search.num_samples"] = sweep.num_samples
    parts = [_grid_spec(part) for part in space_parts(space)]
    if len(parts) == 1:
        spec.update({f"space.{k}": v for k, v in parts[0].items()})
    else:
        spec["space"] = sorted(parts, key=lambda p: json.dumps(p, sort_keys=True))
    for key, value in list(spec.items()):
        local = _local_identity(key, value)
        if local is not None:
            spec[key], spec[f"{key}.digest"] = local
    return spec


def _grid_spec(space: dict[str, list]) -> dict[str, list]:
    """A grid as a set of values per field: their order changes no configuration."""
    return {k: sorted(_plain(list(space[k])), key=lambda v: json.dumps(v, sort_keys=True)) for k in sorted(space)}


def _local_identity(key: str, value: Any) -> tuple[str, str] | None:
    """A local file or folder named by an absolute path (model, tokenizer, data; ``tiny:PATH`` too) as its name
    and a digest of its content, so that the same files elsewhere (another checkout, a job's working dir) are
    the same sweep; ``None`` for anything else."""
    if key not in ("model.name", "model.tokenizer", "data.source") or not isinstance(value, str):
        return None
    prefix = "tiny:" if value.startswith("tiny:") else ""
    path = Path(value[len(prefix):])
    if not path.is_absolute() or not path.exists():
        return None
    return prefix + path.name, content_digest(path)


def content_digest(path: Path, edge: int = 1 << 20) -> str:
    """A digest of a file, or of a folder's files (not recursing): names, sizes and their first and last
    ``edge`` bytes each: cheap for model weights of many GB, and different for any other checkpoint."""
    h = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")) if path.is_dir() else [path]
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(edge))
            if size > 2 * edge:
                fh.seek(size - edge)
            h.update(fh.read(edge))
    return h.hexdigest()


def canonical_specification(spec: dict[str, Any]) -> dict[str, Any]:
    """A stored specification with its search-space fields under the methods' own keys (``space.rank`` ->
    ``space.vdproj.rank``), as ``specification`` writes them for a space of ``canonical_space``, and its
    ``search`` named (a specification stored before it was: ``random`` with a number of samples, else ``grid``)."""
    out: dict[str, Any] = {}
    for key, value in spec.items():
        if key == "space":  # a union of grids
            value = [{canonical_key(k): v for k, v in part.items()} for part in value]
        out[f"space.{canonical_key(key[len('space.'):])}" if key.startswith("space.") else key] = value
    if "search" not in out:  # stored before the searcher was named: random picks or the grid
        out["search"] = "grid" if out.get("search.num_samples") is None else "random"
    return out


def _space_of(spec: dict[str, Any]) -> Space:
    if "space" in spec:
        return spec["space"]
    return {k[len("space."):]: v for k, v in spec.items() if k.startswith("space.")}


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(field, old value, new value)`` for every field that differs; a field one side lacks is ``_MISSING``."""
    return [(k, old.get(k, _MISSING), new.get(k, _MISSING)) for k in sorted(set(old) | set(new))
            if old.get(k, _MISSING) != new.get(k, _MISSING)]


def _show(value: Any) -> str:
    if value is _MISSING:
        return "(not set)"
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 160 else text[:157] + "..."


def describe(diffs: list[tuple[str, Any, Any]]) -> str:
    """One line per differing field: ``  train.epochs: 2 -> 3``; a union of grids on both sides, one line per part it
    lost or gained: ``  space: part removed: {...}``."""
    lines = []
    for k, a, b in diffs:
        if k == "space" and isinstance(a, list) and isinstance(b, list):
            lines += [f"  space: part removed: {_show(p)}" for p in a if p not in b]
            lines += [f"  space: part added: {_show(p)}" for p in b if p not in a]
        else:
            lines.append(f"  {k}: {_show(a)} -> {_show(b)}")
    return "\n".join(lines)


@dataclass
class Round:
    """One Tune experiment of a sweep: the first run, or one ``--grow``."""

    tune: str  # its folder, inside the sweep's
    space: Space  # the search space it was started with
    num_samples: int | None  # random search: trials of this round; None: the grid points new in this round
    started_at: str
    finished: bool = False


@dataclass
class SweepRecord:
    """The content of ``sweep.json``."""

    name: str
    specification: dict[str, Any]
    rounds: list[Round] = field(default_factory=list)
    base: dict | None = None  # the base's validation statistics: {"nll_sum": [...], "tokens": [...]} per position
    base_test: dict | None = None  # and its test statistics (None without a test set)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "name": self.name, "specification": self.specification,
                           "rounds": [asdict(r) for r in self.rounds], "base": self.base, "base_test": self.base_test}, indent=1)

    @classmethod
    def from_json(cls, text: str, where: str) -> "SweepRecord":
        """Raises:
            SpecificationError: the text is not a sweep.json this version of kvsweep reads.
        """
        try:
            d = json.loads(text)
            if d.get("format") != FORMAT:
                raise ValueError(f"format {d.get('format')!r}, this kvsweep reads format {FORMAT}")
            rounds = [Round(**r) for r in d["rounds"]]
            return cls(name=str(d["name"]), specification=dict(d["specification"]), rounds=rounds, base=d.get("base"),
                       base_test=d.get("base_test"))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise SpecificationError(f"{where} is not a sweep specification kvsweep can read ({e})") from None

    def base_stats(self) -> SplitStats | None:
        """The base's validation and test statistics; ``None`` before they were evaluated."""
        if self.base is None:
            return None
        return SplitStats(_stats(self.base), _stats(self.base_test) if self.base_test is not None else None)

    def set_base_stats(self, stats: SplitStats) -> None:
        self.base = _plain_stats(stats.val)
        self.base_test = _plain_stats(stats.test) if stats.test is not None else None


def _stats(d: dict) -> PositionStats:
    return PositionStats(np.array(d["nll_sum"], dtype=np.float64), np.array(d["tokens"], dtype=np.int64))


def _plain_stats(stats: PositionStats) -> dict:
    return {"nll_sum": [float(x) for x in stats.nll_sum], "tokens": [int(x) for x in stats.tokens]}


@dataclass
class Plan:
    """What one run of the driver does: the record to store and the rounds to run, in order."""

    record: SweepRecord
    todo: list[int]  # indices into record.rounds: unfinished rounds, then a new one
    message: str
    changed: bool = False  # the record differs from the stored one (a grown specification): store it even with nothing to run


def round_points(record: SweepRecord, index: int, sweep: SweepCfg) -> list[dict] | None:
    """The configurations of grid round ``index``: its space's points not in an earlier round's space
    (``None`` for a random-search round)."""
    r = record.rounds[index]
    if r.num_samples is not None:
        return None
    earlier = {point_key(p, sweep) for p in grid_points(record.rounds[index - 1].space)} if index else set()
    seen, points = set(earlier), []
    for p in grid_points(r.space):
        key = point_key(p, sweep)
        if key not in seen:
            seen.add(key)
            points.append(p)
    return points


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def plan(stored: SweepRecord | None, spec: dict[str, Any], space: Space, sweep: SweepCfg, *,
         grow: bool = False, where: str = "") -> Plan:
    """Start, continue or grow a sweep.

    Raises:
        SpecificationError: the specification differs from the stored one (without ``grow``), or ``grow``
            would change more than the search space, or drop configurations already run.
    """
    random = sweep.search != "grid"  # random picks or optuna: a number of trials rather than points
    if stored is None:
        record = SweepRecord(sweep.name, spec, [Round("tune-0", _plain(space), sweep.num_samples, _now())])
        return Plan(record, [0], "a new sweep")
    unfinished = [i for i, r in enumerate(stored.rounds) if not r.finished]
    diffs = differences(stored.specification, spec)
    if not diffs:
        msg = f"continuing the sweep in {where}" + (" (finished trials are not run again)" if unfinished else ": it is finished, nothing to run")
        return Plan(stored, unfinished, msg)
    searchable = [d for d in diffs if d[0] == "space" or d[0].startswith("space.") or d[0] == "search.num_samples"]
    fixed = [d for d in diffs if d not in searchable]
    if not grow:
        hint = ("; or, to add these configurations to this sweep, run it with --grow" if not fixed else "")
        raise SpecificationError(
            f"the sweep {sweep.name} in {where} was run with another specification; continuing it would mix results "
            f"of both. Differences (stored -> now):\n{describe(diffs)}\nUse a new --name for the new specification{hint}.")
    if fixed:
        raise SpecificationError(
            f"--grow adds configurations to the sweep {sweep.name} in {where}; everything but the search space must stay "
            f"as it was. Differences (stored -> now):\n{describe(fixed)}\nUse a new --name for another specification.")
    old_space = _space_of(stored.specification)
    if random:
        lost = [f"{k}={v!r}" for k in old_space for v in old_space[k] if v not in space.get(k, [])]
        if set(old_space) != set(space) or lost:
            raise SpecificationError(f"--grow of a random search keeps every field and value of its space "
                                     f"(missing now: {', '.join(lost) or ', '.join(sorted(set(old_space) ^ set(space)))}); use a new --name")
        extra = sweep.num_samples - stored.specification["search.num_samples"]
        if extra < 0:
            raise SpecificationError(f"--grow cannot lower --num-samples from {stored.specification['search.num_samples']} "
                                     f"to {sweep.num_samples}; use a new --name")
        new_round = Round(f"tune-{len(stored.rounds)}", _plain(space), extra, _now()) if extra else None
        added = extra
    else:
        old = {point_key(p, sweep): p for p in grid_points(old_space)}
        new = {point_key(p, sweep): p for p in grid_points(space)}
        dropped = [p for k, p in old.items() if k not in new]
        if dropped:
            raise SpecificationError(
                f"--grow only adds configurations: {len(dropped)} configuration(s) of the sweep {sweep.name} are not in the new "
                f"search space (e.g. {dropped[0]}); keep every value already run, or use a new --name")
        added = sum(k not in old for k in new)
        new_round = Round(f"tune-{len(stored.rounds)}", _plain(space), None, _now()) if added else None
    rounds = list(stored.rounds) + ([new_round] if new_round else [])
    record = SweepRecord(stored.name, spec, rounds, stored.base, stored.base_test)
    todo = unfinished + ([len(rounds) - 1] if new_round else [])
    return Plan(record, todo, f"growing the sweep in {where} by {added} configuration(s)" if added else
                f"the grown search space adds no configuration to the sweep in {where}", changed=True)
