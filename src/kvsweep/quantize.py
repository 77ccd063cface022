"""Asymmetric min-max group quantization, bit packing and the attention that reads keys and values quantized
outside a full-precision band: what the ``quant`` method's training-time forward and its latent-cache decode
step share, so that both round the same numbers the same way.

Source: KIVI (Liu et al., ICML 2024, github.com/jy-yuan/KIVI).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

def quantize(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min-max quantization of ``x`` with one scale and zero point per slice along ``dim`` (the group).

    Returns codes (uint8, ``x``'s shape, 0 .. 2^bits - 1), scale and zero (float16, ``dim`` of size 1);
    ``dequantize`` reads them back. Computed in float32 from the float16 scale and zero, so that whatever stores
    them (the cache) reads back the same numbers.
    """
    xf = x.float()
    levels = 2 ** bits - 1
    lo, hi = xf.amin(dim, keepdim=True), xf.amax(dim, keepdim=True)
    scale, zero = ((hi - lo) / levels).to(torch.float16), lo.to(torch.float16)
    step = scale.float().clamp_min(torch.finfo(torch.float16).tiny)
    codes = torch.round((xf - zero.float()) / step).clamp_(0, levels).to(torch.uint8)
    return codes, scale, zero


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``codes * scale + zero`` in float32 (scale and zero broadcast over their group)."""
    return codes.float() * scale.float() + zero.float()


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (..., w) of ``bits`` bits each -> (..., w * bits / 8) bytes, the first code in the lowest bits."""
    per = 8 // bits
    c = codes.reshape(*codes.shape[:-1], -1, per).to(torch.int32)  # (..., w/per, per)
    shifts = torch.arange(0, 8, bits, device=codes.device, dtype=torch.int32)  # (per,)
    return (c << shifts).sum(-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack``: (..., n) bytes -> (..., n * 8 / bits) uint8 codes."""
    shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)  # (per,)
    c = (packed.unsqueeze(-1) >> shifts) & (2 ** bits - 1)  # (..., n, per)
    return c.reshape(*packed.shape[:-1], packed.shape[-1] * (8 // bits))


def _ste(x: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    """``xq`` in the forward, the identity in the backward (straight-through estimator)."""
    return x + (xq.to(x.dtype) - x).detach()


def fake_quant_keys(k: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Keys (B, H, S, hs) with each complete group of ``group`` tokens quantized per channel (dequantized back);
    the incomplete last group as it is (never read quantized). Straight-through."""
    B, H, S, hs = k.shape
    n = S // group * group
    if n == 0:
        return k
    x = k.transpose(1, 2).reshape(B, S, H * hs)[:, :n].reshape(B, n // group, group, H * hs)  # (B, S/G, G, d)
    deq = dequantize(*quantize(x, bits, dim=2)).reshape(B, n, H, hs).transpose(1, 2)  # (B, H, n, hs)
    return _ste(k, torch.cat([deq.to(k.dtype), k[:, :, n:]], dim=2))


def fake_quant_tokens(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Codes (B, S, w) quantized per token in groups of ``group`` consecutive channels (a low-rank method's latent, as
    the cache holds it). Straight-through."""
    B, S, w = x.shape
    deq = dequantize(*quantize(x.reshape(B, S, w // group, group), bits, dim=3)).reshape(B, S, w)
    return _ste(x, deq)


def fake_quant_values(v: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Values (B, H, S, hs) quantized per token in groups of ``group`` channels of d = H hs. Straight-through."""
    B, H, S, hs = v.shape
    x = v.transpose(1, 2).reshape(B, S, (H * hs) // group, group)  # (B, S, d/G, G)
    deq = dequantize(*quantize(x, bits, dim=3)).reshape(B, S, H, hs).transpose(1, 2)  # (B, H, S, hs)
    return _ste(v, deq)


# ----------------------------------------------------------------------------- the attention both paths share


def key_band(t: torch.Tensor, j: torch.Tensor, window: int, group: int) -> torch.Tensor:
    """(T, S) True where the query at position t reads key j at full precision: inside the window, or in a token
    group not complete at t."""
    t, j = t[:, None], j[None, :]
    return ((t - j) < window) | (j // group >= (t + 1) // group)


def value_band(t: torch.Tensor, j: torch.Tensor, window: int) -> torch.Tensor:
    """(T, S) True where the query at position t reads value j at full precision (inside the window)."""
    return (t[:, None] - j[None, :]) < window


def mixed_attention(q: torch.Tensor, k_fp: torch.Tensor, k_q: torch.Tensor | None, v_fp: torch.Tensor,
                    v_q: torch.Tensor | None, band_k: torch.Tensor | None, band_v: torch.Tensor | None, mask,
                    scaling: float) -> torch.Tensor:
    """Attention of q (B, H, T, hs) over keys and values (B, H, S, hs) read at full precision (``*_fp``) where the
    bands (T, S) say and quantized (``*_q``; None: never) elsewhere. ``mask``: (T, S) or broadcastable bool (True:
    allowed) or float (added). Softmax in float32, as the base's. Returns (B, H, T, hs)."""
    return mixed_values(mixed_probs(q, k_fp, k_q, band_k, mask, scaling), v_fp, v_q, band_v)


def mixed_probs(q: torch.Tensor, k_fp: torch.Tensor, k_q: torch.Tensor | None, band_k: torch.Tensor | None, mask,
                scaling: float) -> torch.Tensor:
    """The attention probabilities P (B, H, T, S) of ``mixed_attention`` (rows sum to 1), at q's dtype."""
    scores = torch.matmul(q, k_fp.transpose(2, 3)) * scaling  # (B, H, T, S)
    if k_q is not None:
        scores = torch.where(band_k, scores, torch.matmul(q, k_q.transpose(2, 3)) * scaling)
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + mask
    return F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)


def mixed_values(p: torch.Tensor, v_fp: torch.Tensor, v_q: torch.Tensor | None, band_v: torch.Tensor | None) -> torch.Tensor:
    """``(P * band) V_fp + (P * ~band) V_q`` (plain ``P V_fp`` when ``v_q`` is None): P (..., T, S), band (T, S), V (..., S, w)
    (values per head, or a group's code) -> (..., T, w)."""
    if v_q is None:
        return torch.matmul(p, v_fp)
    keep = band_v.to(p.dtype)
    return torch.matmul(p * keep, v_fp) + torch.matmul(p * (1 - keep), v_q)
