"""``lowrank``: K/V low-rank projection per head, per group of heads or jointly (Palu's M-/G-/J-LRD).

Options and their errors, flags and search-space values, ranks and layouts, the inits (svd from the weights,
whitened from data) against their closed forms, the budget's allocations, full rank reproducing the base,
latent-cache decoding (grouped codes, folded encodes) against the training-time forward, and trials (0 epochs,
trained, calibration-shaped ranks, packed, resumed).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvsweep.adapters import AdapterSpec, attached, make_adapter
from kvsweep.adapters.lowrank import LowRank, allocate_ranks
from kvsweep.config import ConfigError
from kvsweep.kvcache import base_layout, bytes_per_token
from kvsweep.latent import LatentDecoder, generate, measure_bytes, random_prompt, reference_logits
from kvsweep.models import dims, qkv_rows, split_qkv

from . import test_latent
from .conftest import neox_model

HIDDEN, HEADS, LAYERS, VOCAB = 64, 4, 2, 320
HS = HIDDEN // HEADS


def model_(layers: int = LAYERS, seed: int = 0):
    return neox_model(layers=layers, hidden=HIDDEN, heads=HEADS, vocab=VOCAB, seed=seed)


def lowrank(model, **options) -> LowRank:
    return make_adapter(AdapterSpec.parse("lowrank", **options), dims(model.config))


def samples(n: int = 8, t: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(n, t))


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


@torch.no_grad()
def captured(model, ids) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """K (pre-rotary) and V of every layer of the model as it is, (N*T, d) float64 each."""
    out = {}
    hooks = [layer.attention.query_key_value.register_forward_hook(
        lambda mod, inp, qkv, i=i: out.__setitem__(i, tuple(x.reshape(-1, HIDDEN).double() for x in split_qkv(qkv, HEADS)[1:])))
        for i, layer in enumerate(model.gpt_neox.layers)]
    try:
        logits(model, torch.as_tensor(ids))
    finally:
        for h in hooks:
            h.remove()
    return out


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize("options, message", [
    ({"k_rank": 8, "budget": 0.5}, "either k_rank/v_rank or budget, not both"),
    ({}, "needs k_rank and/or v_rank"),
    ({"group": 2}, "needs k_rank and/or v_rank"),
    ({"budget": 0}, r"budget must be a fraction in \(0, 1\]; got 0"),
    ({"budget": 1.5}, r"budget must be a fraction in \(0, 1\]; got 1.5"),
    ({"budget": -0.1}, "budget must be a fraction"),
    ({"k_rank": 0, "v_rank": 0}, "compress nothing"),
    ({"k_rank": -1}, "k_rank must be a rank >= 0"),
    ({"v_rank": "8,x"}, "v_rank must be a rank >= 0"),
    ({"k_rank": True}, "k_rank must be a rank"),
    ({"k_rank": 8, "allocation": "error"}, "allocation error spreads a budget"),
    ({"budget": 0.5, "allocation": "best"}, "allocation must be one of uniform, error"),
    ({"k_rank": 8, "init": "pca"}, "init must be one of svd, whitened, random"),
    ({"k_rank": 8, "group": 0}, "group must be a whole number >= 1"),
    ({"k_rank": 8, "calib_samples": 0}, "calib_samples must be an integer >= 1"),
])
def test_bad_options_give_one_clear_line(options, message):
    with pytest.raises(ConfigError, match=message) as e:
        AdapterSpec.parse("lowrank", **options)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("options, message", [
    ({"group": 3, "k_rank": 4}, "group 3 must divide the model's 4 heads; valid: 1, 2, 4"),
    ({"group": 1, "k_rank": HS + 1}, f"k_rank {HS + 1} is above group x head size = 1 x {HS} = {HS}.*valid range 0..{HS}"),
    ({"group": 2, "v_rank": 2 * HS + 1}, f"v_rank {2 * HS + 1} is above group x head size = 2 x {HS} = {2 * HS}"),
    ({"k_rank": "4,4,4"}, r"k_rank gives 3 ranks for 2 adapted layers \[0, 1\]"),
])
def test_options_that_do_not_fit_the_model_give_one_clear_line(options, message):
    spec = AdapterSpec.parse("lowrank", **options)  # valid until the model's dims are known
    with pytest.raises(ConfigError, match=message) as e:
        make_adapter(spec, dims(model_().config))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("value", [16, "16", (16,), [16]])
def test_one_rank_is_every_layers(value):
    assert AdapterSpec.parse("lowrank", k_rank=value).options.k_rank == (16,)


def test_per_layer_ranks_as_a_flag_a_space_value_and_a_column():
    from kvsweep.adapters.options import option_columns, option_values, specs_from_point
    from kvsweep.args import adapter_specs
    from kvsweep.cli import build_parser
    from kvsweep.results import table, trial_schema

    flags = adapter_specs(build_parser().parse_args(["train", "--out", "x", "--lowrank.k-rank", "16,8,4", "--lowrank.v-rank", "8",
                                                    "--lowrank.group", "2"]))
    space = specs_from_point({"lowrank.k_rank": (16, 8, 4), "lowrank.v_rank": 8, "lowrank.group": 2})
    tune = specs_from_point({"lowrank.k_rank": "16,8,4", "lowrank.v_rank": "8", "lowrank.group": 2})  # a list as Tune holds it
    listed = specs_from_point({"lowrank.k_rank": [16, 8, 4], "lowrank.v_rank": [8], "lowrank.group": 2})
    assert flags == space == tune == listed
    (spec,) = flags
    assert spec.options.k_rank == (16, 8, 4) and spec.options.v_rank == (8,) and spec.options.group == 2
    values = option_values(flags)
    assert values["lowrank.k_rank"] == "16,8,4" and values["lowrank.v_rank"] == "8" and values["lowrank.budget"] is None
    tbl = table([{"trial_id": "t", **values}], trial_schema(option_columns()))
    assert tbl.column("lowrank.k_rank").to_pylist() == ["16,8,4"] and tbl.column("lowrank.group").to_pylist() == [2]
    budget = specs_from_point({"lowrank.budget": 0.25, "lowrank.allocation": "error"})
    assert budget[0].options.budget == 0.25 and option_values(budget)["lowrank.budget"] == 0.25
    assert AdapterSpec.parse("lowrank", **{k: v for k, v in spec.to_dict().items() if k != "name"}) == spec


def test_labels():
    assert LowRank.label(AdapterSpec.parse("lowrank", group=2, k_rank=8).options) == "lowrank[g2,svd]"
    assert LowRank.label(AdapterSpec.parse("lowrank", budget=0.5, allocation="error", init="whitened").options) \
        == "lowrank[g1,whitened,error]"


# ----------------------------------------------------------------------------- ranks, layout, parameters


def test_per_layer_ranks_give_the_layout_and_the_parameters():
    model = model_(layers=3)
    a = lowrank(model, group=2, k_rank="8,16,0", v_rank=4)
    G = HEADS // 2
    assert a.ranks == {0: (8, 4), 1: (16, 4), 2: (0, 4)}
    layout = a.kv_layout(base_layout(3, HIDDEN))
    assert [(layer["k"].values, layer["v"].values) for layer in layout] == [(G * 8, G * 4), (G * 16, G * 4), (HIDDEN, G * 4)]
    per = lambda r: 2 * r * HIDDEN + G * r + HIDDEN  # noqa: E731  (down, its bias, up, its bias)
    assert a.param_formula() == a.trainable_params() == per(8) + per(16) + 3 * per(4)
    assert a.per_layer["2"].k is None and a.per_layer["0"].k.down.weight.shape == (G, 8, 2 * HS)
    got = measure_bytes(model, [a], "float16")
    assert got["measured_bytes_per_token"] == bytes_per_token(layout, "float16")


def test_per_layer_ranks_follow_the_adapted_layers():
    a = lowrank(model_(layers=3), k_rank="4,12", layers="0,2")
    assert a.ranks == {0: (4, 0), 2: (12, 0)}


@pytest.mark.parametrize("budget, rank", [(1.0, HS), (0.5, HS // 2), (0.3, 4), (0.01, 1)])
def test_a_uniform_budget_is_one_rank_rounded_down(budget, rank):
    model = model_()
    a = lowrank(model, budget=budget)
    assert a.ranks == {0: (rank, rank), 1: (rank, rank)}  # floor(budget * g * hs), at least 1
    kv = bytes_per_token(a.kv_layout(base_layout(LAYERS, HIDDEN)))
    assert kv <= max(budget, 1 / HS) * bytes_per_token(base_layout(LAYERS, HIDDEN))


def test_allocate_ranks_takes_the_largest_gains():
    gains = {(0, "k"): torch.tensor([0.5, 0.3, 0.1, 0.1]), (0, "v"): torch.tensor([0.9, 0.05, 0.03, 0.02]),
             (1, "k"): torch.tensor([0.4, 0.35, 0.2, 0.05])}
    assert allocate_ranks(gains, 3) == {(0, "k"): 1, (0, "v"): 1, (1, "k"): 1}
    assert allocate_ranks(gains, 6) == {(0, "k"): 2, (0, "v"): 1, (1, "k"): 3}  # 0.35, 0.3, 0.2 beat 0.1 and 0.05
    assert allocate_ranks(gains, 12) == {(0, "k"): 4, (0, "v"): 4, (1, "k"): 4}
    assert allocate_ranks(gains, 99) == {(0, "k"): 4, (0, "v"): 4, (1, "k"): 4}


# ----------------------------------------------------------------------------- inits


@pytest.mark.parametrize("group", [1, 2, 4])
def test_svd_init_is_the_truncated_svd_of_the_weights(group):
    model, ids = model_(), samples()
    a = lowrank(model, group=group, k_rank=4, v_rank=6)
    a.calibrate(model, ids[:0])  # from the weights: no data needed, nor attaching
    G, m = HEADS // group, group * HS
    kv = captured(model, ids)
    for i in range(LAYERS):
        w_k, b_k, w_v, b_v = qkv_rows(model, i)
        for name, w, b, x, r in (("k", w_k, b_k, kv[i][0], 4), ("v", w_v, b_v, kv[i][1], 6)):
            U = torch.linalg.svd(w.double().view(G, m, HIDDEN), full_matrices=False).U[..., :r]  # (G, m, r)
            P = U @ U.transpose(1, 2)  # (G, m, m): the projection on the top-r left singular vectors
            xg, bg = x.view(-1, G, m), b.double().view(G, m)
            want = (torch.einsum("gij,ngj->ngi", P, xg - bg) + bg).reshape(-1, HIDDEN)  # U U^T W x + b
            codec = getattr(a.per_layer[str(i)], name)
            with torch.no_grad():
                got = codec(x.float()).double()
            assert (got - want).abs().max().item() < 1e-4, (i, name)
            assert codec.width == G * r


def _best_error(x: torch.Tensor, b: torch.Tensor, G: int, r: int) -> float:
    """The smallest ||x - x_hat||^2 / ||x||^2 of x_hat = b + rank-r per group (the eigenvalue tails of E[(x-b)(x-b)^T])."""
    xg = (x - b.double()).view(len(x), G, -1)
    eig = torch.linalg.eigvalsh(torch.einsum("ngi,ngj->gij", xg, xg))  # ascending, (G, m)
    return (eig[:, : eig.shape[1] - r].sum() / x.pow(2).sum()).item()


@pytest.mark.parametrize("group", [1, 2])
def test_whitened_init_is_the_best_rank_r_reconstruction_on_its_data(group):
    model, ids = model_(), samples()
    G, r = HEADS // group, 3
    kv = captured(model, ids)
    errors = {}
    for init in ("whitened", "svd", "random"):
        a = lowrank(model, group=group, k_rank=r, v_rank=r, init=init, calib_samples=len(ids))
        with attached(model, [a]):
            a.calibrate(model, ids)
        for i in range(LAYERS):
            w_k, b_k, w_v, b_v = qkv_rows(model, i)
            for name, x in zip("kv", kv[i]):
                with torch.no_grad():
                    x_hat = getattr(a.per_layer[str(i)], name)(x.float()).double()
                errors[init, i, name] = ((x - x_hat).pow(2).sum() / x.pow(2).sum()).item()
    for i in range(LAYERS):
        _, b_k, _, b_v = qkv_rows(model, i)
        for name, b, x in (("k", b_k, kv[i][0]), ("v", b_v, kv[i][1])):
            best = _best_error(x, b, G, r)
            assert 0.005 < best < 0.95  # rank r loses something, not everything
            assert errors["whitened", i, name] == pytest.approx(best, rel=1e-3, abs=1e-7), (i, name)
            assert errors["whitened", i, name] <= errors["svd", i, name] + 1e-9
            assert errors["svd", i, name] < errors["random", i, name]


def test_whitened_calibration_needs_attaching_and_samples():
    model = model_()
    a = lowrank(model, k_rank=4, init="whitened")
    with pytest.raises(RuntimeError, match="attach"):
        a.calibrate(model, samples())
    with attached(model, [a]), pytest.raises(ConfigError, match="train_samples must be >= 1"):
        a.calibrate(model, samples()[:0])


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("init", ["svd", "whitened"])
def test_training_free_lowrank_at_full_rank_reproduces_the_base(group, init):
    model, ids = model_(), torch.as_tensor(samples(2, 16, seed=1))
    ref = logits(model, ids)
    a = lowrank(model, group=group, k_rank=group * HS, v_rank=group * HS, init=init)
    with attached(model, [a]):
        a.calibrate(model, samples())
        eye = torch.eye(group * HS).expand(HEADS // group, group * HS, group * HS)
        assert not any(torch.equal(c.down.weight, eye) for c in a._codecs())  # calibrated: not the placeholder
        out = logits(model, ids)
    assert (out - ref).abs().max().item() < 1e-4


def test_before_calibration_svd_keeps_the_first_coordinates_and_random_does_not():
    model = model_()
    a, r = lowrank(model, group=2, k_rank=5), lowrank(model, group=2, k_rank=5, init="random")
    c = a.per_layer["0"].k
    assert torch.equal(c.down.weight, torch.eye(2 * HS)[:5].expand(2, 5, 2 * HS)) and torch.equal(c.up.bias, torch.zeros(2, 2 * HS))
    assert not torch.equal(r.per_layer["0"].k.down.weight, c.down.weight)


# ----------------------------------------------------------------------------- allocation by reconstruction error


def test_error_allocation_spends_the_budget_on_the_largest_normalised_eigenvalues():
    model, ids = model_(layers=3), samples()
    with torch.no_grad():  # layer 0's keys of rank 2: they need few ranks, the others get what they leave
        w = model.gpt_neox.layers[0].attention.query_key_value.weight.view(HEADS, 3, HS, HIDDEN)
        basis = torch.linalg.qr(torch.randn(HIDDEN, 2, generator=torch.Generator().manual_seed(0))).Q  # (d, 2)
        w[:, 1] = w[:, 1] @ basis @ basis.T
    a = lowrank(model, budget=0.25, allocation="error", group=2, calib_samples=len(ids))
    assert a.shaped_by_calibration
    assert a.ranks == {i: (8, 8) for i in range(3)}  # before calibration: the budget's uniform ranks
    with attached(model, [a]):
        a.calibrate(model, ids)
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == a.param_formula() == a.trainable_params()
    m, G = 2 * HS, 2
    assert sum(rk + rv for rk, rv in a.ranks.values()) == int(0.25 * 2 * m * 3)  # every rank unit of the budget
    assert a.ranks[0][0] <= 2 and sum(rv for _, rv in a.ranks.values()) + a.ranks[1][0] + a.ranks[2][0] > 5 * 8, a.ranks
    kv = captured(model, ids)
    gains = {}
    for i in range(3):
        _, b_k, _, b_v = qkv_rows(model, i)
        for name, b, x in (("k", b_k, kv[i][0]), ("v", b_v, kv[i][1])):
            xg = (x - b.double()).view(len(x), G, m)
            eig = torch.linalg.eigvalsh(torch.einsum("ngi,ngj->gij", xg, xg)).flip(-1)
            gains[i, name] = eig.sum(0) / eig.sum()
    want = allocate_ranks(gains, int(0.25 * 2 * m * 3))
    assert a.ranks == {i: (want[i, "k"], want[i, "v"]) for i in range(3)}
    layout = a.kv_layout(base_layout(3, HIDDEN))
    assert [(layer["k"].values, layer["v"].values) for layer in layout] == [(G * rk, G * rv) for rk, rv in a.ranks.values()]
    assert measure_bytes(model, [a], "float32")["measured_bytes_per_token"] == bytes_per_token(layout, "float32")


# ----------------------------------------------------------------------------- latent-cache decoding

DECODE = [
    {"group": 1, "k_rank": 8, "v_rank": 8},  # per head, K+V
    {"group": 2, "k_rank": 12, "v_rank": 6},  # grouped
    {"group": 4, "k_rank": 24, "v_rank": 40},  # joint
    {"group": 1, "v_rank": 5},  # V only
    {"group": 2, "k_rank": 7},  # K only
    {"group": 2, "k_rank": "10,0", "v_rank": "3,20"},  # per-layer ranks, K of layer 1 not compressed
    {"group": 1, "k_rank": HS, "v_rank": HS},  # full rank
]


@pytest.fixture(scope="module")
def dmodel():
    return test_latent.small_model()


@pytest.mark.parametrize("options", DECODE, ids=lambda o: "_".join(f"{k}{v}" for k, v in o.items()))
def test_latent_decode_matches_the_training_time_forward(dmodel, options):
    adapters = test_latent.build(dmodel, (("lowrank", options),))
    prompt = random_prompt(VOCAB, 2, 12, seed=3)
    assert (reference_logits(dmodel, adapters, prompt, 12) - reference_logits(dmodel, [], prompt, 12)).abs().max() > 1e-2
    for fold, restore in test_latent.MODES:
        for fold_qkv in (True, False):
            test_latent.check_equivalence(dmodel, adapters, prompt, 6, fold=fold, restore_prefill=restore, fold_qkv=fold_qkv)


@pytest.mark.parametrize("options", DECODE[:3] + DECODE[5:6], ids=str)
def test_encodes_folded_into_query_key_value_equal_the_unfolded_path(dmodel, options):
    adapters = test_latent.build(dmodel, (("lowrank", options),))
    prompt = random_prompt(VOCAB, 2, 10, seed=8)
    folded = LatentDecoder(dmodel, adapters, cache_dtype="float32", fold_qkv=True)
    plain = LatentDecoder(dmodel, adapters, cache_dtype="float32", fold_qkv=False)
    assert all(p.qkv_w is not None for p in folded.plans) and all(p.qkv_w is None for p in plain.plans)
    a = generate(folded, prompt, 6, keep_logits=True)
    b = generate(plain, prompt, 6, keep_logits=True)
    assert (a.logits - b.logits).abs().max().item() < 1e-4 and torch.equal(a.tokens, b.tokens)
    for la, lb in zip(a.cache.layers, b.cache.layers):  # the same codes in the cache
        for name in la.tensors:
            assert (la.read(name, 15, torch.float32) - lb.read(name, 15, torch.float32)).abs().max().item() < 1e-4


def test_encodes_are_folded_unless_told_not_to(dmodel):
    d = dims(dmodel.config)
    small = [make_adapter(AdapterSpec.parse("lowrank", group=1, k_rank=4, v_rank=4), d)]
    assert all(p.qkv_w.shape == (HIDDEN + 2 * HEADS * 4, HIDDEN) for p in LatentDecoder(dmodel, small).plans)  # Q rows + codes
    assert all(p.qkv_w is None for p in LatentDecoder(dmodel, small, fold_qkv=False).plans)
    vd = [make_adapter(AdapterSpec.parse("vdproj", rank=8), d)]  # V-DProj's down is linear too: Q and K rows + V's code
    assert all(p.qkv_w.shape == (2 * HIDDEN + 8, HIDDEN) for p in LatentDecoder(dmodel, vd).plans)


@pytest.mark.parametrize("target", ["v", "kv"])
@pytest.mark.parametrize("bias", [True, False])
def test_vdprojs_encode_folded_into_query_key_value_equals_the_unfolded_path(dmodel, target, bias):
    torch.manual_seed(3)
    adapters = [make_adapter(AdapterSpec.parse("vdproj", rank=12, target=target, bias=bias), dims(dmodel.config)).eval()]
    prompt = random_prompt(VOCAB, 2, 10, seed=8)
    a = generate(LatentDecoder(dmodel, adapters, cache_dtype="float32", fold_qkv=True), prompt, 6, keep_logits=True)
    b = generate(LatentDecoder(dmodel, adapters, cache_dtype="float32", fold_qkv=False), prompt, 6, keep_logits=True)
    assert (a.logits - b.logits).abs().max().item() < 1e-4 and torch.equal(a.tokens, b.tokens)


def test_each_head_reads_only_its_groups_code(dmodel, monkeypatch):
    """The per-step product over the values is with r latents per head (the group's rank), not the code's width."""
    (a,) = test_latent.build(dmodel, (("lowrank", {"group": 2, "v_rank": 6}),))
    shapes = []
    real = torch.matmul
    monkeypatch.setattr(torch, "matmul", lambda x, y: shapes.append((tuple(x.shape), tuple(y.shape))) or real(x, y))
    generate(LatentDecoder(dmodel, [a], cache_dtype="float32", restore_prefill=False), random_prompt(VOCAB, 1, 5), 3)
    pv = [s for s in shapes if len(s[1]) == 5]  # P (B, G, g, n, T) @ code (B, G, 1, T, r)
    assert pv and all(y[1] == 2 and y[-1] == 6 and x[2] == 2 for x, y in pv)


# ----------------------------------------------------------------------------- trials: 0 epochs, trained, shaped by calibration


def skewed_base():
    """``small_base`` whose layer 0 keys have rank 2: an allocation by reconstruction error gives them little."""
    from .conftest import small_base

    base = small_base()
    with torch.no_grad():
        w = base.model.gpt_neox.layers[0].attention.query_key_value.weight.view(HEADS, 3, HS, HIDDEN)
        basis = torch.linalg.qr(torch.randn(HIDDEN, 2, generator=torch.Generator().manual_seed(0))).Q  # (d, 2)
        w[:, 1] = w[:, 1] @ basis @ basis.T
    return base


ERROR = AdapterSpec.parse("lowrank", budget=0.25, allocation="error", group=2, calib_samples=16)


def test_zero_epochs_is_the_training_free_method_and_at_full_rank_the_base():
    from .test_pack import _alone, _cfg

    full, _ = _alone(_cfg([AdapterSpec.parse("lowrank", group=2, k_rank=2 * HS, v_rank=2 * HS)], epochs=0))
    assert full.status == "completed" and full.epochs_run == 0 and full.best_epoch == 0
    assert full.init_val_ppl == pytest.approx(full.base_val_ppl, rel=1e-5)
    low, _ = _alone(_cfg([AdapterSpec.parse("lowrank", group=2, k_rank=4, v_rank=4)], epochs=0))
    assert low.status == "completed" and low.init_val_ppl > low.base_val_ppl * (1 + 1e-3)
    assert low.kv_bytes_per_layer == [2 * 2 * 4 * 2] * 2  # K and V: G * r = 8 values each at float16, per layer


def test_a_trained_trial_learns_to_reconstruct():
    from .test_pack import _alone, _cfg

    result, reports = _alone(_cfg([AdapterSpec.parse("lowrank", group=2, k_rank=6, v_rank=6, init="random")], epochs=3, lr=2e-2))
    assert result.status == "completed" and len(reports) == 3
    assert reports[-1]["loss_rec"] < 0.8 * reports[0]["loss_rec"]
    assert result.trainable_params == 2 * 2 * (2 * 6 * HIDDEN + 2 * 6 + HIDDEN)


def test_ranks_allocated_in_calibration_make_the_layout_parameters_and_optimizer_of_the_trial():
    from kvsweep.train.loop import Driver

    from .conftest import pattern_samples
    from .test_pack import _cfg

    logged = []
    driver = Driver(skewed_base(), pattern_samples(), log=logged.append)
    try:
        run = driver.add(_cfg([ERROR], epochs=2))
        (a,) = run.adapters
        (rk0, rv0), (rk1, rv1) = a.ranks.values()
        assert f"lowrank after calibration: groups=2, ranks (k, v) per layer: 0: {rk0}/{rv0}, 1: {rk1}/{rv1}" in logged
        assert a.ranks[0][0] <= 2 < a.ranks[1][0], a.ranks  # layer 0's keys of rank 2 got little
        assert run.layout == a.kv_layout(base_layout(LAYERS, HIDDEN))
        assert run.measured["measured_bytes_per_layer"] == [2 * (2 * rk + 2 * rv) for rk, rv in a.ranks.values()]
        assert {id(p) for g in run.opt.param_groups for p in g["params"]} == {id(p) for p in a.parameters()}
        before = {n: p.detach().clone() for n, p in a.named_parameters()}
        driver.run([run])
        assert all(not torch.equal(p, before[n]) for n, p in a.named_parameters())
        result = run.result()
    finally:
        driver.close()
    assert result.status == "completed"
    assert result.kv_bytes_per_layer == result.kv_bytes_per_layer_measured == run.measured["measured_bytes_per_layer"]
    assert result.trainable_params == a.param_formula()


def test_packed_lowrank_trials_report_what_they_report_alone():
    from .test_pack import _alone, _close, _cfg, _packed

    cfgs = [_cfg([ERROR], epochs=2), _cfg([AdapterSpec.parse("lowrank", k_rank=4, v_rank="8,2", init="whitened")], epochs=2, seed=1)]
    results, reports = _packed(cfgs, base=skewed_base)
    for cfg, result, rep in zip(cfgs, results, reports, strict=True):
        alone, alone_reports = _alone(cfg, base=skewed_base)
        for m, ma in zip(rep, alone_reports, strict=True):
            _close(m, ma, rel=1e-5)
        assert result.kv_bytes_per_layer == alone.kv_bytes_per_layer and result.status == "completed"


def _crash_and_resume(tmp_path, before_resume=lambda: None) -> tuple[list, list]:
    """A trial with allocated ranks run whole, then crashed after epoch 1 and resumed (``before_resume`` runs between):
    the whole run's reports and the resumed run's, both stripped of what differs between runs."""
    from kvsweep.train import run_trial

    from .conftest import pattern_samples
    from .test_pack import _cfg, _strip

    cfg = _cfg([ERROR], epochs=3)
    full = [m.to_report() for m in run_trial(cfg, base=skewed_base(), samples=pattern_samples(), log=lambda m: None).history]

    class Crash(Exception):
        pass

    def crash_after_one(metrics, ckpt):
        if metrics.epoch == 1:
            raise Crash

    with pytest.raises(Crash):
        run_trial(cfg, crash_after_one, checkpoint_dir=tmp_path / "a", base=skewed_base(), samples=pattern_samples(), log=lambda m: None)
    before_resume()
    resumed = run_trial(cfg, checkpoint_dir=tmp_path / "b", resume_from=tmp_path / "a", base=skewed_base(), samples=pattern_samples(),
                        log=lambda m: None)
    return [_strip(m) for m in full], [_strip(m.to_report()) for m in resumed.history]


def test_a_resumed_trial_with_allocated_ranks_reports_what_an_uninterrupted_one_does(tmp_path):
    full, resumed = _crash_and_resume(tmp_path)
    assert resumed == full


def test_a_resumed_trial_keeps_the_ranks_it_started_with_whatever_calibration_gives_now(tmp_path, monkeypatch):
    from kvsweep.adapters.lowrank import LowRank

    def other_ranks(self, model, samples):  # a calibration that would allocate differently now (another machine, a near tie)
        self._shape({i: (1, 1) for i in self.layers})

    full, resumed = _crash_and_resume(tmp_path, lambda: monkeypatch.setattr(LowRank, "calibrate", other_ranks))
    assert resumed == full  # trained on, as uninterrupted


def test_a_trial_with_allocated_ranks_loads_for_inference(tmp_path):
    from kvsweep.config import ModelCfg
    from kvsweep.latent.trial import load_trial
    from kvsweep.models import freeze, pythia_config
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(0)  # load_trial builds pythia-70m's random weights with the config's seed 0: the same model
    model = freeze(GPTNeoXForCausalLM(pythia_config("70m")))
    spec = AdapterSpec.parse("lowrank", budget=0.2, allocation="error", group=4, calib_samples=2)
    trained = make_adapter(spec, dims(model.config))
    uniform = dict(trained.ranks)
    with attached(model, [trained]):
        trained.calibrate(model, np.random.default_rng(0).integers(0, 1000, size=(2, 16)))
    assert trained.ranks != uniform
    test_latent.write_trial(tmp_path / "trial", [trained], [spec], ModelCfg(name="pythia-70m", random_init=True, device="cpu"))
    _, (loaded,), _ = load_trial(tmp_path / "trial", log=lambda m: None)
    assert loaded.ranks == trained.ranks
    assert all(torch.equal(x, y) for x, y in zip(loaded.state_dict().values(), trained.state_dict().values(), strict=True))
    fresh = make_adapter(AdapterSpec.parse("lowrank", budget=0.2, group=4), dims(model.config))  # ranks of the options
    with pytest.raises(RuntimeError, match="size mismatch"):
        fresh.load_state_dict(trained.state_dict())


@pytest.mark.slow
def test_kvsweep_train_at_0_epochs_then_kvsweep_cache_of_the_trial(tiny_folder, tmp_path):
    """Training-free use from the command line: the calibrated adapters of epoch 0 are the trial's checkpoint."""
    import json

    from kvsweep.cli import main

    out = tmp_path / "trial"
    assert main(["train", "--model", "tiny", "--data", "tiny", "--lowrank.group", "2", "--lowrank.budget", "0.25",
                 "--lowrank.allocation", "error", "--lowrank.init", "whitened", "--lowrank.calib-samples", "4", "--epochs", "0",
                 "--val-samples", "4", "--test-samples", "2", "--eval-seq-len", "64", "--out", str(out)]) == 0
    record = json.loads((out / "trial.json").read_text())
    assert record["status"] == "completed" and record["epochs_run"] == 0
    assert record["kv_bytes_per_token"] <= 0.25 * record["kv_bytes_per_token_base"]
    assert len(set(record["kv_bytes_per_layer"])) > 1  # ranks allocated by reconstruction error
    assert main(["cache", "--trial", str(out), "--context", "16", "--new-tokens", "4", "--repeats", "1", "--out", str(tmp_path / "c")]) == 0
    cache = json.loads((tmp_path / "c" / "cache.json").read_text())
    assert cache["measured_bytes_per_token"] == cache["accounted_bytes_per_token"] == record["kv_bytes_per_token"]
    assert cache["greedy_identical"] is True


def test_same_shaped_lowrank_trials_run_as_one_batched_call_in_a_pack_and_match_alone(monkeypatch):
    from kvsweep.adapters.codec import GroupCodec

    from .test_pack import _alone, _close, _cfg, _packed

    calls = []
    stacked = GroupCodec.forward_stacked
    monkeypatch.setattr(GroupCodec, "forward_stacked", staticmethod(lambda cs, x: calls.append(len(cs)) or stacked(cs, x)))
    grouped = AdapterSpec.parse("lowrank", group=2, k_rank=6, v_rank=4, init="random")
    cfgs = [_cfg([grouped], seed=0, epochs=2), _cfg([AdapterSpec.parse("lowrank", v_rank=3)], epochs=2),
            _cfg([grouped], seed=1, lr=1e-3, epochs=2), _cfg([grouped], seed=2, loss="lm", epochs=2)]
    results, reports = _packed(cfgs)
    assert calls and max(calls) == 3  # the three same-shaped trials together; the other alone
    for cfg, rep in zip(cfgs, reports, strict=True):
        _, alone = _alone(cfg)
        for m, ma in zip(rep, alone, strict=True):
            _close(m, ma, rel=1e-5)


def test_kvsweep_cache_from_flags_takes_the_svd_of_the_weights(tmp_path, monkeypatch):
    import json

    calibrated = []
    real = LowRank.calibrate
    monkeypatch.setattr(LowRank, "calibrate", lambda self, model, s: calibrated.append(len(s)) or real(self, model, s))
    assert test_latent.run_cli(["cache", "--model", "pythia-70m", "--random-init", "--device", "cpu", "--lowrank.group", "2",
                                "--lowrank.k-rank", "32", "--lowrank.v-rank", "16", "--context", "8", "--new-tokens", "2",
                                "--repeats", "1", "--out", str(tmp_path)]) == 0
    assert calibrated == [0]  # from the weights, no samples
    r = json.loads((tmp_path / "cache.json").read_text())
    assert r["measured_bytes_per_token"] == r["accounted_bytes_per_token"] == 6 * (4 * 32 + 4 * 16) * 2
    assert r["greedy_identical"] is True


def test_per_layer_ranks_in_a_search_space_are_checked_against_the_model_before_a_sweep(tmp_path):
    from kvsweep.adapters.options import specs_from_point
    from kvsweep.config import DataCfg, ModelCfg, SweepCfg, TrainCfg
    from kvsweep.models import model_config, resolve_model
    from kvsweep.tune import validate_space
    from kvsweep.tune.search import tune_value

    sweep = SweepCfg(name="x", storage=str(tmp_path), data=DataCfg(train_samples=16, val_samples=8), train=TrainCfg(epochs=1))
    n = dims(model_config(resolve_model(ModelCfg(name="tiny")))).layers
    per_layer = tuple(range(1, n + 1))
    cfgs = validate_space({"lowrank.k_rank": [per_layer, 8], "lowrank.group": [2]}, sweep)
    assert [c.adapters[0].options.k_rank for c in cfgs] == [per_layer, (8,)]
    assert specs_from_point({"lowrank.k_rank": tune_value(per_layer)})[0].options.k_rank == per_layer  # as Ray Tune holds it
    with pytest.raises(ConfigError, match=f"search space: lowrank.k_rank='8,4': k_rank gives 2 ranks for {n} adapted layers"):
        validate_space({"lowrank.k_rank": ["8,4"]}, sweep)


@pytest.mark.slow
def test_a_sweep_over_per_layer_ranks_and_a_budget(tmp_path):
    """Ray Tune: a per-layer rank tuple and an allocated budget as points; their columns and bytes in trials.parquet."""
    from dataclasses import replace

    import pyarrow.parquet as pq

    from kvsweep.config import DataCfg, ModelCfg, SweepCfg, TrainCfg
    from kvsweep.tune import run_sweep

    sweep = SweepCfg(name="lr", storage=str(tmp_path / "results"), model=ModelCfg(name="tiny"),
                     data=DataCfg(source="tiny", train_samples=16, val_samples=8), train=TrainCfg(epochs=1, lr=1e-3),
                     scheduler="fifo", report_dir=str(tmp_path / "reports"))
    run_sweep(sweep, {"lowrank.k_rank": ["8,4,8,4"], "lowrank.group": [2], "lowrank.init": ["svd"]}, log=lambda m: None)
    run_sweep(replace(sweep, name="lr2"), {"lowrank.budget": [0.25], "lowrank.allocation": ["error"], "lowrank.calib_samples": [4]},
              log=lambda m: None)
    rows = [pq.read_table(tmp_path / "results" / name / "trials.parquet").to_pylist()[0] for name in ("lr", "lr2")]
    assert [r["status"] for r in rows] == ["completed", "completed"], [r["error"] for r in rows]
    ranks, budget = rows
    assert ranks["lowrank.k_rank"] == "8,4,8,4" and ranks["family"] == "lowrank" and ranks["variant"].startswith("lowrank[g2,svd]")
    assert budget["lowrank.budget"] == 0.25 and budget["variant"].startswith("lowrank[g1,svd,error]")
    assert budget["kv_bytes_per_token"] == budget["kv_bytes_per_token_accounted"] <= 0.25 * budget["kv_bytes_per_token_base"]
