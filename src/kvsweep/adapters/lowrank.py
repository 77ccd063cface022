"""Low-rank projection of the keys and values per head, per group of heads, or of all heads jointly.

    K_g (g*hs) -> down_g -> code_g (r) -> up_g -> K_hat_g (g*hs)      for each group g of ``group`` heads

Only the codes are cached: ``G * r`` values per token for K (before rotary) and for V, G = heads / group.
``group`` 1 is Palu's M-LRD (per head), ``group`` = heads its J-LRD (V-DProj's joint case), in between
its G-LRD. Decoding attends over each group's code alone and folds ``up`` into ``dense`` (see
``kvsweep.latent.decoder``): a decoded token costs H * r per cached position on V; keys are restored
from their code and rotated at every step, r * d multiply-adds per cached position and layer (r the rank
per group). benchmarks/decode.py on Pythia-70M's architecture (random weights, CPU, 1 thread, context
2048, float16 cache), ms per decode step, V alone / K+V at one rank: base 24.4; group 1 rank 32 (per
head, half of each head) 22.3 / 43.1; group 2 rank 64: 25.1 / 53.2; group 8 rank 256 (joint, half of d)
27.5 / 75.2: restoring and rotating the keys costs 21 to 48 ms a step there, about a base step or two,
growing with the group's rank and the context.

Ranks: ``k_rank`` / ``v_rank`` per group, one for every adapted layer or one per adapted layer, 0 = that
tensor not compressed; or ``budget``, the fraction of the base's K+V cache the adapted layers keep,
spread by ``allocation``: ``uniform`` gives K and V of every layer the rank floor(budget * g * hs)
(at least 1), so the cache never exceeds the budget; ``error`` gives every (layer, K/V) rank 1, then hands
out the remaining floor(budget * 2 * g * hs * layers) - 2 * layers rank units one at a time to the
largest gain among all (layer, K/V) spectra, a gain being the next eigenvalue of the bias-free second
moment of that tensor on ``calib_samples`` train samples, summed over the groups and divided by the
tensor's whole energy (the fraction of its reconstruction error a rank removes): greedy on the sum of
relative reconstruction errors, exact because each spectrum is non-increasing. Those ranks exist after
``calibrate``; before it the layers hold the uniform ranks of the same budget.

Inits (biases kept: ``down(K) = U^T (K - b)``, ``up(c) = U c + b``, so ``K_hat = U U^T W x + b``):
``svd``: U the top-r left singular vectors of each group's K/V rows ``W_g`` of ``query_key_value``
(Palu's truncated SVD); ``whitened``: U the top-r eigenvectors of each group's second moment of
``W_g x`` on ``calib_samples`` train samples (the SVD of W whitened by the input's second moment: the
best rank-r reconstruction of K on those data); ``random``: PyTorch's ``nn.Linear`` init per block.
``svd`` and ``whitened`` are set by ``calibrate`` (before it: the first r coordinates of each group,
at full rank exactly the base). At full rank every init but ``random`` reproduces the base.

Source: Palu (Chang et al., "Palu: KV-Cache Compression with Low-Rank Projection", ICLR 2025,
github.com/shadowpa0327/Palu).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from numbers import Integral

import numpy as np
import torch

from ..config import ConfigError
from ..kvcache import Layout, with_layers
from ..models import Dims, qkv_rows
from .base import Adapter, AdapterOptions, AdapterSpec, option, register_adapter
from .codec import NAMES, GroupCodec, LayerLowRank

INITS = ("svd", "whitened", "random")
ALLOCATIONS = ("uniform", "error")


def parse_ranks(value, name: str) -> tuple[int, ...] | None:
    """``None``; ``64``, ``"64"`` -> (64,); ``"64,32"``, ``[64, 32]`` -> (64, 32).

    Raises:
        ConfigError: not whole numbers >= 0.
    """
    if value is None:
        return None
    bad = ConfigError(f"{name} must be a rank >= 0 or comma-separated ranks, one per adapted layer; got {value!r}")
    if isinstance(value, str):
        try:
            value = [int(p) for p in value.replace(" ", "").split(",") if p]
        except ValueError:
            raise bad from None
    elif isinstance(value, Integral):
        value = [value]
    try:
        ranks = tuple(value)
    except TypeError:
        raise bad from None
    if not ranks or any(isinstance(r, bool) or not isinstance(r, Integral) or r < 0 for r in ranks):
        raise bad
    return tuple(int(r) for r in ranks)


@dataclass(frozen=True)
class LowRankOptions(AdapterOptions):
    group: int = option(1, "heads per group: 1 per head (M-LRD) .. all heads (J-LRD); must divide the model's heads")
    k_rank: int | tuple[int, ...] | None = option(None, "rank per group of the keys (before rotary): one, or one per adapted "
                                                        "layer ('64,32,...'); 0: keys not compressed")
    v_rank: int | tuple[int, ...] | None = option(None, "rank per group of the values: one, or one per adapted layer; "
                                                        "0: values not compressed")
    budget: float | None = option(None, "instead of ranks: the fraction in (0, 1] of the base's K+V cache the adapted layers keep")
    allocation: str = option("uniform", "with budget: uniform (one rank everywhere) or error (greedy by reconstruction "
                                        "error on calib_samples train samples)", ALLOCATIONS)
    init: str = option("svd", "svd (of the K/V rows of query_key_value), whitened (by the activations on calib_samples "
                              "train samples) or random", INITS)
    calib_samples: int = option(64, "init whitened or allocation error: train samples to measure K and V on")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.group, bool) or not isinstance(self.group, Integral) or self.group < 1:
            raise ConfigError(f"group must be a whole number >= 1 (dividing the model's heads); got {self.group!r}")
        for name in ("k_rank", "v_rank"):
            object.__setattr__(self, name, parse_ranks(getattr(self, name), name))
        ranks = self.k_rank is not None or self.v_rank is not None
        if self.budget is not None:
            if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)) or not 0 < self.budget <= 1:
                raise ConfigError(f"budget must be a fraction in (0, 1]; got {self.budget!r}")
            if ranks:
                raise ConfigError("give either k_rank/v_rank or budget, not both")
        elif not ranks:
            raise ConfigError("lowrank needs k_rank and/or v_rank (ranks per group), or budget (a fraction in (0, 1])")
        elif not any(self.k_rank or ()) and not any(self.v_rank or ()):
            raise ConfigError(f"k_rank {self.k_rank} and v_rank {self.v_rank} compress nothing: give a rank >= 1")
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"allocation must be one of {', '.join(ALLOCATIONS)}; got {self.allocation!r}")
        if self.allocation != "uniform" and self.budget is None:
            raise ConfigError(f"allocation {self.allocation} spreads a budget: give budget instead of ranks")
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {', '.join(INITS)}; got {self.init!r}")
        if isinstance(self.calib_samples, bool) or not isinstance(self.calib_samples, int) or self.calib_samples < 1:
            raise ConfigError(f"calib_samples must be an integer >= 1, got {self.calib_samples!r}")

    @property
    def calibration_samples(self) -> int:
        """Init whitened and allocation error measure K and V on ``calib_samples`` train samples; svd reads weights."""
        return self.calib_samples if self.init == "whitened" or self.allocation == "error" else 0


def allocate_ranks(gains: dict[tuple[int, str], torch.Tensor], slots: int) -> dict[tuple[int, str], int]:
    """Ranks per (layer, tensor) from their gains (block,) (non-increasing: the gain of rank 1, 2, ...): rank 1 each,
    then the ``slots`` - len(gains) largest of the remaining gains (ties in the order given)."""
    keys = list(gains)
    ranks = {key: 1 for key in keys}
    rest = [(float(g), i) for i, key in enumerate(keys) for g in gains[key][1:].tolist()]
    rest.sort(key=lambda t: -t[0])  # stable: equal gains keep their order
    for _, i in rest[: max(0, slots - len(keys))]:
        ranks[keys[i]] += 1
    return ranks


@register_adapter("lowrank")
class LowRank(Adapter):
    Options = LowRankOptions
    family = "lowrank"
    tap = "qkv"
    caches_codes = True
    default_layers = "all"
    loss_terms = ("rec",)

    @classmethod
    def label(cls, options: LowRankOptions) -> str:
        alloc = ",error" if options.allocation == "error" else ""
        return f"lowrank[g{options.group},{options.init}{alloc}]"

    @classmethod
    def example_options(cls, dims: Dims) -> dict:
        group = 2 if dims.heads % 2 == 0 else 1
        return {"group": group, "k_rank": dims.head_size, "v_rank": dims.head_size}

    @classmethod
    def noop_options(cls, dims: Dims) -> dict:
        return {"group": 1, "k_rank": dims.head_size, "v_rank": dims.head_size, "init": "svd"}

    @property
    def shaped_by_calibration(self) -> bool:
        return self.options.budget is not None and self.options.allocation == "error"

    def build(self) -> None:
        o, H, hs = self.options, self.dims.heads, self.dims.head_size
        if H % o.group:
            valid = ", ".join(str(g) for g in range(1, H + 1) if H % g == 0)
            raise ConfigError(f"group {o.group} must divide the model's {H} heads; valid: {valid}")
        self.groups, self.block = H // o.group, o.group * hs  # G groups of m = g * hs channels
        self.per_layer = torch.nn.ModuleDict({str(i): LayerLowRank() for i in self.layers})
        self._shape(self._given_ranks())

    def _given_ranks(self) -> dict[int, tuple[int, int]]:
        """(k rank, v rank) per adapted layer from the options (the budget's uniform ranks for a budget)."""
        o, n, m = self.options, len(self.layers), self.block
        if o.budget is not None:
            r = max(1, math.floor(o.budget * m))
            return {i: (r, r) for i in self.layers}
        per = {}
        for name in ("k_rank", "v_rank"):
            given = getattr(o, name) or (0,)
            if len(given) == 1:
                given = given * n
            elif len(given) != n:
                raise ConfigError(f"{name} gives {len(given)} ranks for {n} adapted layers {list(self.layers)}: give one rank, "
                                  "or one per adapted layer")
            if max(given) > m:
                raise ConfigError(f"{name} {max(given)} is above group x head size = {o.group} x {self.dims.head_size} = {m}, "
                                  f"the width of a group; valid range 0..{m}")
            per[name] = given
        return {i: (rk, rv) for i, rk, rv in zip(self.layers, per["k_rank"], per["v_rank"])}

    def _shape(self, ranks: dict[int, tuple[int, int]]) -> None:
        """Give each layer codecs of ``ranks`` (new ones on the adapter's device, first r coordinates unless init random)."""
        self.ranks = ranks
        like = next(self.parameters(), None)
        for i, mod in self.per_layer.items():
            for name, r in zip(NAMES, ranks[int(i)]):
                codec = getattr(mod, name)
                if (codec.rank if codec is not None else 0) == r:
                    continue
                codec = GroupCodec(self.groups, self.block, r) if r else None
                if codec is not None:
                    if like is not None:
                        codec.to(like)
                    if self.options.init != "random":
                        codec.init_identity()
                setattr(mod, name, codec)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As ``nn.Module``'s; with ranks allocated in calibration, the layers first take the ranks of ``state_dict``
        (a trained trial loaded for inference without calibrating again)."""
        if self.shaped_by_calibration:
            def rank(i: int, name: str) -> int:
                w = state_dict.get(f"per_layer.{i}.{name}.down.weight")
                return int(w.shape[1]) if w is not None else 0  # (G, r, m)

            self._shape({i: (rank(i, "k"), rank(i, "v")) for i in self.layers})
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def resolved_spec(self) -> AdapterSpec:
        """With ranks allocated in calibration: those ranks, one per adapted layer, instead of the budget."""
        if not self.shaped_by_calibration:
            return self.spec
        k, v = (tuple(self.ranks[i][j] for i in self.layers) for j in (0, 1))
        return AdapterSpec(self.name, replace(self.options, budget=None, allocation="uniform", k_rank=k, v_rank=v))

    def extra_repr(self) -> str:
        return f"groups={self.groups}, ranks (k, v) per layer: " + ", ".join(f"{i}: {rk}/{rv}" for i, (rk, rv) in self.ranks.items())

    def _codecs(self) -> list[GroupCodec]:
        return [c for m in self.per_layer.values() for c in m.codecs().values()]

    def kv_layout(self, layout: Layout) -> Layout:
        """The G * r code replaces each compressed K/V on its layer; an uncompressed one stays d wide."""
        for i, rs in self.ranks.items():
            entries = {name: self.groups * r for name, r in zip(NAMES, rs) if r}
            if entries:
                layout = with_layers(layout, (i,), **entries)
        return layout

    def param_formula(self) -> int:
        d, G = self.dims.hidden, self.groups
        return sum(2 * r * d + G * r + d for rs in self.ranks.values() for r in rs if r)  # down, its bias, up, its bias

    def reconstruction_loss(self) -> torch.Tensor | None:
        terms = [c.last_rec for c in self._codecs() if c.last_rec is not None]
        return torch.stack(terms).sum() if terms else None

    @torch.no_grad()
    def calibrate(self, model, samples: np.ndarray) -> None:
        """Allocation error: the ranks from the spectra of K and V on ``calib_samples`` samples; init svd: the truncated
        SVD of the K/V rows of ``query_key_value``; init whitened: the top eigenvectors of K's and V's bias-free second
        moments on those samples. Data are measured with the adapter attached (or routed), every layer passing K and V
        through meanwhile.

        Raises:
            RuntimeError: data are needed and the adapter is neither attached nor routed.
            ConfigError: data are needed and ``samples`` is empty.
        """
        o, G, m = self.options, self.groups, self.block
        rows = {i: dict(zip(NAMES, ((w_k, b_k), (w_v, b_v)))) for i in self.layers
                for w_k, b_k, w_v, b_v in [qkv_rows(model, i)]}  # name -> (W (d, d), b (d,))
        moments = self._moments(model, samples, rows) if o.init == "whitened" or self.shaped_by_calibration else None
        if self.shaped_by_calibration:
            gains = {}
            for i in self.layers:
                for name in NAMES:
                    eig = torch.linalg.eigvalsh(moments[i, name]).flip(-1).clamp_min(0)  # (G, m), descending
                    gains[i, name] = eig.sum(0) / eig.sum().clamp_min(1e-30)  # (m,): per rank, summed over the groups
            got = allocate_ranks(gains, math.floor(o.budget * 2 * m * len(self.layers)))
            self._shape({i: (got[i, "k"], got[i, "v"]) for i in self.layers})
        if o.init == "random":
            return
        for i in self.layers:
            for name, codec in self.per_layer[str(i)].codecs().items():
                w, b = rows[i][name]
                if o.init == "svd":
                    U = torch.linalg.svd(w.double().reshape(G, m, -1), full_matrices=False).U  # (G, m, m), descending
                else:
                    U = torch.linalg.eigh(moments[i, name]).eigenvectors.flip(-1)  # (G, m, m), descending
                codec.set_basis(U[..., : codec.rank], b.double() if b is not None else None)

    def _moments(self, model, samples: np.ndarray, rows: dict) -> dict[tuple[int, str], torch.Tensor]:
        """Per (layer, tensor) the second moment of x - b per group, (G, m, m) float64, on ``calib_samples`` samples."""
        if not self.attached:
            raise RuntimeError("attach the adapter before calibrating it")
        if len(samples) == 0:
            raise ConfigError(f"{self.label(self.options)} measures K and V on calibration samples: train_samples must be >= 1")
        G, m, d = self.groups, self.block, self.dims.hidden
        device = next(model.parameters()).device
        for mod in self.per_layer.values():
            mod.moments = {n: [torch.zeros(d, dtype=torch.float64, device=device),
                               torch.zeros(G, m, m, dtype=torch.float64, device=device), 0] for n in NAMES}
        try:
            batch = samples[: self.options.calib_samples]
            for start in range(0, len(batch), 8):
                ids = torch.from_numpy(np.array(batch[start : start + 8], dtype=np.int64)).to(device)
                model(input_ids=ids, use_cache=False)
            out = {}
            for i in self.layers:
                for name in NAMES:
                    s, ss, n = self.per_layer[str(i)].moments[name]
                    b = rows[i][name][1]
                    bg = (b.double() if b is not None else torch.zeros(d, dtype=torch.float64, device=device)).view(G, m)
                    sg = s.view(G, m)
                    # E[(x - b)(x - b)^T] per group from the sums
                    cross = torch.einsum("gi,gj->gij", sg, bg)
                    out[i, name] = (ss - cross - cross.transpose(1, 2)) / n + torch.einsum("gi,gj->gij", bg, bg)
            return out
        finally:
            for mod in self.per_layer.values():
                mod.moments = None
