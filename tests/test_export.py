"""A trial out of kvsweep: loaded from a train folder or a sweep's results (its newest checkpoint, the best epoch's
weights), with the trial's own validation PPL reproduced."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from kvsweep.adapters import AdapterSpec, attached, make_adapter
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
