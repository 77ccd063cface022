"""The KA attention shared by the KA variants: a causal attention over a layer's attention outputs A.

    x = LayerNorm(A);  Q', K', V' = Linear(d, d)(x) each, with bias;  ka = softmax(Q'K'^T / sqrt(hs)) V'

with the base's head count and no output projection. The variants differ only in how ``ka`` meets
``A`` before the layer's ``dense`` projection (``combine``). A KA layer caches K' and V' (d each) on
top of the base's K and V.

Source: the seed's KA-Attention and PretrainedMKA V2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kvcache import Layout, with_layers
from .base import Adapter, AdapterOptions


@dataclass(frozen=True)
class KAOptions(AdapterOptions):
    """``layers`` defaults to the last layer."""


class KALayer(torch.nn.Module):
    """The output tap of one layer: ``A -> combine(A, ka(A))`` unless inactive."""

    def __init__(self, d: int, heads: int, combine, gated: bool):
        super().__init__()
        self.heads = heads
        self.norm = torch.nn.LayerNorm(d)
        self.q = torch.nn.Linear(d, d)
        self.k = torch.nn.Linear(d, d)
        self.v = torch.nn.Linear(d, d)
        self.gate = torch.nn.Parameter(torch.zeros(1)) if gated else None
        self.combine = combine
        self.active = True

    def ka(self, a: torch.Tensor) -> torch.Tensor:
        B, T, d = a.shape
        hs = d // self.heads
        x = self.norm(a)
        q, k, v = (proj(x).view(B, T, self.heads, hs).transpose(1, 2) for proj in (self.q, self.k, self.v))  # (B, H, T, hs)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hs)
        return out.transpose(1, 2).reshape(B, T, d)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return a
        return self.combine(self, a, self.ka(a))

    # -- the latent cache's decode step
    def cache_shapes(self) -> dict[str, tuple[int, int]]:
        """K' and V' of every head: (H, hs) each per token."""
        hs = self.q.out_features // self.heads
        return {"ka_k": (self.heads, hs), "ka_v": (self.heads, hs)}

    def decode_step(self, cache, a: torch.Tensor, start: int) -> torch.Tensor:
        """``combine(A, attention(LN(A)))`` for A (B, n, d) at positions ``start..``, with K', V' cached."""
        B, n, d = a.shape
        H, hs, end = self.heads, d // self.heads, start + n
        wdt = self.q.weight.dtype
        a_in = a.to(wdt)
        x = self.norm(a_in)
        q, k, v = (proj(x).view(B, n, H, hs).transpose(1, 2) for proj in (self.q, self.k, self.v))  # (B, H, n, hs)
        cache.write("ka_k", k, start)
        cache.write("ka_v", v, start)
        keys, values = cache.read("ka_k", end, wdt), cache.read("ka_v", end, wdt)  # (B, H, end, hs)
        if n == 1:
            ka = F.scaled_dot_product_attention(q, keys, values)
        elif start == 0:
            ka = F.scaled_dot_product_attention(q, keys, values, is_causal=True)
        else:
            allowed = torch.ones(n, end, dtype=torch.bool, device=a.device).tril(start)
            ka = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed)
        ka = ka.transpose(1, 2).reshape(B, n, d)
        return self.combine(self, a_in, ka).to(a.dtype)


class KAAdapter(Adapter):
    """Base of the KA variants; a subclass sets ``gated`` and implements ``combine``."""

    Options = KAOptions
    family = "ka"
    tap = "attention_output"
    default_layers = "last"
    gated = False
    aliases = {"ka-layers": "layers"}

    def build(self) -> None:
        d, heads = self.dims.hidden, self.dims.heads
        self.per_layer = torch.nn.ModuleDict({str(i): KALayer(d, heads, type(self).combine, self.gated) for i in self.layers})

    @staticmethod
    def combine(layer: KALayer, a: torch.Tensor, ka: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def kv_layout(self, layout: Layout) -> Layout:
        """K' and V' (hidden size each) beside the base's K and V on the adapter's layers."""
        return with_layers(layout, self.layers, ka_k=self.dims.hidden, ka_v=self.dims.hidden)

    def param_formula(self) -> int:
        d = self.dims.hidden
        return (3 * (d * d + d) + 2 * d + (1 if self.gated else 0)) * len(self.layers)
