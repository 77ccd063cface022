"""Greedy and sampled generation with a ``LatentDecoder``: prefill the prompt, then one token per step."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .cache import LatentCache
from .decoder import LatentDecoder


@dataclass
class Generation:
    tokens: torch.Tensor  # (B, N) the new tokens
    logits: torch.Tensor | None  # (B, N, V) float32: the logits each new token was chosen from (keep_logits)
    cache: LatentCache  # holds the prompt and the first N-1 new tokens, allocated for exactly that
    prefill_s: float
    decode_s: float  # the N-1 decode steps

    @property
    def decode_steps(self) -> int:
        return self.tokens.shape[1] - 1

    @property
    def decode_tokens_per_s(self) -> float:
        return self.tokens.shape[0] * self.decode_steps / self.decode_s if self.decode_s > 0 else float("nan")


def next_token(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) tokens: argmax at temperature 0, else a sample of softmax(logits / T) over the top k."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    scaled = logits.float() / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = torch.topk(scaled, min(top_k, scaled.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(logits.device)


@torch.no_grad()
def generate(decoder: LatentDecoder, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, generator: torch.Generator | None = None, keep_logits: bool = False) -> Generation:
    """Generate ``max_new_tokens`` after ``prompt`` (B, T) with a fresh cache of exactly T + max_new_tokens - 1."""
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be (batch, tokens) with at least one token, got shape {tuple(prompt.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    B, T = prompt.shape
    cache = decoder.new_cache(B, T + max_new_tokens - 1)
    sync = torch.cuda.synchronize if decoder.device.type == "cuda" else (lambda: None)
    pick = lambda lg: next_token(lg, temperature=temperature, top_k=top_k, generator=generator)  # noqa: E731
    tokens, kept = [], []
    sync()
    t0 = time.perf_counter()
    logits = decoder(prompt, cache, last_only=True)[:, -1]  # (B, V)
    tok = pick(logits)
    sync()
    t1 = time.perf_counter()
    for step in range(max_new_tokens):
        tokens.append(tok)
        if keep_logits:
            kept.append(logits.float())
        if step == max_new_tokens - 1:
            break
        logits = decoder(tok.unsqueeze(1), cache)[:, -1]
        tok = pick(logits)
    sync()
    t2 = time.perf_counter()
    return Generation(torch.stack(tokens, 1), torch.stack(kept, 1) if keep_logits else None, cache, t1 - t0, t2 - t1)
