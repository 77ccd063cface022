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

On a layer where a low-rank method caches K and/or V as a code (``vdproj``, ``lowrank``), ``quant`` quantizes that
code instead, per token (``quant_code``): the cache holds the packed code, its scales and zero points and a ring of
the R most recent codes; the training-time forward reads the codes the method computed (``last_code``, found through
``bind``) and attends with decode(fake_quant(code)) outside the window (keys rotated after decoding).

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
from functools import partial
from typing import Callable

import torch

from ..config import ConfigError
from ..kvcache import CacheEntry, CacheTensor, DTYPE_BYTES, Layout
from ..models import Dims
from ..quantize import (dequantize, fake_quant_keys, fake_quant_tokens, fake_quant_values, key_band, mixed_attention, pack,
                        quantize, unpack, value_band)
from .base import Adapter, AdapterOptions, option, register_adapter
from .quant_code import check_code_width, code_cache_shapes, code_of, keep_recent, read_code, recent

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
        self.layer = -1
        self.code_source: Callable[[], dict] | None = None  # the codecs of the layer's qkv-tap method (``Quant.bind``)

    def quantizes(self, name: str) -> bool:
        """Whether this module caches ``name`` (``"k"`` or ``"v"``) its own way (quantized)."""
        return self.quant_k if name == "k" else self.quant_v

    def bound_codecs(self) -> dict:
        """The codecs of the K and V this module quantizes that the layer's qkv-tap method caches as a code."""
        codecs = self.code_source() if self.code_source is not None else {}
        return {name: c for name, c in codecs.items() if self.quantizes(name)}

    def code_widths(self) -> dict[str, int]:
        """Width of each code this module quantizes, checked (``quant_code.check_code_width``)."""
        return {name: check_code_width(c.width, self.bits, self.group, name, self.layer) for name, c in self.bound_codecs().items()}

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
        B, H = query.shape[:2]
        _ = self.code_widths()  # one clear line where the group does not divide a code's width
        codecs = {n: c for n, c in self.bound_codecs().items() if c.last_code is not None}  # none while calibrating
        heads = lambda x: x.reshape(B, S, H, -1).transpose(1, 2)  # (B, S, d) -> (B, H, S, hs)  # noqa: E731
        quantized = {n: fake_quant_tokens(code_of(c, B, S, n, self.layer), self.bits, self.group) for n, c in codecs.items()}
        k_q = v_q = band_k = band_v = None
        if "k" in codecs:  # keys rebuilt from the quantized code, then rotated as the model rotates keys
            k_q, band_k = base.rotate(heads(codecs["k"].decode(quantized["k"])).to(key.dtype)), value_band(t, j, self.window)
        elif self.quant_k:
            k_q, band_k = fake_quant_keys(key, self.bits, self.group), key_band(t, j, self.window, self.group)
        if "v" in codecs:  # values rebuilt from the quantized code
            v_q, band_v = heads(codecs["v"].decode(quantized["v"])).to(value.dtype), value_band(t, j, self.window)
        elif self.quant_v:
            v_q, band_v = fake_quant_values(value, self.bits, self.group), value_band(t, j, self.window)
        rows = max(1, SCORE_ELEMENTS // (B * H * S))  # queries per chunk: the (B, H, rows, S) scores stay bounded
        outs = []
        for a in range(0, T, rows):
            part = slice(a, a + rows)
            m = mask[..., part, :] if mask.shape[-2] == T else mask  # a mask of one row broadcasts
            outs.append(mixed_attention(query[:, :, part], key, k_q, value, v_q, None if band_k is None else band_k[part],
                                        None if band_v is None else band_v[part], m, scaling))  # (B, H, rows, hs)
        return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None

    # -- the latent cache's decode step (kvsweep.latent)
    def cache_shapes(self, codes: dict[str, int] | None = None) -> dict[str, CacheTensor]:
        """Packed codes per token, float16 scales and zero points (K's per group of G tokens), full-precision rings; for
        a tensor cached as a code (``codes``: name -> width), the code's (``quant_code.code_cache_shapes``)."""
        d, codes = self.heads * self.head_size, codes or {}
        shapes: dict[str, CacheTensor] = {}
        for name, width in codes.items():
            if self.quantizes(name):
                shapes.update(code_cache_shapes(name, check_code_width(width, self.bits, self.group, name, self.layer),
                                                self.bits, self.group, self.window))
        if self.quant_k and "k" not in codes:
            shapes.update(k=CacheTensor((d * self.bits // 8,), "uint8"), k_scale=CacheTensor((d,), "float16", tokens=self.group),
                          k_zero=CacheTensor((d,), "float16", tokens=self.group),
                          k_window=CacheTensor((self.heads, self.head_size), rows=self.key_rows))
        if self.quant_v and "v" not in codes:
            shapes.update(v=CacheTensor((d * self.bits // 8,), "uint8"), v_scale=CacheTensor((d // self.group,), "float16"),
                          v_zero=CacheTensor((d // self.group,), "float16"))
            if self.window:
                shapes["v_window"] = CacheTensor((self.heads, self.head_size), rows=self.window)
        return shapes

    def decode_attend(self, cache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scaling: float) -> torch.Tensor:
        """The decode step: q, k (rotated), v (B, H, n, hs) at positions start .. start+n-1 -> A (B, n, d): the keys
        (``read_keys``) and values (``read_values``) read at full precision inside the bands and dequantized outside
        (``mixed_attention``), as the training-time forward does."""
        B, H, n, hs = q.shape
        t, j = torch.arange(start, start + n, device=q.device), torch.arange(start + n, device=q.device)
        keys, k_q, band_k = self.read_keys(cache, k, start)
        values, v_q, band_v = self.read_values(cache, v, start)
        out = mixed_attention(q, keys, k_q, values, v_q, band_k, band_v, j[None, :] <= t[:, None], scaling)  # (B, H, n, hs)
        return out.transpose(1, 2).reshape(B, n, H * hs)

    def read_keys(self, cache, k: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Store the rotated keys k (B, H, n, hs) at start.. and read all back: full precision (B, H, end, hs; where still
        held), dequantized (None: K not quantized) and the band (n, end) of full-precision reads.

        Keys go to the full-precision ring; each token group this call completes is quantized per channel (its tokens
        from the ring and this call) into ``k``, ``k_scale``, ``k_zero``.
        """
        B, H, n, hs = k.shape
        end, d, G, dt = start + n, H * hs, self.group, k.dtype
        if not self.quant_k:
            cache.write("k", k, start)
            return cache.read("k", end, dt), None, None
        keys = recent(cache, "k_window", k, start)  # (B, H, end, hs): full precision where still held
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
        keep_recent(cache, "k_window", k, start)
        t, j = torch.arange(start, end, device=k.device), torch.arange(end, device=k.device)
        return keys, k_q, key_band(t, j, self.window, G)

    def read_values(self, cache, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Store the values v (B, H, n, hs) at start.. and read all back as ``read_keys`` does; values are quantized per
        token as they come into ``v``, ``v_scale``, ``v_zero``, and kept in their ring."""
        B, H, n, hs = v.shape
        end, d, G, dt = start + n, H * hs, self.group, v.dtype
        if not self.quant_v:
            cache.write("v", v, start)
            return cache.read("v", end, dt), None, None
        x = v.transpose(1, 2).reshape(B, n, d // G, G)  # (B, n, d/G, G)
        codes, scale, zero = quantize(x, self.bits, dim=3)  # per token and channel group: scale, zero (B, n, d/G, 1)
        cache.write("v", pack(codes.reshape(B, n, d), self.bits), start)
        cache.write("v_scale", scale.squeeze(-1), start)
        cache.write("v_zero", zero.squeeze(-1), start)
        codes = unpack(cache.read("v", end, torch.uint8), self.bits).view(B, end, d // G, G)
        deq = dequantize(codes, cache.read("v_scale", end, torch.float16).unsqueeze(-1),
                         cache.read("v_zero", end, torch.float16).unsqueeze(-1))  # (B, end, d/G, G)
        values = recent(cache, "v_window", v, start)
        keep_recent(cache, "v_window", v, start)
        t, j = torch.arange(start, end, device=v.device), torch.arange(end, device=v.device)
        return values, deq.reshape(B, end, H, hs).transpose(1, 2).to(dt), value_band(t, j, self.window)

    def read_code(self, cache, name: str, code: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store the code (B, n, w) of ``name`` at start.. and read all back: full precision, dequantized (B, end, w) and
        the band (n, end) (``quant_code.read_code``)."""
        return read_code(cache, name, code, start, self.bits, self.group, self.window)


def _codecs_of(adapter: Adapter, layer: int) -> dict:
    """The codecs of ``adapter``'s module at ``layer`` as they are now (a calibration may have reshaped them); none while
    the module is inactive (the latent decoder then caches K and V themselves too)."""
    module = adapter.layer_module(layer)
    return module.codecs() if getattr(module, "active", True) else {}


@register_adapter("quant")
class Quant(Adapter):
    Options = QuantOptions
    family = "quant"
    tap = "attention"
    reads_codes = True
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
        for i in self.layers:
            self.per_layer[str(i)].layer = i

    def bind(self, adapters: list[Adapter]) -> None:
        """On each of its layers where a method caches K and/or V as a code (``caches_codes``), read that code.

        Raises:
            ConfigError: that method's code widths come from calibration data (``shaped_by_calibration``): whether the
                group divides them could not be known before a trial starts.
        """
        for i in self.layers:
            owner = [a for a in adapters if a.tap == "qkv" and a.caches_codes and i in a.layers]
            if owner and owner[0].shaped_by_calibration:
                raise ConfigError(f"quant cannot quantize the code {owner[0].name} caches on layer {i}: its widths come from "
                                  "calibration data, so the group could not be checked against them before the trial; give "
                                  f"{owner[0].name} its ranks, or put quant on other layers")
            self.per_layer[str(i)].code_source = partial(_codecs_of, owner[0], i) if owner else None

    def kv_layout(self, layout: Layout) -> Layout:
        """Per quantized tensor of width w (d, or the width of the code a method caches in its place): packed codes
        (uint8, w b / 8) and float16 scale and zero point (w / G each) per token."""
        o, d = self.options, self.dims.hidden
        out = list(layout)
        for i in self.layers:
            widths = self.per_layer[str(i)].code_widths()
            for name in o.target:
                w = widths.get(name, d)
                out[i] = out[i].replaced(**{name: CacheEntry(w * o.bits // 8, "uint8"), f"{name}_scale": CacheEntry(w // o.group, "float16"),
                                            f"{name}_zero": CacheEntry(w // o.group, "float16")})
        return tuple(out)

    def window_bytes(self, cache_dtype: str) -> int:
        """The full-precision rings at the cache's dtype, per layer: max(R, G) keys of d and R values of d; R codes of w
        where a tensor is cached as a code of width w."""
        o, d = self.options, self.dims.hidden
        total = 0
        for i in self.layers:
            widths = self.per_layer[str(i)].code_widths()
            if "k" in o.target:
                total += o.window * widths["k"] if "k" in widths else max(o.window, o.group) * d
            if "v" in o.target:
                total += o.window * widths.get("v", d)
        return total * DTYPE_BYTES[cache_dtype]

    def param_formula(self) -> int:
        return 0
