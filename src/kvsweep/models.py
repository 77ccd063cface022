"""The frozen base model: loading, freezing, and every GPT-NeoX-specific path.

A base is any GPT-NeoX causal LM: a Pythia checkpoint from the hub (with ``revision``), a local folder
saved with ``save_pretrained``, the offline ``tiny`` preset (``kvsweep.tiny`` builds it on first use),
or a Pythia architecture (``kvsweep.archs``) built with random weights (``random_init``) for structural
checks and timing without a download. Nothing outside this module reaches into the model's internals.

Hub models are loaded after a quick probe of the hub (``kvsweep.hub``): when it does not answer, they come
from the local hub cache alone, or fail at once, instead of after half a minute of retries.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import torch
from transformers import AutoConfig, AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
from transformers.models.gpt_neox.modeling_gpt_neox import eager_attention_forward

from .archs import PYTHIA_ARCHS, neox_config, pythia_config  # noqa: F401  (neox_config: part of this module's API)
from .config import ConfigError, KvsweepError, MissingFileError, ModelCfg, error_reason
from .hub import HUB_PROBE_SECONDS, hub_endpoint, hub_offline, hub_reachable
from .tiny import ensure_tiny, tiny_config

_PYTHIA_NAME = re.compile(r"(?:EleutherAI/)?pythia-(?P<size>[0-9.]+[mb])(?P<deduped>-deduped)?", re.IGNORECASE)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_Loaded = TypeVar("_Loaded")


class HubUnavailableError(KvsweepError):
    """The Hugging Face hub could not give a model, tokenizer or dataset."""


@dataclass(frozen=True)
class ModelSource:
    """Where a base comes from, resolved from its name without loading any weights."""

    kind: str  # "tiny" | "pythia-random" | "hub" | "local"
    ref: str  # hub id, folder, tiny corpus path ("" for the built-in corpus) or Pythia size
    revision: str | None = None


def resolve_model(cfg: ModelCfg) -> ModelSource:
    """Map a model name to its source; raise a clear error for an unknown preset or a missing folder."""
    name = cfg.name.strip()
    if name == "tiny" or name.startswith("tiny:"):
        if cfg.random_init:
            raise ConfigError("random_init applies to Pythia architectures (pythia-70m ...), not to tiny")
        corpus = name[len("tiny:"):]
        if corpus and not Path(corpus).expanduser().is_file():
            raise MissingFileError(f"model: tiny corpus file not found: {corpus}")
        return ModelSource("tiny", str(Path(corpus).expanduser().resolve()) if corpus else "")
    pythia = _PYTHIA_NAME.fullmatch(name)
    if cfg.random_init:
        if not pythia:
            raise ConfigError(
                f"random_init builds a Pythia architecture from kvsweep's table; model {name!r} is not one. "
                f"Valid: pythia-{', pythia-'.join(PYTHIA_ARCHS)} (or EleutherAI/pythia-...)"
            )
        size = pythia["size"].lower()
        pythia_config(size)  # validates the size
        return ModelSource("pythia-random", size)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MissingFileError(f"model: folder {name} holds no config.json (save a model with save_pretrained)")
        return ModelSource("local", str(path.resolve()))
    if path.exists():
        raise ConfigError(f"model: {name} is a file; give the folder a model was saved to with save_pretrained")
    if pythia:
        size = pythia["size"].lower()
        pythia_config(size)
        return ModelSource("hub", f"EleutherAI/pythia-{size}{pythia['deduped'] or ''}", cfg.revision or "main")
    if _HUB_ID.fullmatch(name):
        return ModelSource("hub", name, cfg.revision or "main")
    if "/" in name or os.sep in name or name.startswith((".", "~")):
        raise MissingFileError(f"model: folder not found: {name}")
    raise ConfigError(
        f"model: unknown preset {name!r}; valid presets: tiny, tiny:PATH, pythia-{', pythia-'.join(PYTHIA_ARCHS)}; "
        "or a hub id (owner/name) or a local folder"
    )


def model_config(source: ModelSource) -> GPTNeoXConfig:
    """The base's config, read without loading weights (a small hub request for hub models)."""
    if source.kind == "tiny":
        return tiny_config()
    if source.kind == "pythia-random":
        return pythia_config(source.ref)
    if source.kind == "local":
        config = AutoConfig.from_pretrained(source.ref, trust_remote_code=False)
    else:
        config = _from_hub(lambda local: AutoConfig.from_pretrained(source.ref, revision=source.revision, trust_remote_code=False,
                                                                    local_files_only=local), source, "config")
    if config.model_type != "gpt_neox":
        raise ConfigError(f"model: {source.ref} is a {config.model_type!r} model; kvsweep works on GPT-NeoX models (Pythia)")
    return config


def _from_hub(load: Callable[[bool], _Loaded], source: ModelSource, what: str) -> _Loaded:
    """Run a hub load, ``load(local_files_only)``: from the local hub cache alone when the hub does not answer
    (a quick probe, unless HF_HUB_OFFLINE is set).

    Raises:
        HubUnavailableError: one clear line naming the alternatives, for any failure.
    """
    offline = hub_offline()
    unreachable = not offline and not hub_reachable()
    try:
        return load(unreachable)
    except Exception as e:  # transformers raises OSError, ValueError or hub errors, by version
        reason = (f"the hub at {hub_endpoint()} cannot be reached (no answer within {HUB_PROBE_SECONDS:g} s) and the local "
                  "hub cache does not hold it") if unreachable else error_reason(e)
        raise HubUnavailableError(
            f"cannot load the {what} of {source.ref!r} (revision {source.revision}) from the Hugging Face hub"
            f"{' (HF_HUB_OFFLINE is set)' if offline else ''}: {reason}. Without the hub, use a local folder "
            "saved with save_pretrained (--model PATH), the offline preset (--model tiny), or a Pythia "
            "architecture with random weights (--model pythia-70m --random-init --tokenizer tokenizer.json)."
        ) from e


def load_tokenizer(path: str) -> PreTrainedTokenizerFast:
    """A fast tokenizer from a ``tokenizer.json`` file or a folder saved with ``save_pretrained``."""
    p = Path(path).expanduser()
    if not p.exists():
        raise MissingFileError(f"tokenizer: not found: {path}")
    if p.is_dir():
        tok = AutoTokenizer.from_pretrained(str(p), trust_remote_code=False)
    else:
        tok = PreTrainedTokenizerFast(tokenizer_file=str(p))
        vocab = tok.get_vocab()
        for role, token in (("eos_token", "<|endoftext|>"), ("pad_token", "<|padding|>")):
            if token in vocab and getattr(tok, role) is None:
                setattr(tok, role, token)
        if tok.bos_token is None and tok.eos_token is not None:
            tok.bos_token = tok.eos_token
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise ConfigError(f"tokenizer: {path} is not a fast (tokenizers-backed) tokenizer")
    if tok.eos_token_id is None:
        raise ConfigError(f"tokenizer: {path} has no EOS token; kvsweep joins documents with it")
    return tok


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {device} asked for but no CUDA GPU is available; use cpu or auto")
    return dev


@dataclass
class Base:
    """A loaded, frozen base model with its tokenizer (``None`` for random weights without ``tokenizer``)."""

    model: GPTNeoXForCausalLM
    tokenizer: PreTrainedTokenizerFast | None
    name: str
    source: ModelSource
    model_path: str | None  # the folder from_pretrained reloads the model from (None for random weights)

    @property
    def config(self) -> GPTNeoXConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def max_positions(self) -> int:
        return int(self.model.config.max_position_embeddings)


def check_seq_len(config: GPTNeoXConfig, seq_len: int, name: str, what: str = "seq_len") -> None:
    """Raises: ConfigError: ``seq_len`` (the flag ``what``) is beyond the model's positions."""
    if seq_len > config.max_position_embeddings:
        raise ConfigError(
            f"{what} {seq_len} is beyond model {name}'s {config.max_position_embeddings} positions; "
            f"valid range: 2..{config.max_position_embeddings}"
        )


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Turn off gradients for every parameter and put the model in eval mode (no dropout)."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def load_base(cfg: ModelCfg, *, log: Callable[[str], None] = print) -> Base:
    """Load, freeze and place the base described by ``cfg``."""
    source = resolve_model(cfg)
    device = resolve_device(cfg.device)
    dtype = _DTYPES[cfg.dtype]
    model_path: str | None
    folder = ensure_tiny(source.ref or None, log=log) if source.kind == "tiny" else None
    if source.kind == "tiny":
        model = GPTNeoXForCausalLM.from_pretrained(str(folder), dtype=dtype)
        model_path = str(folder)
    elif source.kind == "pythia-random":
        torch.manual_seed(cfg.seed)
        model = GPTNeoXForCausalLM(pythia_config(source.ref)).to(dtype)
        model_path = None
    elif source.kind == "local":
        model_config(source)  # rejects non-GPT-NeoX folders with a clear error
        model = GPTNeoXForCausalLM.from_pretrained(source.ref, dtype=dtype, trust_remote_code=False)
        model_path = source.ref
    else:
        model_config(source)
        model = _from_hub(
            lambda local: GPTNeoXForCausalLM.from_pretrained(source.ref, revision=source.revision, dtype=dtype,
                                                             trust_remote_code=False, local_files_only=local),
            source,
            "weights",
        )
        model_path = _hub_snapshot_folder(source) or source.ref
    tokenizer = _tokenizer(cfg, source, folder)
    _check_vocab(tokenizer, model.config, cfg.name)
    freeze(model).to(device)
    return Base(model=model, tokenizer=tokenizer, name=cfg.name, source=source, model_path=model_path)


def load_base_tokenizer(cfg: ModelCfg, *, log: Callable[[str], None] = print) -> PreTrainedTokenizerFast | None:
    """The tokenizer ``load_base(cfg)`` gives (``None`` for random weights without ``cfg.tokenizer``), checked against
    the base's config, without loading the weights: what a sweep's driver needs to tokenize the data (a hub model's
    config and tokenizer are small requests; its weights stay where the trials load them). The ``tiny`` preset is
    built if it is not yet.

    Raises:
        ConfigError, MissingFileError, HubUnavailableError: as ``load_base``.
    """
    source = resolve_model(cfg)
    folder = ensure_tiny(source.ref or None, log=log) if source.kind == "tiny" else None
    tokenizer = _tokenizer(cfg, source, folder)
    _check_vocab(tokenizer, model_config(source), cfg.name)
    return tokenizer


def _tokenizer(cfg: ModelCfg, source: ModelSource, tiny_folder: Path | None) -> PreTrainedTokenizerFast | None:
    """The base's tokenizer: ``cfg.tokenizer`` when given, else the one saved with the model (tiny, a local folder that
    holds one, the hub's), else ``None``."""
    if cfg.tokenizer is not None:
        return load_tokenizer(cfg.tokenizer)
    if source.kind == "tiny":
        return AutoTokenizer.from_pretrained(str(tiny_folder))
    if source.kind == "local":
        return AutoTokenizer.from_pretrained(source.ref, trust_remote_code=False) if _has_tokenizer(Path(source.ref)) else None
    if source.kind == "hub":
        return _from_hub(lambda local: AutoTokenizer.from_pretrained(source.ref, revision=source.revision, trust_remote_code=False,
                                                                    local_files_only=local), source, "tokenizer")
    return None


def _check_vocab(tokenizer: PreTrainedTokenizerFast | None, config: GPTNeoXConfig, name: str) -> None:
    if tokenizer is not None and len(tokenizer) > config.vocab_size:
        raise ConfigError(f"tokenizer has {len(tokenizer)} entries but model {name} has {config.vocab_size}; they do not belong together")


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()


def _hub_snapshot_folder(source: ModelSource) -> str | None:
    """The local snapshot folder of a hub model, which ``from_pretrained`` reloads offline."""
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(source.ref, "config.json", revision=source.revision)
        return str(Path(hit).parent) if isinstance(hit, str) else None
    except Exception:
        return None


# --------------------------------------------------------------------------- GPT-NeoX internals for adapters
#
# Adapters never touch the model's modules themselves: they ask for a tap at one of three points of a
# layer's attention and get back a function that removes it, restoring the original object.
#   qkv tap:       after the fused query_key_value projection, before rotary and attention: fn(k, v) -> (k, v)
#   attention tap: the attention itself, over the rotated queries and keys (what the base caches):
#                  fn(q, k, v, mask, scaling, base) -> (out, weights), see tap_attention
#   output tap:    on the attention output A (heads merged), before the dense projection: fn(a) -> a


@dataclass(frozen=True)
class Dims:
    layers: int
    hidden: int
    heads: int

    @property
    def head_size(self) -> int:
        return self.hidden // self.heads


def dims(config: GPTNeoXConfig) -> Dims:
    return Dims(config.num_hidden_layers, config.hidden_size, config.num_attention_heads)


def split_qkv(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPT-NeoX fuses Q, K, V per head: (B, T, 3d) -> q, k, v, each (B, T, d) with heads merged."""
    B, T, three_d = qkv.shape
    hs = three_d // (3 * heads)
    per_head = qkv.view(B, T, heads, 3 * hs)  # (B, T, H, 3*hs): [q | k | v] of each head
    q, k, v = per_head.split(hs, dim=-1)  # (B, T, H, hs) each
    return q.reshape(B, T, heads * hs), k.reshape(B, T, heads * hs), v.reshape(B, T, heads * hs)


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of ``split_qkv``: three (B, T, d) -> (B, T, 3d) in GPT-NeoX's per-head layout."""
    B, T, d = q.shape
    hs = d // heads
    per_head = torch.cat([x.view(B, T, heads, hs) for x in (q, k, v)], dim=-1)  # (B, T, H, 3*hs)
    return per_head.view(B, T, 3 * d)


class _QKVTap(torch.nn.Module):
    def __init__(self, inner: torch.nn.Linear, heads: int, fn: torch.nn.Module):
        super().__init__()
        self.inner, self.heads, self.fn = inner, heads, fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.inner(x)  # (B, T, 3d)
        q, k, v = split_qkv(qkv, self.heads)
        k2, v2 = self.fn(k, v)
        if k2 is k and v2 is v:
            return qkv
        return merge_qkv(q, k2, v2, self.heads)


class _OutputTap(torch.nn.Module):
    def __init__(self, inner: torch.nn.Linear, fn: torch.nn.Module):
        super().__init__()
        self.inner, self.fn = inner, fn

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.inner(self.fn(a))  # a: (B, T, d) attention output A before `dense`


def _attention(model: GPTNeoXForCausalLM, layer: int) -> torch.nn.Module:
    return model.gpt_neox.layers[layer].attention


def _swap(parent: torch.nn.Module, name: str, new: torch.nn.Module, expect: type) -> Callable[[], None]:
    old = getattr(parent, name)
    if type(old) is not expect:
        raise ConfigError(f"two adapters tap the same point ({name} of {type(parent).__name__}); combine at most one of each kind")
    setattr(parent, name, new)

    def restore() -> None:
        setattr(parent, name, old)

    return restore


def tap_qkv(model: GPTNeoXForCausalLM, layer: int, fn: torch.nn.Module) -> Callable[[], None]:
    """Route layer ``layer``'s K and V (pre-rotary, (B, T, d) each) through ``fn``; returns the undo."""
    attn = _attention(model, layer)
    return _swap(attn, "query_key_value", _QKVTap(attn.query_key_value, model.config.num_attention_heads, fn), torch.nn.Linear)


def tap_attention_output(model: GPTNeoXForCausalLM, layer: int, fn: torch.nn.Module) -> Callable[[], None]:
    """Route layer ``layer``'s attention output A ((B, T, d), before ``dense``) through ``fn``; returns the undo."""
    attn = _attention(model, layer)
    return _swap(attn, "dense", _OutputTap(attn.dense, fn), torch.nn.Linear)


ATTENTION_TAP = "kvsweep_attention_tap"
"""The name under which kvsweep's attention function is registered with transformers' ``AttentionInterface``."""


class _TappedConfig:
    """One layer's view of the model's config: its attention implementation is kvsweep's tap (``ATTENTION_TAP``),
    every other attribute the model config's own. The model's config, and so its masks and its other layers,
    stay as they are."""

    _attn_implementation = ATTENTION_TAP

    def __init__(self, config: GPTNeoXConfig, fn: torch.nn.Module, rotary: torch.nn.Module):
        self.__dict__["_kvsweep_inner"], self.__dict__["_kvsweep_fn"] = config, fn
        self.__dict__["_kvsweep_rotary"] = rotary

    def __getattr__(self, name: str):
        return getattr(self.__dict__["_kvsweep_inner"], name)


class BaseAttention:
    """The base's own attention in one call of a tapped layer: ``base(q, k, v, mask=...)`` (this call's mask unless given
    one), ``with_mask(mask)`` (the same with another mask, e.g. of some of its rows), and ``rotate(x, start)``: the
    rotary embedding of the model's own rotary module, as its attention applies it to keys (B, H, S, hs) at positions
    start .. start+S-1 (a method that rebuilds keys from a code of the pre-rotary ones rotates them so)."""

    def __init__(self, module, inner: Callable, mask, rotary: torch.nn.Module, scaling: float, dropout: float, kwargs: dict):
        self._module, self._inner, self.mask, self._rotary = module, inner, mask, rotary
        self._scaling, self._dropout, self._kwargs = scaling, dropout, kwargs

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=...):
        mask = self.mask if mask is ... else mask
        return self._inner(self._module, q, k, v, mask, scaling=self._scaling, dropout=self._dropout, **self._kwargs)

    def with_mask(self, mask) -> "BaseAttention":
        return BaseAttention(self._module, self._inner, mask, self._rotary, self._scaling, self._dropout, self._kwargs)

    def rotate(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        pos = torch.arange(start, start + x.shape[2], device=x.device).unsqueeze(0)  # (1, S)
        cos, sin = self._rotary(x, position_ids=pos)  # (1, S, rot) each
        return apply_rotary(x, cos, sin)


def _tapped_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """What a tapped layer's attention calls (query, key, value (B, H, T|S, hs), keys rotated): its tap's function,
    given the base's own attention over any (q, k, v) with this call's mask as ``base`` (a ``BaseAttention``)."""
    config = module.config
    inner = ALL_ATTENTION_FUNCTIONS.get_interface(config._kvsweep_inner._attn_implementation, eager_attention_forward)
    base = BaseAttention(module, inner, attention_mask, config._kvsweep_rotary, scaling, dropout, kwargs)
    return config._kvsweep_fn(query, key, value, attention_mask, scaling, base)


AttentionInterface.register(ATTENTION_TAP, _tapped_attention)


def tap_attention(model: GPTNeoXForCausalLM, layer: int, fn: torch.nn.Module) -> Callable[[], None]:
    """Route layer ``layer``'s attention through ``fn(query, key, value, mask, scaling, base) -> (out, weights)``:
    query, key, value (B, H, T, hs) / (B, H, S, hs) after rotary (the keys as the base caches them), ``mask``
    the model's (None: causal; bool: True where allowed; float: added to the scores), ``scaling`` hs ** -0.5,
    ``base(q, k, v, mask=...)`` the base's own attention (with this call's mask unless given one, e.g. of some of
    its rows; a ``BaseAttention``, which also rotates keys as the model does); ``out`` (B, T, H, hs). Returns the undo.

    The layer's attention module reads its attention implementation from ``config``: the tap gives that one
    module a view of the config naming kvsweep's registered function (transformers' ``AttentionInterface``),
    which calls ``fn``; the model's config is untouched.
    """
    attn = _attention(model, layer)
    return _swap(attn, "config", _TappedConfig(attn.config, fn, model.gpt_neox.rotary_emb), type(model.config))


def dense_weight(model: GPTNeoXForCausalLM, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output projection of layer ``layer``'s attention (weight (d, d), bias (d,))."""
    dense = _attention(model, layer).dense
    dense = dense.inner if isinstance(dense, _OutputTap) else dense
    return dense.weight, dense.bias


def qkv_split_weights(qkv: torch.nn.Linear, heads: int) -> tuple[tuple[torch.Tensor, torch.Tensor | None], ...]:
    """The Q, K and V rows of a fused ``query_key_value`` (weight (3d, d), per-head layout, see ``split_qkv``), each as
    (weight (d, d), bias (d,) or None) in ``split_qkv``'s merged-head order: ``K = x W_k^T + b_k`` (B, T, d), pre-rotary."""
    d = qkv.in_features
    hs = d // heads
    w = qkv.weight.view(heads, 3, hs, d)  # (H, [q|k|v], hs, d)
    b = qkv.bias.view(heads, 3, hs) if qkv.bias is not None else None  # (H, [q|k|v], hs)
    return tuple((w[:, i].reshape(d, d), b[:, i].reshape(d) if b is not None else None) for i in range(3))


def qkv_rows(model: GPTNeoXForCausalLM, layer: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """The K and V rows of layer ``layer``'s ``query_key_value`` (any tap unwrapped): W_k (d, d), b_k (d,), W_v (d, d),
    b_v (d,) (biases None without one), with ``K = x W_k^T + b_k`` (B, T, d) the keys before rotary, heads merged."""
    qkv = _attention(model, layer).query_key_value
    qkv = qkv.inner if isinstance(qkv, _QKVTap) else qkv
    _, (w_k, b_k), (w_v, b_v) = qkv_split_weights(qkv, model.config.num_attention_heads)
    return w_k, b_k, w_v, b_v


# --------------------------------------------------------------------------- GPT-NeoX internals for the latent cache
#
# kvsweep.latent runs its own decoding loop over the base's modules (the adapters' taps bypassed: it
# applies the adapters itself). These give it the modules and the rotary embedding, nothing more.


@dataclass(frozen=True)
class LayerParts:
    """One transformer layer's frozen modules, taps unwrapped."""

    input_norm: torch.nn.LayerNorm
    post_attention_norm: torch.nn.LayerNorm
    qkv: torch.nn.Linear  # fused per head: (d) -> (3d), see split_qkv
    dense: torch.nn.Linear  # attention output projection (d) -> (d)
    mlp: torch.nn.Module
    parallel_residual: bool


@dataclass(frozen=True)
class NeoxParts:
    embed: torch.nn.Embedding
    layers: tuple[LayerParts, ...]
    final_norm: torch.nn.LayerNorm
    lm_head: torch.nn.Linear
    rotary_emb: torch.nn.Module  # called as rotary_emb(x, position_ids) -> (cos, sin), each (B, T, rotary_ndims)
    dims: Dims
    scaling: float  # head_size ** -0.5


def neox_parts(model: GPTNeoXForCausalLM) -> NeoxParts:
    """The modules a decoding loop needs, with any adapter taps unwrapped to the base's own Linear."""
    config = model.config
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope != "default":
        raise ConfigError(f"the latent cache supports GPT-NeoX's default rotary embedding, not rope_type {rope!r}")
    layers = []
    for layer in model.gpt_neox.layers:
        attn = layer.attention
        qkv = attn.query_key_value.inner if isinstance(attn.query_key_value, _QKVTap) else attn.query_key_value
        dense = attn.dense.inner if isinstance(attn.dense, _OutputTap) else attn.dense
        layers.append(LayerParts(layer.input_layernorm, layer.post_attention_layernorm, qkv, dense, layer.mlp,
                                 bool(layer.use_parallel_residual)))
    d = dims(config)
    return NeoxParts(model.gpt_neox.embed_in, tuple(layers), model.gpt_neox.final_layer_norm, model.lm_head,
                     model.gpt_neox.rotary_emb, d, d.head_size ** -0.5)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GPT-NeoX's partial rotary embedding of q or k (B, H, T, hs) with cos, sin (B, T, rotary_ndims):
    the same operations as ``apply_rotary_pos_emb``, on one tensor."""
    from transformers.models.gpt_neox.modeling_gpt_neox import rotate_half

    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, rot)
    n = cos.shape[-1]
    x_rot, x_pass = x[..., :n], x[..., n:]
    return torch.cat([(x_rot * cos) + (rotate_half(x_rot) * sin), x_pass], dim=-1)


def final_hidden(model: GPTNeoXForCausalLM, input_ids: torch.Tensor, wrap: Callable | None = None) -> torch.Tensor:
    """The last layer's hidden states after the final LayerNorm, (B, T, d): the logits are ``output_weight`` times
    these. ``wrap`` (e.g. a torch.compile cache) is applied to the module that computes them."""
    body = model.gpt_neox if wrap is None else wrap(model.gpt_neox)
    return body(input_ids=input_ids, use_cache=False).last_hidden_state


def output_weight(model: GPTNeoXForCausalLM) -> torch.Tensor:
    """The output projection's weight (V, d) (no bias in GPT-NeoX)."""
    return model.get_output_embeddings().weight
