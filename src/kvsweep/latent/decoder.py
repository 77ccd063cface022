"""A GPT-NeoX decoding step of our own that applies a trial's adapters to a latent cache.

``LatentDecoder(model, adapters)`` reads the frozen base's modules (``kvsweep.models.neox_parts``) and
the adapters' own modules (no copies of their parameters; the adapters need not be attached) and runs
prefill and token-by-token decoding with a ``LatentCache``. Per layer, with H heads of hs = d / H:

- base:               cache rotated K and V; ``A_h = P_h V_h``; ``out = dense(A)``.
- V-DProj on V:       cache only ``V_c = down(V)`` (r per token). Rows of P sum to 1, so
                      ``P_h (V_c W_up^T + b_up)_h = (P_h V_c) W_up,h^T + b_up,h``; with no KA on the layer
                      each head's slice of ``up`` is folded into ``dense`` once
                      (``F_h = W_up,h^T W_dense[:, h]^T``, (r, d); bias ``W_dense b_up + b_dense``), so
                      ``out = sum_h (P_h V_c) F_h + b``; the full V is never rebuilt.
- V-DProj + KA:       KA needs A, so ``A_h = (P_h V_c) W_up,h^T + b_up,h`` per head (still no full V),
                      then the KA module, then ``dense``.
- V-DProj on K:       cache ``K_c = down(K)`` of the pre-rotary keys; at use ``up(K_c)`` and the rotary
                      embedding at positions 0..T-1, as the training-time forward does.
- KA adapter:         LayerNorm(A) -> Q', K', V'; cache K' and V' (d each); causal attention; the
                      variant's ``combine``.

The attention reproduces ``transformers``' GPT-NeoX: partial rotary on the first ``rotary_ndims`` of
each head, scores scaled by ``hs ** -0.5``, causal mask, softmax in float32, and the parallel residual
``x + attn(ln1(x)) + mlp(ln2(x))`` (or the sequential one where the config says so).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..adapters import Adapter
from ..adapters.ka import KALayer
from ..adapters.vdproj import Compressor
from ..config import ConfigError
from ..kvcache import Layout, base_layout
from ..models import LayerParts, apply_rotary, neox_parts, split_qkv
from .cache import CACHE_DTYPES, LatentCache, cache_dtype_of


@dataclass
class _LayerPlan:
    parts: LayerParts
    k_comp: Compressor | None = None  # V-DProj on the pre-rotary keys
    v_comp: Compressor | None = None  # V-DProj on the values
    ka: KALayer | None = None
    fold_w: torch.Tensor | None = None  # (H*r, d): per head W_up,h^T @ W_dense[:, h]^T, heads stacked
    fold_b: torch.Tensor | None = None  # (d,): W_dense @ b_up + b_dense


class LatentDecoder:
    """Prefill and decode a GPT-NeoX base with ``adapters`` (at most one per family) on a latent cache.

    ``cache_dtype`` (float16, bfloat16, float32; default: the model's dtype) is what the cache stores;
    compute runs in the model's dtype. ``fold`` (default True) folds ``up`` into ``dense`` on V-DProj
    layers without KA; False computes A per head and then ``dense`` (the same numbers, less work when
    H * r > r + d). ``restore_prefill``: when several tokens are fed at once (prefill), V-DProj layers may
    restore V for that call only (not cached: the cache still holds ``V_c`` alone), which costs
    ``T r d`` instead of ``H n T r``; None (default) picks the cheaper, True always, False never. One
    decoded token always takes the latent product. Build the decoder after the adapters' weights are
    final: the folded matrices are computed here.
    """

    def __init__(self, model, adapters: list[Adapter] | tuple[Adapter, ...] = (), *, cache_dtype: str | None = None,
                 fold: bool = True, restore_prefill: bool | None = None):
        self.model = model
        self.restore_prefill = restore_prefill
        self.adapters = list(adapters)
        self.parts = neox_parts(model)
        self.dims = self.parts.dims
        self.dtype = self.parts.embed.weight.dtype
        self.device = self.parts.embed.weight.device
        self.cache_dtype_name = cache_dtype or {v: k for k, v in CACHE_DTYPES.items()}.get(self.dtype, "float32")
        self.cache_dtype = cache_dtype_of(self.cache_dtype_name)
        self.plans = [_LayerPlan(p) for p in self.parts.layers]
        for a in self.adapters:
            if a.dims != self.dims:
                raise ConfigError(f"adapter {a.name} was built for {a.dims}, the model is {self.dims}")
            if a.family == "vdproj":
                for i in a.layers:
                    m = a.per_layer[str(i)]
                    if m.active:
                        self.plans[i].k_comp, self.plans[i].v_comp = m.k, m.v
            elif a.family == "ka":
                for i in a.layers:
                    m = a.per_layer[str(i)]
                    if m.active:
                        self.plans[i].ka = m
            else:
                raise ConfigError(f"the latent cache does not know adapter family {a.family!r} (adapter {a.name})")
        if fold:
            for plan in self.plans:
                if plan.v_comp is not None and plan.ka is None:
                    plan.fold_w, plan.fold_b = self._fold(plan)
        self._cos = self._sin = None  # rotary tables (1, N, rot) for positions 0..N-1, grown on demand

    # ------------------------------------------------------------------ accounting and cache
    def layout(self) -> Layout:
        """What ``kvsweep.kvcache`` accounts for this model and these adapters."""
        layout = base_layout(self.dims.layers, self.dims.hidden)
        for a in self.adapters:
            layout = a.kv_layout(layout)
        return layout

    def new_cache(self, batch: int, capacity: int) -> LatentCache:
        """An empty cache for ``batch`` sequences of up to ``capacity`` tokens; widths from the modules."""
        H, hs = self.dims.heads, self.dims.head_size
        layers = []
        for plan in self.plans:
            shapes: dict[str, tuple[int, ...]] = {}
            shapes.update({"k_c": (plan.k_comp.down.out_features,)} if plan.k_comp is not None else {"k": (H, hs)})
            shapes.update({"v_c": (plan.v_comp.down.out_features,)} if plan.v_comp is not None else {"v": (H, hs)})
            if plan.ka is not None:
                shapes.update(ka_k=(H, hs), ka_v=(H, hs))
            layers.append(shapes)
        return LatentCache(layers, batch, capacity, self.cache_dtype, self.device)

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def forward(self, ids: torch.Tensor, cache: LatentCache, *, last_only: bool = False) -> torch.Tensor:
        """Feed ``ids`` (B, n) at the cache's position and append them to the cache; logits (B, n, V), or
        (B, 1, V) of the last position with ``last_only`` (a prefill needs no more)."""
        B, n = ids.shape
        start, end = cache.length, cache.length + ids.shape[1]
        if B != cache.batch:
            raise ValueError(f"batch {B} does not match the cache's {cache.batch}")
        if end > cache.capacity:
            raise ValueError(f"cache full: {start} + {n} tokens exceed its capacity of {cache.capacity}")
        ids = ids.to(self.device)
        x = self.parts.embed(ids)  # (B, n, d)
        cos, sin = self._rotary(end, x)
        for i, plan in enumerate(self.plans):
            x = self._layer(plan, cache.layers[i], x, start, cos, sin)
        if last_only:
            x = x[:, -1:]
        cache.length = end
        return self.parts.lm_head(self.parts.final_norm(x))

    __call__ = forward

    def _layer(self, plan: _LayerPlan, lc, x, start, cos, sin):
        parts, H, hs, d = plan.parts, self.dims.heads, self.dims.head_size, self.dims.hidden
        B, n, _ = x.shape
        end = start + n
        heads = lambda t: t.view(B, -1, H, hs).transpose(1, 2)  # (B, T, d) -> (B, H, T, hs)  # noqa: E731
        q, k, v = split_qkv(parts.qkv(parts.input_norm(x)), H)  # (B, n, d) each, K and V pre-rotary
        q = apply_rotary(heads(q), cos[:, start:end], sin[:, start:end])  # (B, H, n, hs)
        if plan.k_comp is not None:
            lc.write("k_c", _run(plan.k_comp.down, k), start)  # (B, n, r)
            k_all = _run(plan.k_comp.up, lc.read("k_c", end, self.dtype))  # (B, end, d) restored
            keys = apply_rotary(heads(k_all), cos[:, :end], sin[:, :end])  # (B, H, end, hs)
        else:
            lc.write("k", apply_rotary(heads(k), cos[:, start:end], sin[:, start:end]), start)
            keys = lc.read("k", end, self.dtype)  # (B, H, end, hs)
        out = None
        if plan.v_comp is None:
            lc.write("v", heads(v), start)
            a = self._attend(q, keys, lc.read("v", end, self.dtype), start)  # (B, n, d)
        else:
            lc.write("v_c", _run(plan.v_comp.down, v), start)  # (B, n, r)
            v_c = lc.read("v_c", end, self.dtype)  # (B, end, r)
            if self._restore_values(n, end, v_c.shape[-1], plan):
                # prefill: restoring V for this call (never cached) costs less than attending over the code per head
                a = self._attend(q, keys, heads(_run(plan.v_comp.up, v_c)), start)
            else:
                scores = torch.matmul(q, keys.transpose(2, 3)) * self.parts.scaling  # (B, H, n, end)
                if n > 1:  # query i sits at position start+i and sees keys 0..start+i
                    allowed = torch.ones(n, end, dtype=torch.bool, device=x.device).tril(start)
                    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
                p = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # rows sum to 1
                pv = torch.matmul(p, v_c.unsqueeze(1))  # (B, H, n, r): P_h V_c
                if plan.fold_w is not None:
                    out = pv.transpose(1, 2).reshape(B, n, -1) @ plan.fold_w + plan.fold_b  # (B, n, d) = dense(A)
                else:
                    up = plan.v_comp.up
                    w = up.weight.view(H, hs, -1).to(pv.dtype)  # (H, hs, r): W_up,h, a view of up's own weight
                    a = torch.einsum("bhnr,hsr->bnhs", pv, w).reshape(B, n, d)  # (B, n, d): A without b_up
                    if up.bias is not None:
                        a = a + up.bias.to(a.dtype)
        if out is None:
            if plan.ka is not None:
                a = self._ka(plan.ka, lc, a, start)
            out = parts.dense(a)
        if parts.parallel_residual:
            return x + out + parts.mlp(parts.post_attention_norm(x))
        h = x + out
        return h + parts.mlp(parts.post_attention_norm(h))

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int) -> torch.Tensor:
        """Causal attention of q (B, H, n, hs) at positions start.. over keys, values (B, H, end, hs) -> (B, n, d)."""
        B, H, n, hs = q.shape
        end = keys.shape[2]
        if n == 1:
            o = F.scaled_dot_product_attention(q, keys, values, scale=self.parts.scaling)
        elif start == 0:
            o = F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=self.parts.scaling)
        else:
            allowed = torch.ones(n, end, dtype=torch.bool, device=q.device).tril(start)
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed, scale=self.parts.scaling)
        return o.transpose(1, 2).reshape(B, n, H * o.shape[-1])

    def _restore_values(self, n: int, end: int, r: int, plan: _LayerPlan) -> bool:
        """Whether this call restores V transiently instead of the latent product: only with several
        queries (prefill), never when decoding one token; by cost unless ``restore_prefill`` says."""
        if n == 1 or self.restore_prefill is False:
            return False
        if self.restore_prefill:
            return True
        H, hs, d = self.dims.heads, self.dims.head_size, self.dims.hidden
        latent = H * n * end * r + n * (H * r * d if plan.fold_w is not None else r * d + d * d)
        restore = end * r * d + H * n * end * hs + n * d * d
        return restore < latent

    def _ka(self, layer: KALayer, lc, a: torch.Tensor, start: int) -> torch.Tensor:
        """The KA variant on A (B, n, d) with its K', V' cached: ``combine(A, attention(LN(A)))``."""
        B, n, d = a.shape
        H, hs, end = self.dims.heads, self.dims.head_size, start + a.shape[1]
        wdt = layer.q.weight.dtype
        a_in = a.to(wdt)
        x = layer.norm(a_in)
        q, k, v = (proj(x).view(B, n, H, hs).transpose(1, 2) for proj in (layer.q, layer.k, layer.v))  # (B, H, n, hs)
        lc.write("ka_k", k, start)
        lc.write("ka_v", v, start)
        keys, values = lc.read("ka_k", end, wdt), lc.read("ka_v", end, wdt)  # (B, H, end, hs)
        if n == 1:
            ka = F.scaled_dot_product_attention(q, keys, values)
        elif start == 0:
            ka = F.scaled_dot_product_attention(q, keys, values, is_causal=True)
        else:
            allowed = torch.ones(n, end, dtype=torch.bool, device=a.device).tril(start)
            ka = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed)
        ka = ka.transpose(1, 2).reshape(B, n, d)
        return layer.combine(layer, a_in, ka).to(a.dtype)

    # ------------------------------------------------------------------ precomputation
    def _rotary(self, end: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (1, >=end, rot) of positions 0.., from the model's own rotary module."""
        if self._cos is None or self._cos.shape[1] < end:
            size = max(end, 2 * (self._cos.shape[1] if self._cos is not None else 0), 64)
            pos = torch.arange(size, device=self.device).unsqueeze(0)
            self._cos, self._sin = self.parts.rotary_emb(like, position_ids=pos)
        return self._cos, self._sin

    @torch.no_grad()
    def _fold(self, plan: _LayerPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold each head's slice of V-DProj's ``up`` into ``dense``: (H*r, d) and a bias (d,)."""
        H, hs, d = self.dims.heads, self.dims.head_size, self.dims.hidden
        up, dense = plan.v_comp.up, plan.parts.dense
        r = up.in_features
        w_up = up.weight.double().view(H, hs, r)  # (H, hs, r): rows of head h
        w_dense = dense.weight.double().view(d, H, hs)  # (d, H, hs): columns of head h
        fold_w = torch.einsum("hsr,ehs->hre", w_up, w_dense).reshape(H * r, d)  # F_h = W_up,h^T W_dense[:, h]^T
        fold_b = torch.zeros(d, dtype=torch.float64, device=fold_w.device)
        if up.bias is not None:
            fold_b = fold_b + dense.weight.double() @ up.bias.double()
        if dense.bias is not None:
            fold_b = fold_b + dense.bias.double()
        return fold_w.to(self.dtype), fold_b.to(self.dtype)


def _run(linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """An adapter's Linear on ``x``, in the adapter's dtype, back in ``x``'s."""
    return linear(x.to(linear.weight.dtype)).to(x.dtype)
