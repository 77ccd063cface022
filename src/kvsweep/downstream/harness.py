"""A frozen base with kvsweep adapters as an lm-evaluation-harness model.

``KvsweepLM`` is lm-eval's own ``HFLM`` (its tokenization, batching, request ordering and metrics are
lm-eval's) over the base model, with two calls replaced:

- scoring (``loglikelihood``, ``loglikelihood_rolling``, ``multiple_choice``) runs the adapted model's
  training-time forward: the adapters are attached for each batch (this is the forward the latent cache
  reproduces to within float rounding; ``tests/test_latent.py`` and the methods' tests check it);
- generation (``generate_until``) decodes on the latent cache (``kvsweep.latent.LatentDecoder``): the
  cache holds only what the adapters leave, as a compressed model would run.

Source: EleutherAI, lm-evaluation-harness (https://github.com/EleutherAI/lm-evaluation-harness), its
``lm_eval.models.huggingface.HFLM``.
"""

from __future__ import annotations

import logging

import torch
from lm_eval.models.huggingface import HFLM

from ..adapters import Adapter, attached, kv_layout_of
from ..kvcache import base_layout, bytes_per_token
from ..latent import LatentDecoder, next_token
from ..models import Base, dims


class KvsweepLM(HFLM):
    """lm-eval's ``HFLM`` over ``base`` with ``adapters`` (none: the base itself, on the plain cache of the same decoder).

    ``batch_size``: lm-eval's batch of scoring requests; generation runs one sequence at a time (the latent
    decoder has no padding mask). ``cache_dtype``: what the latent cache stores during generation. ``max_length``:
    the longest context lm-eval builds (default: the base's positions).
    """

    def __init__(self, base: Base, adapters: list[Adapter] | tuple[Adapter, ...] = (), *, batch_size: int = 8,
                 cache_dtype: str = "float16", max_length: int | None = None):
        if base.tokenizer is None:
            raise ValueError(f"model {base.name} has no tokenizer; lm-eval needs one")
        quiet = logging.getLogger("lm_eval")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # its warning that a model object (not a hub id) was given: that is the point here
        try:
            super().__init__(pretrained=base.model, tokenizer=base.tokenizer, backend="causal", batch_size=batch_size,
                             max_length=max_length or base.max_positions)
        finally:
            quiet.setLevel(level)
        self.adapters = list(adapters)
        self.cache_dtype = cache_dtype
        self._decoder: LatentDecoder | None = None

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        """(B, T) token ids -> (B, T, V) logits of the adapted training-time forward."""
        with attached(self.model, self.adapters):
            return super()._model_call(inps, attn_mask, labels)

    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes per token of the model evaluated, at ``cache_dtype`` (the accounting ``LatentDecoder.layout`` gives,
        without building the decoder)."""
        d = dims(self.model.config)
        return bytes_per_token(kv_layout_of(self.adapters, base_layout(d.layers, d.hidden)), self.cache_dtype)

    @property
    def decoder(self) -> LatentDecoder:
        """The latent decoder, built on first use (after the adapters' weights are final)."""
        if self._decoder is None:
            self._decoder = LatentDecoder(self.model, self.adapters, cache_dtype=self.cache_dtype)
        return self._decoder

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs) -> torch.Tensor:
        """(B, T) left-padded contexts -> (B, max_length): each context, as lm-eval padded it, followed by its new tokens
        (pad after an early stop). Greedy unless ``do_sample``; then ``temperature`` and ``top_k`` sample."""
        mask = generation_kwargs.pop("attention_mask", None)
        sample = bool(generation_kwargs.pop("do_sample", False))
        temperature = float(generation_kwargs.pop("temperature", 1.0) or 0.0) if sample else 0.0
        top_k = generation_kwargs.pop("top_k", None)
        B, T = context.shape
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        out = torch.full((B, max(max_length, T)), pad, dtype=torch.long, device=context.device)
        out[:, :T] = context
        for b in range(B):
            ids = context[b] if mask is None else context[b][mask[b].bool()]
            new = self._generate_one(ids, max_length - T, stop, temperature, top_k)
            out[b, T:T + len(new)] = torch.tensor(new, dtype=torch.long, device=context.device)
        return out

    def _generate_one(self, ids: torch.Tensor, n: int, stop: list[str], temperature: float, top_k: int | None) -> list[int]:
        """Up to ``n`` new tokens after ``ids`` (T,), stopping after the end-of-text token or once the text holds a stop string."""
        if n < 1:
            return []
        cache = self.decoder.new_cache(1, ids.shape[0] + n - 1)
        logits = self.decoder(ids[None], cache, last_only=True)[:, -1]  # (1, V)
        new: list[int] = []
        while True:
            tok = next_token(logits, temperature=temperature, top_k=top_k)  # (1,)
            new.append(int(tok))
            if len(new) == n or new[-1] == self.eot_token_id or _stopped(self.tok_decode(new), stop):
                return new
            logits = self.decoder(tok[:, None], cache)[:, -1]


def _stopped(text: str, stop: list[str]) -> bool:
    return any(s and s in text for s in stop)
