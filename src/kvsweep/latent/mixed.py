"""The decode step of a layer where a method at the attention (``reads_codes``: it caches K and V its own way, e.g.
quantized) meets a method that caches K and/or V as a code (its codecs): the attention module stores and reads back
each tensor (``read_code`` for a code, ``read_keys`` / ``read_values`` for K and V themselves), full precision inside
its band and its own way (dequantized) outside; the decoder mixes them.

    scores = where(band_k, q k_fp, q k_q),   keys of a code: rotary(decode(code)) at positions 0 .. end-1
    V of a code, decode linear over G groups:  P_h ((P * band) c_fp + (P * ~band) c_q)_g W_h^T + b_h  (rows of P sum to 1)

so that each head attends over its group's code and the decode folds into ``dense`` as on a layer without the
attention method (``LatentDecoder``).
"""

from __future__ import annotations

import torch

from ..adapters.codec import group_blocks
from ..models import apply_rotary
from ..quantize import mixed_probs, mixed_values


def param_dtype(fn) -> torch.dtype | None:
    owner = getattr(fn, "__self__", fn)  # a bound method's module, or the module itself
    if isinstance(owner, torch.nn.Module):
        p = next(owner.parameters(), None)
        return p.dtype if p is not None else None
    return None


def run(fn, *xs: torch.Tensor):
    """A method's module (or a module's method) on ``xs``, in the module's dtype, back in the inputs' dtype."""
    dt = param_dtype(fn)
    out = fn(*(x.to(dt) for x in xs)) if dt is not None else fn(*xs)
    if isinstance(out, tuple):
        return tuple(o.to(x.dtype) for o, x in zip(out, xs))
    return out.to(xs[0].dtype)


def up_blocks(codec) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """A codec's linear decode as blocks: W (G, d/G, r) and bias (d,) or None; None when its decode is not linear."""
    return group_blocks(getattr(codec, "linear", None)) if codec is not None else None


def attend_mixed(plan, lc, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_code, v_code, start: int, cos, sin,
                 scaling: float, dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """One layer's attention (``plan``: the decoder's ``_LayerPlan`` with an attention module and a codec): q rotated
    (B, H, n, hs) at positions start..; k, v pre-rotary (B, n, d); ``k_code``/``v_code`` (B, n, w) when already computed
    (encodes folded into ``query_key_value``). Returns (A (B, n, d), None) or, with the decode folded into ``dense``,
    (None, dense(A))."""
    m, (B, H, n, hs) = plan.attention, q.shape
    end, d = start + n, H * hs
    heads = lambda t: t.reshape(B, -1, H, hs).transpose(1, 2)  # (B, T, d) -> (B, H, T, hs)  # noqa: E731
    rot = lambda t: apply_rotary(heads(t), cos[:, :end], sin[:, :end])  # restored keys (B, end, d) at 0..end-1  # noqa: E731
    t, j = torch.arange(start, end, device=q.device), torch.arange(end, device=q.device)
    k_q = band_k = None
    if plan.k_codec is not None:
        code = run(plan.k_codec.encode, k) if k_code is None else k_code  # (B, n, w)
        if m.quantizes("k"):
            c_fp, c_q, band_k = m.read_code(lc, "k", code, start)
            keys, k_q = rot(run(plan.k_codec.decode, c_fp)), rot(run(plan.k_codec.decode, c_q))
        else:
            lc.write("k", code, start)
            keys = rot(run(plan.k_codec.decode, lc.read("k", end, dtype)))
    else:
        keys, k_q, band_k = m.read_keys(lc, apply_rotary(heads(k), cos[:, start:end], sin[:, start:end]), start)
    p = mixed_probs(q, keys, k_q, band_k, j[None, :] <= t[:, None], scaling)  # (B, H, n, end), rows sum to 1
    if plan.v_codec is None:
        values, v_q, band_v = m.read_values(lc, heads(v), start)
        return mixed_values(p, values, v_q, band_v).transpose(1, 2).reshape(B, n, d), None
    code = run(plan.v_codec.encode, v) if v_code is None else v_code  # (B, n, w)
    if m.quantizes("v"):
        c_fp, c_q, band_v = m.read_code(lc, "v", code, start)
    else:
        lc.write("v", code, start)
        c_fp, c_q, band_v = lc.read("v", end, dtype), None, None
    up = up_blocks(plan.v_codec)
    if up is None:  # a decode that is not linear: restore the values
        restore = lambda c: None if c is None else heads(run(plan.v_codec.decode, c))  # noqa: E731
        return mixed_values(p, restore(c_fp), restore(c_q), band_v).transpose(1, 2).reshape(B, n, d), None
    W, bias = up  # (G, d/G, r), (d,)
    G, r = W.shape[0], W.shape[2]
    group = lambda c: None if c is None else c.view(B, end, G, r).transpose(1, 2).unsqueeze(2)  # (B, G, 1, end, r)  # noqa: E731
    pv = mixed_values(p.view(B, G, H // G, n, end), group(c_fp), group(c_q), band_v).reshape(B, H, n, r)  # P_h code_g
    if plan.fold_w is not None:
        return None, pv.transpose(1, 2).reshape(B, n, -1) @ plan.fold_w + plan.fold_b  # (B, n, d) = dense(A)
    a = torch.einsum("bhnr,hsr->bnhs", pv, W.reshape(H, hs, r).to(pv.dtype)).reshape(B, n, d)  # A without the bias
    return (a + bias.to(a.dtype) if bias is not None else a), None
