"""A trial out of kvsweep: loaded from a train folder or a sweep's results (its newest checkpoint, the best epoch's
weights), with the trial's own validation PPL reproduced."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from kvsweep.adapters import AdapterSpec, attached, disabled, make_adapter
from kvsweep.checkpoint import save_checkpoint
from kvsweep.config import ConfigError, DataCfg, MissingFileError, ModelCfg
from kvsweep.data import load_samples
from kvsweep.evaluate import evaluate
from kvsweep.latent.trial import (NoCheckpointError, TrialFigures, TrialRecord, UnknownTrialError, find_trial, load_any,
                                  load_record, load_sweep_trial, sweep_record)
from kvsweep.models import Dims
from kvsweep.report.errors import NotResultsError
from kvsweep.report.synthetic import write_synthetic

QUIET = {"log": lambda m: None}


def val_ppl(base, adapters, config: dict) -> float:
    """The validation PPL of ``adapters`` on ``base`` over the trial's own validation samples, batched as its trial was."""
    samples = load_samples(DataCfg(**config["data"]), base.tokenizer, **QUIET)
    with attached(base.model, adapters):
        return evaluate(base.model, samples.val, batch_size=config["train"]["eval_batch_size"]).ppl


def random_70m_config(*specs: AdapterSpec) -> dict:
    from kvsweep.train import TrialCfg

    return TrialCfg(model=ModelCfg(name="pythia-70m", random_init=True, device="cpu"), adapters=specs).to_dict()


# ----------------------------------------------------------------------------- finding a trial (fast)


def _synthetic_sweep(tmp_path: Path) -> tuple[Path, list[str]]:
    folder = write_synthetic(tmp_path / "sweep", 7)
    return folder, pq.read_table(folder / "trials.parquet").column("trial_id").to_pylist()


def test_a_sweep_trial_is_found_by_id_or_folder_name_with_its_newest_checkpoint(tmp_path):
    folder, ids = _synthetic_sweep(tmp_path)
    adapter = make_adapter(AdapterSpec.parse("vdproj", rank=4), Dims(layers=2, hidden=16, heads=2))
    tid = ids[3]
    for tune, n in (("tune-0", 0), ("tune-0", 1), ("tune-1", 0), ("tune-1", 12)):
        save_checkpoint(folder / tune / f"trial_{tid}_vdproj.rank=4" / f"checkpoint_{n:06d}", [adapter], None, {"epoch": n}, None)
    (folder / "tune-1" / f"trial_{ids[4]}_x").mkdir()  # a trial folder without any checkpoint
    by_id = sweep_record(folder, tid)
    assert by_id.trial_id == tid and by_id.checkpoint == folder / "tune-1" / f"trial_{tid}_vdproj.rank=4" / "checkpoint_000012"
    assert sweep_record(folder, f"trial_{tid}_vdproj.rank=4") == by_id
    assert find_trial(folder, tid) == by_id
    assert sweep_record(folder, ids[4]).checkpoint is None and sweep_record(folder, ids[5]).checkpoint is None
    row = pq.read_table(folder / "trials.parquet").to_pylist()[3]
    assert by_id.figures.best_val_ppl == row["best_val_ppl"] and by_id.figures.kv_bytes_per_token == row["kv_bytes_per_token"]
    assert by_id.config == json.loads(row["config"]) and by_id.sweep == row["sweep"]


def test_a_trial_that_is_not_there_is_refused_with_what_is(tmp_path):
    folder, ids = _synthetic_sweep(tmp_path)
    with pytest.raises(UnknownTrialError, match=f"no trial 'abc_00009'.*include {ids[0]}, .*7 in all"):
        load_sweep_trial(folder, "abc_00009", **QUIET)
    with pytest.raises(ConfigError, match=f"name one of its trials.*{ids[0]}"):
        load_any(folder, **QUIET)
    with pytest.raises(NotResultsError, match="no trials.parquet"):
        load_sweep_trial(tmp_path, ids[0], **QUIET)
    with pytest.raises(MissingFileError, match="neither trial.json.*nor trials.parquet"):
        load_any(tmp_path, **QUIET)
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "trial.json").write_text(json.dumps({"config": random_70m_config(AdapterSpec.parse("quant"))}))
    with pytest.raises(ConfigError, match="without a trial id"):
        load_any(tmp_path / "train", "x", **QUIET)


def test_weights_without_a_checkpoint_are_refused_and_a_method_without_weights_needs_none(tmp_path):
    stopped = TrialRecord(tmp_path, "t_00001", "s", random_70m_config(AdapterSpec.parse("vdproj", rank=32)), None,
                          TrialFigures(status="asha_stopped"))
    with pytest.raises(NoCheckpointError, match="trial t_00001 of .*asha_stopped.*no checkpoint"):
        load_record(stopped, **QUIET)
    free = TrialRecord(tmp_path, "t_00002", "s", random_70m_config(AdapterSpec.parse("quant", bits=4)), None, TrialFigures())
    base, (quant,), config = load_record(free, **QUIET)
    assert quant.name == "quant" and not quant.state_dict() and config == free.config and base.device.type == "cpu"


# ----------------------------------------------------------------------------- the trial's own PPL (slow)


@pytest.fixture(scope="module")
def train_folder(tiny_folder, tmp_path_factory) -> Path:
    """A ``kvsweep train`` trial on tiny: V-DProj rank 16, 16 train samples, 1 epoch, 8 validation and test samples."""
    from kvsweep.cli import main

    out = tmp_path_factory.mktemp("train") / "vdproj-r16"
    assert main(["train", "--model", "tiny", "--data", "tiny", "--vdproj.rank", "16", "--vdproj.init", "random",
                 "--train-samples", "16", "--val-samples", "8", "--test-samples", "8", "--eval-seq-len", "128",
                 "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_a_train_folder_reproduces_its_validation_ppl(train_folder):
    record = json.loads((train_folder / "trial.json").read_text())
    assert record["best_epoch"] == 1
    base, adapters, config = load_any(train_folder, **QUIET)
    assert config == record["config"]
    assert val_ppl(base, adapters, config) == record["best_val_ppl"]


@pytest.mark.slow
def test_a_sweep_trial_reproduces_its_validation_ppl(smoke_sweep, tmp_path):
    rows = {r["trial_id"]: r for r in pq.read_table(smoke_sweep / "trials.parquet").to_pylist()}
    tid, row = max(rows.items(), key=lambda kv: (kv[1]["epochs_run"], kv[0]))  # a trial that trained on after its first checkpoint
    base, adapters, config = load_sweep_trial(smoke_sweep, tid, device="cpu", **QUIET)
    assert config == json.loads(row["config"])
    assert val_ppl(base, adapters, config) == row["best_val_ppl"]
    copy = shutil.copytree(smoke_sweep, tmp_path / "sweep")  # the trial's checkpoints gone: refused, naming it
    for ckpt in copy.glob(f"tune-*/trial_{tid}_*/checkpoint_*"):
        shutil.rmtree(ckpt)
    with pytest.raises(NoCheckpointError, match=f"trial {tid} of .*no checkpoint"):
        load_sweep_trial(copy, tid, **QUIET)


# ----------------------------------------------------------------------------- kvsweep export and load_exported


@pytest.fixture(scope="module")
def allocated(tmp_path_factory):
    """A kvsweep train folder of lowrank with budget and allocation error, calibrated (ranks allocated from data), on a
    small GPT-NeoX saved in a local folder; and its adapter."""
    import numpy as np

    from kvsweep.models import dims
    from kvsweep.train import TrialCfg

    from .conftest import neox_model

    root = tmp_path_factory.mktemp("allocated")
    model = neox_model()  # 2 layers, d 64, 4 heads of 16
    model.save_pretrained(root / "model")
    spec = AdapterSpec.parse("lowrank", budget=0.2, allocation="error", group=4, calib_samples=4)
    adapter = make_adapter(spec, dims(model.config))
    uniform = dict(adapter.ranks)
    with attached(model, [adapter]):
        adapter.calibrate(model, np.random.default_rng(0).integers(0, 320, size=(4, 32)))
    assert adapter.ranks != uniform
    folder = root / "trial"
    folder.mkdir()
    config = TrialCfg(model=ModelCfg(name=str(root / "model"), device="cpu"), adapters=(spec,)).to_dict()
    (folder / "trial.json").write_text(json.dumps({"config": config, "status": "completed", "best_epoch": 0}))
    save_checkpoint(folder / "checkpoint", [adapter], None, {"epoch": 0}, [adapter.state_dict()])
    return folder, adapter


def test_allocated_ranks_export_as_options_and_load_without_calibration(allocated, tmp_path, monkeypatch):
    import kvsweep
    from kvsweep.adapters.lowrank import LowRank
    from kvsweep.cli import main

    folder, trained = allocated
    assert main(["export", str(folder), "-o", str(tmp_path / "export")]) == 0
    info = json.loads((tmp_path / "export" / "kvsweep_adapters.json").read_text())
    (written,) = info["adapters"]
    assert written["options"]["budget"] is None and written["options"]["allocation"] == "uniform"
    assert written["options"]["k_rank"] == [trained.ranks[i][0] for i in trained.layers]
    assert info["trained_as"][0]["budget"] == 0.2 and info["trained_as"][0]["allocation"] == "error"
    monkeypatch.setattr(LowRank, "calibrate", lambda *a, **k: pytest.fail("loading an export calibrated"))
    with kvsweep.load_exported(tmp_path / "export", device="cpu", **QUIET) as loaded:
        (a,) = loaded.adapters
        assert a.ranks == trained.ranks and a.attached
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), trained.state_dict().values(), strict=True))
    assert not a.attached
    card = (tmp_path / "export" / "README.md").read_text()
    assert "as built after calibration" in card and "Palu" in card and "budget=0.2" in card


def test_an_export_that_is_not_one_is_newer_or_does_not_fit_is_refused(allocated, tmp_path):
    from safetensors.torch import load_file, save_file

    from kvsweep.export import ExportError, export_trial, load_exported

    folder, _ = allocated
    with pytest.raises(ExportError, match="not a kvsweep export: it has no kvsweep_adapters.json"):
        load_exported(tmp_path, **QUIET)
    out = export_trial(folder, tmp_path / "e", **QUIET)
    with pytest.raises(ConfigError, match="not empty"):
        export_trial(folder, out, **QUIET)
    export_trial(folder, out, overwrite=True, **QUIET)  # an earlier export is replaced on request
    info_path = out / "kvsweep_adapters.json"
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps({**info, "version": 2}))
    with pytest.raises(ExportError, match="format version 2, newer than this kvsweep"):
        load_exported(out, **QUIET)
    info_path.write_text(json.dumps({**info, "format": "something-else"}))
    with pytest.raises(ExportError, match="not a kvsweep export"):
        load_exported(out, **QUIET)
    info_path.write_text(json.dumps(info))
    weights = load_file(out / "adapters.safetensors")
    key = next(k for k in weights if k.endswith("k.down.weight"))
    save_file({**weights, key: weights[key][:, :-1].contiguous()}, out / "adapters.safetensors")  # one rank fewer than the options say
    with pytest.raises(ExportError, match="adapter 0 \\(lowrank\\) do not fit"):
        load_exported(out, **QUIET)
    save_file({**weights, "adapters.3.x": weights[key].clone()}, out / "adapters.safetensors")
    with pytest.raises(ExportError, match="unexpected key 'adapters.3.x'"):
        load_exported(out, **QUIET)


def test_import_kvsweep_stays_light():
    import subprocess
    import sys

    code = "import sys, kvsweep; assert 'torch' not in sys.modules and 'load_exported' in kvsweep.__all__; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.slow
def test_an_exported_train_trial_reproduces_its_ppl_and_generates_as_it_trained(train_folder, tmp_path):
    from kvsweep.cli import main
    from kvsweep.export import load_exported
    from kvsweep.latent.measure import compare

    record = json.loads((train_folder / "trial.json").read_text())
    assert main(["export", str(train_folder), "-o", str(tmp_path / "export")]) == 0
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["README.md", "adapters.safetensors", "kvsweep_adapters.json"]
    trial = load_exported(tmp_path / "export", device="cpu", **QUIET)
    assert trial.config == record["config"] and trial.info.figures.best_val_ppl == record["best_val_ppl"]
    samples = load_samples(trial.info.data, trial.base.tokenizer, **QUIET)
    assert evaluate(trial.model, samples.val, batch_size=trial.config["train"]["eval_batch_size"]).ppl == record["best_val_ppl"]
    prompt = torch.from_numpy(samples.val[:2, :24].astype("int64"))  # (2, 24)
    gen = trial.generate(prompt, 12, keep_logits=True)
    cmp = compare(trial.model, trial.adapters, prompt, gen)  # the training-time forward on the same tokens
    assert gen.tokens.shape == (2, 12) and cmp["greedy_identical"] and cmp["max_abs_logit_diff"] < 1e-2
    base_logits = trial.model(input_ids=prompt).logits
    trial.close()
    assert not torch.equal(trial.model(input_ids=prompt).logits, base_logits)  # detached: the base's logits again


@pytest.mark.slow
def test_an_exported_sweep_trial_reproduces_its_ppl(smoke_sweep, tmp_path):
    from kvsweep.cli import main
    from kvsweep.export import load_exported

    row = max(pq.read_table(smoke_sweep / "trials.parquet").to_pylist(), key=lambda r: (r["epochs_run"], r["trial_id"]))
    out = tmp_path / "export"
    assert main(["export", str(smoke_sweep), "--trial", row["trial_id"], "-o", str(out)]) == 0
    info = json.loads((out / "kvsweep_adapters.json").read_text())
    assert info["trial"]["sweep"] == row["sweep"] and info["figures"]["test_ppl"] == row["test_ppl"]
    with load_exported(out, device="cpu", **QUIET) as trial:
        samples = load_samples(trial.info.data, trial.base.tokenizer, **QUIET)
        batch = trial.config["train"]["eval_batch_size"]
        assert evaluate(trial.model, samples.val, batch_size=batch).ppl == row["best_val_ppl"]
        with disabled(trial.adapters):  # the base, as the trial evaluated it
            assert evaluate(trial.model, samples.val, batch_size=batch).ppl == row["base_val_ppl"] != row["best_val_ppl"]
    card = (out / "README.md").read_text()
    assert f"{row['best_val_ppl']:.4f}" in card and f"{row['kv_bytes_per_token']:,}" in card and "kvsweep.load_exported" in card


@pytest.mark.slow
def test_a_training_free_trial_with_allocated_ranks_exports_and_reproduces_its_ppl(tiny_folder, tmp_path, monkeypatch):
    from kvsweep.adapters.lowrank import LowRank
    from kvsweep.cli import main
    from kvsweep.export import load_exported

    trial = tmp_path / "lowrank"
    assert main(["train", "--model", "tiny", "--data", "tiny", "--lowrank.budget", "0.3", "--lowrank.allocation", "error",
                 "--lowrank.calib-samples", "4", "--train-samples", "4", "--val-samples", "8", "--test-samples", "0",
                 "--eval-seq-len", "128", "--epochs", "0", "--device", "cpu", "--out", str(trial)]) == 0
    record = json.loads((trial / "trial.json").read_text())
    assert main(["export", str(trial), "-o", str(tmp_path / "export")]) == 0
    monkeypatch.setattr(LowRank, "calibrate", lambda *a, **k: pytest.fail("loading an export calibrated"))
    with load_exported(tmp_path / "export", device="cpu", **QUIET) as loaded:
        samples = load_samples(loaded.info.data, loaded.base.tokenizer, **QUIET)
        assert evaluate(loaded.model, samples.val, batch_size=loaded.config["train"]["eval_batch_size"]).ppl == record["best_val_ppl"]
