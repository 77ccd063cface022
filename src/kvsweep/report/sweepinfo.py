"""What a sweep's stored specification (``sweep.json``, written by ``kvsweep.tune.spec``) says about how its trials
were chosen and stopped: the scheduler, the searcher, the number of samples and the size of the search space's grid.

Read as plain JSON (``kvsweep.tune`` imports ray, which a report does not); a ``sweep.json`` that cannot be read is
a note in the report, not an error: the results themselves are complete without it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from pyarrow import fs as pafs

from ..config import error_reason

SWEEP_FILE = "sweep.json"  # kvsweep.tune.spec.SWEEP_FILE


@dataclass(frozen=True)
class SweepInfo:
    """The scheduler and searcher of one sweep, from its specification."""

    scheduler: str | None  # "asha", "fifo", "moasha", ...
    search: str | None  # "grid", "random", "optuna", ...
    search_inferred: bool  # the specification predates its "search" field: grid without num_samples, else random
    num_samples: int | None  # trials a random or model-based search draws (None: a grid)
    grid_size: int | None  # configurations in the search space's grid (the product of its value lists)
    grace_period: int | None
    reduction_factor: float | None


def _int(v: Any) -> int | None:
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def sweep_info(spec: dict[str, Any]) -> SweepInfo:
    """The ``SweepInfo`` of a stored specification (``sweep.json``'s ``"specification"``: flat keys such as
    ``"scheduler"``, ``"search.num_samples"``, ``"space.vdproj.rank"``)."""
    num_samples = _int(spec.get("search.num_samples"))
    search = spec.get("search")
    inferred = not isinstance(search, str)
    if inferred:
        search = "grid" if num_samples is None else "random"
    lists = [v for k, v in spec.items() if k.startswith("space.") and isinstance(v, list)]
    grid = math.prod(len(v) for v in lists) if lists else None
    rf = spec.get("scheduler.reduction_factor")
    return SweepInfo(
        scheduler=spec.get("scheduler") if isinstance(spec.get("scheduler"), str) else None, search=search,
        search_inferred=inferred, num_samples=num_samples, grid_size=grid, grace_period=_int(spec.get("scheduler.grace_period")),
        reduction_factor=float(rf) if isinstance(rf, (int, float)) and not isinstance(rf, bool) else None,
    )


def read_sweep_info(filesystem: pafs.FileSystem, path: str) -> tuple[SweepInfo | None, str | None]:
    """The sweep's ``SweepInfo`` from its ``sweep.json``, or None and a note saying why it cannot be read."""
    try:
        with filesystem.open_input_stream(path) as f:
            d = json.loads(f.read().decode("utf-8", errors="replace"))
        spec = d["specification"]
        if not isinstance(spec, dict):
            raise TypeError("its specification is not an object")
    except (OSError, pa.ArrowException, ValueError, KeyError, TypeError) as e:
        return None, f"{SWEEP_FILE} cannot be read ({error_reason(e)}): the scheduler and searcher are not shown"
    return sweep_info(spec), None
