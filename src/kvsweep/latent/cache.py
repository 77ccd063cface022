"""The latent KV cache: per layer, preallocated tensors that hold exactly what decoding needs.

A layer holds its tensors by the names of its accounting entries (``kvsweep.kvcache.LayerKV``), with
``C`` = the capacity in tokens: per head ``(B, H, C, hs)`` for a per-token shape (H, hs), e.g. the
base's rotated keys ``k`` and values ``v`` or a KA variant's ``ka_k``/``ka_v``; ``(B, C, w)`` for a
per-token shape (w,), e.g. a codec's code in place of ``k`` or ``v`` (V-DProj's ``down(V)``). A tensor
is at the cache's dtype unless its method gives it one of its own (packed integers, metadata).

A method may declare a tensor as a ``kvsweep.kvcache.CacheTensor``: one row per group of G tokens
(``(B, C/G, w)``, metadata such as a scale per channel and token group; the capacity is then rounded up to
whole groups), or a fixed number of rows (``(B, H, rows, hs)`` or ``(B, rows, w)``: a ring of the most recent
tokens), which does not grow with the capacity.

Each tensor is allocated once, for exactly ``capacity`` tokens, so the bytes the storages of the tensors
that grow with the context hold divided by ``batch * capacity`` are the bytes per token: that is what
``measured_layer_bytes`` reports, and what ``check_bytes`` holds against ``kvsweep.kvcache``'s accounting,
to the byte. The fixed tensors are measured apart (``measured_fixed_bytes``, per sequence) and held against
the fixed bytes the methods declare for them.
"""

from __future__ import annotations

import math

import torch

from ..config import ConfigError, KvsweepError
from ..kvcache import CacheTensor, Layout, layer_bytes

CACHE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
ENTRY_DTYPES = {**CACHE_DTYPES, "uint8": torch.uint8, "int8": torch.int8, "int16": torch.int16, "int32": torch.int32}


class CacheMismatchError(KvsweepError):
    """The bytes the cache tensors hold differ from what the accounting claims."""


def cache_dtype_of(name: str) -> torch.dtype:
    if name not in CACHE_DTYPES:
        raise ConfigError(f"cache_dtype must be one of {', '.join(CACHE_DTYPES)}; got {name!r}")
    return CACHE_DTYPES[name]


class LayerCache:
    """One layer's cache tensors by name; written in place at the running position, read as a prefix."""

    def __init__(self, shapes: dict[str, tuple | CacheTensor], batch: int, capacity: int, dtype: torch.dtype, device):
        """``shapes``: name -> (per-token shape (H, hs) or (w,), dtype name or None for ``dtype``), or a ``CacheTensor``
        (``capacity`` a multiple of its ``tokens``)."""
        self.tensors: dict[str, torch.Tensor] = {}
        self.fixed: set[str] = set()  # the tensors that do not grow with the capacity
        self._heads: set[str] = set()
        for name, spec in shapes.items():
            spec = spec if isinstance(spec, CacheTensor) else CacheTensor(tuple(spec[0]), spec[1])
            if capacity % spec.tokens:
                raise ValueError(f"cache tensor {name!r}: capacity {capacity} is not a whole number of groups of {spec.tokens}")
            rows = spec.rows or capacity // spec.tokens
            if spec.rows:
                self.fixed.add(name)
            if len(spec.shape) == 2:
                full = (batch, spec.shape[0], rows, spec.shape[1])
                self._heads.add(name)
            else:
                full = (batch, rows, spec.shape[0])
            self.tensors[name] = torch.empty(full, dtype=ENTRY_DTYPES[spec.dtype] if spec.dtype else dtype, device=device)

    def write(self, name: str, x: torch.Tensor, start: int) -> None:
        """Store ``x`` ((B, H, n, hs) or (B, n, r)) at positions ``start .. start+n-1``."""
        t = self.tensors[name]
        if name in self._heads:
            t[:, :, start : start + x.shape[2]] = x
        else:
            t[:, start : start + x.shape[1]] = x

    def read(self, name: str, end: int, dtype: torch.dtype) -> torch.Tensor:
        """Positions ``0 .. end-1`` in the compute dtype (a view when the dtypes agree)."""
        t = self.tensors[name]
        t = t[:, :, :end] if name in self._heads else t[:, :end]
        return t.to(dtype)

    def nbytes(self, which: str = "all") -> int:
        """Bytes the storages of this layer's tensors hold (each storage counted once): ``"all"``, ``"tokens"`` (those
        that grow with the capacity) or ``"fixed"``."""
        seen: dict[int, int] = {}
        for name, t in self.tensors.items():
            if which == "all" or (name in self.fixed) == (which == "fixed"):
                s = t.untyped_storage()
                seen[s.data_ptr()] = s.nbytes()
        return sum(seen.values())


class LatentCache:
    """The whole model's cache: one ``LayerCache`` per layer, ``length`` tokens of ``capacity`` written."""

    def __init__(self, layers: list[dict[str, tuple | CacheTensor]], batch: int, capacity: int, dtype: torch.dtype, device):
        """``capacity`` is rounded up to whole groups of the tensors whose rows hold groups of tokens."""
        if capacity < 1 or batch < 1:
            raise ConfigError(f"a cache needs batch >= 1 and capacity >= 1 tokens; got batch {batch}, capacity {capacity}")
        unit = math.lcm(1, *(s.tokens for shapes in layers for s in shapes.values() if isinstance(s, CacheTensor)))
        capacity = -(-capacity // unit) * unit
        self.batch, self.capacity, self.dtype, self.length = batch, capacity, dtype, 0
        self.layers = [LayerCache(shapes, batch, capacity, dtype, device) for shapes in layers]

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def measured_layer_bytes(self) -> list[int]:
        """Bytes per token of each layer: its storage bytes over ``batch * capacity`` (exact, or an error)."""
        tokens = self.batch * self.capacity
        out = []
        for i, layer in enumerate(self.layers):
            n = layer.nbytes("tokens")
            if n % tokens:
                raise CacheMismatchError(f"layer {i}: cache storage of {n} bytes is not a whole number of bytes per token "
                                         f"over {tokens} tokens (batch {self.batch} x capacity {self.capacity})")
            out.append(n // tokens)
        return out

    def measured_fixed_bytes(self) -> list[int]:
        """Bytes of each layer's fixed tensors (full-precision windows) per sequence: their storage bytes over ``batch``."""
        return [layer.nbytes("fixed") // self.batch for layer in self.layers]

    def describe(self) -> list[dict[str, list[int]]]:
        """Each layer's tensors and shapes, for reports and error messages."""
        return [{name: list(t.shape) for name, t in layer.tensors.items()} for layer in self.layers]


def check_bytes(cache: LatentCache, layout: Layout, cache_dtype: str, fixed_bytes: int = 0) -> dict:
    """Hold the bytes the cache's tensors hold against the accounting of ``layout``, and its fixed tensors against
    ``fixed_bytes`` (what the methods declare their cache's fixed tensors to hold per sequence); raise if they differ.

    Returns ``{"measured_bytes_per_layer", "accounted_bytes_per_layer", "measured_bytes_per_token",
    "accounted_bytes_per_token", "measured_fixed_bytes", "accounted_fixed_bytes"}``.

    Raises:
        CacheMismatchError: naming the layers (and tensors) whose bytes differ.
    """
    if cache_dtype_of(cache_dtype) != cache.dtype:
        raise CacheMismatchError(f"the cache holds {cache.dtype}, not the {cache_dtype} it is accounted at")
    measured = cache.measured_layer_bytes()
    accounted = layer_bytes(layout, cache_dtype)
    if len(measured) != len(accounted) or measured != accounted:
        lines = []
        for i, (m, a) in enumerate(zip(measured, accounted)):
            if m != a:
                lines.append(f"  layer {i}: measured {m} bytes/token (tensors {cache.describe()[i]}), "
                             f"accounted {a} ({layout[i]})")
        if len(measured) != len(accounted):
            lines.append(f"  {len(measured)} cached layers against {len(accounted)} accounted")
        raise CacheMismatchError(
            f"KV cache bytes differ from the accounting ({sum(measured)} measured against {sum(accounted)} accounted "
            f"bytes/token at {cache_dtype}):\n" + "\n".join(lines))
    fixed = sum(cache.measured_fixed_bytes())
    if fixed != fixed_bytes:
        raise CacheMismatchError(f"the cache's fixed tensors (full-precision windows) hold {fixed} bytes per sequence; "
                                 f"the methods declare {fixed_bytes} (tensors {cache.describe()})")
    return {"measured_bytes_per_layer": measured, "accounted_bytes_per_layer": accounted,
            "measured_bytes_per_token": sum(measured), "accounted_bytes_per_token": sum(accounted),
            "measured_fixed_bytes": fixed, "accounted_fixed_bytes": fixed_bytes}
