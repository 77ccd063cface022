"""``kvsweep cache``'s decode-speed figures: the adapted/base ratio is the true one under a cold start or a
busy spell (an injected clock), and two real measurements of the same thing agree."""

from __future__ import annotations

import time

import pytest
import torch

from kvsweep.adapters import AdapterSpec, make_adapter
from kvsweep.latent import LatentDecoder, measure_cache
from kvsweep.latent.cli import format_cache
from kvsweep.models import dims

from .conftest import neox_model

BASE_STEP, ADAPTED_STEP = 2.0, 1.0  # seconds of the injected clock per decoded token: the true ratio is 2
COLD_CALLS, COLD_COST = 12, 50.0  # the first calls of the process are slow (allocator, kernels, caches)
BUSY_CALLS, BUSY_FACTOR = range(40, 90), 5.0  # a spell during which the machine runs everything 5x slower


@pytest.fixture(autouse=True)
def one_thread():
    """torch on one CPU thread: on a shared 2-core machine a second thread waits for a core at every parallel
    op, which stretches a run from seconds to a minute (the ratio holds either way; the test's time does not)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class InjectedClock:
    """A clock that only moves when the decoder runs: each call costs its decoder's per-token time."""

    def __init__(self, *, cold: bool = False, busy: bool = False):
        self.now, self.calls, self.cold, self.busy = 0.0, 0, cold, busy

    def perf_counter(self) -> float:
        return self.now

    def charge(self, decoder: LatentDecoder, tokens: int) -> None:
        self.calls += 1
        cost = (ADAPTED_STEP if decoder.adapters else BASE_STEP) * tokens
        if self.cold and self.calls <= COLD_CALLS:
            cost += COLD_COST
        if self.busy and self.calls in BUSY_CALLS:
            cost *= BUSY_FACTOR
        self.now += cost


def model_and_vdproj(rank: int = 16):
    model = neox_model()
    vd = make_adapter(AdapterSpec.parse("vdproj", rank=rank), dims(model.config)).eval()
    return model, vd


@pytest.mark.parametrize("cold,busy", [(True, False), (False, True), (True, True)], ids=["cold-start", "busy-spell", "both"])
def test_decode_speed_ratio_is_the_true_one(monkeypatch, cold, busy):
    """Timing the base first, cold, once and then the adapted model once reports 16x (cold start), 0.41x (busy
    spell) or 3.3x (both) here; the ratio, both speeds and every repeat must be the true ones."""
    clock = InjectedClock(cold=cold, busy=busy)
    monkeypatch.setattr(time, "perf_counter", clock.perf_counter)
    call = LatentDecoder.__call__

    def charged(self, ids, cache, **kw):
        out = call(self, ids, cache, **kw)
        clock.charge(self, ids.shape[1])
        return out

    monkeypatch.setattr(LatentDecoder, "__call__", charged)
    model, vd = model_and_vdproj()
    t = measure_cache(model, [vd], context=16, new_tokens=32, check_logits=False)["timings"]
    assert t["decode_speed_ratio"] == pytest.approx(BASE_STEP / ADAPTED_STEP)
    assert t["base"]["decode_tokens_per_s"] == pytest.approx(1 / BASE_STEP)
    assert t["adapted"]["decode_tokens_per_s"] == pytest.approx(1 / ADAPTED_STEP)
    assert t["decode_speed_ratio_spread"] == {"min": 2.0, "q1": 2.0, "q3": 2.0, "max": 2.0}


def test_two_measurements_of_the_same_decode_agree():
    """Reproducibility, not speed: on a busy machine two runs of the same measurement give the same ratio."""
    model, vd = model_and_vdproj()
    runs = [measure_cache(model, [vd], context=128, new_tokens=64, check_logits=False, repeats=9) for _ in range(2)]
    for r in runs:
        s = r["timings"]["decode_speed_ratio_spread"]
        assert s["min"] <= s["q1"] <= r["timings"]["decode_speed_ratio"] <= s["q3"] <= s["max"]
        assert r["timings"]["repeats"] == 9 and r["timings"]["base"]["decode_steps"] == 64
    first, second = (r["timings"]["decode_speed_ratio"] for r in runs)
    assert abs(first / second - 1) < 0.10, (first, second)
    text = format_cache({"model": "small", "adapters": [{"name": "vdproj", "rank": 16}], **runs[0]})
    assert f"decode speed adapted/base: {first:.2f}x (median of 9 runs, base and adapted interleaved step by step; min " in text
