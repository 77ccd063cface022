"""Checkpoints: a bitwise round trip, and no code run from a crafted or old pickled checkpoint."""

from __future__ import annotations

import json
import math
import pathlib
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from kvsweep import checkpoint as kckpt
from kvsweep.adapters import AdapterSpec, make_adapter
from kvsweep.checkpoint import (CheckpointError, has_checkpoint, load_best_adapter_states, load_checkpoint, save_checkpoint,
                                saved_epoch)
from kvsweep.cli import main
from kvsweep.config import DataCfg, ModelCfg, TrainCfg
from kvsweep.latent.trial import load_trial
from kvsweep.models import dims
from kvsweep.train import TrialCfg, run_trial_to_folder

from .conftest import SAMPLE_TEXT, neox_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
NEW_FILES = (kckpt.STATE_FILE, kckpt.ADAPTERS_FILE, kckpt.BEST_ADAPTERS_FILE, kckpt.OPTIMIZER_FILE, kckpt.RNG_FILE)
SPECS = (AdapterSpec.parse("vdproj", rank=16), AdapterSpec.parse("ka_gated"))
TRIAL_STATE = {
    "epoch": 2, "step": 6, "best_val_ppl": 12.5, "best_epoch": 1, "bad_epochs": 1,
    "history": [{"epoch": 1, "train_ppl": math.nan, "val_ppl": 12.5, "loss_kl": math.inf, "w_rec": -math.inf,
                 "early_stopped": False, "kv_bytes_per_token": 384, "tiny": 5e-324, "third": 1 / 3},
                {"epoch": 2, "train_ppl": 14.0000000000001, "val_ppl": 13.0, "early_stopped": False}],
    "best_positions": [{"lo": 0, "hi": 16, "ppl": math.nan, "tokens": 0, "nll_sum": 0.0}],
}


# ----------------------------------------------------------------------------- a real checkpoint


def _adapters(seed: int) -> list[torch.nn.Module]:
    torch.manual_seed(seed)
    d = dims(neox_model().config)
    adapters = [make_adapter(s, d) for s in SPECS]
    for a in adapters:  # away from init (ka_gated's gate starts at 0)
        for p in a.parameters():
            p.data.normal_()
    return adapters


def _trained(seed: int) -> tuple[list[torch.nn.Module], torch.optim.AdamW]:
    """Adapters and an AdamW with state after three steps."""
    adapters = _adapters(seed)
    params = [p for a in adapters for p in a.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    for _ in range(3):
        opt.zero_grad()
        sum((p.float() ** 2).sum() for p in params).backward()
        opt.step()
    return adapters, opt


def _states(adapters) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in a.state_dict().items()} for a in adapters]


def _bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
                                        and torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8))
                                        for k in a)


def _same(a, b) -> bool:
    """Equal data, NaN equal to NaN, types included (an int stays an int, a float a float)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture
def saved(tmp_path):
    """A checkpoint folder with best weights, and what it was written from."""
    adapters, opt = _trained(0)
    best = _states(_adapters(7))
    torch.manual_seed(123)
    np.random.seed(456)
    np.random.standard_normal()  # numpy's cached Gaussian is part of its state
    rng = (torch.get_rng_state(), np.random.get_state())
    folder = tmp_path / "checkpoint"
    save_checkpoint(folder, adapters, opt, TRIAL_STATE, best)
    return folder, adapters, opt, best, rng


def test_round_trip_is_bitwise(saved):
    folder, adapters, opt, best, (torch_rng, numpy_rng) = saved
    fresh, fresh_opt = _trained(1)  # other weights, other optimizer state
    torch.manual_seed(0)
    np.random.seed(0)
    trial = load_checkpoint(folder, fresh, fresh_opt)
    assert _same(trial, TRIAL_STATE)
    assert all(_bitwise(a.state_dict(), b.state_dict()) for a, b in zip(fresh, adapters))
    want, got = opt.state_dict(), fresh_opt.state_dict()
    assert want["state"].keys() == got["state"].keys() and len(want["state"]) == len(opt.param_groups[0]["params"])
    assert all(_bitwise(want["state"][p], got["state"][p]) for p in want["state"])
    assert _same(got["param_groups"], want["param_groups"]) and isinstance(got["param_groups"][0]["betas"], tuple)
    assert torch.equal(torch.get_rng_state(), torch_rng)
    now = np.random.get_state()
    assert now[0] == numpy_rng[0] and np.array_equal(now[1], numpy_rng[1]) and now[2:] == numpy_rng[2:]
    assert numpy_rng[3] == 1  # the cached Gaussian was there to restore
    states, which = load_best_adapter_states(folder)
    assert which == "best epoch" and all(_bitwise(s, b) for s, b in zip(states, best))
    assert saved_epoch(folder) == 2 and has_checkpoint(folder)


def test_layout_named_keys_and_no_pickle(saved):
    folder, adapters, opt, _, _ = saved
    assert sorted(p.name for p in folder.iterdir()) == sorted(NEW_FILES)
    keys = set(load_file(folder / kckpt.ADAPTERS_FILE))
    assert {"adapter.0.per_layer.0.v.down.weight", "adapter.1.per_layer.1.gate"} <= keys
    assert all(k.startswith(("adapter.0.", "adapter.1.")) for k in keys)
    assert set(load_file(folder / kckpt.BEST_ADAPTERS_FILE)) == keys
    n = len(opt.param_groups[0]["params"])
    assert set(load_file(folder / kckpt.OPTIMIZER_FILE)) == {f"optimizer.state.{p}.{k}" for p in range(n)
                                                            for k in ("exp_avg", "exp_avg_sq", "step")}
    assert set(load_file(folder / kckpt.RNG_FILE)) == {"rng.torch"}
    state = json.loads((folder / kckpt.STATE_FILE).read_text())
    assert state["version"] == 1 and state["adapters"] == 2 and state["trial"]["epoch"] == 2
    assert state["rng"]["numpy"]["bit_generator"] == "MT19937" and len(state["rng"]["numpy"]["key"]) == 624


def test_best_weights_carry_over_else_the_last_epochs(saved, tmp_path):
    folder, adapters, opt, best, _ = saved
    save_checkpoint(folder, adapters, opt, {**TRIAL_STATE, "epoch": 3}, None)  # not better: keeps its best
    restarted = tmp_path / "restarted"  # a restarted trial checkpoints into a new folder
    save_checkpoint(restarted, adapters, opt, {**TRIAL_STATE, "epoch": 4}, None, previous=folder)
    for f in (folder, restarted):
        states, which = load_best_adapter_states(f)
        assert which == "best epoch" and all(_bitwise(s, b) for s, b in zip(states, best))
    never = tmp_path / "never"
    save_checkpoint(never, adapters, None, {"epoch": 0}, None)
    states, which = load_best_adapter_states(never)
    assert which == "last epoch" and all(_bitwise(s, a.state_dict()) for s, a in zip(states, adapters))
    assert saved_epoch(restarted) == 4


# ----------------------------------------------------------------------------- damaged checkpoints


@pytest.mark.parametrize("name", NEW_FILES)
def test_truncated_file_is_a_clear_error_naming_it(saved, name):
    folder, _, _, _, _ = saved
    path = folder / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    fresh, fresh_opt = _trained(1)
    before = _states(fresh)
    reader = load_best_adapter_states if name == kckpt.BEST_ADAPTERS_FILE else lambda f: load_checkpoint(f, fresh, fresh_opt)
    with pytest.raises(CheckpointError, match=rf"{name} is not (a valid safetensors file|valid JSON) \(truncated or damaged\?\)"):
        reader(folder)
    assert all(_bitwise(a.state_dict(), b) for a, b in zip(fresh, before))  # nothing half-loaded


@pytest.mark.parametrize("name", [kckpt.STATE_FILE, kckpt.ADAPTERS_FILE, kckpt.OPTIMIZER_FILE, kckpt.RNG_FILE])
def test_missing_file_is_a_clear_error_naming_it(saved, name):
    folder, _, _, _, _ = saved
    (folder / name).unlink()
    fresh, fresh_opt = _trained(1)
    with pytest.raises(CheckpointError, match=rf"{name} not found"):
        load_checkpoint(folder, fresh, fresh_opt)


def test_weights_of_another_trial_are_refused(saved):
    folder, _, _, _, _ = saved
    d = dims(neox_model().config)
    other = [make_adapter(AdapterSpec.parse("vdproj", rank=8), d), make_adapter(SPECS[1], d)]
    with pytest.raises(CheckpointError, match=r"adapters\.safetensors, adapter 0: per_layer\.0\.v\.down\.weight has shape "
                                              r"\(16, 64\), the adapter \(8, 64\)"):
        load_checkpoint(folder, other, torch.optim.AdamW([p for a in other for p in a.parameters()]))
    with pytest.raises(CheckpointError, match="holds 2 adapters; this trial has 1"):
        load_checkpoint(folder, other[:1], None)


def _rewrite_json(path: pathlib.Path, change) -> None:
    state = json.loads(path.read_text())
    change(state)
    path.write_text(json.dumps(state))


FOREIGN = {
    "adapter key": (kckpt.ADAPTERS_FILE, lambda f: save_file({"adapter.01.per_layer.0.v.down.weight": torch.zeros(16, 64)}, f),
                    r"unexpected key 'adapter\.01\."),
    "optimizer key": (kckpt.OPTIMIZER_FILE, lambda f: save_file({"optimizer.state.99.exp_avg": torch.zeros(1)}, f),
                      r"unexpected key 'optimizer\.state\.99\.exp_avg'"),
    "torch rng": (kckpt.RNG_FILE, lambda f: save_file({"rng.torch": torch.zeros(3)}, f), r"no valid rng\.torch state"),
    "numpy rng": (kckpt.STATE_FILE, lambda f: _rewrite_json(f, lambda s: s["rng"]["numpy"].update(key=[-1])),
                  r"no valid numpy RNG state"),
    "version": (kckpt.STATE_FILE, lambda f: _rewrite_json(f, lambda s: s.update(version=2)), r"of version 2; this kvsweep reads version 1"),
    "epoch": (kckpt.STATE_FILE, lambda f: _rewrite_json(f, lambda s: s["trial"].update(epoch="2")), r"an epoch >= 0"),
}


@pytest.mark.parametrize("what", FOREIGN)
def test_well_formed_files_with_foreign_contents_are_refused(saved, what):
    folder, _, _, _, _ = saved
    name, write, message = FOREIGN[what]
    write(folder / name)
    fresh, fresh_opt = _trained(1)
    before = _states(fresh), torch.get_rng_state()
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(folder, fresh, fresh_opt)
    assert all(_bitwise(a.state_dict(), b) for a, b in zip(fresh, before[0])) and torch.equal(torch.get_rng_state(), before[1])


# ----------------------------------------------------------------------------- crafted pickles run nothing


class _Payload:
    """Unpickling this creates ``marker``: what a crafted checkpoint does in place of a shell command."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


@pytest.fixture
def model_folder(tmp_path, small_tokenizer):
    folder = tmp_path / "model"
    neox_model().save_pretrained(folder)
    small_tokenizer.save_pretrained(folder)
    return folder


def _crafted_trial(folder: pathlib.Path, model_folder: pathlib.Path, marker: pathlib.Path, layout: str) -> pathlib.Path:
    """A ``kvsweep train --out`` folder whose checkpoint is the payload: under the old pickle names
    (``old``), under every new name (``new``), or a genuine ``state.json`` beside payload tensor files
    (``tensors``)."""
    cfg = TrialCfg(model=ModelCfg(name=str(model_folder), device="cpu"), adapters=(AdapterSpec.parse("vdproj", rank=16),))
    ckpt = folder / "checkpoint"
    folder.mkdir(parents=True)
    (folder / "trial.json").write_text(json.dumps({"config": cfg.to_dict(), "status": "completed"}))
    if layout == "tensors":
        save_checkpoint(ckpt, [make_adapter(cfg.adapters[0], dims(neox_model().config))], None, {"epoch": 1}, None)
    ckpt.mkdir(exist_ok=True)
    names = {"old": kckpt.PICKLED_FILES, "new": NEW_FILES, "tensors": NEW_FILES[1:]}[layout]
    for name in names:
        torch.save(_Payload(marker), ckpt / name)
    return folder


def _refused(marker: pathlib.Path, call, match: str) -> None:
    try:
        with pytest.raises(CheckpointError, match=match):
            call()
    finally:
        assert not marker.exists(), "loading the checkpoint ran its code"


OLD_MESSAGE = r"holds a pickled checkpoint \(state\.pt\) of an older kvsweep; kvsweep no longer loads pickles, which can run code"
LAYOUTS = {"old": OLD_MESSAGE, "new": r"state\.json is not valid JSON", "tensors": r"\.safetensors is not a valid safetensors file"}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_loaders_run_no_code_from_a_crafted_checkpoint(tmp_path, model_folder, layout):
    marker = tmp_path / "pwned"
    ckpt = _crafted_trial(tmp_path / "trial", model_folder, marker, layout) / "checkpoint"
    adapters = [make_adapter(AdapterSpec.parse("vdproj", rank=16), dims(neox_model().config))]
    opt = torch.optim.AdamW([p for a in adapters for p in a.parameters()])
    _refused(marker, lambda: load_checkpoint(ckpt, adapters, opt), LAYOUTS[layout])
    _refused(marker, lambda: load_best_adapter_states(ckpt), LAYOUTS[layout])
    _refused(marker, lambda: load_trial(ckpt.parent, log=lambda m: None), LAYOUTS[layout])
    if layout != "tensors":  # a genuine state.json says which epoch it holds
        _refused(marker, lambda: saved_epoch(ckpt), LAYOUTS[layout])


@pytest.mark.parametrize("layout", ["old", "new"])
def test_kvsweep_train_resume_runs_no_code_from_a_crafted_checkpoint(tmp_path, model_folder, layout, capsys):
    marker = tmp_path / "pwned"
    out = _crafted_trial(tmp_path / "trial", model_folder, marker, layout)
    text = tmp_path / "corpus.txt"
    text.write_text(SAMPLE_TEXT * 4)
    args = ["train", "--model", str(model_folder), "--data", str(text), "--seq-len", "32", "--train-samples", "all",
            "--val-samples", "all", "--adapter", "vdproj", "--rank", "16", "--epochs", "2", "--out", str(out), "--resume"]
    try:
        code = main(args)
    finally:
        assert not marker.exists(), "resuming ran the checkpoint's code"
    assert code == 2 and re.search(LAYOUTS[layout], capsys.readouterr().err)
    cfg = TrialCfg(model=ModelCfg(name=str(model_folder), device="cpu"),
                   data=DataCfg(source=str(text), seq_len=32, train_samples="all"),
                   adapters=(AdapterSpec.parse("vdproj", rank=16),), train=TrainCfg(epochs=2))
    _refused(marker, lambda: run_trial_to_folder(cfg, out, resume=True, log=lambda m: None), LAYOUTS[layout])


@pytest.mark.parametrize("layout", ["old", "new"])
def test_kvsweep_cache_trial_runs_no_code_from_a_crafted_checkpoint(tmp_path, model_folder, layout, capsys):
    marker = tmp_path / "pwned"
    out = _crafted_trial(tmp_path / "trial", model_folder, marker, layout)
    try:
        code = main(["cache", "--trial", str(out), "--device", "cpu", "--context", "8", "--new-tokens", "2"])
    finally:
        assert not marker.exists(), "loading the trial ran the checkpoint's code"
    assert code == 2 and re.search(LAYOUTS[layout], capsys.readouterr().err)


def test_no_module_unpickles():
    """Nothing in kvsweep calls torch.load or pickle: a checkpoint is data, never code."""
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in sorted((ROOT / "src" / "kvsweep").rglob("*.py"))
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if "torch.load(" in line or "import pickle" in line or "pickle.load" in line]
    assert offenders == []
