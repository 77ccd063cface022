"""The latent-cache inference path: decoding equals the training-time forward, bytes equal the accounting.

Equivalence runs on small random GPT-NeoX models built in code (weights drawn so that logits are O(1),
adapter weights random and non-zero, the ka_gated gate non-zero) for every adapter combination; byte
counts on Pythia-70M's architecture with random weights; one slow test on the ``tiny`` preset.
"""

from __future__ import annotations

import argparse
import json
from contextlib import nullcontext

import pytest
import torch
from transformers import GPTNeoXForCausalLM

from kvsweep.adapters import ADAPTERS, AdapterSpec, attached, make_adapter
from kvsweep.checkpoint import save_checkpoint
from kvsweep.config import KvsweepError, ModelCfg
from kvsweep.kvcache import base_layout, bytes_per_token
from kvsweep.latent import (
    CacheMismatchError,
    LatentDecoder,
    check_bytes,
    generate,
    measure_bytes,
    measure_cache,
    next_token,
    random_prompt,
    reference_logits,
)
from kvsweep.models import dims, freeze, neox_config, pythia_config

from .conftest import neox_model

HIDDEN, HEADS, LAYERS, VOCAB = 64, 4, 2, 320
KA_NAMES = sorted(n for n, cls in ADAPTERS.items() if cls.family == "ka")
TOL = 1e-4

# every combination: vdproj targets x ranks, each KA variant alone, vdproj with each KA variant
COMBOS: list[tuple[tuple[str, dict], ...]] = (
    [(("vdproj", {"rank": r, "target": t}),) for t in ("v", "k", "kv") for r in (8, 16, HIDDEN)]
    + [((name, {}),) for name in KA_NAMES]
    + [(("vdproj", {"rank": 16, "target": "v"}), (name, {})) for name in KA_NAMES]
    + [(("vdproj", {"rank": 8, "target": "kv"}), ("ka_gated", {}))]
)
# (fold, restore_prefill): the folded and the per-head decode, prefill latent or with V restored
MODES = [(True, False), (False, False), (True, True), (False, None)]


def combo_id(combo) -> str:
    return "+".join(n + ("_" + "_".join(f"{k}{v}" for k, v in o.items()) if o else "") for n, o in combo)


# ----------------------------------------------------------------------------- helpers


@torch.no_grad()
def demanding(model: GPTNeoXForCausalLM, seed: int = 0, std: float = 0.15) -> GPTNeoXForCausalLM:
    """Redraw the weights of a random model so that its logits are O(1) (HF's init gives ~0.1)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.dim() >= 2:
            p.copy_(std * torch.randn(p.shape, generator=g))
        else:
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def small_model(seed: int = 0, parallel: bool = True) -> GPTNeoXForCausalLM:
    if parallel:
        return demanding(neox_model(layers=LAYERS, hidden=HIDDEN, heads=HEADS, vocab=VOCAB, seed=seed), seed)
    config = neox_config(layers=LAYERS, hidden=HIDDEN, heads=HEADS, intermediate=4 * HIDDEN, vocab=VOCAB, positions=256)
    config.use_parallel_residual = False
    torch.manual_seed(seed)
    return demanding(freeze(GPTNeoXForCausalLM(config)), seed)


@torch.no_grad()
def randomize(adapter, seed: int = 1, gate: float = 0.7):
    """Random, non-zero adapter weights; a KA gate of ``gate``."""
    g = torch.Generator().manual_seed(seed)
    for name, p in adapter.named_parameters():
        if name.endswith("gate"):
            p.fill_(gate)
        elif p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
        else:
            p.copy_((1.0 if name.endswith("norm.weight") else 0.0) + 0.3 * torch.randn(p.shape, generator=g))
    return adapter.eval()


def build(model, combo, seed: int = 1, **kw):
    d = dims(model.config)
    return [randomize(make_adapter(AdapterSpec.parse(n, **o), d), seed + i, **kw) for i, (n, o) in enumerate(combo)]


@torch.no_grad()
def reference_greedy(model, adapters, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding by the training-time forward: the full sequence again at every step, no cache."""
    seq = prompt
    with (nullcontext() if adapters and adapters[0].attached else attached(model, adapters)):
        for _ in range(n):
            nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    return seq[:, prompt.shape[1]:]


def check_equivalence(model, adapters, prompt, n: int, **decoder_kw) -> float:
    """Latent greedy decode against the training-time forward: logits at every step and greedy tokens."""
    dec = LatentDecoder(model, adapters, cache_dtype="float32", **decoder_kw)
    gen = generate(dec, prompt, n, keep_logits=True)
    seq = torch.cat([prompt, gen.tokens[:, :-1]], 1)
    ref = reference_logits(model, adapters, seq, n)  # (B, n, V)
    diff = (gen.logits - ref).abs().max().item()
    assert diff < TOL, f"{decoder_kw}: max |logit diff| {diff:.3g}"
    assert torch.equal(gen.tokens, reference_greedy(model, adapters, prompt, n)), f"{decoder_kw}: greedy outputs differ"
    check_bytes(gen.cache, dec.layout(), "float32", dec.window_bytes())
    return diff


# ----------------------------------------------------------------------------- equivalence, every combination


@pytest.fixture(scope="module")
def model():
    return small_model()


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_latent_decode_matches_the_training_time_forward(model, combo):
    adapters = build(model, combo)
    prompt = random_prompt(VOCAB, 2, 12, seed=3)
    # the adapters really change the model, so the comparison is not against the base by accident
    assert (reference_logits(model, adapters, prompt, 12) - reference_logits(model, [], prompt, 12)).abs().max() > 1e-2
    for fold, restore in MODES:
        check_equivalence(model, adapters, prompt, 8, fold=fold, restore_prefill=restore)


@pytest.mark.parametrize("combo", [COMBOS[0], COMBOS[-1], ((KA_NAMES[0], {}),)], ids=combo_id)
def test_on_hf_default_weights_and_with_the_adapters_attached(combo):
    plain = neox_model(layers=LAYERS, hidden=HIDDEN, heads=HEADS, vocab=VOCAB, seed=5)  # HF's own init
    adapters = build(plain, combo)
    prompt = random_prompt(VOCAB, 1, 10, seed=4)
    check_equivalence(plain, adapters, prompt, 6)
    with attached(plain, adapters):  # the decoder unwraps the taps and applies the adapters itself
        check_equivalence(plain, adapters, prompt, 6)


def test_sequential_residual_models_too():
    m = small_model(seed=2, parallel=False)
    adapters = build(m, COMBOS[-1])
    check_equivalence(m, adapters, random_prompt(VOCAB, 2, 9, seed=1), 6)


@pytest.mark.parametrize("restore", [False, True])
def test_chunked_prefill_matches_at_every_position(model, restore):
    adapters = build(model, COMBOS[-1])
    ids = random_prompt(VOCAB, 2, 20, seed=7)
    dec = LatentDecoder(model, adapters, cache_dtype="float32", restore_prefill=restore)
    cache = dec.new_cache(2, 20)
    chunks = [dec(ids[:, a:b], cache) for a, b in ((0, 5), (5, 6), (6, 13), (13, 20))]
    got = torch.cat(chunks, 1)
    ref = reference_logits(model, adapters, ids, 20)
    assert (got - ref).abs().max().item() < TOL
    assert cache.length == 20
    with pytest.raises(ValueError, match="capacity"):
        dec(ids[:, :1], cache)


def test_decoding_never_rebuilds_v(model, monkeypatch):
    (vd,) = build(model, (("vdproj", {"rank": 16, "target": "v"}),))
    calls: list[tuple[int, ...]] = []
    for m in vd.per_layer.values():
        up = m.v.up
        monkeypatch.setattr(up, "forward", lambda x, _up=up: calls.append(tuple(x.shape)) or torch.nn.Linear.forward(_up, x))
    prompt = random_prompt(VOCAB, 1, 12)
    for restore, expected in ((False, 0), (True, LAYERS)):
        calls.clear()
        gen = generate(LatentDecoder(model, [vd], cache_dtype="float32", restore_prefill=restore), prompt, 6)
        assert len(calls) == expected, calls  # restored at most once per layer, in the prefill, never per token
        assert all(shape[1] == 12 for shape in calls)
        assert all(set(layer) == {"k", "v"} for layer in gen.cache.describe())  # V itself is never cached: its code is
        assert all(layer["v"] == [1, 12 + 6 - 1, 16] for layer in gen.cache.describe())


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_every_method_decodes_as_the_training_time_forward(model, name):
    """Registry-wide: each method alone, with its example options and random weights, on the latent cache."""
    (adapter,) = build(model, ((name, ADAPTERS[name].example_options(dims(model.config))),))
    prompt = random_prompt(VOCAB, 2, 12, seed=5)
    assert (reference_logits(model, [adapter], prompt, 12) - reference_logits(model, [], prompt, 12)).abs().max() > 1e-2
    for fold, restore in MODES:
        check_equivalence(model, [adapter], prompt, 6, fold=fold, restore_prefill=restore)


def test_no_op_adapters_reproduce_the_base(model):
    d = dims(model.config)
    vd = make_adapter(AdapterSpec.parse("vdproj", rank=HIDDEN, init="identity"), d)
    ka = make_adapter(AdapterSpec.parse("ka_gated"), d)  # gate 0
    prompt = random_prompt(VOCAB, 2, 10, seed=9)
    base = generate(LatentDecoder(model, [], cache_dtype="float32"), prompt, 6, keep_logits=True)
    noop = generate(LatentDecoder(model, [vd, ka], cache_dtype="float32"), prompt, 6, keep_logits=True)
    assert (base.logits - noop.logits).abs().max().item() < 1e-5
    assert torch.equal(base.tokens, noop.tokens)


# ----------------------------------------------------------------------------- the base alone, sampling


def test_base_cache_matches_the_plain_model(model):
    prompt = random_prompt(VOCAB, 2, 12, seed=11)
    dec = LatentDecoder(model, [], cache_dtype="float32")
    gen = generate(dec, prompt, 8, keep_logits=True)
    with torch.no_grad():
        seq = torch.cat([prompt, gen.tokens[:, :-1]], 1)
        plain = model(input_ids=seq, use_cache=False).logits[:, -8:]
        hf = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)[:, 12:]  # transformers' own cache
    assert (gen.logits - plain).abs().max().item() < TOL
    assert torch.equal(gen.tokens, hf)
    assert all(set(layer) == {"k", "v"} for layer in gen.cache.describe())
    assert check_bytes(gen.cache, dec.layout(), "float32")["measured_bytes_per_token"] == LAYERS * 2 * HIDDEN * 4


def test_sampling_is_deterministic_and_matches_the_reference(model):
    adapters = build(model, COMBOS[-1])
    prompt = random_prompt(VOCAB, 2, 8, seed=2)
    dec = LatentDecoder(model, adapters, cache_dtype="float32")
    kw = dict(temperature=0.9, top_k=20)
    a = generate(dec, prompt, 10, generator=torch.Generator().manual_seed(5), **kw).tokens
    b = generate(dec, prompt, 10, generator=torch.Generator().manual_seed(5), **kw).tokens
    c = generate(dec, prompt, 10, generator=torch.Generator().manual_seed(6), **kw).tokens
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the same draws from the training-time forward's logits give the same tokens
    g, seq = torch.Generator().manual_seed(5), prompt
    with attached(model, adapters), torch.no_grad():
        for _ in range(10):
            logits = model(input_ids=seq, use_cache=False).logits[:, -1]
            seq = torch.cat([seq, next_token(logits, generator=g, **kw).unsqueeze(1)], 1)
    assert torch.equal(a, seq[:, 8:])
    greedy = generate(dec, prompt, 10).tokens
    assert torch.equal(generate(dec, prompt, 10, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(0)).tokens, greedy)
    with pytest.raises(ValueError):
        next_token(logits, temperature=-1.0)


# ----------------------------------------------------------------------------- bytes on Pythia-70M's architecture


@pytest.fixture(scope="module")
def p70():
    torch.manual_seed(0)
    return freeze(GPTNeoXForCausalLM(pythia_config("70m")))


def p70_adapters(p70, combo, **kw):
    return build(p70, combo, **kw)


@pytest.mark.parametrize("rank", [64, 128, 320, 512])
def test_measured_bytes_equal_the_accounting_for_vdproj(p70, rank):
    (vd,) = p70_adapters(p70, (("vdproj", {"rank": rank}),))
    got = measure_bytes(p70, [vd], "float16", context=4, new_tokens=2)
    assert got["measured_bytes_per_token"] == got["accounted_bytes_per_token"] == 6 * (512 + rank) * 2
    assert got["measured_bytes_per_layer"] == [(512 + rank) * 2] * 6


@pytest.mark.parametrize("combo,expected", [
    ((("vdproj", {"rank": 320, "target": "k"}),), 6 * (320 + 512) * 2),
    ((("vdproj", {"rank": 320, "target": "kv"}),), 6 * (320 + 320) * 2),
    ((("vdproj", {"rank": 128, "layers": "0,5"}),), 12_288 - 2 * (512 - 128) * 2),
    *[(((name, {}),), 12_288 + 2 * 512 * 2) for name in KA_NAMES],
    ((("vdproj", {"rank": 320}), ("ka_gated", {})), 9_984 + 2 * 512 * 2),
], ids=lambda x: combo_id(x) if isinstance(x, tuple) else str(x))
def test_measured_bytes_equal_the_accounting(p70, combo, expected):
    adapters = p70_adapters(p70, combo)
    got = measure_bytes(p70, adapters, "float16", context=4, new_tokens=2)
    assert got["measured_bytes_per_token"] == got["accounted_bytes_per_token"] == expected


@pytest.mark.parametrize("dtype,size", [("float32", 4), ("bfloat16", 2)])
def test_bytes_at_other_cache_dtypes(p70, dtype, size):
    adapters = p70_adapters(p70, (("vdproj", {"rank": 320}),))
    got = measure_bytes(p70, adapters, dtype, context=3, new_tokens=1)
    assert got["measured_bytes_per_token"] == 6 * (512 + 320) * size


def test_a_cache_that_differs_from_the_accounting_raises(p70, monkeypatch):
    (vd,) = p70_adapters(p70, (("vdproj", {"rank": 320}),))
    monkeypatch.setattr(vd, "kv_layout", lambda layout: layout)  # claims nothing, caches r: a mismatch
    with pytest.raises(CacheMismatchError, match=r"layer 0: measured 1664 bytes/token .* accounted 2048"):
        measure_bytes(p70, [vd], "float16", context=4, new_tokens=1)
    with pytest.raises(CacheMismatchError):
        measure_cache(p70, [vd], context=4, new_tokens=1, check_logits=False)
    gen = generate(LatentDecoder(p70, [], cache_dtype="float16"), random_prompt(50304, 1, 3), 2)
    with pytest.raises(CacheMismatchError, match="float32"):
        check_bytes(gen.cache, base_layout(6, 512), "float32")  # the right values at the wrong dtype


def test_pythia_70m_decode_matches_and_measures(p70):
    adapters = p70_adapters(p70, (("vdproj", {"rank": 320}), ("ka_gated", {})), gate=0.5)
    r = measure_cache(p70, adapters, context=24, new_tokens=6, cache_dtype="float16")
    assert r["measured_bytes_per_token"] == r["accounted_bytes_per_token"] == 9_984 + 2_048
    assert r["base_bytes_per_token"] == bytes_per_token(base_layout(6, 512)) == 12_288
    assert r["cache_capacity_tokens"] == 30
    assert r["timings"]["adapted"]["cache_bytes"] == (9_984 + 2_048) * 30
    assert r["timings"]["base"]["decode_tokens_per_s"] > 0 and r["timings"]["adapted"]["max_rss_bytes"] > 0
    assert r["greedy_identical"] and r["base_greedy_identical"]
    assert r["exact"]["cache_dtype"] == "float32"
    assert r["exact"]["max_abs_logit_diff"] < TOL and r["exact"]["greedy_identical"]
    assert r["max_abs_logit_diff"] < 1e-2  # float16 rounding of the cache only


# ----------------------------------------------------------------------------- kvsweep cache


def run_cli(argv: list[str]) -> int:
    from kvsweep.latent.cli import add_parser

    p = argparse.ArgumentParser(prog="kvsweep")
    add_parser(p.add_subparsers(dest="command", required=True))
    a = p.parse_args(argv)
    return a.func(a)


def write_trial(folder, adapters, specs, model: ModelCfg) -> None:
    from kvsweep.train import TrialCfg

    cfg = TrialCfg(model=model, adapters=tuple(specs))
    folder.mkdir(parents=True)
    (folder / "trial.json").write_text(json.dumps({"config": cfg.to_dict(), "status": "completed"}))
    save_checkpoint(folder / "checkpoint", adapters, None, {"epoch": 1}, [a.state_dict() for a in adapters])


def test_kvsweep_cache_with_a_trained_trial(tmp_path, p70, capsys):
    from kvsweep.latent.trial import load_trial

    specs = [AdapterSpec.parse("vdproj", rank=320), AdapterSpec.parse("ka_gated")]
    trained = [randomize(make_adapter(s, dims(p70.config)), 10 + i) for i, s in enumerate(specs)]
    write_trial(tmp_path / "trial", trained, specs, ModelCfg(name="pythia-70m", random_init=True, device="cpu"))
    _, loaded, _ = load_trial(tmp_path / "trial", log=lambda m: None)
    for a, b in zip(loaded, trained):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert run_cli(["cache", "--trial", str(tmp_path / "trial"), "--device", "cpu", "--context", "16", "--new-tokens", "4",
                    "--out", str(tmp_path / "out")]) == 0
    r = json.loads((tmp_path / "out" / "cache.json").read_text())
    assert r["measured_bytes_per_token"] == r["accounted_bytes_per_token"] == 12_032
    assert r["base_bytes_per_token"] == 12_288
    assert r["greedy_identical"] is True and r["exact"]["max_abs_logit_diff"] < TOL
    assert {"base", "adapted", "decode_speed_ratio"} <= set(r["timings"])
    assert [a["name"] for a in r["adapters"]] == ["vdproj", "ka_gated"]
    assert "measured 12,032 = accounted 12,032" in capsys.readouterr().out


def test_kvsweep_cache_bad_input(tmp_path):
    with pytest.raises(KvsweepError, match="not both"):
        run_cli(["cache", "--trial", str(tmp_path), "--adapter", "ka_gated"])
    with pytest.raises(KvsweepError, match="--rank"):
        run_cli(["cache", "--model", "pythia-70m", "--random-init", "--adapter", "vdproj"])
    with pytest.raises(KvsweepError, match="trial.json"):
        run_cli(["cache", "--trial", str(tmp_path / "none")])
    with pytest.raises(KvsweepError, match="pca"):
        run_cli(["cache", "--model", "pythia-70m", "--random-init", "--adapter", "vdproj", "--rank", "8", "--init", "pca"])


# ----------------------------------------------------------------------------- the tiny preset


@pytest.mark.slow
def test_tiny_preset_latent_decode_and_cli(tiny_folder, tmp_path):
    from kvsweep.models import load_base

    base = load_base(ModelCfg(name="tiny", device="cpu"), log=lambda m: None)
    adapters = build(base.model, (("vdproj", {"rank": 32, "target": "kv"}), ("ka_gated", {})), gate=0.5)
    r = measure_cache(base.model, adapters, context=96, new_tokens=24, cache_dtype="float32")
    d = base.config.hidden_size
    expected = bytes_per_token(base_layout(4, d), "float32") - 4 * 2 * (d - 32) * 4 + 2 * d * 4
    assert r["measured_bytes_per_token"] == r["accounted_bytes_per_token"] == expected
    assert r["max_abs_logit_diff"] < TOL and r["greedy_identical"]
    text = tmp_path / "prompt.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    assert run_cli(["cache", "--model", "tiny", "--device", "cpu", "--adapter", "vdproj", "--rank", "64", "--init", "identity",
                    "--context", "64", "--new-tokens", "8", "--text", str(text), "--out", str(tmp_path / "out")]) == 0
    r = json.loads((tmp_path / "out" / "cache.json").read_text())
    assert r["measured_bytes_per_token"] == r["accounted_bytes_per_token"] == 4 * (d + 64) * 2
    assert r["greedy_identical"] and r["exact"]["max_abs_logit_diff"] < TOL
