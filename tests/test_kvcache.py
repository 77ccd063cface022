"""KV-cache accounting: pure functions over cache layouts (no model, no torch)."""

from __future__ import annotations

import pytest

from kvsweep.kvcache import CacheEntry, LayerKV, base_layout, bytes_per_token, layer_bytes, with_layers

# Pythia-70M: 6 layers, hidden 512.
L, D = 6, 512
ALL = tuple(range(L))


def test_base_pythia_70m_is_12288_bytes_per_token():
    layout = base_layout(L, D)
    assert len(layout) == L
    assert all(layer == LayerKV.of(k=D, v=D) for layer in layout)
    assert bytes_per_token(layout) == 6 * (512 + 512) * 2 == 12_288


def test_vdproj_r320_on_all_layers_is_9984():
    layout = with_layers(base_layout(L, D), ALL, v=320)
    assert all(layer == LayerKV.of(k=512, v=320) for layer in layout)
    assert bytes_per_token(layout) == 6 * (512 + 320) * 2 == 9_984


def test_vdproj_target_k_compresses_keys_only():
    layout = with_layers(base_layout(L, D), ALL, k=320)
    assert all(layer == LayerKV.of(k=320, v=512) for layer in layout)
    assert bytes_per_token(layout) == 6 * (320 + 512) * 2


def test_vdproj_target_kv_compresses_both():
    layout = with_layers(base_layout(L, D), ALL, k=320, v=320)
    assert all(layer == LayerKV.of(k=320, v=320) for layer in layout)
    assert bytes_per_token(layout) == 6 * (320 + 320) * 2 == 7_680


def test_vdproj_on_a_subset_of_layers_leaves_the_others_alone():
    layout = with_layers(base_layout(L, D), (0, 5), v=128)
    assert [layer["v"].values for layer in layout] == [128, 512, 512, 512, 512, 128]
    assert [layer["k"].values for layer in layout] == [512] * 6
    assert bytes_per_token(layout) == 12_288 - 2 * (512 - 128) * 2


def test_with_ka_adds_k_and_v_prime_on_its_layers():
    layout = with_layers(base_layout(L, D), (5,), ka_k=D, ka_v=D)
    assert layout[5] == LayerKV.of(k=512, v=512, ka_k=512, ka_v=512)
    assert all(layer == LayerKV.of(k=512, v=512) for layer in layout[:5])
    assert bytes_per_token(layout) == 12_288 + 2 * 512 * 2 == 14_336


def test_vdproj_and_ka_compose():
    layout = with_layers(with_layers(base_layout(L, D), ALL, v=320), (5,), ka_k=D, ka_v=D)
    assert bytes_per_token(layout) == 9_984 + 2 * 512 * 2


def test_layouts_are_not_modified_in_place():
    base = base_layout(L, D)
    with_layers(base, ALL, k=320, v=320)
    with_layers(base, ALL, ka_k=D, ka_v=D)
    assert bytes_per_token(base) == 12_288


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_layer_bytes_sum_to_bytes_per_token(dtype):
    layout = with_layers(with_layers(base_layout(L, D), (1, 2, 3), k=200, v=200), (4,), ka_k=D, ka_v=D)
    per_layer = layer_bytes(layout, dtype)
    assert len(per_layer) == L
    assert sum(per_layer) == bytes_per_token(layout, dtype)
    size = 4 if dtype == "float32" else 2
    assert per_layer[0] == (512 + 512) * size
    assert per_layer[1] == (200 + 200) * size
    assert per_layer[4] == 4 * 512 * size


def test_float32_doubles_the_bytes():
    layout = with_layers(base_layout(L, D), ALL, v=320)
    assert bytes_per_token(layout, "float32") == 2 * bytes_per_token(layout, "float16") == 19_968
    assert bytes_per_token(layout, "bfloat16") == bytes_per_token(layout, "float16")


def test_default_cache_dtype_is_float16():
    layout = base_layout(L, D)
    assert bytes_per_token(layout) == bytes_per_token(layout, "float16")


@pytest.mark.parametrize("dtype", ["int8", "fp16", "", "float128"])
def test_unknown_cache_dtype_raises(dtype):
    with pytest.raises(ValueError, match="cache_dtype"):
        bytes_per_token(base_layout(L, D), dtype)
    with pytest.raises(ValueError, match="cache_dtype"):
        layer_bytes(base_layout(L, D), dtype)


def test_an_entry_at_its_own_dtype_counts_its_own_bytes():
    layout = with_layers(base_layout(L, D), (0,), v=CacheEntry(256, "uint8"), v_scale=CacheEntry(8, "float16"))
    assert layer_bytes(layout, "float32")[0] == 512 * 4 + 256 * 1 + 8 * 2
    assert layout[0].names == ("k", "v", "v_scale")


def test_a_replaced_entry_keeps_its_place_and_a_new_one_is_appended():
    layer = LayerKV.of(k=D, v=D).replaced(v=64, extra=3)
    assert layer == LayerKV.of(k=D, v=64, extra=3) and layer.values == D + 67


@pytest.mark.parametrize("bad", [-1, 2.5, True])
def test_an_entry_needs_a_whole_number_of_values(bad):
    with pytest.raises(ValueError, match="whole number"):
        CacheEntry(bad)


def test_an_entry_dtype_must_be_known():
    with pytest.raises(ValueError, match="dtype"):
        CacheEntry(4, "float8")
