"""A compression method defined here, in the test file alone, goes through everything a registered method does.

``halfv``: a learned per-channel scale of V whose cache holds V at half the values on one layer (each
pair of scaled channels averaged; read back by repeating each value twice). Nothing outside this file
names it: the registry gives it ``kvsweep train``/``kvsweep cache`` flags, search-space keys, result
columns and a report label; the registry-wide invariant tests run on it; it trains alone, in one point
of a Ray Tune sweep (whose trial processes get it from the driver), is decoded on the latent cache with
its bytes measured, and appears in the report.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass

import pyarrow.parquet as pq
import pytest
import torch

from kvsweep.adapters import ADAPTERS, Adapter, AdapterOptions, option, register_adapter
from kvsweep.config import ConfigError, DataCfg, ModelCfg, SweepCfg, TrainCfg
from kvsweep.kvcache import Layout, with_layers
from kvsweep.models import Dims

from . import test_adapters, test_latent


@dataclass(frozen=True)
class HalfVOptions(AdapterOptions):
    init_scale: float = option(1.0, "the scale every channel of V starts at (> 0)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.init_scale, (int, float)) or isinstance(self.init_scale, bool) or not self.init_scale > 0:
            raise ConfigError(f"init_scale must be a number > 0; got {self.init_scale!r}")


class HalfVLayer(torch.nn.Module):
    """``v -> decode(encode(v))``; its own codec for V: ``encode`` (B, n, d) -> (B, n, d/2), ``decode`` back."""

    def __init__(self, d: int, init_scale: float):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.full((d,), float(init_scale)))
        self.width = d // 2
        self.active = True

    def encode(self, v: torch.Tensor) -> torch.Tensor:
        x = v * self.scale
        return (x[..., 0::2] + x[..., 1::2]) / 2

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        return code.repeat_interleave(2, dim=-1)

    def codecs(self) -> dict:
        return {"v": self}

    def forward(self, k: torch.Tensor, v: torch.Tensor):
        return (k, v) if not self.active else (k, self.decode(self.encode(v)))


@pytest.fixture(scope="module", autouse=True)
def halfv():
    """Registered for this module's tests only (other modules see the registry as it ships)."""

    @register_adapter("halfv")
    class HalfV(Adapter):
        Options = HalfVOptions
        family = "halfv"
        tap = "qkv"
        default_layers = "last"

        def build(self) -> None:
            self.per_layer = torch.nn.ModuleDict({str(i): HalfVLayer(self.dims.hidden, self.options.init_scale) for i in self.layers})

        def kv_layout(self, layout: Layout) -> Layout:
            return with_layers(layout, self.layers, v=self.dims.hidden // 2)

        def param_formula(self) -> int:
            return self.dims.hidden * len(self.layers)

        @classmethod
        def example_options(cls, dims: Dims) -> dict:
            return {"init_scale": 1.5}

    yield HalfV
    ADAPTERS.pop("halfv")


def tiny_hidden() -> int:
    from kvsweep.models import dims, model_config, resolve_model

    return dims(model_config(resolve_model(ModelCfg(name="tiny")))).hidden


INVARIANTS = [
    test_adapters.test_only_adapter_parameters_train, test_adapters.test_attached_context_manager_restores_the_base,
    test_adapters.test_attach_and_detach_restore_the_base, test_adapters.test_attached_detaches_when_the_block_raises,
    test_adapters.test_disabled_is_exactly_the_base, test_adapters.test_kv_layout_changes_only_the_adapters_layers,
    test_adapters.test_layer_index_out_of_range_is_rejected, test_adapters.test_declared_layout_is_what_the_latent_cache_holds,
    test_adapters.test_every_option_has_a_flag_a_space_key_and_a_column,
]


@pytest.mark.parametrize("check", INVARIANTS, ids=lambda f: f.__name__)
def test_the_registry_wide_invariants_hold(check):
    check("halfv")


@pytest.mark.parametrize("layers", ["all", "last", (0,)])
def test_parameter_count(layers):
    test_adapters.test_trainable_parameters_match_param_formula("halfv", layers)


def test_it_decodes_on_the_latent_cache_as_it_trains():
    test_latent.test_every_method_decodes_as_the_training_time_forward(test_latent.small_model(), "halfv")


def test_kvsweep_train_and_kvsweep_cache(tmp_path, capsys):
    from kvsweep.cli import main

    out = tmp_path / "trial"
    assert main(["train", "--model", "tiny", "--data", "tiny", "--halfv.init-scale", "2", "--epochs", "1", "--train-samples", "16",
                 "--val-samples", "8", "--test-samples", "4", "--eval-seq-len", "256", "--lr", "1e-2", "--out", str(out)]) == 0
    record = json.loads((out / "trial.json").read_text())
    assert record["config"]["adapters"] == [{"name": "halfv", "layers": None, "init_scale": 2.0}]
    assert record["status"] == "completed" and record["epochs_run"] == 1
    d = tiny_hidden()
    assert record["trainable_params"] == d  # one layer's scale
    assert record["fixed_bytes"] == d * 2  # its weights at the cache's float16
    assert record["kv_bytes_per_token"] == record["kv_bytes_per_token_base"] - d // 2 * 2  # half of V on one layer, fp16
    assert main(["cache", "--trial", str(out), "--context", "16", "--new-tokens", "4", "--repeats", "1", "--out", str(tmp_path / "c")]) == 0
    cache = json.loads((tmp_path / "c" / "cache.json").read_text())
    assert cache["measured_bytes_per_token"] == cache["accounted_bytes_per_token"] == record["kv_bytes_per_token"]
    assert cache["greedy_identical"] is True and cache["methods"] == "halfv init_scale=2.0"
    assert cache["cache_tensors"][-1]["v"] == [1, 16 + 4, d // 2]  # the last layer caches d/2 values of V per token
    assert cache["cache_tensors"][0]["v"] == [1, 4, 16 + 4, d // 4]  # the others V of every head, (B, H, C, hs)
    capsys.readouterr()
    assert main(["train", "--halfv.init-scale", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "init_scale must be a number > 0" in capsys.readouterr().err


@pytest.mark.slow
def test_one_sweep_point_and_its_report(tmp_path):
    """A Ray Tune sweep of one point: its trial process gets the method from the driver (pickled by value)."""
    from kvsweep.tune import run_sweep

    sweep = SweepCfg(name="halfv", storage=str(tmp_path / "results"), model=ModelCfg(name="tiny"),
                     data=DataCfg(source="tiny", train_samples=16, val_samples=8), train=TrainCfg(epochs=1, lr=1e-2),
                     scheduler="fifo", report_dir=str(tmp_path / "reports"))
    run_sweep(sweep, {"halfv.init_scale": [2.0], "halfv.layers": ["1"]}, log=lambda m: None)
    folder = tmp_path / "results" / "halfv"
    (trial,) = pq.read_table(folder / "trials.parquet").to_pylist()
    assert trial["status"] == "completed", trial["error"]
    assert trial["adapters"] == "halfv" and trial["family"] == "halfv" and trial["variant"] == "halfv / lm"
    assert trial["halfv.init_scale"] == 2.0 and trial["halfv.layers"] == "1"
    assert trial["options"] == "halfv layers=1 init_scale=2.0"
    assert trial["fixed_bytes"] == tiny_hidden() * 2
    assert trial["kv_bytes_per_token"] == trial["kv_bytes_per_token_accounted"] == trial["kv_bytes_per_token_base"] - tiny_hidden() // 2 * 2
    with open(tmp_path / "reports" / "halfv" / "frontier.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["halfv.init_scale"] == "2.0" and row["variant"] == "halfv / lm"
    assert "halfv layers=1 init_scale=2.0" in (tmp_path / "reports" / "halfv" / "report.md").read_text()


def test_kvsweep_cache_builds_a_method_named_by_its_own_flags(tmp_path):
    from kvsweep.cli import main

    assert main(["cache", "--model", "tiny", "--halfv.init-scale", "2", "--context", "8", "--new-tokens", "2", "--repeats", "1",
                 "--out", str(tmp_path)]) == 0  # no --adapter: its flags name it
    cache = json.loads((tmp_path / "cache.json").read_text())
    assert cache["methods"] == "halfv init_scale=2.0" and cache["measured_bytes_per_token"] == cache["accounted_bytes_per_token"]


def test_two_methods_at_one_tap_of_one_layer_are_refused_before_anything_runs(tmp_path):
    from kvsweep.tune import validate_space

    sweep = SweepCfg(name="x", storage=str(tmp_path), data=DataCfg(train_samples=16, val_samples=8), train=TrainCfg(epochs=1))
    with pytest.raises(ConfigError, match="vdproj and halfv both act at the qkv tap of layer 3"):
        validate_space({"vdproj.rank": [8], "halfv.layers": ["3"]}, sweep)  # vdproj is on every layer by default
    validate_space({"vdproj.rank": [8], "vdproj.layers": ["0,1,2"], "halfv.layers": ["3"]}, sweep)
