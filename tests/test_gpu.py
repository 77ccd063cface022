"""The equivalence tests on a CUDA device: packed vs alone, compiled vs eager, latent cache vs training forward, bf16.

Marked ``gpu``: they run on ``$KVSWEEP_TEST_DEVICE`` (default ``cuda``) and are skipped where that device is
absent. ``benchmarks/gpu_check.sh`` runs them on the GPU; its ``--dry-run`` runs them with
``KVSWEEP_TEST_DEVICE=cpu``, so the checks themselves are exercised on every CI run.

Tolerances: float32 (``amp off``) on CUDA sums in other orders than the CPU and packs batch other rows
together, so packed vs alone and compiled vs eager agree to ~1e-4 relative, not bit for bit; bf16 autocast
(8 bits of mantissa) agrees with float32 to about a percent in PPL.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace

import pytest
import torch

from kvsweep.adapters import ADAPTERS
from kvsweep.latent import LatentDecoder, check_bytes, generate, random_prompt, reference_logits
from kvsweep.models import Base, dims
from kvsweep.results import TrialResult
from kvsweep.train import TrialCfg

from .conftest import small_base
from .test_latent import VOCAB, build, reference_greedy, small_model
from . import test_pack as pack_tests
from .test_pack import MIXED, VD, _cfg, _close

DEVICE = torch.device(os.environ.get("KVSWEEP_TEST_DEVICE", "cuda"))


def _available(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
    return device.type == "cpu"


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _available(DEVICE), reason=f"no {DEVICE} device")]


def _base() -> Base:
    b = small_base()
    b.model.to(DEVICE)
    return b


def _on(cfg: TrialCfg, **train) -> TrialCfg:
    return replace(cfg, train=replace(cfg.train, **train))


def _alone(cfg: TrialCfg) -> tuple[TrialResult, list[dict]]:
    return pack_tests._alone(cfg, base=_base)


def _packed(cfgs: list[TrialCfg]) -> tuple[list[TrialResult], list[list[dict]]]:
    return pack_tests._packed(cfgs, base=_base)


def _timing_free(result: TrialResult) -> dict:
    return {k: v for k, v in result.to_json().items() if k not in ("positions", "seconds")}


def test_the_trials_run_on_the_device():
    result, reports = _alone(_on(_cfg([VD], epochs=1), amp="off"))
    assert result.status == "completed" and len(reports) == 1
    assert _base().device.type == DEVICE.type


def test_packed_trials_report_what_they_report_alone_in_float32():
    cfgs = [_on(c, amp="off") for c in MIXED]
    results, reports = _packed(cfgs)
    for cfg, result, rep in zip(cfgs, results, reports, strict=True):
        alone, alone_reports = _alone(cfg)
        assert len(rep) == len(alone_reports) == cfg.train.epochs
        for m, ma in zip(rep, alone_reports, strict=True):
            _close(m, ma, rel=1e-4)
        assert result.status == alone.status == "completed"
        _close(_timing_free(result), _timing_free(alone), rel=1e-4)


def test_packed_trials_under_bf16_autocast_match_alone_within_bf16():
    cfgs = [_on(c, amp="bf16") for c in MIXED[:3]]
    results, _ = _packed(cfgs)
    for cfg, result in zip(cfgs, results, strict=True):
        alone, _ = _alone(cfg)
        assert result.status == alone.status == "completed"
        assert result.best_val_ppl == pytest.approx(alone.best_val_ppl, rel=2e-2)


def test_bf16_autocast_trains_as_float32_does_within_bf16():
    cfg = _cfg([VD], epochs=2)
    fp32, fp32_reports = _alone(_on(cfg, amp="off"))
    bf16, bf16_reports = _alone(_on(cfg, amp="bf16"))
    assert bf16.status == fp32.status == "completed"
    for a, b in zip(bf16_reports, fp32_reports, strict=True):
        assert math.isfinite(a["loss"])
        assert a["val_ppl"] == pytest.approx(b["val_ppl"], rel=2e-2)
    assert bf16_reports[-1]["val_ppl"] < bf16_reports[0]["val_ppl"] * 1.01  # it still learns


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_training_forward_matches_eager(mode):
    cfg = _on(_cfg([VD], epochs=2), amp="off")
    _, eager = _alone(cfg)
    _, comp = _alone(_on(cfg, compile=mode))
    assert len(comp) == len(eager) == 2
    for m, mc in zip(eager, comp, strict=True):
        _close(m, mc, rel=1e-4)


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_every_method_decodes_on_the_device_as_the_training_time_forward(name):
    """Each method on the latent cache on the device: logits within 1e-4 of the training-time forward at every
    step in float32, the same greedy tokens, and the cache's bytes equal to the accounting."""
    model = small_model().to(DEVICE)
    adapters = [a.to(DEVICE) for a in build(model, ((name, ADAPTERS[name].example_options(dims(model.config))),))]
    prompt = random_prompt(VOCAB, 2, 12, seed=5).to(DEVICE)
    assert (reference_logits(model, adapters, prompt, 12) - reference_logits(model, [], prompt, 12)).abs().max() > 1e-2
    for fold in (True, False):
        dec = LatentDecoder(model, adapters, cache_dtype="float32", fold=fold)
        gen = generate(dec, prompt, 6, keep_logits=True)
        seq = torch.cat([prompt, gen.tokens[:, :-1]], 1)
        assert gen.logits.device.type == DEVICE.type
        assert (gen.logits - reference_logits(model, adapters, seq, 6)).abs().max().item() < 1e-4
        assert torch.equal(gen.tokens, reference_greedy(model, adapters, prompt, 6))
        check_bytes(gen.cache, dec.layout(), "float32", dec.window_bytes())


def test_a_half_precision_cache_on_the_device_holds_the_accounted_bytes():
    model = small_model().to(DEVICE)
    adapters = [a.to(DEVICE) for a in build(model, (("vdproj", {"rank": 16}),))]
    prompt = random_prompt(VOCAB, 1, 16, seed=7).to(DEVICE)
    for dtype in ("float16", "bfloat16"):
        dec = LatentDecoder(model, adapters, cache_dtype=dtype)
        gen = generate(dec, prompt, 4)
        check_bytes(gen.cache, dec.layout(), dtype)
        assert gen.tokens.shape == (1, 4)
