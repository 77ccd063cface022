"""KV-cache accounting: what an inference cache holds per token, per layer and in total.

Pure functions over cache layouts; no torch. The base caches K and V of width d (hidden size) on every
layer. V-DProj caches its rank-r code instead of V (and of K for ``target`` k/kv) on its layers; a KA
adapter adds its own K' and V' (d each) on its layers. Bytes are values times the cache dtype's size.

Pythia-70M at fp16: base 6 x (512 + 512) x 2 = 12,288 bytes/token; V-DProj r=320 on all layers
6 x (512 + 320) x 2 = 9,984.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


@dataclass(frozen=True)
class LayerKV:
    """Values cached per token by one layer: base K and V (possibly compressed) and KA's K' and V'."""

    k: int
    v: int
    ka_k: int = 0
    ka_v: int = 0

    @property
    def values(self) -> int:
        return self.k + self.v + self.ka_k + self.ka_v


Layout = tuple[LayerKV, ...]


def base_layout(n_layers: int, hidden: int) -> Layout:
    return tuple(LayerKV(k=hidden, v=hidden) for _ in range(n_layers))


def with_vdproj(layout: Layout, layers: tuple[int, ...], rank: int, target: str) -> Layout:
    """V-DProj on ``layers``: the rank-r code replaces V (``v``), K (``k``) or both (``kv``)."""
    out = list(layout)
    for i in layers:
        out[i] = replace(out[i], k=rank if "k" in target else out[i].k, v=rank if "v" in target else out[i].v)
    return tuple(out)


def with_ka(layout: Layout, layers: tuple[int, ...], hidden: int) -> Layout:
    """A KA attention on ``layers`` caches its K' and V' (``hidden`` each) beside the base's K and V."""
    out = list(layout)
    for i in layers:
        out[i] = replace(out[i], ka_k=hidden, ka_v=hidden)
    return tuple(out)


def layer_bytes(layout: Layout, cache_dtype: str = "float16") -> list[int]:
    """Bytes per token of each layer."""
    if cache_dtype not in DTYPE_BYTES:
        raise ValueError(f"cache_dtype must be one of {', '.join(DTYPE_BYTES)}; got {cache_dtype!r}")
    return [layer.values * DTYPE_BYTES[cache_dtype] for layer in layout]


def bytes_per_token(layout: Layout, cache_dtype: str = "float16") -> int:
    """Bytes per token of the whole cache."""
    return sum(layer_bytes(layout, cache_dtype))
