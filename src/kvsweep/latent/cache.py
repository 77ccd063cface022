"""The latent KV cache: per layer, preallocated tensors that hold exactly what decoding needs.

A layer holds its tensors by the names of its accounting entries (``kvsweep.kvcache.LayerKV``), with
``C`` = the capacity in tokens: per head ``(B, H, C, hs)`` for a per-token shape (H, hs), e.g. the
base's rotated keys ``k`` and values ``v`` or a KA variant's ``ka_k``/``ka_v``; ``(B, C, w)`` for a
per-token shape (w,), e.g. a codec's code in place of ``k`` or ``v`` (V-DProj's ``down(V)``). A tensor
is at the cache's dtype unless its method gives it one of its own (packed integers, metadata).

Each tensor is allocated once, for exactly ``capacity`` tokens, so the bytes its storage holds divided
by ``batch * capacity`` are the bytes per token: that is what ``measured_layer_bytes`` reports, and what
``check_bytes`` holds against ``kvsweep.kvcache``'s accounting, to the byte.
"""

from __future__ import annotations

import torch

from ..config import ConfigError, KvsweepError
from ..kvcache import Layout, layer_bytes

CACHE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
ENTRY_DTYPES = {**CACHE_DTYPES, "uint8": torch.uint8, "int8": torch.int8, "int16": torch.int16, "int32": torch.int32}


class CacheMismatchError(KvsweepError):
    """The bytes the cache tensors hold differ from what the accounting claims."""


def cache_dtype_of(name: str) -> torch.dtype:
    if name not in CACHE_DTYPES:
        raise ConfigError(f"cache_dtype must be one of {', '.join(CACHE_DTYPES)}; got {name!r}")
    return CACHE_DTYPES[name]


class LayerCache:
    """One layer's cache tensors by name; written in place at the running position, read as a prefix."""

    def __init__(self, shapes: dict[str, tuple], batch: int, capacity: int, dtype: torch.dtype, device):
        """``shapes``: name -> (per-token shape (H, hs) or (w,), dtype name or None for ``dtype``)."""
        self.tensors: dict[str, torch.Tensor] = {}
        self._heads: set[str] = set()
        for name, (shape, own) in shapes.items():
            if len(shape) == 2:
                full = (batch, shape[0], capacity, shape[1])
                self._heads.add(name)
            elif len(shape) == 1:
                full = (batch, capacity, shape[0])
            else:
                raise ValueError(f"cache tensor {name!r}: a per-token shape (H, hs) or (w,); got {shape}")
            self.tensors[name] = torch.empty(full, dtype=ENTRY_DTYPES[own] if own else dtype, device=device)

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

    def nbytes(self) -> int:
        """Bytes the storages of this layer's tensors hold (each storage counted once)."""
        seen: dict[int, int] = {}
        for t in self.tensors.values():
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        return sum(seen.values())


class LatentCache:
    """The whole model's cache: one ``LayerCache`` per layer, ``length`` tokens of ``capacity`` written."""

    def __init__(self, layers: list[dict[str, tuple]], batch: int, capacity: int, dtype: torch.dtype, device):
        if capacity < 1 or batch < 1:
            raise ConfigError(f"a cache needs batch >= 1 and capacity >= 1 tokens; got batch {batch}, capacity {capacity}")
        self.batch, self.capacity, self.dtype, self.length = batch, capacity, dtype, 0
        self.layers = [LayerCache(shapes, batch, capacity, dtype, device) for shapes in layers]

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def measured_layer_bytes(self) -> list[int]:
        """Bytes per token of each layer: its storage bytes over ``batch * capacity`` (exact, or an error)."""
        tokens = self.batch * self.capacity
        out = []
        for i, layer in enumerate(self.layers):
            n = layer.nbytes()
            if n % tokens:
                raise CacheMismatchError(f"layer {i}: cache storage of {n} bytes is not a whole number of bytes per token "
                                         f"over {tokens} tokens (batch {self.batch} x capacity {self.capacity})")
            out.append(n // tokens)
        return out

    def describe(self) -> list[dict[str, list[int]]]:
        """Each layer's tensors and shapes, for reports and error messages."""
        return [{name: list(t.shape) for name, t in layer.tensors.items()} for layer in self.layers]


def check_bytes(cache: LatentCache, layout: Layout, cache_dtype: str) -> dict:
    """Hold the bytes the cache's tensors hold against the accounting of ``layout``; raise if they differ.

    Returns ``{"measured_bytes_per_layer", "accounted_bytes_per_layer", "measured_bytes_per_token",
    "accounted_bytes_per_token"}``.
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
    return {"measured_bytes_per_layer": measured, "accounted_bytes_per_layer": accounted,
            "measured_bytes_per_token": sum(measured), "accounted_bytes_per_token": sum(accounted)}
