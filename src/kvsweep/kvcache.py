"""KV-cache accounting: what an inference cache holds per token, per layer and in total.

Pure functions over cache layouts; no torch. A layout has one ``LayerKV`` per layer: the tensors that
layer caches per token, by name, each with its values per token and its dtype (``None``: the cache's
dtype). The base caches ``k`` and ``v`` of width d (hidden size) on every layer; a method's file
declares how it changes that (``Adapter.kv_layout``), e.g. V-DProj caches its rank-r code as ``v``,
a KA variant adds ``ka_k`` and ``ka_v``, a quantized cache holds packed integers (``uint8``) and
their scales. Bytes are values times their dtype's size.

Fixed bytes (``Adapter.fixed_bytes``) do not grow with the context; a method whose cache holds some (a ring
of the most recent tokens at full precision) declares its cache tensors as ``CacheTensor`` s (per token, per
group of tokens, or a fixed number of rows), which the latent cache allocates and measures.

Pythia-70M at fp16: base 6 x (512 + 512) x 2 = 12,288 bytes/token; V-DProj r=320 on all layers
6 x (512 + 320) x 2 = 9,984.
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
"""The dtypes a whole cache may be held at (``cache_dtype``; float64 for exact checks of a float64 model)."""
ENTRY_DTYPE_BYTES = {**DTYPE_BYTES, "uint8": 1, "int8": 1, "int16": 2, "int32": 4}
"""The dtypes one cached tensor may have of its own (packed integers, metadata)."""


@dataclass(frozen=True)
class CacheEntry:
    """One tensor a layer caches: ``values`` per token, at ``dtype`` (``None``: the cache's dtype)."""

    values: int
    dtype: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.values, bool) or not isinstance(self.values, int) or self.values < 0:
            raise ValueError(f"a cache entry holds a whole number >= 0 of values per token; got {self.values!r}")
        if self.dtype is not None and self.dtype not in ENTRY_DTYPE_BYTES:
            raise ValueError(f"a cache entry's dtype must be one of {', '.join(ENTRY_DTYPE_BYTES)}; got {self.dtype!r}")

    def bytes(self, cache_dtype: str) -> int:
        """Bytes per token at ``cache_dtype`` (unless the entry has its own dtype)."""
        return self.values * ENTRY_DTYPE_BYTES[self.dtype or cache_dtype]


@dataclass(frozen=True)
class LayerKV:
    """The tensors one layer caches per token, by name, in the order they were declared."""

    entries: tuple[tuple[str, CacheEntry], ...]

    @classmethod
    def of(cls, **entries: int | CacheEntry) -> "LayerKV":
        """``LayerKV.of(k=512, v=320)``: entries by name, a number being values at the cache's dtype."""
        return cls(tuple((name, e if isinstance(e, CacheEntry) else CacheEntry(e)) for name, e in entries.items()))

    def __getitem__(self, name: str) -> CacheEntry:
        for n, e in self.entries:
            if n == name:
                return e
        raise KeyError(name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.entries)

    def replaced(self, **entries: int | CacheEntry) -> "LayerKV":
        """A copy with ``entries`` set: an existing name keeps its place, a new one is appended."""
        new = {n: e if isinstance(e, CacheEntry) else CacheEntry(e) for n, e in entries.items()}
        kept = tuple((n, new.pop(n, e)) for n, e in self.entries)
        return LayerKV(kept + tuple(new.items()))

    @property
    def values(self) -> int:
        """Values per token over all entries (whatever their dtype)."""
        return sum(e.values for _, e in self.entries)

    def bytes(self, cache_dtype: str = "float16") -> int:
        return sum(e.bytes(cache_dtype) for _, e in self.entries)

    def __repr__(self) -> str:
        return "LayerKV(" + ", ".join(f"{n}={e.values}" + (f":{e.dtype}" if e.dtype else "") for n, e in self.entries) + ")"


Layout = tuple[LayerKV, ...]


@dataclass(frozen=True)
class CacheTensor:
    """How the latent cache allocates one tensor of a layer: ``shape`` of one row, (H, hs) per head or (w,), at
    ``dtype`` (``None``: the cache's dtype), and what a row stands for:

    - ``tokens`` = 1, ``rows`` = 0: one token (a per-token entry of the layout);
    - ``tokens`` = G: G consecutive tokens share the row (metadata of a group of tokens: its per-token share is
      ``values / G``), the capacity rounded up to whole groups;
    - ``rows`` > 0: a fixed tensor of that many rows (a ring of the most recent tokens), the same for any
      capacity: fixed bytes, not bytes per token.
    """

    shape: tuple[int, ...]
    dtype: str | None = None
    tokens: int = 1
    rows: int = 0

    def __post_init__(self) -> None:
        if len(self.shape) not in (1, 2) or any(not isinstance(n, int) or n < 1 for n in self.shape):
            raise ValueError(f"a cache tensor's row is (H, hs) or (w,) of whole numbers >= 1; got {self.shape}")
        if self.dtype is not None and self.dtype not in ENTRY_DTYPE_BYTES:
            raise ValueError(f"a cache tensor's dtype must be one of {', '.join(ENTRY_DTYPE_BYTES)}; got {self.dtype!r}")
        if self.tokens < 1 or self.rows < 0 or (self.rows and self.tokens != 1):
            raise ValueError(f"a cache tensor holds rows of tokens >= 1 tokens, or a fixed number rows >= 1; got "
                             f"tokens={self.tokens}, rows={self.rows}")

    @property
    def values(self) -> int:
        """Values in one row."""
        n = 1
        for s in self.shape:
            n *= s
        return n

    def fixed_bytes(self, cache_dtype: str) -> int:
        """Bytes of a fixed tensor for one sequence (0 for the others)."""
        return self.rows * self.values * ENTRY_DTYPE_BYTES[self.dtype or cache_dtype]


def base_layout(n_layers: int, hidden: int) -> Layout:
    """The base's cache: rotated keys ``k`` and values ``v``, ``hidden`` values each, on every layer."""
    return tuple(LayerKV.of(k=hidden, v=hidden) for _ in range(n_layers))


def with_layers(layout: Layout, layers: tuple[int, ...], **entries: int | CacheEntry) -> Layout:
    """``layout`` with ``entries`` set on ``layers`` (replacing entries of the same name, adding new ones)."""
    out = list(layout)
    for i in layers:
        out[i] = out[i].replaced(**entries)
    return tuple(out)


def _check_dtype(cache_dtype: str) -> None:
    if cache_dtype not in DTYPE_BYTES:
        raise ValueError(f"cache_dtype must be one of {', '.join(DTYPE_BYTES)}; got {cache_dtype!r}")


def layer_bytes(layout: Layout, cache_dtype: str = "float16") -> list[int]:
    """Bytes per token of each layer."""
    _check_dtype(cache_dtype)
    return [layer.bytes(cache_dtype) for layer in layout]


def bytes_per_token(layout: Layout, cache_dtype: str = "float16") -> int:
    """Bytes per token of the whole cache."""
    return sum(layer_bytes(layout, cache_dtype))
