"""``quant`` of a low-rank method's latent: what the cache holds and how it reads it back where the layer's K and/or V
are cached as a code (``vdproj``, ``lowrank``: ``codecs()`` of the qkv-tap module) instead of as themselves.

A code c = encode(x) of width w (per token) is quantized **per token**, in groups of G consecutive code channels
(asymmetric min-max, a float16 scale and zero point per group): the codes of K as well as of V. Per-channel
quantization over token groups (KIVI's choice for rotated keys, whose outliers sit in fixed channels) buys little on a
code: a low-rank basis (PCA, SVD) spreads each outlier channel over the whole code and orders the code's channels by
variance, so that G consecutive channels have similar ranges, and Palu quantizes its latents per token as well. Per
token, a code is quantized as it comes: no incomplete token group stays at full precision, and the window is the
only band (query t reads code j at full precision iff t - j < R), for keys as for values.

Cache per coded tensor ``name`` (``k`` or ``v``): ``name`` packed codes (uint8, w b / 8 per token), ``name_scale`` and
``name_zero`` (float16, w / G per token each), and ``name_window``: a ring of the R most recent codes at the cache's
dtype (fixed bytes, w R per layer; none at R = 0).

Reading: V's attention stays linear in the code, so the per-group attention over the code and the fold of the
decode into ``dense`` still hold: ``A_h = ((P * band) c_fp + (P * ~band) c_q) W_h^T + b_h`` (rows of P sum to 1).
Keys are ``rotary(decode(c))``: the quantized ones ``rotary(decode(dequantize(c_q)))``, mixed with the full-precision
ones by the band in the scores, as ``quant`` mixes plain keys.

Source: KIVI (Liu et al., ICML 2024) for the rounding and the window; Palu (Chang et al., ICLR 2025,
github.com/shadowpa0327/Palu) for quantizing a low-rank latent per token.
"""

from __future__ import annotations

import torch

from ..config import ConfigError
from ..kvcache import CacheTensor
from ..quantize import dequantize, pack, quantize, unpack, value_band


def check_code_width(width: int, bits: int, group: int, name: str, layer: int) -> int:
    """``width`` if quant can hold a code of it (G divides it, whole bytes), else one clear line.

    Raises:
        ConfigError: the group does not divide the code's width (or the packed codes are not whole bytes).
    """
    if width % group or (width * bits) % 8:
        raise ConfigError(f"quant: group {group} must divide the width {width} of the code of {name.upper()} cached on "
                          f"layer {layer} (and {bits}-bit codes fill whole bytes); choose a group dividing {width}")
    return width


def code_cache_shapes(name: str, width: int, bits: int, group: int, window: int) -> dict[str, CacheTensor]:
    """The cache tensors of one quantized code of ``width`` per token (see the module's docstring)."""
    shapes = {name: CacheTensor((width * bits // 8,), "uint8"), f"{name}_scale": CacheTensor((width // group,), "float16"),
              f"{name}_zero": CacheTensor((width // group,), "float16")}
    if window:
        shapes[f"{name}_window"] = CacheTensor((width,), rows=window)
    return shapes


def read_code(cache, name: str, code: torch.Tensor, start: int, bits: int, group: int,
              window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Store ``code`` (B, n, w) at positions start.. (packed, scales, zero points, ring) and read all codes back:
    full precision (B, end, w; where the ring or this call holds them, zeros elsewhere: never read so), dequantized
    (B, end, w), both at ``code``'s dtype, and the band (n, end) where a query reads full precision."""
    B, n, w = code.shape
    end, dt = start + n, code.dtype
    codes, scale, zero = quantize(code.reshape(B, n, w // group, group), bits, dim=3)  # per token and channel group
    cache.write(name, pack(codes.reshape(B, n, w), bits), start)
    cache.write(f"{name}_scale", scale.squeeze(-1), start)
    cache.write(f"{name}_zero", zero.squeeze(-1), start)
    stored = unpack(cache.read(name, end, torch.uint8), bits).view(B, end, w // group, group)
    deq = dequantize(stored, cache.read(f"{name}_scale", end, torch.float16).unsqueeze(-1),
                     cache.read(f"{name}_zero", end, torch.float16).unsqueeze(-1)).reshape(B, end, w).to(dt)
    fp = recent(cache, f"{name}_window", code.unsqueeze(1), start).squeeze(1)  # (B, end, w)
    keep_recent(cache, f"{name}_window", code.unsqueeze(1), start)
    t, j = torch.arange(start, end, device=code.device), torch.arange(end, device=code.device)
    return fp, deq, value_band(t, j, window)


def _ring(cache, name: str) -> torch.Tensor | None:
    """The ring ``name`` as (B, H, rows, hs) (a code's ring (B, rows, w) as (B, 1, rows, w), a view); None if absent."""
    ring = cache.tensors.get(name)
    return ring.unsqueeze(1) if ring is not None and ring.dim() == 3 else ring


def recent(cache, name: str, x: torch.Tensor, start: int) -> torch.Tensor:
    """(B, H, end, hs): the tokens of ``x`` (B, H, n, hs) at start.., and before them those the ring ``name`` still
    holds (positions start - rows .. start - 1); zeros elsewhere (never read at full precision)."""
    B, H, n, hs = x.shape
    out = x.new_zeros(B, H, start + n, hs)
    out[:, :, start:] = x
    ring = _ring(cache, name)
    if ring is not None and start:
        rows = ring.shape[2]
        lo = max(0, start - rows)
        out[:, :, lo:start] = ring[:, :, torch.arange(lo, start, device=x.device) % rows].to(x.dtype)
    return out


def keep_recent(cache, name: str, x: torch.Tensor, start: int) -> None:
    """Write the last tokens of ``x`` (B, H, n, hs) at start.. into the ring ``name`` (position p in row p % rows)."""
    ring = _ring(cache, name)
    if ring is None:
        return
    rows, n = ring.shape[2], x.shape[2]
    first = max(0, n - rows)
    ring[:, :, torch.arange(start + first, start + n, device=x.device) % rows] = x[:, :, first:].to(ring.dtype)


def code_of(codec, batch: int, tokens: int, name: str, layer: int) -> torch.Tensor:
    """The code (B, S, w) the codec computed in this forward (``last_code``; in a pack its rows of a stacked call).

    Raises:
        RuntimeError: the codec holds no code of this forward's B x S tokens (the keys came from a transformers cache,
            or the method did not compress this forward).
    """
    code = getattr(codec, "last_code", None)
    if code is None or code.numel() != batch * tokens * codec.width:
        raise RuntimeError(f"quant on layer {layer} reads the code of {name.upper()} from this forward, which holds none "
                           f"for its {batch} x {tokens} tokens: run the whole sequence in one forward (use_cache=False)")
    return code.reshape(batch, tokens, codec.width)
