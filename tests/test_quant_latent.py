"""``quant`` of a low-rank method's latent: on a layer where ``vdproj`` or ``lowrank`` caches K and/or V as a code, the
cache holds that code quantized (packed, float16 scales and zero points, a ring of full-precision codes). Latent
decoding against the fake-quantized training-time forward, bytes measured against the declared layout (Pythia-70M's
architecture too), gradients through the straight-through estimator, trained trials alone and in packs, refusals."""

from __future__ import annotations

import pytest
import torch
from transformers import GPTNeoXForCausalLM

from kvsweep.adapters import AdapterSpec, attached, check_taps, disabled, make_adapter
from kvsweep.adapters.quant import QuantLayer
from kvsweep.adapters.vdproj import VDProj
from kvsweep.config import ConfigError
from kvsweep.latent import LatentDecoder, measure_bytes, random_prompt, reference_logits
from kvsweep.models import dims, freeze, pythia_config
from kvsweep.quantize import fake_quant_tokens

from . import test_latent
from .test_latent import VOCAB
from .test_pack import _alone, _close, _packed
from .test_pack import _cfg as pack_cfg
from .test_quant import check_exact

G = 8  # quant's group on the test models (hidden 64, 4 heads of 16)
LOW_RANK = {  # the qkv-tap method whose code quant quantizes
    "vdproj-v": ("vdproj", {"rank": 16, "target": "v"}),
    "vdproj-kv": ("vdproj", {"rank": 16, "target": "kv"}),
    "lowrank-head": ("lowrank", {"group": 1, "k_rank": 8, "v_rank": 8, "init": "random"}),
    "lowrank-grouped": ("lowrank", {"group": 2, "k_rank": 8, "v_rank": 16, "init": "random"}),
    "lowrank-joint": ("lowrank", {"group": 4, "k_rank": 24, "v_rank": 40, "init": "random"}),
}


@pytest.fixture(scope="module")
def model64():
    """float64 (see tests/test_quant.py's ``model64``: float32 may move a float16 scale across a rounding boundary)."""
    return test_latent.small_model().double()


@pytest.fixture(scope="module")
def model32():
    return test_latent.small_model()


def build(model, low: str, **quant):
    adapters = test_latent.build(model, (LOW_RANK[low], ("quant", {"group": G, **quant})))
    return [a.to(next(model.parameters()).dtype) for a in adapters]


@pytest.mark.parametrize("window", [0, G])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("low", list(LOW_RANK))
def test_latent_decode_equals_the_fake_quantized_forward(model64, low, bits, window):
    adapters = build(model64, low, bits=bits, window=window)
    prompt = random_prompt(VOCAB, 2, 12, seed=3)
    check_exact(model64, adapters, prompt, 8)  # logits within 1e-4 at every step, greedy identical, bytes as declared
    alone = reference_logits(model64, adapters[:1], prompt, 12)
    assert (reference_logits(model64, adapters, prompt, 12) - alone).abs().max() > 1e-3  # quant changes the codes' reads
    dec = LatentDecoder(model64, adapters)
    name, options = LOW_RANK[low]
    for layer, shapes in zip(dec.layout(), dec.new_cache(1, 16).describe(), strict=True):
        for t in ("k", "v"):
            if name == "vdproj":
                width = options["rank"] if t in options["target"] else 0
            else:  # a rank per group of heads (4 heads)
                width = options[f"{t}_rank"] * 4 // options["group"]
            if width:  # the code, packed, with w / G scales and zero points per token, and a ring of R codes
                assert layer[t].values == width * bits // 8 and layer[t].dtype == "uint8"
                assert layer[f"{t}_scale"].values == layer[f"{t}_zero"].values == width // G
                assert shapes[t] == [1, 16, width * bits // 8]
                assert (f"{t}_window" in shapes) == bool(window) and shapes.get(f"{t}_window", [1, window, width]) == [1, window, width]


@pytest.mark.parametrize("low, bits, window", [("lowrank-joint", 4, G), ("vdproj-kv", 4, 0), ("lowrank-head", 8, G)])
def test_in_float32_too(model32, low, bits, window):
    check_exact(model32, build(model32, low, bits=bits, window=window), random_prompt(VOCAB, 2, 12, seed=3), 8)


def test_quant_on_k_or_v_alone_and_the_other_tensor_as_the_low_rank_method_caches_it(model64):
    for low, target in (("vdproj-kv", "v"), ("lowrank-grouped", "k"), ("vdproj-v", "kv")):  # vdproj-v + kv: K plain KIVI
        check_exact(model64, build(model64, low, bits=4, window=0 if "k" in target else 3, target=target),
                    random_prompt(VOCAB, 2, 12, seed=5), 6)


def test_in_either_order_and_with_the_decode_per_head(model64):
    adapters = build(model64, "lowrank-grouped", bits=2, window=G)
    check_exact(model64, adapters[::-1], random_prompt(VOCAB, 1, 10, seed=2), 6)
    dec = LatentDecoder(model64, adapters, fold=False, fold_qkv=False)
    folded = LatentDecoder(model64, adapters)
    prompt = random_prompt(VOCAB, 1, 10, seed=2)
    assert torch.allclose(dec(prompt, dec.new_cache(1, 16)), folded(prompt, folded.new_cache(1, 16)), atol=1e-9)


def test_the_training_forward_attends_over_the_decoded_quantized_code(model64):
    """With R = 0 and V alone, A is P decode(fake_quant(code)): against the same layer computed by hand."""
    low, q = build(model64, "vdproj-v", bits=2, window=0, layers="0", target="v")
    ids = random_prompt(VOCAB, 1, 9, seed=4)
    seen = {}
    layer = q.per_layer["0"]
    forward = layer.forward

    def spy(query, key, value, mask, scaling, base):
        out = forward(query, key, value, mask, scaling, base)
        comp = low.per_layer["0"].v
        v_q = comp.decode(fake_quant_tokens(comp.last_code, 2, G)).view(1, 9, 4, 16).transpose(1, 2)  # (B, H, S, hs)
        p = torch.softmax((query @ key.transpose(2, 3) * scaling).masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), -torch.inf), -1)
        seen["diff"] = (out[0] - (p @ v_q).transpose(1, 2)).abs().max().item()
        return out

    layer.forward = spy
    try:
        with attached(model64, [low, q]):
            model64(input_ids=ids, use_cache=False)
    finally:
        del layer.forward
    assert seen["diff"] < 1e-5  # the softmax in float32, as the base's


def test_with_the_low_rank_method_off_or_calibrating_quant_quantizes_k_and_v_themselves(model64):
    low, q = build(model64, "lowrank-grouped", bits=4, window=0)
    prompt = random_prompt(VOCAB, 2, 12, seed=1)
    with disabled([low]):
        check_exact(model64, [low, q], prompt, 6)  # the decoder caches K and V quantized, as the forward reads them
        assert torch.equal(reference_logits(model64, [low, q], prompt, 12), reference_logits(model64, [q], prompt, 12))
    whitened = make_adapter(AdapterSpec.parse("lowrank", group=2, k_rank=8, v_rank=16, init="whitened", calib_samples=4),
                            dims(model64.config)).double()
    with attached(model64, [whitened, q]):  # its calibration's forwards compute no code: quant reads K and V themselves
        whitened.calibrate(model64, random_prompt(VOCAB, 4, 12, seed=2).numpy())
    check_exact(model64, [whitened, q], prompt, 6)


# ----------------------------------------------------------------------------- bytes on Pythia-70M's architecture


@pytest.fixture(scope="module")
def p70():
    torch.manual_seed(0)
    return freeze(GPTNeoXForCausalLM(pythia_config("70m")))


@pytest.mark.parametrize("low, quant, per_token, fixed", [
    # K and V codes of 256 at 4 bits: 128 bytes + 8 scales + 8 zero points (float16) each, per layer and tensor
    ({"group": 8, "k_rank": 256, "v_rank": 256, "init": "random"}, {"bits": 4, "group": 32, "window": 0}, 6 * 2 * (128 + 32), 0),
    ({"group": 8, "k_rank": 256, "v_rank": 256, "init": "random"}, {"bits": 4, "group": 32, "window": 128}, 6 * 2 * (128 + 32),
     6 * 2 * 128 * 256 * 2),  # rings of 128 codes of 256 at float16
    ({"rank": 256, "target": "kv"}, {"bits": 8, "group": 32, "window": 0}, 6 * 2 * (256 + 32), 0),
    ({"rank": 256, "target": "kv"}, {"bits": 8, "group": 32, "window": 128}, 6 * 2 * (256 + 32), 6 * 2 * 128 * 256 * 2),
])
def test_bytes_on_pythia_70m_are_measured_to_the_byte(p70, low, quant, per_token, fixed):
    d = dims(p70.config)
    name = "vdproj" if "rank" in low else "lowrank"
    adapters = [make_adapter(AdapterSpec.parse(name, **low), d), make_adapter(AdapterSpec.parse("quant", **quant), d)]
    got = measure_bytes(p70, adapters, "float16", context=4, new_tokens=1)  # raises on any difference
    assert got["measured_bytes_per_token"] == got["accounted_bytes_per_token"] == per_token
    assert got["measured_fixed_bytes"] == got["accounted_fixed_bytes"] == fixed == adapters[1].window_bytes("float16")


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("low", ["vdproj-kv", "lowrank-joint"])
def test_the_straight_through_estimator_passes_gradients_to_the_low_rank_weights(model32, low):
    """At R = 0 every key and value is read from the quantized code: without the straight-through estimator the
    language-model loss would give the encodes no gradient."""
    adapters = build(model32, low, bits=2, window=0)
    ids = random_prompt(VOCAB, 2, 16, seed=7)
    with attached(model32, adapters):
        model32(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    downs = [c.down.weight for m in adapters[0].per_layer.values() for c in m.codecs().values()]
    assert len(downs) == 4 and all(w.grad is not None and w.grad.abs().sum() > 0 for w in downs)


QUANT = AdapterSpec.parse("quant", bits=4, group=8, window=0)
TRAINED = [pack_cfg([AdapterSpec.parse("vdproj", rank=16, target="kv"), QUANT], epochs=2, loss="lm", lr=1e-2, seed=seed)
           for seed in (0, 1)] + [pack_cfg([AdapterSpec.parse("lowrank", group=2, k_rank=8, v_rank=16), QUANT], epochs=2, loss="lm", lr=1e-2)]


def test_trained_trials_learn_and_measure_their_bytes():
    # 2 layers; per code of w at 4 bits and G = 8: w / 2 bytes + 2 x w / 8 float16 = w bytes per token
    for cfg, per_token in zip(TRAINED[1:], (2 * (16 + 16), 2 * (16 + 32)), strict=True):
        result, reports = _alone(cfg)
        assert result.status == "completed" and result.epochs_run == 2
        ppl = [m["val_ppl"] for m in reports]  # epochs 1, 2: the random base's pattern, learnt a little
        assert min(ppl) < reports[0]["init_val_ppl"] and result.best_epoch >= 1
        assert result.kv_bytes_per_token == result.kv_bytes_per_token_measured == per_token


def test_packed_trials_report_what_they_report_alone():
    results, reports = _packed(TRAINED)  # the two vdproj trials as one stacked call: each quant reads its own rows' codes
    for cfg, result, rep in zip(TRAINED, results, reports, strict=True):
        alone, alone_reports = _alone(cfg)
        for m, ma in zip(rep, alone_reports, strict=True):
            _close(m, ma, rel=1e-5)
        assert result.status == alone.status == "completed"


# ----------------------------------------------------------------------------- refusals


def test_group_must_divide_the_code_width(model64):
    adapters = test_latent.build(model64, (("vdproj", {"rank": 12}), ("quant", {"group": G, "window": 0})))
    with pytest.raises(ConfigError, match=r"quant: group 8 must divide the width 12 of the code of V cached on layer 0") as e:
        LatentDecoder(model64, adapters).layout()
    assert "\n" not in str(e.value)


def test_still_refused_where_the_qkv_method_caches_no_code(monkeypatch, model64):
    d = dims(model64.config)
    vd, q = AdapterSpec.parse("vdproj", rank=16, layers="0"), AdapterSpec.parse("quant", layers="0")
    check_taps((vd, q), d)
    check_taps((q, vd), d)
    monkeypatch.setattr(VDProj, "caches_codes", False)
    for specs in ((vd, q), (q, vd)):
        with pytest.raises(ConfigError, match=r"^adapters quant and vdproj both change the cached K and V of layer 0 \(quant "
                                              r"cannot cache what vdproj caches\); give them different layers$"):
            check_taps(specs, d)
    monkeypatch.undo()
    monkeypatch.delattr(QuantLayer, "read_code")
    with pytest.raises(ConfigError, match="layer 0: quant caches K and V its own way and cannot hold the code of another"):
        LatentDecoder(model64, build(model64, "vdproj-v", bits=2, window=0))


def test_a_sweep_refuses_quant_over_a_code_its_group_does_not_divide_before_any_trial():
    from kvsweep.config import SweepCfg
    from kvsweep.tune import validate_space

    sweep = SweepCfg(name="s")  # tiny: 4 heads of 32
    bad = {"lowrank.group": [1], "lowrank.k_rank": [12], "lowrank.v_rank": [12], "quant": ["quant"], "quant.group": [32]}
    with pytest.raises(ConfigError, match=r"the combination .*group 32 must divide the width 48"):
        validate_space(bad, sweep)
    validate_space({**bad, "lowrank.k_rank": [16], "lowrank.v_rank": [16]}, sweep)  # 4 x 16 = 64: whole groups of 32
    allocated = {"lowrank.budget": [0.5], "lowrank.allocation": ["error"], "quant": ["quant"]}
    with pytest.raises(ConfigError, match="its widths come from calibration data"):
        validate_space(allocated, sweep)
