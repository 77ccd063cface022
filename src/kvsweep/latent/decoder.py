"""A GPT-NeoX decoding step of our own that applies a trial's methods to a latent cache.

``LatentDecoder(model, adapters)`` reads the frozen base's modules (``kvsweep.models.neox_parts``) and
the methods' own per-layer modules (no copies of their parameters; the adapters need not be attached)
and runs prefill and token-by-token decoding with a ``LatentCache``. What a method caches and how it
reads it back is the method's own (its decode step, see ``kvsweep.adapters.Adapter``); the decoder
knows no method by name. Per layer, with H heads of hs = d / H:

- base:               cache rotated K and V; ``A_h = P_h V_h``; ``out = dense(A)``.
- a codec on V:       cache only ``code = encode(V)`` (``width`` per token). With a linear decode
                      over G groups (``codec.groups``; V-DProj's ``up`` is one group, a ``GroupLinear``
                      G blocks): the code is G blocks of r, head h of group g = h // (H/G) reads block g
                      alone, ``V_h = code_g W_h^T + b_h`` (W_h: the (hs, r) rows of head h in its group's
                      block); rows of P sum to 1, so ``P_h (code_g W_h^T + b_h) = (P_h code_g) W_h^T + b_h``;
                      with nothing at the layer's attention output, each head's W_h is folded into
                      ``dense`` once (``F_h = W_h^T W_dense[:, h]^T``, (r, d); bias ``W_dense b + b_dense``), so
                      ``out = sum_h (P_h code_g) F_h + b``; the full V is never rebuilt, and a step costs
                      H r per cached position (the group's rank, not the whole width). Otherwise (or with a
                      method at the attention output) ``A_h = (P_h code_g) W_h^T + b_h`` per head; a codec
                      whose decode is not linear restores V from the cached code at every step.
- a codec on K:       cache ``code = encode(K)`` of the pre-rotary keys; at use ``decode(code)`` and the
                      rotary embedding at positions 0..T-1, as the training-time forward does: every step
                      restores all T keys, ``T * width * d / G`` multiply-adds per layer (plus the rotary),
                      against reading T rotated keys from a base cache (benchmarks/decode.py's lowrank rows
                      measure it: K+V against V alone at one rank).
- encode folded into ``query_key_value``: where no position-wise module acts on K and V and a codec's encode
                      is linear (``encode_linear``: ``code = D (W x + b) + c``), ``D W`` (width, d) and
                      ``D b + c`` replace that codec's rows of the fused projection once, so a token costs
                      ``(d + rows of K + rows of V) * d`` instead of ``3 d * d`` plus the encodes: never more,
                      since a code is at most d wide (``fold_qkv``, default True; False: never).
- a qkv module without codecs: applied to (K, V) before the base's cache (a position-wise map).
- at the attention itself: a module's ``decode_attend`` with its own cache tensors in place of the base's ``k``
                      and/or ``v`` (``quant``'s packed codes, scales, zero points and full-precision rings); on a
                      layer where a codec caches K and/or V as a code, the module's ``read_code`` (and
                      ``read_keys``/``read_values`` for what has no codec) store and read them back, full
                      precision inside its band and its own way outside, and the decoder mixes them
                      (``kvsweep.latent.mixed``): V's code still attended per group and folded into ``dense``.
- at the attention output: a module's ``decode_step`` with its own cache tensors (KA's K' and V'), or
                      the module itself (a position-wise map).

The attention reproduces ``transformers``' GPT-NeoX: partial rotary on the first ``rotary_ndims`` of
each head, scores scaled by ``hs ** -0.5``, causal mask, softmax in float32, and the parallel residual
``x + attn(ln1(x)) + mlp(ln2(x))`` (or the sequential one where the config says so).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..adapters import Adapter, bind_adapters, kv_layout_of
from ..adapters.codec import group_blocks
from ..config import ConfigError
from ..kvcache import Layout, base_layout
from ..models import LayerParts, apply_rotary, neox_parts, qkv_split_weights, split_qkv
from .cache import CACHE_DTYPES, LatentCache, cache_dtype_of
from .mixed import attend_mixed, run as _run, up_blocks as _up


@dataclass
class _LayerPlan:
    parts: LayerParts
    qkv: list = field(default_factory=list)  # position-wise (k, v) -> (k, v) modules, in attach order
    k_codec: object | None = None  # what caches the pre-rotary keys compressed
    v_codec: object | None = None  # what caches the values compressed
    out: list = field(default_factory=list)  # attention-output modules, in attach order
    attention: torch.nn.Module | None = None  # a method that attends itself over its own cache tensors
    attention_by: str = ""  # that method's name
    fold_w: torch.Tensor | None = None  # (H*r, d): per head W_h^T @ W_dense[:, h]^T, heads stacked
    fold_b: torch.Tensor | None = None  # (d,): W_dense @ b + b_dense
    qkv_w: torch.Tensor | None = None  # (d + rows of K + rows of V, d): query_key_value with the encodes folded in
    qkv_b: torch.Tensor | None = None  # (d + rows of K + rows of V,)
    qkv_split: tuple[int, int, int] = (0, 0, 0)  # the rows of Q, of K (or its code), of V (or its code)


def _down(codec) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """A codec's linear encode as blocks: D (G, r, d/G) and bias (G*r,) or None; None when not declared linear."""
    return group_blocks(getattr(codec, "encode_linear", None)) if codec is not None else None


class LatentDecoder:
    """Prefill and decode a GPT-NeoX base with ``adapters`` (at most one per family) on a latent cache.

    ``cache_dtype`` (float16, bfloat16, float32; default: the model's dtype) is what the cache stores;
    compute runs in the model's dtype. ``fold`` (default True) folds ``up`` into ``dense`` on layers whose
    V codec decodes linearly (V-DProj, lowrank) without KA; False computes A per head and then ``dense``
    (the same numbers, less work when H * r > r + d). ``restore_prefill``: when several tokens are fed at
    once (prefill), such layers may restore V for that call only (not cached: the cache still holds the
    code alone), which costs ``T r d`` instead of ``H n T r``; None (default) picks the cheaper, True
    always, False never. One decoded token always takes the latent product. ``fold_qkv`` (default True)
    folds linear encodes into ``query_key_value`` (False: the base's projection, then the encodes). Build
    the decoder after the adapters' weights are final: the folded matrices are computed here.
    """

    def __init__(self, model, adapters: list[Adapter] | tuple[Adapter, ...] = (), *, cache_dtype: str | None = None,
                 fold: bool = True, restore_prefill: bool | None = None, fold_qkv: bool = True):
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
        bind_adapters(self.adapters)
        for a in self.adapters:
            if a.dims != self.dims:
                raise ConfigError(f"adapter {a.name} was built for {a.dims}, the model is {self.dims}")
            for i in a.layers:
                m = a.layer_module(i)
                if getattr(m, "active", True):
                    self._plan_module(self.plans[i], a, i, m)
        for i, plan in enumerate(self.plans):
            coded = plan.k_codec is not None or plan.v_codec is not None
            if plan.attention is not None and coded and not hasattr(plan.attention, "read_code"):
                raise ConfigError(f"layer {i}: {plan.attention_by} caches K and V its own way and cannot hold the code of "
                                  "another method that compresses them there; give the two methods different layers")
        for plan in self.plans:
            if fold and _up(plan.v_codec) is not None and not plan.out:
                plan.fold_w, plan.fold_b = self._fold(plan)
            if fold_qkv and not plan.qkv and (_down(plan.k_codec) or _down(plan.v_codec)) is not None:
                plan.qkv_w, plan.qkv_b, plan.qkv_split = self._fold_qkv(plan)
        self._cos = self._sin = None  # rotary tables (1, N, rot) for positions 0..N-1, grown on demand

    @staticmethod
    def _plan_module(plan: _LayerPlan, a: Adapter, layer: int, m: torch.nn.Module) -> None:
        if a.tap == "attention":
            if plan.attention is not None:
                raise ConfigError(f"layer {layer}: two methods attend over their own caches ({plan.attention_by} and {a.name})")
            plan.attention, plan.attention_by = m, a.name
            return
        if a.tap == "attention_output":
            plan.out.append(m)
            return
        codecs = m.codecs() if hasattr(m, "codecs") else None
        if codecs is None:
            if plan.k_codec is not None or plan.v_codec is not None:
                raise ConfigError(f"adapter {a.name} on layer {layer} maps K and V after another method compressed "
                                  "them: attach it first")
            plan.qkv.append(m)
            return
        for name, codec in codecs.items():
            if getattr(plan, f"{name}_codec") is not None:
                raise ConfigError(f"layer {layer}: two methods compress {name.upper()} (adapter {a.name} and another)")
            setattr(plan, f"{name}_codec", codec)

    # ------------------------------------------------------------------ accounting and cache
    def window_bytes(self) -> int:
        """What the methods declare the cache's fixed tensors (full-precision windows) to hold per sequence."""
        return sum(a.window_bytes(self.cache_dtype_name) for a in self.adapters)

    def layout(self) -> Layout:
        """What ``kvsweep.kvcache`` accounts for this model and these adapters."""
        return kv_layout_of(self.adapters, base_layout(self.dims.layers, self.dims.hidden))

    def new_cache(self, batch: int, capacity: int) -> LatentCache:
        """An empty cache for ``batch`` sequences of up to ``capacity`` tokens; widths from the modules."""
        H, hs = self.dims.heads, self.dims.head_size
        layers = []
        for plan in self.plans:
            shapes: dict[str, tuple] = {}
            codes: dict[str, int] = {}  # name -> width of what a codec caches in place of K or V
            for name in ("k", "v"):
                codec = getattr(plan, f"{name}_codec")
                shapes[name] = ((H, hs), None) if codec is None else ((codec.width,), getattr(codec, "dtype", None))
                if codec is not None:
                    codes[name] = codec.width
            if plan.attention is not None:
                shapes.update(plan.attention.cache_shapes(codes) if codes else plan.attention.cache_shapes())
            for m in plan.out:
                if hasattr(m, "cache_shapes"):
                    for name, shape in m.cache_shapes().items():
                        if name in shapes:
                            raise ConfigError(f"two methods cache a tensor named {name!r} on one layer")
                        shapes[name] = (tuple(shape), None)
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
        k_code = v_code = None  # the codes, when the encodes are folded into query_key_value
        if plan.qkv_w is not None:
            q, k, v = F.linear(parts.input_norm(x), plan.qkv_w, plan.qkv_b).split(plan.qkv_split, dim=-1)
            if _down(plan.k_codec) is not None:
                k_code = k  # (B, n, w_k)
            if _down(plan.v_codec) is not None:
                v_code = v  # (B, n, w_v)
        else:
            q, k, v = split_qkv(parts.qkv(parts.input_norm(x)), H)  # (B, n, d) each, K and V pre-rotary
        for m in plan.qkv:
            k, v = _run(m, k, v)
        q = apply_rotary(heads(q), cos[:, start:end], sin[:, start:end])  # (B, H, n, hs)
        if plan.attention is not None and (plan.k_codec is not None or plan.v_codec is not None):
            a, out = attend_mixed(plan, lc, q, k, v, k_code, v_code, start, cos, sin, self.parts.scaling, self.dtype)
            return self._close(plan, lc, x, a, out, start)
        if plan.attention is not None:
            k = apply_rotary(heads(k), cos[:, start:end], sin[:, start:end])  # (B, H, n, hs), as the base caches it
            return self._close(plan, lc, x, plan.attention.decode_attend(lc, q, k, heads(v), start, self.parts.scaling), None, start)
        if plan.k_codec is not None:
            lc.write("k", _run(plan.k_codec.encode, k) if k_code is None else k_code, start)  # (B, n, w)
            k_all = _run(plan.k_codec.decode, lc.read("k", end, self.dtype))  # (B, end, d) restored
            keys = apply_rotary(heads(k_all), cos[:, :end], sin[:, :end])  # (B, H, end, hs)
        else:
            lc.write("k", apply_rotary(heads(k), cos[:, start:end], sin[:, start:end]), start)
            keys = lc.read("k", end, self.dtype)  # (B, H, end, hs)
        a = out = None
        codec, up = plan.v_codec, _up(plan.v_codec)
        if codec is None:
            lc.write("v", heads(v), start)
            a = self._attend(q, keys, lc.read("v", end, self.dtype), start)  # (B, n, d)
        else:
            lc.write("v", _run(codec.encode, v) if v_code is None else v_code, start)  # (B, n, w)
            code = lc.read("v", end, self.dtype)  # (B, end, w)
            if up is None or self._restore_values(n, end, up[0].shape[-1], plan):
                # a decode that is not linear, or a prefill where restoring V for this call (never cached) costs less
                a = self._attend(q, keys, heads(_run(codec.decode, code)), start)
            else:
                scores = torch.matmul(q, keys.transpose(2, 3)) * self.parts.scaling  # (B, H, n, end)
                if n > 1:  # query i sits at position start+i and sees keys 0..start+i
                    allowed = torch.ones(n, end, dtype=torch.bool, device=x.device).tril(start)
                    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
                p = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # rows sum to 1
                W, bias = up  # (G, d/G, r), (d,)
                G, r = W.shape[0], W.shape[2]
                code_g = code.view(B, end, G, r).transpose(1, 2).unsqueeze(2)  # (B, G, 1, end, r): each group's block
                pv = torch.matmul(p.view(B, G, H // G, n, end), code_g).reshape(B, H, n, r)  # P_h code_g of head h's group
                if plan.fold_w is not None:
                    out = pv.transpose(1, 2).reshape(B, n, -1) @ plan.fold_w + plan.fold_b  # (B, n, d) = dense(A)
                else:
                    w = W.reshape(H, hs, r).to(pv.dtype)  # (H, hs, r): W_h, a view of the method's own weight
                    a = torch.einsum("bhnr,hsr->bnhs", pv, w).reshape(B, n, d)  # (B, n, d): A without the bias
                    if bias is not None:
                        a = a + bias.to(a.dtype)
        return self._close(plan, lc, x, a, out, start)

    def _close(self, plan: _LayerPlan, lc, x: torch.Tensor, a: torch.Tensor | None, out: torch.Tensor | None, start: int):
        """The layer's end from A (B, n, d) or, already projected, ``out``: the attention-output modules, ``dense`` and
        the residual."""
        parts = plan.parts
        if out is None:
            for m in plan.out:
                a = m.decode_step(lc, a, start) if hasattr(m, "decode_step") else _run(m, a)
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
        queries (prefill), never when decoding one token; by cost unless ``restore_prefill`` says. ``r``: the
        rank of a group (the code's width over its groups): a head attends over r latents, restoring costs r d."""
        if n == 1 or self.restore_prefill is False:
            return False
        if self.restore_prefill:
            return True
        H, hs, d = self.dims.heads, self.dims.head_size, self.dims.hidden
        latent = H * n * end * r + n * (H * r * d if plan.fold_w is not None else r * d + d * d)
        restore = end * r * d + H * n * end * hs + n * d * d
        return restore < latent

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
        """Fold each head's rows of the V codec's linear decode into ``dense``: (H*r, d) and a bias (d,)."""
        H, hs, d = self.dims.heads, self.dims.head_size, self.dims.hidden
        (W, bias), dense = _up(plan.v_codec), plan.parts.dense
        r = W.shape[2]
        w_up = W.double().reshape(H, hs, r)  # (H, hs, r): rows of head h in its group's block
        w_dense = dense.weight.double().view(d, H, hs)  # (d, H, hs): columns of head h
        fold_w = torch.einsum("hsr,ehs->hre", w_up, w_dense).reshape(H * r, d)  # F_h = W_h^T W_dense[:, h]^T
        fold_b = torch.zeros(d, dtype=torch.float64, device=fold_w.device)
        if bias is not None:
            fold_b = fold_b + dense.weight.double() @ bias.double()
        if dense.bias is not None:
            fold_b = fold_b + dense.bias.double()
        return fold_w.to(self.dtype), fold_b.to(self.dtype)

    @torch.no_grad()
    def _fold_qkv(self, plan: _LayerPlan) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]:
        """``query_key_value`` with each linear encode folded into its rows (``D W``, ``D b + c``): weight (rows, d),
        bias (rows,) and the rows of Q, of K (or its code) and of V (or its code)."""
        d, qkv = self.dims.hidden, plan.parts.qkv
        rows, biases = [], []
        for name, (w, b) in zip(("q", "k", "v"), qkv_split_weights(qkv, self.dims.heads)):
            w, b = w.double(), (b.double() if b is not None else torch.zeros(d, dtype=torch.float64, device=w.device))
            down = _down(getattr(plan, f"{name}_codec", None))
            if down is not None:
                D, c = down  # (G, r, d/G), (G*r,)
                G, r, m = D.shape
                w = torch.einsum("grm,gme->gre", D.double(), w.view(G, m, d)).reshape(G * r, d)  # (G*r, d): D_g W_g
                b = torch.einsum("grm,gm->gr", D.double(), b.view(G, m)).reshape(-1) + (c.double() if c is not None else 0)
            rows.append(w)
            biases.append(b)
        return torch.cat(rows).to(self.dtype), torch.cat(biases).to(self.dtype), tuple(len(w) for w in rows)
