"""Codecs over groups of heads: ``GroupLinear``, a block-diagonal linear map the latent-cache decoder reads,
``GroupCodec``, a low-rank codec made of two of them, and ``LayerLowRank``, the qkv tap of one layer with a
``GroupCodec`` for K and/or V.

A low-rank codec over groups of heads (Palu's G-LRD; per head and all heads jointly as its extreme cases)
compresses each group's slice of K or V on its own: ``G`` blocks, each ``in_features -> out_features``,
on the consecutive slices of the last dimension. The decoder (``kvsweep.latent``) recognises it (as it
recognises a plain ``nn.Linear``, the one-group case) to attend over each group's code and to fold the maps
into ``dense`` and ``query_key_value``.
"""

from __future__ import annotations

import math

import torch

from ..losses import relative_reconstruction

NAMES = ("k", "v")


class GroupLinear(torch.nn.Module):
    """``x (..., G * in) -> (..., G * out)``: block g maps slice g of x by ``weight[g]`` (out, in) plus ``bias[g]``.

    Parameters: ``weight`` (G, out, in), ``bias`` (G, out) (or None). Initialised as ``nn.Linear`` does per
    block (uniform in +-1/sqrt(in)).
    """

    def __init__(self, groups: int, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.groups, self.in_features, self.out_features = groups, in_features, out_features
        bound = 1 / math.sqrt(in_features)
        self.weight = torch.nn.Parameter(torch.empty(groups, out_features, in_features).uniform_(-bound, bound))
        self.bias = torch.nn.Parameter(torch.empty(groups, out_features).uniform_(-bound, bound)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xg = x.reshape(*lead, self.groups, self.in_features)  # (..., G, in)
        y = torch.einsum("...gi,goi->...go", xg, self.weight)  # (..., G, out)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.groups * self.out_features)

    def extra_repr(self) -> str:
        return f"groups={self.groups}, in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def group_blocks(lin: torch.nn.Module | None) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """A linear map as blocks: weight (G, out, in) and bias (G * out,) or None; an ``nn.Linear`` is one block; None for
    anything else (a map that is not linear)."""
    if isinstance(lin, GroupLinear):
        return lin.weight, (lin.bias.reshape(-1) if lin.bias is not None else None)
    if isinstance(lin, torch.nn.Linear):
        return lin.weight.unsqueeze(0), lin.bias
    return None


class DownUpCodec(torch.nn.Module):
    """A low-rank codec ``x (B, T, d) -> up(down(x))`` from two linear maps, keeping the relative reconstruction error and
    the code of the last call. Its codec for the latent cache: ``encode = down``, ``decode = up``, ``linear`` = ``up``
    (the decoder attends over the code and folds ``up`` into ``dense``) and ``encode_linear`` = ``down`` (the decoder
    folds it into ``query_key_value``); ``last_code`` (B, T, width) is what a method at the layer's attention that
    quantizes the code reads."""

    dtype = None  # the code is cached at the cache's dtype

    def __init__(self, down: torch.nn.Module, up: torch.nn.Module):
        super().__init__()
        self.down, self.up = down, up
        self.last_rec: torch.Tensor | None = None
        self.last_code: torch.Tensor | None = None

    @property
    def linear(self) -> torch.nn.Module:
        return self.up

    @property
    def encode_linear(self) -> torch.nn.Module:
        return self.down

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(x)

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        return self.up(code)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last_code = self.down(x)  # (B, T, width)
        x_hat = self.up(self.last_code)
        self.last_rec = relative_reconstruction(x, x_hat)
        return x_hat


class GroupCodec(DownUpCodec):
    """``x (B, T, d) -> up(down(x))`` over G groups of ``block`` = d / G channels, rank r each; keeps the relative
    reconstruction error of the last call. Its codec for the latent cache: ``encode = down`` (B, n, d) ->
    (B, n, G*r), ``decode = up``, ``groups`` G, ``linear`` = ``up`` and ``encode_linear`` = ``down`` (``GroupLinear``s);
    ``last_code``: the code (B, T, G*r) of the last call (a method at the layer's attention that quantizes it reads it)."""

    def __init__(self, groups: int, block: int, rank: int):
        super().__init__(GroupLinear(groups, block, rank), GroupLinear(groups, rank, block))  # weights (G, r, block), (G, block, r)

    @property
    def groups(self) -> int:
        return self.down.groups

    @property
    def rank(self) -> int:
        return self.down.out_features

    @property
    def width(self) -> int:
        return self.groups * self.rank

    @staticmethod
    def forward_stacked(codecs: list[GroupCodec], x: torch.Tensor) -> torch.Tensor:
        """K codecs of one shape, each on its own rows: x (K, N, d) -> (K, N, d) in two batched products; each keeps
        its own reconstruction error, as if called alone."""
        K, N, d = x.shape
        G, r, m = codecs[0].down.weight.shape
        down_w = torch.stack([c.down.weight for c in codecs])  # (K, G, r, m)
        up_w = torch.stack([c.up.weight for c in codecs])  # (K, G, m, r)
        h = torch.einsum("kngm,kgrm->kngr", x.reshape(K, N, G, m), down_w) + torch.stack([c.down.bias for c in codecs]).unsqueeze(1)
        x_hat = (torch.einsum("kngr,kgmr->kngm", h, up_w) + torch.stack([c.up.bias for c in codecs]).unsqueeze(1)).reshape(K, N, d)
        xf = x.float()
        rec = (xf - x_hat.float()).pow(2).sum((1, 2)) / xf.pow(2).sum((1, 2)).clamp_min(1e-12)  # (K,)
        for c, e, code in zip(codecs, rec.unbind(), h.reshape(K, N, G * r).unbind(), strict=True):
            c.last_rec, c.last_code = e, code  # code (N, G*r): this codec's rows
        return x_hat

    @torch.no_grad()
    def set_basis(self, U: torch.Tensor, b: torch.Tensor | None) -> None:
        """``down(x) = U^T (x - b)``, ``up(c) = U c + b`` per group: U (G, block, r) orthonormal columns, b (d,) or None."""
        G, block, _ = U.shape
        bg = torch.zeros(G, block, dtype=U.dtype, device=U.device) if b is None else b.to(U).view(G, block)
        w = self.down.weight
        self.down.weight.copy_(U.transpose(1, 2).to(w))  # (G, r, block)
        self.down.bias.copy_(-torch.einsum("gmr,gm->gr", U, bg).to(w))
        self.up.weight.copy_(U.to(w))
        self.up.bias.copy_(bg.to(w))

    def init_identity(self) -> None:
        """The first r coordinates of each group (at full rank exactly the identity)."""
        G, r, block = self.down.weight.shape
        eye = torch.eye(block, r, dtype=torch.float64, device=self.down.weight.device)
        self.set_basis(eye.expand(G, block, r), None)


class LayerLowRank(torch.nn.Module):
    """The qkv tap of one layer: K and/or V through their ``GroupCodec`` unless inactive; records moments when calibrating."""

    def __init__(self):
        super().__init__()
        self.k: GroupCodec | None = None
        self.v: GroupCodec | None = None
        self.active = True
        self.moments: dict[str, list] | None = None  # name -> [sum x (d,), sum of x_g x_g^T (G, m, m), rows], float64

    def codecs(self) -> dict[str, GroupCodec]:
        """What the latent cache holds compressed: ``"k"`` and/or ``"v"``."""
        return {name: c for name in NAMES if (c := getattr(self, name)) is not None}

    def stack_key(self) -> tuple | None:
        """Modules with equal keys run in a pack as one batched computation (``forward_stacked``); ``None``: not now."""
        if self.moments is not None or not self.active:
            return None
        return tuple(None if c is None else tuple(c.down.weight.shape) for c in (self.k, self.v))

    @staticmethod
    def forward_stacked(mods: list[LayerLowRank], k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` of K modules with equal ``stack_key``, each on its own rows: k, v (K, N, d) each."""
        out = [x if getattr(mods[0], name) is None else GroupCodec.forward_stacked([getattr(m, name) for m in mods], x)
               for name, x in (("k", k), ("v", v))]
        return out[0], out[1]

    def forward(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for c in self.codecs().values():  # a code of this forward, or none (calibrating, inactive)
            c.last_code = None
        if self.moments is not None:
            for name, x in (("k", k), ("v", v)):
                if name in self.moments:
                    m = self.moments[name]
                    G, block = m[1].shape[0], m[1].shape[1]
                    flat = x.detach().reshape(-1, G, block).double()  # (N, G, m)
                    m[0] += flat.sum(0).reshape(-1)
                    m[1] += torch.einsum("ngi,ngj->gij", flat, flat)
                    m[2] += flat.shape[0]
            return k, v
        if not self.active:
            return k, v
        return (self.k(k) if self.k is not None else k), (self.v(v) if self.v is not None else v)
