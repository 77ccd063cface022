"""V-DProj: per-layer learned compression of V (and optionally of the pre-rotary K).

    V (d) -> down -> V_c (r) -> up -> V_restored (d)        only V_c needs caching

``down: Linear(d, r)`` and ``up: Linear(r, d)`` act on V of all heads jointly. ``init``: ``random``
(PyTorch's default), ``pca`` (the top-r principal directions and the mean of V on calibration samples:
the best linear rank-r reconstruction before any training) or ``identity`` (the first r coordinates;
at r = d an exact no-op).

Source: the seed's V-DProj; the joint (all heads at once) case of Palu's low-rank projection (J-LRD;
Chang et al., ICLR 2025, github.com/shadowpa0327/Palu).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import ConfigError
from ..kvcache import Layout, with_layers
from ..models import Dims
from .base import Adapter, AdapterOptions, option, register_adapter
from .codec import DownUpCodec

TARGETS = ("v", "k", "kv")
INITS = ("random", "pca", "identity")


@dataclass(frozen=True)
class VDProjOptions(AdapterOptions):
    rank: int = option(0, "compressed width r, 1..hidden size", required=True)
    target: str = option("v", "what is compressed: v, k (the keys before rotary) or kv", TARGETS)
    init: str = option("random", "random, pca (top-r principal directions of V on calib_samples train samples) or identity", INITS)
    bias: bool = option(True, "down and up with bias")
    calib_samples: int = option(64, "init pca: train samples to measure V on")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"rank must be an integer >= 1 (and <= the model's hidden size), got {self.rank!r}")
        if self.target not in TARGETS:
            raise ConfigError(f"target must be one of {', '.join(TARGETS)}; got {self.target!r}")
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {', '.join(INITS)}; got {self.init!r}")
        if not isinstance(self.calib_samples, int) or self.calib_samples < 1:
            raise ConfigError(f"calib_samples must be an integer >= 1, got {self.calib_samples!r}")

    @property
    def calibration_samples(self) -> int:
        """The PCA init measures V on ``calib_samples`` train samples; the others need none."""
        return self.calib_samples if self.init == "pca" else 0


class Compressor(DownUpCodec):
    """``x (B, T, d) -> up(down(x))``, keeping the relative reconstruction error of the last call.

    Its codec for the latent cache: ``encode = down`` (B, n, d) -> (B, n, r), ``decode = up``, ``linear``
    (``up``, an affine map: the decoder attends over the code and folds ``up`` into ``dense``) and ``encode_linear``
    (``down``: the decoder folds it into ``query_key_value`` and computes the code from the layer input). ``last_code``: the code
    (B, T, r) of the last call (a method at the layer's attention that quantizes it reads it there).
    """

    def __init__(self, d: int, r: int, bias: bool):
        super().__init__(torch.nn.Linear(d, r, bias=bias), torch.nn.Linear(r, d, bias=bias))

    @property
    def width(self) -> int:
        return self.down.out_features

    @staticmethod
    def forward_stacked(comps: list[Compressor], x: torch.Tensor) -> torch.Tensor:
        """K compressors of one shape, each on its own rows: x (K, N, d) -> (K, N, d), two batched matmuls.
        Each keeps its own reconstruction error, as if called alone."""
        down_w = torch.stack([c.down.weight for c in comps]).transpose(1, 2)  # (K, d, r)
        up_w = torch.stack([c.up.weight for c in comps]).transpose(1, 2)  # (K, r, d)
        if comps[0].down.bias is not None:
            h = torch.baddbmm(torch.stack([c.down.bias for c in comps]).unsqueeze(1), x, down_w)  # (K, N, r)
            x_hat = torch.baddbmm(torch.stack([c.up.bias for c in comps]).unsqueeze(1), h, up_w)  # (K, N, d)
        else:
            h = torch.bmm(x, down_w)  # (K, N, r)
            x_hat = torch.bmm(h, up_w)
        xf, err = x.float(), (x.float() - x_hat.float())
        rec = err.pow(2).sum((1, 2)) / xf.pow(2).sum((1, 2)).clamp_min(1e-12)  # (K,)
        for c, r, code in zip(comps, rec.unbind(), h.unbind(), strict=True):
            c.last_rec, c.last_code = r, code  # code (N, r): this compressor's rows
        return x_hat

    @torch.no_grad()
    def init_identity(self) -> None:
        r, d = self.down.weight.shape
        eye = torch.eye(d, dtype=self.down.weight.dtype, device=self.down.weight.device)
        self.down.weight.copy_(eye[:r])  # (r, d): keep the first r coordinates
        self.up.weight.copy_(eye[:, :r])  # (d, r)
        for lin in (self.down, self.up):
            if lin.bias is not None:
                lin.bias.zero_()

    @torch.no_grad()
    def init_pca(self, sum_x: torch.Tensor, sum_xx: torch.Tensor, n: int) -> None:
        """From first and second moments (float64) of the activations, ``n`` rows."""
        r = self.down.weight.shape[0]
        centered = self.down.bias is not None
        mean = sum_x / n if centered else torch.zeros_like(sum_x)
        cov = sum_xx / n - torch.outer(mean, mean)  # (d, d)
        _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
        U = vecs[:, -r:].flip(-1)  # (d, r): top-r principal directions, largest first
        dt = self.down.weight.dtype
        self.down.weight.copy_(U.T.to(dt))  # V_c = U^T (V - mean)
        self.up.weight.copy_(U.to(dt))  # V_restored = U V_c + mean
        if centered:
            self.down.bias.copy_((-(U.T @ mean)).to(dt))
            self.up.bias.copy_(mean.to(dt))


class LayerVDProj(torch.nn.Module):
    """The qkv tap of one layer: compresses V (and K) unless inactive; can record moments for PCA."""

    def __init__(self, d: int, r: int, target: str, bias: bool):
        super().__init__()
        self.v = Compressor(d, r, bias) if "v" in target else None
        self.k = Compressor(d, r, bias) if "k" in target else None
        self.active = True
        self.moments: dict[str, list] | None = None  # set while calibrating

    def codecs(self) -> dict[str, Compressor]:
        """What the latent cache holds compressed: ``"k"`` and/or ``"v"``."""
        return {name: c for name, c in (("k", self.k), ("v", self.v)) if c is not None}

    def stack_key(self) -> tuple | None:
        """Modules with equal keys can run as one batched computation (``forward_stacked``); ``None``: not now."""
        if self.moments is not None or not self.active:
            return None
        return tuple(None if c is None else tuple(c.down.weight.shape) + (c.down.bias is not None,) for c in (self.k, self.v))

    @staticmethod
    def forward_stacked(mods: list[LayerVDProj], k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` of K modules with equal ``stack_key``, each on its own rows: k, v (K, N, d) each."""
        out = []
        for name, x in (("k", k), ("v", v)):
            comps = [getattr(m, name) for m in mods]
            out.append(x if comps[0] is None else Compressor.forward_stacked(comps, x))
        return out[0], out[1]

    def forward(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for c in self.codecs().values():  # a code of this forward, or none (calibrating, inactive)
            c.last_code = None
        if self.moments is not None:
            for name, x in (("k", k), ("v", v)):
                if getattr(self, name) is not None:
                    flat = x.detach().reshape(-1, x.shape[-1]).double()  # (B*T, d)
                    m = self.moments[name]
                    m[0] += flat.sum(0)
                    m[1] += flat.T @ flat
                    m[2] += flat.shape[0]
            return k, v
        if not self.active:
            return k, v
        return (self.k(k) if self.k is not None else k), (self.v(v) if self.v is not None else v)


@register_adapter("vdproj")
class VDProj(Adapter):
    Options = VDProjOptions
    family = "vdproj"
    tap = "qkv"
    caches_codes = True
    default_layers = "all"
    loss_terms = ("rec",)
    aliases = {"rank": "rank", "target": "target", "init": "init", "layers": "layers", "no-bias": "bias", "calib-samples": "calib_samples"}

    @classmethod
    def label(cls, options: VDProjOptions) -> str:
        return f"vdproj[{options.target},{options.init}]"

    @classmethod
    def example_options(cls, dims: Dims) -> dict:
        return {"rank": max(1, dims.hidden // 8)}

    @classmethod
    def noop_options(cls, dims: Dims) -> dict:
        return {"rank": dims.hidden, "init": "identity", "target": "kv"}

    def build(self) -> None:
        o, d = self.options, self.dims.hidden
        if o.rank > d:
            raise ConfigError(f"rank must be in 1..{d} (the model's hidden size); got {o.rank}")
        self.per_layer = torch.nn.ModuleDict({str(i): LayerVDProj(d, o.rank, o.target, o.bias) for i in self.layers})
        if o.init == "identity":
            for comp in self._compressors():
                comp.init_identity()

    def _compressors(self) -> list[Compressor]:
        return [c for m in self.per_layer.values() for c in (m.k, m.v) if c is not None]

    def kv_layout(self, layout: Layout) -> Layout:
        """The rank-r code replaces V (target ``v``), the keys (``k``) or both (``kv``) on the adapter's layers."""
        return with_layers(layout, self.layers, **{name: self.options.rank for name in self.options.target})

    def param_formula(self) -> int:
        d, r = self.dims.hidden, self.options.rank
        per = 2 * d * r + ((r + d) if self.options.bias else 0)
        return per * len(self.layers) * len(self.options.target)

    def reconstruction_loss(self) -> torch.Tensor | None:
        terms = [c.last_rec for c in self._compressors() if c.last_rec is not None]
        return torch.stack(terms).sum() if terms else None

    @torch.no_grad()
    def calibrate(self, model, samples: np.ndarray) -> None:
        """PCA init: moments of the base's K/V on ``calib_samples`` samples (the adapter must be attached)."""
        if self.options.init != "pca":
            return
        if not self.attached:
            raise RuntimeError("attach the adapter before calibrating it")
        if len(samples) == 0:
            raise ConfigError("init pca needs calibration samples: train_samples must be >= 1")
        d = self.dims.hidden
        device = next(model.parameters()).device
        for m in self.per_layer.values():
            m.moments = {n: [torch.zeros(d, dtype=torch.float64, device=device),
                             torch.zeros(d, d, dtype=torch.float64, device=device), 0] for n in ("k", "v")}
        try:
            batch = samples[: self.options.calib_samples]
            for start in range(0, len(batch), 8):
                ids = torch.from_numpy(np.array(batch[start : start + 8], dtype=np.int64)).to(device)
                model(input_ids=ids, use_cache=False)
            for m in self.per_layer.values():
                for name in ("k", "v"):
                    comp = getattr(m, name)
                    if comp is not None:
                        comp.init_pca(*m.moments[name])
        finally:
            for m in self.per_layer.values():
                m.moments = None
