"""KIVI-style quantized KV cache: K per channel, V per token, in groups, asymmetric, with a full-precision window.

    K (rotated, as the base caches it): per channel, each group of G consecutive tokens shares a scale and a zero
                                        point per channel; a group is quantized once all its G tokens are there
    V:                                  per token, each group of G consecutive channels shares a scale and a zero point
    codes = clamp(round((x - zero) / scale), 0, 2^b - 1),  scale = (max - min) / (2^b - 1),  zero = min
    scale and zero stored as float16; codes packed 8 / b to a byte (uint8)

Full-precision window of R tokens: the query at position t reads key/value j at full precision iff t - j < R;
otherwise dequantized. A key is also read at full precision while its token group is incomplete (j // G >=
(t + 1) // G): a channel's group needs its G tokens before it can be quantized. The window rule for keys is
therefore ``R = 0 or R >= G``: with R >= G every key outside the window belongs to a complete group (the
training-time forward's rule is then exactly the window), and at R = 0 the keys of the current incomplete
group (at most G - 1 besides the query's own) stay full precision until their group completes, as in KIVI,
whose residual keeps them; values are all quantized at R = 0. Keys read quantized are thus query-independent:
the training-time forward quantizes them once per sequence and attends with

    scores = where(band_k, q k_fp, q k_q),  out = (P * band_v) V_fp + (P * ~band_v) V_q

through the attention tap (``kvsweep.models.tap_attention``). K is quantized after rotary because that is
what the cache holds (KIVI quantizes the cached, rotated keys; a pre-rotary K would need the rotation
re-applied to every cached key at every step) and because the window is a property of the attention (which
query reads which key how), which only an attention-level tap sees.

Training: fake quantization with a straight-through estimator (the forward sees the rounding, the backward
passes the gradient through unchanged), so that adapters trained with it learn under the quantization noise;
``quant`` alone has no trainable parameters (a trial of it is its epoch 0).

Cache (``kvsweep.latent``): per layer and quantized tensor, ``k``/``v`` packed codes (uint8, d b / 8 per
token), ``k_scale``/``k_zero`` (float16, one row of d per group of G tokens: 2 d / G values per token),
``v_scale``/``v_zero`` (float16, d / G per token each) and a ring of the most recent tokens at full precision
(``k_window``: max(R, G) tokens; ``v_window``: R tokens), which are fixed bytes, not bytes per token.

The rounding and the packing are written here in torch: optimum-quanto's and HQQ's quantized tensors carry
layouts and metadata of their own (HQQ fits its zero points with a solver; both keep scales at the input's
dtype and shapes for weights), and transformers' ``QuantizedCache`` built on them re-quantizes its whole cache
whenever its residual fills, so none holds exactly the bytes declared here; torchao's sub-byte packing targets
CUDA weight layouts. Min-max rounding and bit packing are a few tensor operations that run anywhere.

Source: KIVI (Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", ICML 2024,
github.com/jy-yuan/KIVI).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ConfigError
from ..kvcache import CacheEntry, CacheTensor, DTYPE_BYTES, Layout, with_layers
from ..models import Dims
from ..quantize import dequantize, fake_quant_keys, fake_quant_values, key_band, mixed_attention, pack, quantize, unpack, value_band
from .base import Adapter, AdapterOptions, option, register_adapter

BITS = (2, 4, 8)
TARGETS = ("kv", "k", "v")
SCORE_ELEMENTS = 1 << 25
"""The training-time forward attends in chunks of queries whose scores (B, H, rows, S) hold at most this many
values (128 MiB in float32): it computes them twice (full precision and quantized keys), not in a fused kernel."""


@dataclass(frozen=True)
class QuantOptions(AdapterOptions):
    bits: int = option(4, "bits per quantized value: 2, 4 or 8", BITS)
    group: int = option(32, "group size G: K per channel over G consecutive tokens, V per token over G consecutive "
                            "channels; must divide the hidden size")
    window: int = option(128, "full-precision window R of the most recent tokens (>= 0; 0 or >= group where K is quantized)")
    target: str = option("kv", "what is quantized: kv, k (the rotated keys) or v", TARGETS)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bits not in BITS or isinstance(self.bits, bool):
            raise ConfigError(f"bits must be one of 2, 4, 8; got {self.bits!r}")
        if isinstance(self.group, bool) or not isinstance(self.group, int) or self.group < 1:
            raise ConfigError(f"group must be an integer >= 1 (dividing the hidden size); got {self.group!r}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 0:
            raise ConfigError(f"window must be an integer >= 0; got {self.window!r}")
        if self.target not in TARGETS:
            raise ConfigError(f"target must be one of {', '.join(TARGETS)}; got {self.target!r}")
        if "k" in self.target and 0 < self.window < self.group:
            raise ConfigError(f"window must be 0 or >= group ({self.group}) when K is quantized (a key is quantized once "
                              f"its group of {self.group} tokens is complete); got {self.window}")


class QuantLayer(torch.nn.Module):
    """The attention tap of one layer: attends with K and/or V quantized outside the full-precision window."""

    def __init__(self, bits: int, group: int, window: int, target: str, heads: int, head_size: int):
        super().__init__()
        self.bits, self.group, self.window = bits, group, window
        self.quant_k, self.quant_v = "k" in target, "v" in target
        self.heads, self.head_size = heads, head_size
        self.active = True

    @property
    def key_rows(self) -> int:
        """Tokens of the keys' full-precision ring: the window, and at least one token group."""
        return max(self.window, self.group)

    def forward(self, query, key, value, attention_mask, scaling, base):
        """query (B, H, T, hs) at positions S-T .. S-1, key (rotated) and value (B, H, S, hs) -> ((B, T, H, hs), None)."""
        T, S = query.shape[2], key.shape[2]
        if not self.active or (self.window >= S and (not self.quant_k or self.window > 0)):
            return base(query, key, value)  # every key and value read at full precision
        dev = query.device
        t, j = torch.arange(S - T, S, device=dev), torch.arange(S, device=dev)
        mask = (j[None, :] <= t[:, None]) if attention_mask is None else attention_mask
        k_q = fake_quant_keys(key, self.bits, self.group) if self.quant_k else None
        v_q = fake_quant_values(value, self.bits, self.group) if self.quant_v else None
        band_k = key_band(t, j, self.window, self.group) if self.quant_k else None
        band_v = value_band(t, j, self.window) if self.quant_v else None
        B, H = query.shape[:2]
        rows = max(1, SCORE_ELEMENTS // (B * H * S))  # queries per chunk: the (B, H, rows, S) scores stay bounded
        outs = []
        for a in range(0, T, rows):
            part = slice(a, a + rows)
            m = mask[..., part, :] if mask.shape[-2] == T else mask  # a mask of one row broadcasts
            outs.append(mixed_attention(query[:, :, part], key, k_q, value, v_q, None if band_k is None else band_k[part],
                                        None if band_v is None else band_v[part], m, scaling))  # (B, H, rows, hs)
        return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None

    # -- the latent cache's decode step (kvsweep.latent)
    def cache_shapes(self) -> dict[str, CacheTensor]:
        """Packed codes per token, float16 scales and zero points (K's per group of G tokens), full-precision rings."""
        d = self.heads * self.head_size
        shapes: dict[str, CacheTensor] = {}
        if self.quant_k:
            shapes.update(k=CacheTensor((d * self.bits // 8,), "uint8"), k_scale=CacheTensor((d,), "float16", tokens=self.group),
                          k_zero=CacheTensor((d,), "float16", tokens=self.group),
                          k_window=CacheTensor((self.heads, self.head_size), rows=self.key_rows))
        if self.quant_v:
            shapes.update(v=CacheTensor((d * self.bits // 8,), "uint8"), v_scale=CacheTensor((d // self.group,), "float16"),
                          v_zero=CacheTensor((d // self.group,), "float16"))
            if self.window:
                shapes["v_window"] = CacheTensor((self.heads, self.head_size), rows=self.window)
        return shapes

    def decode_attend(self, cache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scaling: float) -> torch.Tensor:
        """The decode step: q, k (rotated), v (B, H, n, hs) at positions start .. start+n-1 -> A (B, n, d).

        Keys go to the full-precision ring; each token group this call completes is quantized per channel (its
        tokens from the ring and this call) into ``k``, ``k_scale``, ``k_zero``. Values are quantized per token as
        they come into ``v``, ``v_scale``, ``v_zero``, and kept in their ring. The attention then reads the
        full-precision ones inside the bands and the dequantized ones outside (``mixed_attention``), as the
        training-time forward does.
        """
        B, H, n, hs = q.shape
        end, d, G, dt = start + n, H * hs, self.group, q.dtype
        t, j = torch.arange(start, end, device=q.device), torch.arange(end, device=q.device)
        k_q = v_q = band_k = band_v = None
        if self.quant_k:
            keys = _recent(cache, "k_window", k, start)  # (B, H, end, hs): full precision where still held
            for g in range(start // G, end // G):  # the token groups this call completes
                x = keys[:, :, g * G : (g + 1) * G].transpose(1, 2).reshape(B, G, d)  # (B, G, d)
                codes, scale, zero = quantize(x, self.bits, dim=1)  # per channel: scale, zero (B, 1, d)
                cache.write("k", pack(codes, self.bits), g * G)
                cache.write("k_scale", scale, g)
                cache.write("k_zero", zero, g)
            groups = end // G
            codes = unpack(cache.read("k", groups * G, torch.uint8), self.bits).view(B, groups, G, d)
            deq = dequantize(codes, cache.read("k_scale", groups, torch.float16).unsqueeze(2),
                             cache.read("k_zero", groups, torch.float16).unsqueeze(2))  # (B, groups, G, d)
            k_q = torch.zeros_like(keys)  # positions of the incomplete group are never read quantized
            k_q[:, :, : groups * G] = deq.reshape(B, groups * G, H, hs).transpose(1, 2).to(dt)
            _keep_recent(cache, "k_window", k, start)
            band_k = key_band(t, j, self.window, G)
        else:
            cache.write("k", k, start)
            keys = cache.read("k", end, dt)  # (B, H, end, hs)
        if self.quant_v:
            x = v.transpose(1, 2).reshape(B, n, d // G, G)  # (B, n, d/G, G)
            codes, scale, zero = quantize(x, self.bits, dim=3)  # per token and channel group: scale, zero (B, n, d/G, 1)
            cache.write("v", pack(codes.reshape(B, n, d), self.bits), start)
            cache.write("v_scale", scale.squeeze(-1), start)
            cache.write("v_zero", zero.squeeze(-1), start)
            codes = unpack(cache.read("v", end, torch.uint8), self.bits).view(B, end, d // G, G)
            deq = dequantize(codes, cache.read("v_scale", end, torch.float16).unsqueeze(-1),
                             cache.read("v_zero", end, torch.float16).unsqueeze(-1))  # (B, end, d/G, G)
            v_q = deq.reshape(B, end, H, hs).transpose(1, 2).to(dt)  # (B, H, end, hs)
            values = _recent(cache, "v_window", v, start)
            _keep_recent(cache, "v_window", v, start)
            band_v = value_band(t, j, self.window)
        else:
            cache.write("v", v, start)
            values = cache.read("v", end, dt)
        out = mixed_attention(q, keys, k_q, values, v_q, band_k, band_v, j[None, :] <= t[:, None], scaling)  # (B, H, n, hs)
        return out.transpose(1, 2).reshape(B, n, d)


def _recent(cache, name: str, x: torch.Tensor, start: int) -> torch.Tensor:
    """(B, H, end, hs): the tokens of ``x`` (B, H, n, hs) at start.., and before them those the ring ``name`` still
    holds (positions start - rows .. start - 1); zeros elsewhere (never read at full precision)."""
    B, H, n, hs = x.shape
    out = x.new_zeros(B, H, start + n, hs)
    out[:, :, start:] = x
    ring = cache.tensors.get(name)
    if ring is not None and start:
        rows = ring.shape[2]
        lo = max(0, start - rows)
        out[:, :, lo:start] = ring[:, :, torch.arange(lo, start, device=x.device) % rows].to(x.dtype)
    return out


def _keep_recent(cache, name: str, x: torch.Tensor, start: int) -> None:
    """Write the last tokens of ``x`` (B, H, n, hs) at start.. into the ring ``name`` (position p in row p % rows)."""
    ring = cache.tensors.get(name)
    if ring is None:
        return
    rows, n = ring.shape[2], x.shape[2]
    first = max(0, n - rows)
    ring[:, :, torch.arange(start + first, start + n, device=x.device) % rows] = x[:, :, first:].to(ring.dtype)


@register_adapter("quant")
class Quant(Adapter):
    Options = QuantOptions
    family = "quant"
    tap = "attention"
    default_layers = "all"

    @classmethod
    def label(cls, options: QuantOptions) -> str:
        return f"quant[{options.target},{options.bits}b,G{options.group},R{options.window}]"

    @classmethod
    def example_options(cls, dims: Dims) -> dict:
        return {"bits": 2, "group": max(1, dims.hidden // 8), "window": 0}

    @classmethod
    def noop_options(cls, dims: Dims) -> dict:
        return {"bits": 2, "group": max(1, dims.hidden // 8), "window": 1 << 20}  # a window longer than any context

    def build(self) -> None:
        o, d = self.options, self.dims.hidden
        if d % o.group:
            raise ConfigError(f"group must divide the hidden size {d}; got {o.group}")
        if (d * o.bits) % 8:
            raise ConfigError(f"the hidden size {d} at {o.bits} bits is not a whole number of bytes")
        self.per_layer = torch.nn.ModuleDict({str(i): QuantLayer(o.bits, o.group, o.window, o.target, self.dims.heads,
                                                                 self.dims.head_size) for i in self.layers})

    def kv_layout(self, layout: Layout) -> Layout:
        """Per quantized tensor: packed codes (uint8, d b / 8) and float16 scale and zero point (d / G each) per token."""
        o, d = self.options, self.dims.hidden
        entries: dict[str, CacheEntry] = {}
        for name in o.target:
            entries.update({name: CacheEntry(d * o.bits // 8, "uint8"), f"{name}_scale": CacheEntry(d // o.group, "float16"),
                            f"{name}_zero": CacheEntry(d // o.group, "float16")})
        return with_layers(layout, self.layers, **entries)

    def window_bytes(self, cache_dtype: str) -> int:
        """The full-precision rings at the cache's dtype: max(R, G) keys and R values of d each, per layer."""
        o, d = self.options, self.dims.hidden
        rows = (max(o.window, o.group) if "k" in o.target else 0) + (o.window if "v" in o.target else 0)
        return rows * d * DTYPE_BYTES[cache_dtype] * len(self.layers)

    def param_formula(self) -> int:
        return 0
