"""Adapter invariants, checked over the whole registry on small GPT-NeoX models built in code.

Every registered adapter: only its parameters train, the frozen base stays bit-identical, detaching
restores the base exactly, ``disabled`` is the base, parameter counts match ``param_formula``, and its
KV layout touches only its own layers. Adapter-specific checks follow (no-op settings, PCA init,
Pythia-70M numbers, composition, option validation).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import GPTNeoXForCausalLM

from kvsweep.adapters import (
    ADAPTERS,
    Adapter,
    AdapterOptions,
    AdapterSpec,
    adapter_class,
    attached,
    check_combination,
    disabled,
    make_adapter,
    register_adapter,
)
from kvsweep.config import ConfigError
from kvsweep.kvcache import base_layout, bytes_per_token
from kvsweep.losses import relative_reconstruction
from kvsweep.models import dims, freeze, pythia_config, split_qkv

from .conftest import neox_model

HIDDEN, LAYERS, HEADS, VOCAB = 64, 3, 4, 320

NAMES = sorted(ADAPTERS)
KA_NAMES = sorted(n for n, cls in ADAPTERS.items() if cls.family == "ka")


# ----------------------------------------------------------------------------- helpers


def model_(layers: int = LAYERS, seed: int = 0) -> GPTNeoXForCausalLM:
    return neox_model(layers=layers, hidden=HIDDEN, heads=HEADS, vocab=VOCAB, seed=seed)


def spec(name: str, **options) -> AdapterSpec:
    """The method with its ``example_options`` on the test models (a valid setting every method declares)."""
    d = dims(model_().config)
    return AdapterSpec.parse(name, **{**ADAPTERS[name].example_options(d), **options})


def build(model, name: str, **options) -> Adapter:
    return make_adapter(spec(name, **options), dims(model.config))


def input_ids(seed: int = 0, batch: int = 2, length: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


def attention_modules(model) -> list[tuple]:
    """Per layer what the three taps swap: the fused qkv projection, the config the attention reads its
    implementation from (the attention tap), the output projection."""
    return [(layer.attention.query_key_value, layer.attention.config, layer.attention.dense) for layer in model.gpt_neox.layers]


def assert_base_modules(model, originals) -> None:
    for i, (qkv, config, dense) in enumerate(originals):
        attn = model.gpt_neox.layers[i].attention
        assert attn.query_key_value is qkv, f"layer {i}: query_key_value not restored"
        assert attn.config is config is model.config, f"layer {i}: the attention's config not restored"
        assert attn.dense is dense, f"layer {i}: dense not restored"
        assert type(attn.query_key_value) is torch.nn.Linear and type(attn.dense) is torch.nn.Linear


@torch.no_grad()
def perturb(adapter: Adapter, seed: int = 1, scale: float = 0.1) -> None:
    """Move every adapter parameter away from its init, so the attached model surely differs from the base."""
    g = torch.Generator().manual_seed(seed)
    for p in adapter.parameters():
        p.add_(scale * torch.randn(p.shape, generator=g))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids, use_cache=False).loss


# ----------------------------------------------------------------------------- registry-wide invariants


def test_registry_holds_the_design_adapters():
    assert {"vdproj", "ka_residual", "ka_replace", "ka_gated"} <= set(ADAPTERS)
    for name, cls in ADAPTERS.items():
        assert issubclass(cls, Adapter)
        assert cls.name == name
        assert issubclass(cls.Options, AdapterOptions)
        assert isinstance(cls.family, str) and cls.family


@pytest.mark.parametrize("name", NAMES)
def test_only_adapter_parameters_train(name):
    model = model_()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapter = build(model, name)
    if adapter.param_formula() == 0:  # a training-free method: nothing trains, and the model has nothing to train
        assert list(adapter.parameters()) == []
        with attached(model, [adapter]):
            assert not any(p.requires_grad for p in model.parameters())
            assert not lm_loss(model, input_ids()).requires_grad
        assert all(torch.equal(p, base[n]) for n, p in model.named_parameters())
        return
    before = {n: p.detach().clone() for n, p in adapter.named_parameters()}
    ids = input_ids()
    got_grad: set[str] = set()
    with attached(model, [adapter]):
        trainable = [p for p in model.parameters() if p.requires_grad]
        # what the model would hand an optimizer is exactly the adapter's parameters
        assert {id(p) for p in trainable} == {id(p) for p in adapter.parameters()}
        opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)  # no decay: a change means a gradient step
        for _ in range(3):
            opt.zero_grad()
            lm_loss(model, ids).backward()
            got_grad |= {n for n, p in adapter.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
            opt.step()
    for n, p in model.named_parameters():
        assert not p.requires_grad, n
        assert p.grad is None, n
        assert torch.equal(p, base[n]), f"base parameter {n} changed"
    assert set(dict(model.named_parameters())) == set(base), "adapter parameters left behind in the model"
    assert all(p.requires_grad for p in adapter.parameters())
    changed = {n for n, p in adapter.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "no adapter parameter changed"
    assert got_grad <= changed, f"got a gradient but did not change: {sorted(got_grad - changed)}"


@pytest.mark.parametrize("name", NAMES)
def test_attached_context_manager_restores_the_base(name):
    model, ids = model_(), input_ids()
    ref, originals = logits(model, ids), attention_modules(model)
    adapter = build(model, name)
    perturb(adapter)
    with attached(model, [adapter]) as adapters:
        assert adapters == [adapter]
        assert adapter.attached
        assert attention_modules(model) != originals, "attaching swapped no module"
        assert not torch.equal(logits(model, ids), ref), "the attached adapter does not change the output"
    assert not adapter.attached
    assert_base_modules(model, originals)
    assert torch.equal(logits(model, ids), ref)


@pytest.mark.parametrize("name", NAMES)
def test_attach_and_detach_restore_the_base(name):
    model, ids = model_(), input_ids()
    ref, originals = logits(model, ids), attention_modules(model)
    n_params = sum(p.numel() for p in model.parameters())
    adapter = build(model, name)
    perturb(adapter)
    for _ in range(2):  # detach, then attach again
        adapter.attach(model)
        with pytest.raises(RuntimeError, match="already attached"):
            adapter.attach(model)
        assert sum(p.numel() for p in model.parameters()) == n_params + adapter.trainable_params()
        assert not torch.equal(logits(model, ids), ref)
        adapter.detach()
        assert not adapter.attached
        assert_base_modules(model, originals)
        assert sum(p.numel() for p in model.parameters()) == n_params
        assert torch.equal(logits(model, ids), ref)
    adapter.detach()  # detaching a detached adapter is harmless
    assert_base_modules(model, originals)


@pytest.mark.parametrize("name", NAMES)
def test_attached_detaches_when_the_block_raises(name):
    model, ids = model_(), input_ids()
    ref, originals = logits(model, ids), attention_modules(model)
    adapter = build(model, name)
    with pytest.raises(KeyError):
        with attached(model, [adapter]):
            raise KeyError("boom")
    assert not adapter.attached
    assert_base_modules(model, originals)
    assert torch.equal(logits(model, ids), ref)


@pytest.mark.parametrize("name", NAMES)
def test_disabled_is_exactly_the_base(name):
    model, ids = model_(), input_ids()
    ref = logits(model, ids)
    adapter = build(model, name)
    perturb(adapter)
    with attached(model, [adapter]):
        adapted = logits(model, ids)
        assert not torch.equal(adapted, ref)
        with disabled([adapter]):
            assert torch.equal(logits(model, ids), ref)
        assert torch.equal(logits(model, ids), adapted), "adapter not re-enabled after disabled()"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("layers", ["all", "last", (0,), (0, 2)])
def test_trainable_parameters_match_param_formula(name, layers):
    model = model_()
    adapter = build(model, name, layers=layers)
    expected_layers = {"all": (0, 1, 2), "last": (2,)}.get(layers, layers)
    assert adapter.layers == expected_layers
    assert adapter.trainable_params() == adapter.param_formula() == sum(p.numel() for p in adapter.parameters())
    with attached(model, [adapter]):
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == adapter.param_formula()


@pytest.mark.parametrize("name", NAMES)
def test_kv_layout_changes_only_the_adapters_layers(name):
    model = model_()
    adapter = build(model, name, layers=(1,))
    base = base_layout(LAYERS, HIDDEN)
    layout = adapter.kv_layout(base)
    assert len(layout) == LAYERS
    assert layout[0] == base[0] and layout[2] == base[2]
    assert layout[1] != base[1]
    assert base == base_layout(LAYERS, HIDDEN), "kv_layout modified its input"


@pytest.mark.parametrize("name", NAMES)
def test_layer_index_out_of_range_is_rejected(name):
    d = dims(model_().config)
    for bad in ((LAYERS,), (0, 7), -1):
        with pytest.raises(ConfigError, match="layers") as e:
            make_adapter(spec(name, layers=bad), d)
        assert f"0..{LAYERS - 1}" in str(e.value)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", ["first", "1,1", [], "0,x"])
def test_malformed_layers_are_rejected(name, bad):
    with pytest.raises(ConfigError, match="layers"):
        spec(name, layers=bad)


@pytest.mark.parametrize("name", NAMES)
def test_no_op_setting_reproduces_the_base(name):
    model, ids = model_(), input_ids()
    noop = ADAPTERS[name].noop_options(dims(model.config))
    if noop is None:
        pytest.skip(f"{name} declares no no-op setting")
    ref = logits(model, ids)
    adapter = make_adapter(AdapterSpec.parse(name, **noop), dims(model.config))
    with attached(model, [adapter]):
        out = logits(model, ids)
    assert max_diff(out, ref) < 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_declared_layout_is_what_the_latent_cache_holds(name):
    from kvsweep.latent import measure_bytes

    model = model_()
    d = dims(model.config)
    adapter = build(model, name)
    declared = adapter.kv_layout(base_layout(d.layers, d.hidden))
    for dtype in ("float16", "float32"):
        got = measure_bytes(model, [adapter], dtype)  # raises CacheMismatchError where the tensors differ
        assert got["measured_bytes_per_token"] == bytes_per_token(declared, dtype)


@pytest.mark.parametrize("name", ["vdproj", *KA_NAMES])
def test_fixed_bytes_of_the_methods_here_are_their_weights_at_the_cache_dtype(name):
    adapter = build(model_(), name)
    weights = sum(p.numel() for p in adapter.parameters())
    assert adapter.fixed_bytes("float16") == 2 * weights and adapter.fixed_bytes("float32") == 4 * weights


@pytest.mark.parametrize("name", NAMES)
def test_every_option_has_a_flag_a_space_key_and_a_column(name):
    from kvsweep.adapters.options import option_columns, option_fields, space_keys
    from kvsweep.cli import build_parser

    cls = ADAPTERS[name]
    flags = build_parser()._subparsers._group_actions[0].choices["train"]._option_string_actions
    columns = dict(option_columns())
    for f in option_fields(cls):
        assert f"--{name}.{f.name.replace('_', '-')}" in flags
        assert f"{name}.{f.name}" in space_keys()
        assert f"{name}.{f.name}" in columns
    assert cls.family in space_keys()


# ----------------------------------------------------------------------------- no-op settings and KA variants


@pytest.mark.parametrize("target", ["v", "k", "kv"])
@pytest.mark.parametrize("bias", [True, False])
def test_vdproj_full_rank_identity_reproduces_the_base(target, bias):
    model, ids = model_(), input_ids()
    ref = logits(model, ids)
    adapter = build(model, "vdproj", rank=HIDDEN, init="identity", target=target, bias=bias)
    with attached(model, [adapter]):
        out = logits(model, ids)
        rec = adapter.reconstruction_loss()
    assert max_diff(out, ref) < 1e-5
    assert rec is not None and rec.item() < 1e-10


def test_vdproj_identity_below_full_rank_changes_the_output():
    model, ids = model_(), input_ids()
    ref = logits(model, ids)
    adapter = build(model, "vdproj", rank=HIDDEN // 2, init="identity")
    with attached(model, [adapter]):
        assert max_diff(logits(model, ids), ref) > 1e-4


def test_ka_gated_starts_at_the_base_and_moves_after_one_step():
    model, ids = model_(), input_ids()
    ref = logits(model, ids)
    adapter = build(model, "ka_gated")
    gates = [m.gate for m in adapter.modules() if getattr(m, "gate", None) is not None]
    assert gates and all(torch.equal(g, torch.zeros_like(g)) for g in gates)
    with attached(model, [adapter]):
        assert max_diff(logits(model, ids), ref) < 1e-5
        opt = torch.optim.AdamW(adapter.parameters(), lr=1e-2)
        lm_loss(model, ids).backward()
        opt.step()
        assert any(g.item() != 0 for g in gates)
        assert max_diff(logits(model, ids), ref) > 1e-6


@pytest.mark.parametrize("name", ["ka_replace", "ka_residual"])
def test_ka_replace_and_residual_change_the_output_at_init(name):
    model, ids = model_(), input_ids()
    ref = logits(model, ids)
    with attached(model, [build(model, name)]):
        assert max_diff(logits(model, ids), ref) > 1e-4


def test_ka_replace_and_residual_differ_from_each_other():
    model, ids = model_(), input_ids()
    outs = []
    for name in ("ka_replace", "ka_residual"):
        torch.manual_seed(0)  # same KA weights; only the combination differs
        with attached(model, [build(model, name)]):
            outs.append(logits(model, ids))
    assert max_diff(*outs) > 1e-4


# ----------------------------------------------------------------------------- Pythia-70M numbers


@pytest.fixture(scope="module")
def pythia_70m_meta():
    with torch.device("meta"):
        return freeze(GPTNeoXForCausalLM(pythia_config("70m")))


def test_ka_residual_on_pythia_70m_counts_as_in_the_seed(pythia_70m_meta):
    model = pythia_70m_meta
    d = dims(model.config)
    assert (d.layers, d.hidden, d.heads) == (6, 512, 8)
    assert sum(p.numel() for p in model.parameters()) == 70_426_624
    adapter = make_adapter(AdapterSpec.parse("ka_residual"), d)
    assert adapter.layers == (5,)
    assert adapter.param_formula() == adapter.trainable_params() == 3 * (512 * 512 + 512) + 2 * 512 == 788_992
    with attached(model, [adapter]):
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 788_992
        assert sum(p.numel() for p in model.parameters()) == 71_215_616 == 70_426_624 + 788_992
    assert sum(p.numel() for p in model.parameters()) == 70_426_624


def test_vdproj_r320_on_pythia_70m_parameter_count(pythia_70m_meta):
    d = dims(pythia_70m_meta.config)
    adapter = make_adapter(AdapterSpec.parse("vdproj", rank=320), d)
    assert adapter.layers == tuple(range(6))
    assert adapter.param_formula() == adapter.trainable_params() == 6 * (2 * 512 * 320 + 320 + 512) == 1_971_072


@pytest.mark.parametrize(
    "options, per_layer, n_layers",
    [
        ({"rank": 1}, 2 * 64 * 1 + 1 + 64, 3),
        ({"rank": 8, "bias": False}, 2 * 64 * 8, 3),
        ({"rank": 8, "target": "kv"}, 2 * (2 * 64 * 8 + 8 + 64), 3),
        ({"rank": 8, "target": "k", "layers": (1,)}, 2 * 64 * 8 + 8 + 64, 1),
        ({"rank": 64, "target": "kv", "bias": False, "layers": "0,2"}, 2 * 2 * 64 * 64, 2),
        ({"rank": 32, "layers": "last"}, 2 * 64 * 32 + 32 + 64, 1),
    ],
)
def test_vdproj_param_formula_by_hand(options, per_layer, n_layers):
    model = model_()
    adapter = make_adapter(AdapterSpec.parse("vdproj", **options), dims(model.config))
    assert adapter.param_formula() == adapter.trainable_params() == per_layer * n_layers


@pytest.mark.parametrize("name", KA_NAMES)
@pytest.mark.parametrize("layers", ["last", "all", (0, 1)])
def test_ka_param_formula_by_hand(name, layers):
    model = model_()
    adapter = build(model, name, layers=layers)
    per_layer = 3 * (64 * 64 + 64) + 2 * 64 + (1 if name == "ka_gated" else 0)
    assert adapter.param_formula() == adapter.trainable_params() == per_layer * len(adapter.layers)


def pythia_70m_bytes(adapter_name: str, **options) -> int:
    d = dims(pythia_config("70m"))
    adapter = make_adapter(AdapterSpec.parse(adapter_name, **options), d)
    return bytes_per_token(adapter.kv_layout(base_layout(d.layers, d.hidden)), "float16")


def test_kv_bytes_on_pythia_70m():
    d = dims(pythia_config("70m"))
    assert bytes_per_token(base_layout(d.layers, d.hidden), "float16") == 12_288
    assert pythia_70m_bytes("vdproj", rank=320) == 9_984
    assert pythia_70m_bytes("vdproj", rank=320, target="k") == 9_984
    assert pythia_70m_bytes("vdproj", rank=320, target="kv") == 6 * (320 + 320) * 2
    assert pythia_70m_bytes("vdproj", rank=320, layers=(0, 1)) == 12_288 - 2 * (512 - 320) * 2
    for name in KA_NAMES:
        assert pythia_70m_bytes(name) == 12_288 + 2 * 512 * 2


def test_composed_kv_layout_on_pythia_70m():
    d = dims(pythia_config("70m"))
    v = make_adapter(AdapterSpec.parse("vdproj", rank=320), d)
    ka = make_adapter(AdapterSpec.parse("ka_residual"), d)
    layout = base_layout(d.layers, d.hidden)
    for a in (v, ka):
        layout = a.kv_layout(layout)
    assert bytes_per_token(layout) == 9_984 + 2 * 512 * 2


# ----------------------------------------------------------------------------- PCA init


def captured_v(model, samples: np.ndarray) -> dict[int, torch.Tensor]:
    """V of every layer of the (unadapted) model on ``samples``, (N*T, d) float64, via split_qkv."""
    out: dict[int, torch.Tensor] = {}
    hooks = [
        layer.attention.query_key_value.register_forward_hook(
            lambda mod, inp, qkv, i=i: out.__setitem__(i, split_qkv(qkv, HEADS)[2].detach().reshape(-1, HIDDEN).double())
        )
        for i, layer in enumerate(model.gpt_neox.layers)
    ]
    try:
        logits(model, torch.from_numpy(samples))
    finally:
        for h in hooks:
            h.remove()
    return out


def optimal_rank_r_error(v: torch.Tensor, r: int) -> float:
    """Best affine rank-r reconstruction error of V relative to its second moment: smallest d-r eigenvalues
    of the covariance over the mean squared norm."""
    mean = v.mean(0)
    cov = (v - mean).T @ (v - mean) / len(v)
    eig = torch.linalg.eigvalsh(cov)  # ascending
    return (eig[: v.shape[1] - r].sum() / (v.pow(2).sum() / len(v))).item()


@pytest.fixture(scope="module")
def pca_setup():
    model = model_(layers=2, seed=3)
    samples = np.random.default_rng(0).integers(0, VOCAB, size=(8, 32))
    return model, samples, captured_v(model, samples)


def vdproj_error(adapter, layer: int, v: torch.Tensor) -> float:
    comp = adapter.per_layer[str(layer)].v
    with torch.no_grad():
        return relative_reconstruction(v.float(), comp(v.float())).item()


@pytest.mark.parametrize("rank", [8, 16])
def test_pca_init_is_the_optimal_rank_r_reconstruction(pca_setup, rank):
    model, samples, vs = pca_setup
    pca = build(model, "vdproj", rank=rank, init="pca")
    rand = build(model, "vdproj", rank=rank, init="random")
    with attached(model, [pca]):
        pca.calibrate(model, samples)
        # layer 0's V does not depend on the adapter: the live forward pass reconstructs it optimally too
        logits(model, torch.from_numpy(samples))
        live = pca.per_layer["0"].v.last_rec.item()
    with attached(model, [rand]):
        rand.calibrate(model, samples)  # a no-op for init random
    for layer, v in vs.items():
        best = optimal_rank_r_error(v, rank)
        assert 0.01 < best < 0.9  # the test is meaningful: rank r loses something, but not everything
        err = vdproj_error(pca, layer, v)
        assert err == pytest.approx(best, rel=1e-3, abs=1e-6), f"layer {layer}"
        assert err < 0.5 * vdproj_error(rand, layer, v), f"layer {layer}: PCA no better than random"
    assert live == pytest.approx(optimal_rank_r_error(vs[0], rank), rel=1e-3)


def test_pca_init_at_full_rank_reconstructs_v(pca_setup):
    model, samples, vs = pca_setup
    adapter = build(model, "vdproj", rank=HIDDEN, init="pca")
    ids = torch.from_numpy(samples)
    ref = logits(model, ids)
    with attached(model, [adapter]):
        adapter.calibrate(model, samples)
        out = logits(model, ids)
    for layer, v in vs.items():
        assert vdproj_error(adapter, layer, v) < 1e-8, f"layer {layer}"
    assert max_diff(out, ref) < 1e-4


def test_pca_calibration_needs_an_attached_adapter(pca_setup):
    model, samples, _ = pca_setup
    adapter = build(model, "vdproj", rank=8, init="pca")
    with pytest.raises(RuntimeError, match="attach"):
        adapter.calibrate(model, samples)


def test_calibrate_leaves_random_init_alone(pca_setup):
    model, samples, _ = pca_setup
    adapter = build(model, "vdproj", rank=8, init="random")
    before = {n: p.detach().clone() for n, p in adapter.named_parameters()}
    with attached(model, [adapter]):
        adapter.calibrate(model, samples)
    assert all(torch.equal(p, before[n]) for n, p in adapter.named_parameters())


# ----------------------------------------------------------------------------- registry and options


def test_register_adapter_rejects_a_duplicate_name():
    snapshot = dict(ADAPTERS)
    original = ADAPTERS["vdproj"]
    try:
        with pytest.raises(ValueError, match="vdproj"):

            @register_adapter("vdproj")
            class Duplicate(original):  # noqa: F811
                pass

        assert ADAPTERS == snapshot
        assert ADAPTERS["vdproj"] is original and original.name == "vdproj"
    finally:
        ADAPTERS.clear()
        ADAPTERS.update(snapshot)


def test_adapter_class_lists_the_valid_names():
    assert adapter_class("vdproj") is ADAPTERS["vdproj"]
    with pytest.raises(ConfigError, match="nope") as e:
        adapter_class("nope")
    for name in NAMES:
        assert name in str(e.value)
    with pytest.raises(ConfigError):
        AdapterSpec.parse("nope")


@pytest.mark.parametrize("rank", [0, -3, 2.5, True, "8"])
def test_bad_rank_is_rejected(rank):
    with pytest.raises(ConfigError, match="rank"):
        AdapterSpec.parse("vdproj", rank=rank)


def test_vdproj_needs_a_rank():
    with pytest.raises(ConfigError, match="rank"):
        AdapterSpec.parse("vdproj")


def test_rank_above_hidden_size_is_rejected_with_dims():
    d = dims(model_().config)
    s = AdapterSpec.parse("vdproj", rank=HIDDEN + 1)  # valid until the model's width is known
    with pytest.raises(ConfigError, match="rank") as e:
        make_adapter(s, d)
    assert str(HIDDEN) in str(e.value)
    assert make_adapter(AdapterSpec.parse("vdproj", rank=HIDDEN), d).options.rank == HIDDEN


@pytest.mark.parametrize("field, value", [("target", "q"), ("target", "V"), ("init", "svd"), ("init", "")])
def test_unknown_target_or_init_is_rejected(field, value):
    with pytest.raises(ConfigError, match=field):
        AdapterSpec.parse("vdproj", rank=8, **{field: value})


@pytest.mark.parametrize("name, options, unknown", [("vdproj", {"rank": 8, "ranks": 4}, "ranks"), ("ka_residual", {"rank": 8}, "rank"), ("ka_gated", {"gate": 1.0}, "gate")])
def test_unknown_option_is_rejected_by_name(name, options, unknown):
    with pytest.raises(ConfigError, match=repr(unknown)) as e:
        AdapterSpec.parse(name, **options)
    assert "layers" in str(e.value)  # lists the valid options


def test_spec_round_trips_through_to_dict():
    s = AdapterSpec.parse("vdproj", rank=16, layers="0,2", target="kv", init="pca")
    d = s.to_dict()
    assert d["name"] == "vdproj" and d["rank"] == 16 and d["layers"] == (0, 2) and d["target"] == "kv"
    name = d.pop("name")
    assert AdapterSpec.parse(name, **d) == s


# ----------------------------------------------------------------------------- combinations


@pytest.mark.parametrize("a", KA_NAMES)
@pytest.mark.parametrize("b", KA_NAMES)
def test_two_ka_variants_cannot_be_combined(a, b):
    with pytest.raises(ConfigError, match="cannot be combined"):
        check_combination((spec(a), spec(b)))


def test_two_vdproj_cannot_be_combined():
    with pytest.raises(ConfigError):
        check_combination((spec("vdproj"), spec("vdproj", rank=4)))


@pytest.mark.parametrize("ka", KA_NAMES)
def test_vdproj_with_one_ka_variant_is_accepted(ka):
    check_combination((spec("vdproj"), spec(ka)))
    check_combination((spec(ka), spec("vdproj")))
    check_combination((spec(ka),))
    check_combination(())


@pytest.mark.parametrize("ka", KA_NAMES)
def test_vdproj_composed_with_ka_attaches_and_detaches_cleanly(ka):
    model, ids = model_(), input_ids()
    ref, originals = logits(model, ids), attention_modules(model)
    v, k = build(model, "vdproj", layers="all"), build(model, ka, layers="all")
    perturb(k)
    outs = []
    for order in ([v, k], [k, v]):
        with attached(model, order):
            assert v.attached and k.attached
            assert sum(p.numel() for p in model.parameters() if p.requires_grad) == v.param_formula() + k.param_formula()
            outs.append(logits(model, ids))
            assert not torch.equal(outs[-1], ref)
            with disabled(order):
                assert torch.equal(logits(model, ids), ref)
        assert not v.attached and not k.attached
        assert_base_modules(model, originals)
        assert torch.equal(logits(model, ids), ref)
    assert max_diff(*outs) < 1e-5  # the attach order does not matter


def test_two_ka_variants_on_the_same_layer_fail_to_attach_and_leave_the_base():
    model, ids = model_(), input_ids()
    ref, originals = logits(model, ids), attention_modules(model)
    a, b = build(model, KA_NAMES[0]), build(model, KA_NAMES[-1])
    with pytest.raises(ConfigError, match="same point"):
        with attached(model, [a, b]):
            pass
    assert not a.attached and not b.attached
    assert_base_modules(model, originals)
    assert torch.equal(logits(model, ids), ref)


@pytest.fixture
def typed_method():
    """A method whose options have the types a method may declare: optional, float, bool, tuple."""
    from dataclasses import dataclass as dc

    from kvsweep.adapters import option
    from kvsweep.kvcache import Layout

    @dc(frozen=True)
    class TypedOptions(AdapterOptions):
        bits: int | None = option(None, "bits, or None for full precision")
        scale: float = option(1.0, "a scale")
        signed: bool = option(False, "signed")
        weights: tuple[float, ...] = option((), "weights per group")

    @register_adapter("typed")
    class Typed(Adapter):
        Options = TypedOptions
        family = "typed"
        tap = "attention_output"

        def build(self) -> None:
            self.per_layer = torch.nn.ModuleDict({str(i): torch.nn.Identity() for i in self.layers})

        def kv_layout(self, layout: Layout) -> Layout:
            return layout

        def param_formula(self) -> int:
            return 0

    yield Typed
    ADAPTERS.pop("typed")


def test_options_of_every_type_get_flags_space_keys_and_columns_of_their_type(typed_method):
    import pyarrow as pa

    from kvsweep.adapters.options import option_columns, option_values, specs_from_point
    from kvsweep.args import adapter_specs
    from kvsweep.cli import build_parser
    from kvsweep.results import table, trial_schema

    columns = dict(option_columns())
    assert columns["typed.bits"] == pa.int64() and columns["typed.scale"] == pa.float64()
    assert columns["typed.signed"] == pa.bool_() and columns["typed.weights"] == pa.string()
    from_flags = adapter_specs(build_parser().parse_args(["train", "--out", "x", "--typed.bits", "4", "--typed.weights", "0.5,0.25",
                                                          "--typed.signed"]))
    from_space = specs_from_point({"typed.bits": 4, "typed.weights": [0.5, 0.25], "typed.signed": True})
    from_tune = specs_from_point({"typed.bits": 4, "typed.weights": "0.5,0.25", "typed.signed": True})  # a list as Tune holds it
    assert from_flags == from_space == from_tune
    (spec,) = from_space
    assert spec.options.bits == 4 and spec.options.weights == (0.5, 0.25)
    assert {spec} and option_values(from_space) == {"typed.layers": None, "typed.bits": 4, "typed.scale": 1.0, "typed.signed": True,
                                                    "typed.weights": "0.5,0.25"}
    row = {"trial_id": "t", **option_values(from_space)}
    tbl = table([row], trial_schema(option_columns()))
    assert tbl.column("typed.bits").to_pylist() == [4] and tbl.column("typed.weights").to_pylist() == ["0.5,0.25"]
    with pytest.raises(ConfigError, match="weights must be tuple"):
        AdapterSpec.parse("typed", weights="0.5,x")


def test_an_alias_of_another_family_is_refused_at_registration():
    class Clash(Adapter):
        Options = AdapterOptions
        family = "clash"
        tap = "qkv"
        aliases = {"rank": "layers"}

    with pytest.raises(ValueError, match="alias 'rank' is vdproj's already"):
        register_adapter("clash")(Clash)
    assert "clash" not in ADAPTERS
