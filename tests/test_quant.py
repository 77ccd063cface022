"""The ``quant`` method (KIVI-style quantized KV cache): options, rounding and packing, the attention tap, the
latent-cache decode against the fake-quantized training-time forward, bytes measured on Pythia-70M's
architecture, a training-free trial, and the combinations it refuses."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GPTNeoXForCausalLM

from kvsweep.adapters import AdapterSpec, attached, check_taps, make_adapter
from kvsweep.config import ConfigError
from kvsweep.kvcache import base_layout, bytes_per_token
from kvsweep.latent import LatentDecoder, check_bytes, generate, measure_bytes, random_prompt, reference_logits
from kvsweep.models import ATTENTION_TAP, dims, freeze, pythia_config
from kvsweep.quantize import dequantize, fake_quant_keys, fake_quant_values, pack, quantize, unpack

from .test_latent import TOL, VOCAB, check_equivalence, reference_greedy, small_model

G = 8  # the group on the test models (hidden 64)


def quant(model, **options):
    return make_adapter(AdapterSpec.parse("quant", **options), dims(model.config))


@pytest.fixture(scope="module")
def model():
    return small_model()


@pytest.fixture(scope="module")
def model64():
    """In float64: the decoder's K and V (its qkv projection over 1 row, the forward's over T) agree to ~1e-16 instead
    of float32's ~1e-6, which is enough to move a float16 scale or zero point across a rounding boundary now and then
    (a jump of 1e-3 of the group's range): in float64 the comparison checks the method, not GEMM blocking."""
    return small_model().double()


def check_exact(model, adapters, prompt: torch.Tensor, n: int) -> float:
    """Prefill ``prompt`` and decode ``n`` tokens greedily on the latent cache (at the model's dtype): logits within
    TOL of the fake-quantized training-time forward at every step, greedy tokens identical, bytes as declared."""
    dec = LatentDecoder(model, adapters)
    gen = generate(dec, prompt, n, keep_logits=True)
    ref = reference_logits(model, adapters, torch.cat([prompt, gen.tokens[:, :-1]], 1), n)
    diff = (gen.logits - ref).abs().max().item()
    assert diff < TOL, f"max |logit diff| {diff:.3g}"
    assert torch.equal(gen.tokens, reference_greedy(model, adapters, prompt, n))
    check_bytes(gen.cache, dec.layout(), dec.cache_dtype_name, dec.window_bytes())
    return diff


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize("options, message", [
    ({"bits": 3}, "bits must be one of 2, 4, 8"),
    ({"bits": 16}, "bits must be one of 2, 4, 8"),
    ({"window": -1}, "window must be an integer >= 0"),
    ({"group": 0}, "group must be an integer >= 1"),
    ({"group": 32, "window": 16}, r"window must be 0 or >= group \(32\) when K is quantized"),
    ({"group": 32, "window": 16, "target": "k"}, r"window must be 0 or >= group"),
    ({"target": "q"}, "target must be one of kv, k, v"),
])
def test_bad_options_give_one_clear_line(options, message):
    with pytest.raises(ConfigError, match=message) as e:
        AdapterSpec.parse("quant", **options)
    assert "\n" not in str(e.value)


def test_group_must_divide_the_width_and_values_take_any_window(model):
    with pytest.raises(ConfigError, match="group must divide the hidden size 64; got 24"):
        quant(model, group=24, window=0)
    assert quant(model, group=32, window=16, target="v").layers == (0, 1)  # V alone: no token groups, any window


# ----------------------------------------------------------------------------- rounding, packing, straight-through


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_round_trips_and_quantization_error_is_half_a_step(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2 ** bits, (3, 5, 64), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 64 * bits // 8)
    assert torch.equal(unpack(packed, bits), codes)
    x = torch.randn(4, 16, 32, generator=g) * 3
    q, scale, zero = quantize(x, bits, dim=2)
    assert q.max() <= 2 ** bits - 1 and scale.dtype == zero.dtype == torch.float16 and scale.shape == (4, 16, 1)
    err = (dequantize(q, scale, zero) - x).abs()
    assert (err <= scale.float() / 2 + 1e-3 * x.abs().amax()).all()  # half a step, and float16 rounding of the metadata
    assert err.max() > 0


def test_fake_quantization_is_straight_through():
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(2, 4, 20, 16, generator=g).requires_grad_() for _ in range(2))
    w = torch.randn(2, 4, 20, 16, generator=g)
    kq, vq = fake_quant_keys(k, 2, G), fake_quant_values(v, 2, G)
    assert not torch.equal(kq[:, :, :16], k[:, :, :16]) and not torch.equal(vq, v)  # the forward sees the rounding
    assert torch.equal(kq[:, :, 16:], k[:, :, 16:])  # the incomplete last token group as it is
    ((kq * w).sum() + (vq * w).sum()).backward()
    assert torch.equal(k.grad, w) and torch.equal(v.grad, w)  # the backward passes the gradient through


# ----------------------------------------------------------------------------- the attention tap


def test_the_attention_tap_leaves_the_model_config_and_other_layers_alone(model):
    q = quant(model, layers="1", **{"bits": 2, "group": G, "window": 0})
    ids = random_prompt(VOCAB, 2, 16)
    base = reference_logits(model, [], ids, 16)
    with attached(model, [q]):
        assert model.config._attn_implementation == "sdpa"
        attn = [layer.attention for layer in model.gpt_neox.layers]
        assert attn[0].config is model.config and attn[1].config._attn_implementation == ATTENTION_TAP
        assert attn[1].config.hidden_size == model.config.hidden_size  # every other attribute is the model's
        with pytest.raises(ConfigError, match="same point"):
            quant(model, layers="1", bits=4, group=G, window=0).attach(model)
        assert q.layers == (1,) and not torch.equal(reference_logits(model, [q], ids, 16), base)
    assert all(layer.attention.config is model.config for layer in model.gpt_neox.layers)


def test_the_forward_attends_in_chunks_of_queries_with_the_same_result(model, monkeypatch):
    import kvsweep.adapters.quant as quant_module

    eager = small_model(seed=4)
    eager.config._attn_implementation = "eager"  # a float mask of (B, 1, T, S), sliced per chunk
    ids = random_prompt(VOCAB, 2, 40)
    qs = {id(m): quant(m, bits=2, group=G, window=G) for m in (model, eager)}
    whole = {id(m): reference_logits(m, [qs[id(m)]], ids, 40) for m in (model, eager)}
    monkeypatch.setattr(quant_module, "SCORE_ELEMENTS", 2 * 4 * 40 * 7)  # 7 queries per chunk: 6 chunks, the last short
    for m in (model, eager):
        assert (reference_logits(m, [qs[id(m)]], ids, 40) - whole[id(m)]).abs().max().item() < 1e-5


def test_a_window_as_long_as_the_context_is_the_base_exactly(model):
    ids = random_prompt(VOCAB, 2, 16)
    for target in ("k", "v", "kv"):
        assert torch.equal(reference_logits(model, [quant(model, bits=2, group=G, window=16, target=target)], ids, 16),
                           reference_logits(model, [], ids, 16))
    assert not torch.equal(reference_logits(model, [quant(model, bits=2, group=G, window=15, target="v")], ids, 16),
                           reference_logits(model, [], ids, 16))


# ----------------------------------------------------------------------------- latent decoding


@pytest.mark.parametrize("target", ["k", "v", "kv"])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("window", [0, G, 2 * G])
def test_latent_decode_matches_the_fake_quantized_forward(model64, target, bits, window):
    q = quant(model64, bits=bits, group=G, window=window, target=target)
    prompt = random_prompt(VOCAB, 2, 13, seed=bits + window)
    n = 12  # 25 tokens: three complete token groups, the window's edge crossed at every step
    seq = torch.cat([prompt, random_prompt(VOCAB, 2, n, seed=1)], 1)
    assert (reference_logits(model64, [q], seq, 25) - reference_logits(model64, [], seq, 25)).abs().max() > 1e-4  # it quantizes
    check_exact(model64, [q], prompt, n)  # prefill, then token by token: logits and greedy tokens


def test_in_float32_too(model):
    """The float32 decode of one setting, to the same tolerance (see ``model64`` for why not all)."""
    check_equivalence(model, [quant(model, bits=4, group=G, window=G)], random_prompt(VOCAB, 2, 12, seed=3), 10)


@pytest.mark.parametrize("window", [0, G, 2 * G])
def test_chunked_prefill_matches_at_every_position(model64, window):
    q = quant(model64, bits=2, group=G, window=window)
    ids = random_prompt(VOCAB, 2, 30, seed=7)
    dec = LatentDecoder(model64, [q])
    cache = dec.new_cache(2, 30)
    assert cache.capacity == 32  # rounded up to whole token groups
    got = torch.cat([dec(ids[:, a:b], cache) for a, b in ((0, 5), (5, 6), (6, 19), (19, 20), (20, 30))], 1)
    assert (got - reference_logits(model64, [q], ids, 30)).abs().max().item() < TOL


def test_eager_attention_models_and_float_masks_too():
    m = small_model(seed=4).double()
    m.config._attn_implementation = "eager"  # the model's masks are then additive floats
    q = quant(m, bits=4, group=G, window=G)
    check_exact(m, [q], random_prompt(VOCAB, 2, 11, seed=2), 10)


def test_with_vdproj_on_other_layers(model64):
    model = model64
    d = dims(model.config)
    vd = make_adapter(AdapterSpec.parse("vdproj", rank=16, layers="0"), d).double()
    check_exact(model, [vd, quant(model, bits=2, group=G, window=0, layers="1")], random_prompt(VOCAB, 2, 12), 8)
    check_taps((vd.spec, AdapterSpec.parse("quant", layers="1,5")), dims(pythia_config("70m")))
    # on the same layer quant caches vdproj's code: tests/test_quant_latent.py


def test_with_a_ka_variant_on_the_same_layer(model64):
    ka = make_adapter(AdapterSpec.parse("ka_gated", layers="1"), dims(model64.config)).double()
    with torch.no_grad():
        ka.per_layer["1"].gate.fill_(0.7)
    check_exact(model64, [quant(model64, bits=2, group=G, window=G), ka], random_prompt(VOCAB, 2, 12, seed=6), 8)


# ----------------------------------------------------------------------------- bytes on Pythia-70M's architecture


@pytest.fixture(scope="module")
def p70():
    torch.manual_seed(0)
    return freeze(GPTNeoXForCausalLM(pythia_config("70m")))


@pytest.mark.parametrize("window", [0, 128])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_measured_bytes_on_pythia_70m(p70, bits, group, window):
    q = quant(p70, bits=bits, group=group, window=window)
    got = measure_bytes(p70, [q], "float16", context=4, new_tokens=2)
    per_tensor = 512 * bits // 8 + 2 * 2 * 512 // group  # packed codes; float16 scale and zero point, d/G each
    assert got["measured_bytes_per_token"] == got["accounted_bytes_per_token"] == 6 * 2 * per_tensor
    assert got["measured_bytes_per_token"] == bytes_per_token(q.kv_layout(base_layout(6, 512)), "float16")
    window_bytes = 6 * (max(window, group) + window) * 512 * 2  # the rings: keys max(R, G) tokens, values R, float16
    assert got["measured_fixed_bytes"] == got["accounted_fixed_bytes"] == window_bytes == q.fixed_bytes("float16")
    assert q.window_bytes("float32") == 2 * window_bytes


def test_v_only_on_some_layers_keeps_the_base_keys(p70):
    q = quant(p70, bits=4, group=64, window=0, target="v", layers="0,5")
    got = measure_bytes(p70, [q], "float32", context=4, new_tokens=2)
    assert got["measured_bytes_per_token"] == 12_288 * 2 - 2 * 512 * 4 + 2 * (256 + 2 * 2 * 8)
    assert got["measured_fixed_bytes"] == 0


# ----------------------------------------------------------------------------- a training-free trial, packs


def test_kvsweep_train_and_cache_with_a_method_without_parameters(tmp_path, capsys):
    from kvsweep.cli import main

    out = tmp_path / "trial"
    assert main(["train", "--model", "tiny", "--data", "tiny", "--quant.bits", "2", "--quant.group", "16", "--quant.window", "32",
                 "--epochs", "2", "--train-samples", "16", "--val-samples", "8", "--test-samples", "4", "--eval-seq-len", "128",
                 "--out", str(out)]) == 0
    record = json.loads((out / "trial.json").read_text())
    assert record["status"] == "completed" and record["trainable_params"] == 0 and record["best_epoch"] == 0
    # per tensor and token: d fp16 values (2d bytes) -> d/4 bytes of 2-bit codes + 2 x d/16 fp16 (d/4 bytes)
    assert record["kv_bytes_per_token"] == record["kv_bytes_per_token_base"] // 4
    assert record["fixed_bytes"] > 0
    assert main(["cache", "--trial", str(out), "--context", "40", "--new-tokens", "4", "--repeats", "1", "--out", str(tmp_path / "c")]) == 0
    cache = json.loads((tmp_path / "c" / "cache.json").read_text())
    assert cache["measured_bytes_per_token"] == record["kv_bytes_per_token"]
    assert cache["measured_fixed_bytes"] == cache["accounted_fixed_bytes"] == record["fixed_bytes"]  # no weights: the rings alone
    assert f"fixed (full-precision windows, per sequence): measured {record['fixed_bytes']:,} = declared" in capsys.readouterr().out
    assert cache["exact"]["max_abs_logit_diff"] < TOL and cache["exact"]["greedy_identical"] is True  # no checkpoint needed


def test_packed_quant_trials_report_what_they_report_alone():
    """Through the pack's router of the attention tap: a quant trial (no weights: its epoch 0), one that trains
    vdproj under quant on the next layer, and a plain vdproj trial, in one pack and alone."""
    from .test_pack import _alone, _cfg, _close, _packed

    cfgs = [_cfg([AdapterSpec.parse("quant", bits=2, group=G, window=0)]),
            _cfg([AdapterSpec.parse("vdproj", rank=16, layers="0"), AdapterSpec.parse("quant", bits=4, group=G, window=G, layers="1")],
                 loss="lm", epochs=2),
            _cfg([AdapterSpec.parse("vdproj", rank=32)], epochs=2)]
    results, reports = _packed(cfgs)
    for cfg, result, rep in zip(cfgs, results, reports, strict=True):
        alone, alone_reports = _alone(cfg)
        assert len(rep) == len(alone_reports) == (1 if len(cfg.adapters) == 1 and cfg.adapters[0].name == "quant" else 2)
        for m, ma in zip(rep, alone_reports, strict=True):
            _close(m, ma, rel=1e-5)
        assert result.status == alone.status == "completed"
    assert results[0].trainable_params == 0 and results[1].trainable_params > 0


def test_a_window_that_differs_from_its_declared_fixed_bytes_raises(p70, monkeypatch):
    from kvsweep.latent import CacheMismatchError

    q = quant(p70, bits=4, group=64, window=128)
    monkeypatch.setattr(q, "window_bytes", lambda cache_dtype: 0)  # holds rings, declares none: a mismatch
    with pytest.raises(CacheMismatchError, match=f"fixed tensors .* hold {6 * 256 * 512 * 2} bytes per sequence; the methods declare 0"):
        measure_bytes(p70, [q], "float16", context=4, new_tokens=1)


def test_a_trained_method_learns_through_the_quantized_attention(tmp_path):
    """vdproj on layer 0 trains while quant rounds the cache of the layers after it: its gradient passes the
    rounding straight through; the trial's fixed bytes are vdproj's weights and quant's rings."""
    from kvsweep.cli import main

    out = tmp_path / "trial"
    assert main(["train", "--model", "tiny", "--data", "tiny", "--vdproj.rank", "32", "--vdproj.layers", "0", "--quant.bits", "2",
                 "--quant.group", "16", "--quant.window", "0", "--quant.layers", "1,2,3", "--epochs", "1", "--train-samples", "16",
                 "--val-samples", "8", "--test-samples", "4", "--eval-seq-len", "128", "--lr", "1e-2", "--out", str(out)]) == 0
    record = json.loads((out / "trial.json").read_text())
    assert record["status"] == "completed" and record["epochs_run"] == 1
    d = record["kv_bytes_per_token_base"] // (4 * 2 * 2)  # hidden size of the 4-layer tiny preset
    assert record["trainable_params"] == 2 * d * 32 + 32 + d
    assert record["fixed_bytes"] == 2 * record["trainable_params"] + 3 * 16 * d * 2  # weights + key rings of G tokens, fp16


def test_gradients_reach_a_method_before_the_quantized_attention(model):
    vd = make_adapter(AdapterSpec.parse("vdproj", rank=16, layers="0"), dims(model.config))
    ids = random_prompt(VOCAB, 2, 24)
    with attached(model, [vd, quant(model, bits=2, group=G, window=0, layers="1")]):
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    grads = [p.grad for p in vd.parameters()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
