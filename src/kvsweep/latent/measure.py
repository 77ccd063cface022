"""Measure the latent cache: bytes its tensors really hold against the accounting, logits against the
training-time forward, decode speed and peak memory, for the base and the adapted model."""

from __future__ import annotations

import resource
import sys
from contextlib import nullcontext

import torch

from ..adapters import Adapter, attached
from .cache import check_bytes
from .decoder import LatentDecoder
from .generate import Generation, generate


def random_prompt(vocab: int, batch: int, context: int, seed: int = 0) -> torch.Tensor:
    """(batch, context) token ids drawn uniformly from ``vocab`` with a fixed seed."""
    return torch.randint(0, vocab, (batch, context), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def reference_logits(model, adapters: list[Adapter], ids: torch.Tensor, keep: int) -> torch.Tensor:
    """The training-time forward (adapters attached, full sequence, V restored): last ``keep`` logits (B, keep, V)."""
    states = {a.attached for a in adapters}
    if len(states) > 1:
        raise RuntimeError("attach all of the adapters or none of them")
    ctx = nullcontext() if states == {True} else attached(model, list(adapters))
    device = next(model.parameters()).device
    with ctx:
        return model(input_ids=ids.to(device), use_cache=False, logits_to_keep=keep).logits.float()


def compare(model, adapters: list[Adapter], prompt: torch.Tensor, gen: Generation) -> dict:
    """Logits of every step of ``gen`` (which kept its logits) against the training-time forward on the same
    tokens; greedy outputs are identical when the reference's argmax at every step is the generated token."""
    n = gen.tokens.shape[1]
    seq = torch.cat([prompt.to(gen.tokens.device), gen.tokens[:, :-1]], dim=1)  # (B, T + n - 1): what was fed
    ref = reference_logits(model, adapters, seq, n)  # (B, n, V)
    diff = (gen.logits - ref).abs().amax().item()
    return {"max_abs_logit_diff": diff, "greedy_identical": bool((ref.argmax(-1) == gen.tokens).all().item()),
            "steps_compared": n}


def measure_bytes(model, adapters: list[Adapter], cache_dtype: str = "float16", *, context: int = 8,
                  new_tokens: int = 2) -> dict:
    """A short decode; the bytes per token its cache holds, checked against the accounting (raises if they differ).

    For a sweep to record the measured bytes with each trial at the end of the trial.
    """
    decoder = LatentDecoder(model, adapters, cache_dtype=cache_dtype)
    prompt = random_prompt(model.config.vocab_size, 1, context)
    gen = generate(decoder, prompt, new_tokens + 1)
    return check_bytes(gen.cache, decoder.layout(), cache_dtype)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"cuda_max_memory_allocated_bytes": int(torch.cuda.max_memory_allocated(device))}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"max_rss_bytes": int(rss if sys.platform == "darwin" else rss * 1024)}


def _run(decoder: LatentDecoder, prompt: torch.Tensor, new_tokens: int, *, keep_logits: bool) -> tuple[Generation, dict]:
    generate(decoder, prompt[:, :8], 2)  # warm-up: first-call costs stay out of the timings
    _reset_peak(decoder.device)
    gen = generate(decoder, prompt, new_tokens + 1, keep_logits=keep_logits)  # prefill + new_tokens decode steps
    timing = {
        "prefill_s": gen.prefill_s,
        "decode_s": gen.decode_s,
        "decode_steps": gen.decode_steps,
        "decode_tokens_per_s": gen.decode_tokens_per_s,
        "cache_bytes": gen.cache.nbytes(),
        **_peak(decoder.device),
    }
    return gen, timing


def measure_cache(model, adapters: list[Adapter], *, context: int, new_tokens: int, cache_dtype: str = "float16",
                  batch: int = 1, prompt: torch.Tensor | None = None, seed: int = 0, check_logits: bool = True,
                  fold: bool = True, log=None) -> dict:
    """Prefill ``context`` tokens and decode ``new_tokens`` steps with the base and with ``adapters``.

    Reports the bytes the cache tensors hold (per layer and per token) next to ``kvsweep.kvcache``'s
    accounting at ``cache_dtype`` and raises ``CacheMismatchError`` if they differ by a byte; the latent
    decode's logits at every step against the training-time forward (``max_abs_logit_diff``,
    ``greedy_identical``), also with the cache at the compute dtype when ``cache_dtype`` differs from it
    (``exact``); decode tokens/s and peak memory of both.
    """
    log = log or (lambda msg: None)
    if context < 1 or new_tokens < 1:
        raise ValueError(f"context and new_tokens must be >= 1; got {context}, {new_tokens}")
    if prompt is None:
        prompt = random_prompt(model.config.vocab_size, batch, context, seed)
    batch, context = prompt.shape
    device = next(model.parameters()).device
    prompt = prompt.to(device)

    base = LatentDecoder(model, [], cache_dtype=cache_dtype)
    adapted = LatentDecoder(model, adapters, cache_dtype=cache_dtype, fold=fold)
    log(f"decoding {context} + {new_tokens} tokens (batch {batch}) with the base ...")
    base_gen, base_t = _run(base, prompt, new_tokens, keep_logits=check_logits)
    base_bytes = check_bytes(base_gen.cache, base.layout(), cache_dtype)
    log("... and with the adapters")
    gen, adapted_t = _run(adapted, prompt, new_tokens, keep_logits=check_logits)
    got = check_bytes(gen.cache, adapted.layout(), cache_dtype)  # raises CacheMismatchError on any difference

    out = {
        "context": context,
        "new_tokens": new_tokens,
        "batch": batch,
        "cache_dtype": cache_dtype,
        "compute_dtype": str(adapted.dtype).replace("torch.", ""),
        "device": str(device),
        **got,
        "base_bytes_per_token": base_bytes["measured_bytes_per_token"],
        "base_bytes_per_layer": base_bytes["measured_bytes_per_layer"],
        "ratio_to_base": got["measured_bytes_per_token"] / base_bytes["measured_bytes_per_token"],
        "cache_tensors": gen.cache.describe(),
        "cache_capacity_tokens": gen.cache.capacity,
        "generated": gen.tokens.tolist(),  # (B, new_tokens + 1) tokens of the adapted model
        "timings": {
            "base": base_t,
            "adapted": adapted_t,
            "decode_speed_ratio": adapted_t["decode_tokens_per_s"] / base_t["decode_tokens_per_s"],
        },
    }
    if check_logits:
        log("checking the logits against the training-time forward ...")
        out.update(compare(model, adapters, prompt, gen))
        base_cmp = compare(model, [], prompt, base_gen)
        out["base_max_abs_logit_diff"] = base_cmp["max_abs_logit_diff"]
        out["base_greedy_identical"] = base_cmp["greedy_identical"]
        out["exact"] = None
        if adapted.cache_dtype != adapted.dtype:  # the latent path itself, without the cache dtype's rounding
            exact = LatentDecoder(model, adapters, cache_dtype=out["compute_dtype"], fold=fold)
            exact_gen = generate(exact, prompt, new_tokens + 1, keep_logits=True)
            out["exact"] = {"cache_dtype": out["compute_dtype"], **compare(model, adapters, prompt, exact_gen)}
    return out
