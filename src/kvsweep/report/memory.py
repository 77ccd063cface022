"""Memory at a context length L and the break-even context, from KV bytes/token and fixed bytes.

    memory at L = fixed bytes + L x KV bytes/token            (the cache of one sequence of L tokens, in bytes)
    break-even  = the smallest L >= 1 with memory(L) < the base's memory(L) = L x the base's KV bytes/token

The base adds no fixed bytes. A method with fixed bytes F and a cache of kv < kv_base bytes/token saves
``kv_base - kv`` per token and repays F past ``F / (kv_base - kv)`` tokens, so its break-even context is
``floor(F / (kv_base - kv)) + 1``; with F = 0 it is 1 (smaller from the first token). A method whose cache
is not smaller per token never breaks even (``inf``, whatever its fixed bytes). Unknown fixed bytes (results of
a kvsweep before they were recorded: null) give NaN for memory at L, and for the break-even of a smaller cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

DEFAULT_CONTEXT = 2048
"""The default L when the results do not say longer: the maximum context (``max_position_embeddings``) of every
released Pythia model and of the ``tiny`` preset."""

Axis = Literal["bytes-per-token", "memory-at-L"]
AXES: tuple[str, ...] = ("bytes-per-token", "memory-at-L")


def memory_at(context: int, fixed_bytes: ArrayLike, kv_bytes_per_token: ArrayLike) -> NDArray[np.float64]:
    """``fixed + L x kv`` in bytes, elementwise; NaN where either is unknown."""
    return np.asarray(fixed_bytes, dtype=np.float64) + float(context) * np.asarray(kv_bytes_per_token, dtype=np.float64)


def break_even(fixed_bytes: ArrayLike, kv_bytes_per_token: ArrayLike, kv_base: ArrayLike) -> NDArray[np.float64]:
    """The smallest context L >= 1 (tokens) at which ``fixed + L x kv < L x kv_base``, elementwise: ``floor(F / (kv_base
    - kv)) + 1``; ``inf`` where ``kv >= kv_base`` (never), NaN where that needs an unknown input."""
    f = np.asarray(fixed_bytes, dtype=np.float64)
    kv = np.asarray(kv_bytes_per_token, dtype=np.float64)
    base = np.asarray(kv_base, dtype=np.float64)
    f, kv, base = np.broadcast_arrays(f, kv, base)
    out = np.full(f.shape, np.nan)
    known = np.isfinite(kv) & np.isfinite(base)
    out[known & (kv >= base)] = np.inf
    saves = known & (kv < base) & np.isfinite(f)
    out[saves] = np.floor(np.maximum(f[saves], 0.0) / (base[saves] - kv[saves])) + 1.0
    return out


def default_context(eval_lengths: ArrayLike) -> tuple[int, str]:
    """L for memory at L when none is given, and a sentence on where it comes from: ``DEFAULT_CONTEXT`` (Pythia's
    maximum context), or the longest evaluation length of the results (``eval_seq_len``) when that is longer."""
    v = np.asarray(eval_lengths, dtype=np.float64)
    v = v[np.isfinite(v)]
    longest = int(v.max()) if v.size else 0
    if longest > DEFAULT_CONTEXT:
        return longest, "the longest evaluation length of the results (`eval_seq_len`)"
    return DEFAULT_CONTEXT, "the maximum context of the Pythia models and of the `tiny` preset (the results do not record the model's own)"


@dataclass(frozen=True)
class CostAxis:
    """The cost a report's fronts minimise besides PPL: KV bytes/token, or memory at ``context`` tokens."""

    kind: str  # one of AXES
    context: int  # L, tokens (memory at L is shown whatever the axis)
    context_source: str  # where L comes from, a sentence for the report

    def __post_init__(self) -> None:
        if self.kind not in AXES:
            raise ValueError(f"the cost axis must be one of {', '.join(AXES)}, got {self.kind!r}")
        if isinstance(self.context, bool) or not isinstance(self.context, int) or self.context < 1:
            raise ValueError(f"the context L must be an integer >= 1 (tokens), got {self.context!r}")

    @property
    def is_memory(self) -> bool:
        return self.kind == "memory-at-L"

    @property
    def label(self) -> str:
        """The axis's name in figures and tables."""
        return f"memory at L = {self.context:,} tokens (MB)" if self.is_memory else "KV cache (bytes/token)"

    @property
    def short(self) -> str:
        return f"memory at {self.context:,}" if self.is_memory else "KV bytes/token"

    def cost(self, fixed_bytes: ArrayLike, kv_bytes_per_token: ArrayLike) -> NDArray[np.float64]:
        """The axis's value per trial: KV bytes/token, or memory at L in bytes (NaN where fixed bytes are unknown)."""
        kv = np.asarray(kv_bytes_per_token, dtype=np.float64)
        return memory_at(self.context, fixed_bytes, kv) if self.is_memory else kv

    def shown(self, value: float) -> float:
        """A cost as drawn: bytes/token as they are, memory in MB (10^6 bytes)."""
        return value / 1e6 if self.is_memory else value


def megabytes(n_bytes: float) -> str:
    """A byte count as text: ``3.94 MB`` (10^6 bytes to the MB) from 10 kB on, bytes below; a dash when unknown."""
    if not math.isfinite(n_bytes):
        return "—"
    return f"{n_bytes / 1e6:,.2f} MB" if n_bytes >= 1e4 else f"{n_bytes:,.0f} B"
