"""Measure the latent cache: bytes its tensors really hold against the accounting, logits against the
training-time forward, decode speed and peak memory, for the base and the adapted model."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

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
    """A short decode; the bytes per token its cache holds and its fixed tensors (full-precision windows), checked
    against the accounting and the methods' ``window_bytes`` (raises ``CacheMismatchError`` if they differ).

    For a sweep to record the measured bytes with each trial at the end of the trial.
    """
    decoder = LatentDecoder(model, adapters, cache_dtype=cache_dtype)
    prompt = random_prompt(model.config.vocab_size, 1, context)
    gen = generate(decoder, prompt, new_tokens + 1)
    return check_bytes(gen.cache, decoder.layout(), cache_dtype, decoder.window_bytes())


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device, held: int = 0) -> dict:
    """Peak memory since ``_reset_peak``; on a GPU less ``held`` bytes that were allocated before and are not the run's."""
    if device.type == "cuda":
        return {"cuda_max_memory_allocated_bytes": int(torch.cuda.max_memory_allocated(device)) - held}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"max_rss_bytes": int(rss if sys.platform == "darwin" else rss * 1024)}


@dataclass
class Spread:
    """A median over repeats and how far the repeats spread around it."""
    median: float
    min: float
    q1: float  # the lower and upper quartiles (inclusive method; the value itself with one repeat)
    q3: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> "Spread":
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
        return cls(statistics.median(values), min(values), q1, q3, max(values))


@dataclass
class StepTimes:
    """One decoder's timed runs: seconds of each prefill (repeats,) and of each decode step (repeats, new_tokens)."""
    prefill_s: list[float] = field(default_factory=list)
    step_s: list[list[float]] = field(default_factory=list)

    def summary(self, batch: int) -> dict:
        """Medians over the repeats: prefill_s, decode_s (all steps of a run), step_s (a run's median step) and
        decode_tokens_per_s (batch / step_s)."""
        step = statistics.median(statistics.median(run) for run in self.step_s)
        return {"prefill_s": statistics.median(self.prefill_s), "decode_s": statistics.median(sum(run) for run in self.step_s),
                "step_s": step, "decode_tokens_per_s": batch / step}


@dataclass
class DecodeTimings:
    """The base's and the adapted model's decode timed in lockstep (``time_decode``)."""
    batch: int
    base: StepTimes
    adapted: StepTimes

    def ratios(self) -> list[float]:
        """Adapted/base decode speed of each repeat: the median over its steps of base step s / adapted step s."""
        return [statistics.median(b / a for b, a in zip(rb, ra)) for rb, ra in zip(self.base.step_s, self.adapted.step_s)]

    @property
    def ratio(self) -> Spread:
        return Spread.of(self.ratios())


def _clock(device: torch.device):
    """(mark, seconds): ``mark()`` notes when the work queued so far ends (a CUDA event on a GPU, so that no step
    waits for a synchronization); ``seconds(a, b)`` between two marks, read after the last synchronization."""
    if device.type == "cuda":
        def mark():
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return mark, lambda a, b: a.elapsed_time(b) / 1000
    return (lambda: time.perf_counter()), (lambda a, b: b - a)


@torch.no_grad()
def time_decode(base: LatentDecoder, adapted: LatentDecoder, prompt: torch.Tensor, new_tokens: int, *,
                repeats: int = 5, warmup: int = 1) -> DecodeTimings:
    """Greedy decoding of ``new_tokens`` steps after ``prompt`` (B, T), ``base`` and ``adapted`` in lockstep.

    Each repeat prefills both (fresh caches of T + new_tokens), then runs decode step s of one and step s of
    the other back to back, the order alternating from step to step and from repeat to repeat (AB, BA, ...):
    both steps of a pair see the same cache length and whatever else the machine was doing then, so that
    the ratio of the two holds on a busy machine, where either time alone does not. ``warmup`` untimed
    repeats first keep first-call costs out.

    Raises:
        ValueError: ``repeats`` or ``new_tokens`` < 1, or ``warmup`` < 0.
    """
    if repeats < 1 or new_tokens < 1 or warmup < 0:
        raise ValueError(f"repeats and new_tokens must be >= 1 and warmup >= 0; got {repeats}, {new_tokens}, {warmup}")
    B, T = prompt.shape
    decoders = (base, adapted)
    device = base.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    mark, seconds = _clock(device)
    out = DecodeTimings(B, StepTimes(), StepTimes())
    for rep in range(-warmup, repeats):
        caches = [d.new_cache(B, T + new_tokens) for d in decoders]
        tok: list[torch.Tensor | None] = [None, None]  # (B,) each decoder's last greedy token
        marks: list[list[tuple]] = [[], []]  # per decoder: (start, end) of its prefill, then of each step
        for s in range(new_tokens + 1):
            for i in (0, 1) if (s + rep) % 2 == 0 else (1, 0):
                start = mark()
                ids = prompt if s == 0 else tok[i].unsqueeze(1)
                tok[i] = decoders[i](ids, caches[i], last_only=s == 0)[:, -1].argmax(-1)
                marks[i].append((start, mark()))
        sync()
        if rep >= 0:
            for times, m in zip((out.base, out.adapted), marks):
                secs = [seconds(a, b) for a, b in m]
                times.prefill_s.append(secs[0])
                times.step_s.append(secs[1:])
    return out


def _untimed(decoder: LatentDecoder, prompt: torch.Tensor, new_tokens: int, *, keep_logits: bool,
             start: int) -> tuple[Generation, dict]:
    """The run whose tokens, logits and cache are checked and whose peak memory is reported; it also warms up.
    ``start``: bytes allocated when the measurement began; what earlier runs still hold is left out of the peak."""
    _reset_peak(decoder.device)
    held = _allocated(decoder.device) - start  # e.g. the base's cache and logits while the adapted model runs
    gen = generate(decoder, prompt, new_tokens + 1, keep_logits=keep_logits)  # prefill + new_tokens decode steps
    return gen, {"decode_steps": gen.decode_steps, "cache_bytes": gen.cache.nbytes(), **_peak(decoder.device, held)}


def measure_cache(model, adapters: list[Adapter], *, context: int, new_tokens: int, cache_dtype: str = "float16",
                  batch: int = 1, prompt: torch.Tensor | None = None, seed: int = 0, check_logits: bool = True,
                  fold: bool = True, repeats: int = 5, log=None) -> dict:
    """Prefill ``context`` tokens and decode ``new_tokens`` steps with the base and with ``adapters``.

    Reports the bytes the cache tensors hold (per layer and per token) next to ``kvsweep.kvcache``'s
    accounting at ``cache_dtype`` and raises ``CacheMismatchError`` if they differ by a byte; the latent
    decode's logits at every step against the training-time forward (``max_abs_logit_diff``,
    ``greedy_identical``), also with the cache at the compute dtype when ``cache_dtype`` differs from it
    (``exact``); decode tokens/s and peak memory of both.

    Peak memory: each one's checked run, as if it ran alone (on a GPU the bytes the other's earlier run
    still holds are left out); not the timed runs, which hold both caches at once. Speed: after the
    checked runs (untimed; they warm up), ``repeats`` runs of both in lockstep (``time_decode``):
    tokens/s from each run's median step time, medians over the repeats; the adapted/base speed ratio
    of each repeat, their median and spread.

    Raises:
        ValueError: ``context``, ``new_tokens`` or ``repeats`` < 1.
        CacheMismatchError: the bytes the cache holds differ from the accounting.
    """
    log = log or (lambda msg: None)
    if context < 1 or new_tokens < 1 or repeats < 1:
        raise ValueError(f"context, new_tokens and repeats must be >= 1; got {context}, {new_tokens}, {repeats}")
    if prompt is None:
        prompt = random_prompt(model.config.vocab_size, batch, context, seed)
    batch, context = prompt.shape
    device = next(model.parameters()).device
    prompt = prompt.to(device)

    base = LatentDecoder(model, [], cache_dtype=cache_dtype)
    adapted = LatentDecoder(model, adapters, cache_dtype=cache_dtype, fold=fold)
    start = _allocated(device)  # the model, the adapters, the folded matrices, the prompt
    log(f"decoding {context} + {new_tokens} tokens (batch {batch}) with the base ...")
    base_gen, base_m = _untimed(base, prompt, new_tokens, keep_logits=check_logits, start=start)
    base_bytes = check_bytes(base_gen.cache, base.layout(), cache_dtype)
    log("... and with the adapters")
    gen, adapted_m = _untimed(adapted, prompt, new_tokens, keep_logits=check_logits, start=start)
    got = check_bytes(gen.cache, adapted.layout(), cache_dtype, adapted.window_bytes())  # raises CacheMismatchError on any difference
    log(f"timing {repeats} runs of both, interleaved step by step ...")
    timed = time_decode(base, adapted, prompt, new_tokens, repeats=repeats, warmup=0)  # the runs above warmed up
    ratio = timed.ratio

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
            "repeats": repeats,
            "base": {**timed.base.summary(batch), **base_m},
            "adapted": {**timed.adapted.summary(batch), **adapted_m},
            "decode_speed_ratio": ratio.median,
            "decode_speed_ratio_spread": {k: v for k, v in asdict(ratio).items() if k != "median"},
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
