"""One trial without Ray: reports, checkpoints and resume, early stopping, errors, ``kvsweep train``."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from kvsweep.train import loop as ktrain  # where the loop looks up what these tests replace
from kvsweep.adapters import AdapterSpec
from kvsweep.checkpoint import BEST_ADAPTERS_FILE, STATE_FILE
from kvsweep.cli import main
from kvsweep.config import ConfigError, DataCfg, ModelCfg, TrainCfg
from kvsweep.evaluate import PositionStats
from kvsweep.losses import LossCfg, Schedule
from kvsweep.results import EPOCH_SCHEMA, POSITION_SCHEMA, TrialResult
from kvsweep.train import TrialCfg, TrialError, run_trial

from .conftest import SAMPLE_TEXT, neox_model, pattern_samples as _samples, small_base as _base

T = 32


def _cfg(adapters=(AdapterSpec.parse("vdproj", rank=32),), epochs: int = 3, loss: LossCfg | None = None, **train) -> TrialCfg:
    return TrialCfg(
        model=ModelCfg(name="small"),
        data=DataCfg(seq_len=T, train_samples=24, val_samples=6),
        adapters=tuple(adapters),
        loss=loss or LossCfg.named("rec_to_lm", kl=0.5),
        train=TrainCfg(**{"lr": 3e-3, "batch_size": 8, "epochs": epochs, "patience": 3, **train}),
    )


def _run(cfg: TrialCfg, **kw) -> tuple[TrialResult, list[dict]]:
    reports: list[dict] = []
    result = run_trial(cfg, lambda m, ckpt: reports.append(m.to_report()), base=_base(), samples=_samples(), log=lambda m: None, **kw)
    return result, reports


def _strip(m: dict) -> dict:
    return {k: v for k, v in m.items() if k not in ("seconds", "first_step_at")}


def test_reports_every_epoch_with_the_metrics_a_sweep_needs():
    result, reports = _run(_cfg(patience=5))
    assert [m["epoch"] for m in reports] == [1, 2, 3]
    keys = {"epoch", "train_ppl", "val_ppl", "loss", "loss_lm", "loss_rec", "loss_kl", "w_lm", "w_rec", "w_kl",
            "kv_bytes_per_token", "kv_ratio", "trainable_params", "base_val_ppl", "best_val_ppl",
            "ppl_pos_0_16", "ppl_pos_16_32"}
    assert keys <= reports[0].keys()
    assert reports[0]["kv_bytes_per_token"] == 2 * (64 + 32) * 2 and reports[0]["kv_ratio"] == pytest.approx(96 / 128)
    assert reports[0]["trainable_params"] == 2 * (2 * 64 * 32 + 32 + 64)
    assert reports[-1]["w_rec"] == pytest.approx(0.0) and reports[-1]["w_lm"] == pytest.approx(1.0)
    assert reports[0]["loss_kl"] > 0 and reports[0]["loss_rec"] > 0
    assert result.status == "completed" and result.epochs_run == 3
    assert result.best_val_ppl == min([result.init_val_ppl] + [m["val_ppl"] for m in reports])  # the init a candidate too
    assert reports[-1]["loss_rec"] < 0.8 * reports[0]["loss_rec"]  # the compressor learned to reconstruct V
    assert result.total_params == sum(p.numel() for p in neox_model().parameters()) + result.trainable_params
    assert [p.lo for p in result.positions] == [0, 16] and all(p.base_ppl > 0 for p in result.positions)


def test_same_seed_same_metrics_on_cpu():
    a, ra = _run(_cfg(epochs=2))
    b, rb = _run(_cfg(epochs=2))
    assert [_strip(m) for m in ra] == [_strip(m) for m in rb]


def test_resumed_trial_reports_what_an_uninterrupted_one_does(tmp_path):
    cfg = _cfg(epochs=4, patience=5, adapters=(AdapterSpec.parse("vdproj", rank=32), AdapterSpec.parse("ka_gated")))
    full, full_reports = _run(cfg)

    class Crash(Exception):
        pass

    reports: list[dict] = []

    def crash_after_two(metrics, ckpt):
        reports.append(metrics.to_report())
        if metrics.epoch == 2:
            raise Crash

    ckpt = tmp_path / "ckpt"
    with pytest.raises(Crash):
        run_trial(cfg, crash_after_two, checkpoint_dir=ckpt, base=_base(), samples=_samples(), log=lambda m: None)
    ckpt2 = tmp_path / "ckpt2"  # a restarted Ray trial resumes from a copy and checkpoints into a new folder
    resumed = run_trial(cfg, lambda m, c: reports.append(m.to_report()), checkpoint_dir=ckpt2, resume_from=ckpt,
                        base=_base(), samples=_samples(), log=lambda m: None)
    assert [m["epoch"] for m in reports] == [1, 2, 3, 4]
    assert [_strip(m) for m in reports] == [_strip(m) for m in full_reports]
    assert resumed.best_val_ppl == full.best_val_ppl and resumed.epochs_run == 4
    assert [_strip(m.to_report()) for m in resumed.history] == [_strip(m.to_report()) for m in full.history]
    assert [m.epoch for m in resumed.history] == [0, 1, 2, 3, 4]
    assert (ckpt2 / STATE_FILE).is_file() and (ckpt2 / BEST_ADAPTERS_FILE).is_file()


def test_frozen_base_is_untouched_by_a_trial():
    base = _base()
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    run_trial(_cfg(epochs=1), base=base, samples=_samples(), log=lambda m: None)
    after = base.model.state_dict()
    assert before.keys() == after.keys()  # adapters detached: no extra modules left behind
    assert all(torch.equal(before[k], after[k]) for k in before)


class Scripted:
    """``evaluate`` for ``Driver``: validation PPL ``val[k]`` at the k-th validation evaluation (k = 0: the init,
    then epoch k) and test PPL ``test[k]`` for a test evaluation after it; records which epochs test was evaluated at."""

    def __init__(self, samples, val: list[float], test: list[float]):
        self.samples, self.val, self.test = samples, val, test
        self.epoch = -1
        self.test_epochs: list[int] = []

    @staticmethod
    def stats(samples, ppl: float) -> PositionStats:
        n, e = samples.shape
        return PositionStats(np.full(e - 1, n * math.log(ppl)), np.full(e - 1, n, dtype=np.int64))

    def __call__(self, model, samples, batch_size):
        if samples is self.samples.val:
            self.epoch += 1
            return self.stats(samples, self.val[self.epoch])
        assert samples is self.samples.test
        self.test_epochs.append(self.epoch)
        return self.stats(samples, self.test[self.epoch])


def _scripted(monkeypatch, cfg: TrialCfg, val: list[float], test: list[float]) -> tuple[TrialResult, list[dict], Scripted]:
    samples = _samples(n_test=4)
    script = Scripted(samples, val, test)
    monkeypatch.setattr(ktrain, "evaluate", script)
    reports: list[dict] = []
    result = run_trial(cfg, lambda m, ckpt: reports.append(m.to_report()), base=_base(), samples=samples, log=lambda m: None)
    return result, reports, script


def test_an_init_better_than_every_epoch_is_the_best_epoch_and_patience_counts_from_it(monkeypatch):
    result, reports, script = _scripted(monkeypatch, _cfg(epochs=10, patience=2), val=[10.0, 12.0, 11.0, 9.0], test=[20.0] * 4)
    assert result.status == "early_stopped"
    assert [m["epoch"] for m in reports] == [1, 2] and reports[-1]["early_stopped"]  # 2 epochs without beating epoch 0
    assert result.best_epoch == 0 and result.best_val_ppl == pytest.approx(10.0) and result.test_ppl == pytest.approx(20.0)
    assert all(m["best_epoch"] == 0 and m["best_val_ppl"] == pytest.approx(10.0) for m in reports)
    assert script.test_epochs == [0]  # test only for the best epoch: here the init


def test_test_is_evaluated_for_the_best_epoch_only_and_never_chooses(monkeypatch):
    # test would pick epoch 3 (or 2); validation picks epoch 1, and the trial's test PPL is epoch 1's
    val, test = [10.0, 8.0, 9.0, 8.5], [20.0, 30.0, 5.0, 4.0]
    result, reports, script = _scripted(monkeypatch, _cfg(epochs=3, patience=5), val, test)
    assert result.status == "completed" and result.best_epoch == 1
    assert result.test_ppl == pytest.approx(30.0) and result.best_val_ppl == pytest.approx(8.0)
    assert script.test_epochs == [0, 1]  # the init, then the one epoch that improved on validation
    assert [m["test_ppl"] for m in reports] == pytest.approx([30.0, 30.0, 30.0])  # every report: the best epoch's
    assert [(p.split, p.ppl) for p in result.positions] == [("validation", pytest.approx(8.0))] * 2 + [("test", pytest.approx(30.0))] * 2
    assert result.base_test_ppl is not None and [p.base_ppl > 0 for p in result.positions] == [True] * 4


def test_checkpoint_of_a_trial_whose_init_is_best_holds_the_init_as_best_weights(monkeypatch, tmp_path):
    from kvsweep.checkpoint import load_best_adapter_states

    samples = _samples(n_test=4)
    monkeypatch.setattr(ktrain, "evaluate", Scripted(samples, [10.0, 12.0, 13.0], [20.0] * 3))
    ckpt = tmp_path / "ckpt"
    driver = ktrain.Driver(_base(), samples, log=lambda m: None)
    try:
        run = driver.add(_cfg(epochs=1, patience=5), checkpoint_dir=ckpt)
        at_init = [{k: v.clone() for k, v in a.state_dict().items()} for a in run.adapters]
        driver.run([run])
    finally:
        driver.close()
    best, which = load_best_adapter_states(ckpt)
    assert run.state.best_epoch == 0 and which == "best epoch"
    assert all(torch.equal(best[0][k], v) for k, v in at_init[0].items())
    trained = run.adapters[0].state_dict()
    assert not all(torch.equal(trained[k], v) for k, v in at_init[0].items())  # epoch 1 moved the weights


def test_nan_loss_is_an_error_naming_epoch_and_step(monkeypatch):
    real = ktrain.token_nll
    calls = {"n": 0}

    def nan_on_fifth(logits, ids):
        calls["n"] += 1
        out = real(logits, ids)
        return out * float("nan") if calls["n"] == 5 else out

    monkeypatch.setattr(ktrain, "token_nll", nan_on_fifth)
    with pytest.raises(TrialError, match=r"nan at epoch 2, step 2 of 3"):
        _run(_cfg(epochs=3, loss=LossCfg.named("lm")))


def test_epochs_zero_only_evaluates():
    result, reports = _run(_cfg(epochs=0, adapters=(AdapterSpec.parse("vdproj", rank=64, init="identity"),)))
    assert len(reports) == 1 and reports[0]["epoch"] == 0
    assert result.init_val_ppl == pytest.approx(result.base_val_ppl, rel=1e-6)  # identity at r = d is a no-op


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: _cfg(adapters=(AdapterSpec.parse("ka_gated"), AdapterSpec.parse("ka_residual"))), "cannot be combined"),
        (lambda: _cfg(lr=0), "lr must be > 0"),
        (lambda: _cfg(batch_size=100), "batch_size 100 is larger than train_samples 24"),
        (lambda: _cfg(loss=LossCfg(lm=Schedule("constant", 0.0))), "all zero"),
        (lambda: LossCfg.named("warmup"), "schedule must be one of"),
        (lambda: AdapterSpec.parse("vdproj", rank=0), "rank must be"),
        (lambda: AdapterSpec.parse("vdproj", rank=8, target="q"), "target must be one of"),
        (lambda: AdapterSpec.parse("vdproj", rank=8, init="svd"), "init must be one of"),
        (lambda: AdapterSpec.parse("lora"), "adapter must be one of"),
        (lambda: _cfg(adapters=(AdapterSpec.parse("ka_residual"),), loss=LossCfg.named("rec")), "no adapter reconstructs"),
    ],
)
def test_bad_trial_config_is_a_clear_error(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


@pytest.mark.parametrize(
    "spec, message",
    [
        (AdapterSpec.parse("vdproj", rank=65), r"rank must be in 1\.\.64"),
        (AdapterSpec.parse("vdproj", rank=8, layers="0,5"), r"layer index 5 is out of range; valid range 0\.\.1"),
    ],
)
def test_bad_options_against_the_model(spec, message):
    with pytest.raises(ConfigError, match=message):
        _run(_cfg(adapters=(spec,)))


def test_kvsweep_train_writes_trial_json_and_parquet(tmp_path, small_tokenizer, capsys):
    folder, text, out = tmp_path / "model", tmp_path / "corpus.txt", tmp_path / "trial"
    neox_model().save_pretrained(folder)
    small_tokenizer.save_pretrained(folder)
    text.write_text(SAMPLE_TEXT * 4)
    args = ["train", "--model", str(folder), "--data", str(text), "--seq-len", "32", "--eval-seq-len", "64", "--train-samples",
            "all", "--val-samples", "all", "--adapter", "vdproj", "--rank", "16", "--init", "pca", "--adapter", "ka_gated",
            "--schedule", "rec_to_lm", "--epochs", "2", "--lr", "1e-3", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "64-96" not in printed and "32-64" in printed and "KV cache:" in printed and "test PPL" in printed
    rec = json.loads((out / "trial.json").read_text())
    assert rec["status"] == "completed" and rec["epochs_run"] == 2
    assert rec["config"]["adapters"][0]["name"] == "vdproj" and rec["config"]["adapters"][1]["name"] == "ka_gated"
    assert rec["kv_bytes_per_token"] == (2 * (64 + 16) + 2 * 64) * 2  # vdproj on both layers, KA K'/V' on the last
    assert rec["trainable_params"] < rec["total_params"]
    epochs = pq.read_table(out / "epochs.parquet")
    positions = pq.read_table(out / "positions.parquet")
    assert epochs.schema.equals(EPOCH_SCHEMA) and positions.schema.equals(POSITION_SCHEMA)
    assert epochs.column("epoch").to_pylist() == [0, 1, 2]  # epoch 0: the adapters at init
    assert positions.column("lo").to_pylist() == [0, 16, 32] * 2  # evaluated at 64 tokens
    assert positions.column("split").to_pylist() == ["validation"] * 3 + ["test"] * 3
    assert rec["eval_seq_len"] == 64 and rec["config"]["data"]["eval_seq_len"] == 64
    assert rec["test_ppl"] > 1 and rec["base_test_ppl"] > 1
    assert math.isclose(min(row["val_ppl"] for row in epochs.to_pylist()), rec["best_val_ppl"])  # epoch 0 included
    # --resume after completion continues from the checkpoint: nothing left to train, same result
    assert main([*args, "--resume", "--epochs", "3"]) == 0
    assert json.loads((out / "trial.json").read_text())["epochs_run"] == 3
    assert pq.read_table(out / "epochs.parquet").column("epoch").to_pylist() == [0, 1, 2, 3]


def test_kvsweep_train_bad_input(capsys):
    assert main(["train", "--adapter", "vdproj", "--out", "x"]) == 2
    assert "--rank" in capsys.readouterr().err
    assert main(["train", "--adapter", "ka_gated", "--adapter", "ka_replace", "--out", "x"]) == 2
    assert "cannot be combined" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_base_trains_float32_adapters_under_autocast(dtype):
    base = _base()
    base.model.to(dtype)
    cfg = _cfg(epochs=1, adapters=(AdapterSpec.parse("vdproj", rank=32, init="pca"), AdapterSpec.parse("ka_residual")))
    result = run_trial(cfg, base=base, samples=_samples(), log=lambda m: None)
    assert result.status == "completed" and math.isfinite(result.best_val_ppl)
    with pytest.raises(ConfigError, match="amp 'off' needs a float32 base"):
        run_trial(_cfg(epochs=1, amp="off"), base=base, samples=_samples(), log=lambda m: None)


def test_epoch_0_is_the_adapters_at_init_in_the_history_but_no_report_of_its_own():
    result, reports = _run(_cfg(epochs=2))
    assert [m["epoch"] for m in reports] == [1, 2]  # a sweep's scheduler counts trained epochs only
    init = result.history[0]
    assert [h.epoch for h in result.history] == [0, 1, 2]
    assert init.val_ppl == result.init_val_ppl == reports[0]["init_val_ppl"]
    assert init.metrics.train_ppl is None and init.metrics.loss is None and init.metrics.steps == 0
    assert [(b.lo, b.hi) for b in init.buckets] == [(0, 16), (16, 32)] and all(b.ppl > 0 for b in init.buckets)
    ppls = [result.init_val_ppl] + [m["val_ppl"] for m in reports]
    assert result.best_epoch == ppls.index(min(ppls))  # the init is a candidate for the best epoch


def test_one_loop_drives_a_trial_alone_and_trials_in_a_pack(monkeypatch):
    from kvsweep.pack import Pack, run_packed

    calls: list[tuple[str, int]] = []
    real = ktrain.Driver.advance

    def spy(self, runs):
        calls.append((type(self).__name__, len(runs)))
        return real(self, runs)

    monkeypatch.setattr(ktrain.Driver, "advance", spy)
    cfg = _cfg(epochs=2)
    alone, _ = _run(cfg)
    steps = 2 * 3  # epochs x steps per epoch (24 samples, batches of 8)
    assert calls == [("Driver", 1)] * steps
    calls.clear()
    packed = run_packed([cfg, cfg], base=_base(), samples=_samples(), log=lambda m: None)
    assert calls == [("Pack", 2)] * steps
    assert [r.best_val_ppl for r in packed] == pytest.approx([alone.best_val_ppl] * 2, rel=1e-5)
    for name in ("advance", "run", "add", "add_many", "finish_epochs", "remove"):  # a pack changes how, not what
        assert getattr(Pack, name) is getattr(ktrain.Driver, name), name


def test_a_trial_run_makes_every_attribute_in_its_constructor():
    base, samples = _base(), _samples()
    driver = ktrain.Driver(base, samples, log=lambda m: None)
    run = ktrain.TrialRun(_cfg(epochs=1), base, samples, log=lambda m: None)
    made = set(vars(run))
    try:
        run = driver.add(_cfg(epochs=1))
        driver.run([run])
    finally:
        driver.close()
    assert run.status == "completed" and set(vars(run)) == made


def test_a_method_without_trainable_parameters_is_a_trial_of_its_epoch_0(frozen_vdproj):
    samples = _samples(n_test=4)
    cfg = _cfg(epochs=5, adapters=(AdapterSpec.parse("frozen_vdproj", rank=32, init="identity"),))
    reports: list[dict] = []
    result = run_trial(cfg, lambda m, ckpt: reports.append(m.to_report()), base=_base(), samples=samples, log=lambda m: None)
    assert [m["epoch"] for m in reports] == [0] and reports[0]["early_stopped"] is False
    assert (result.status, result.epochs_run, result.best_epoch, result.trainable_params) == ("completed", 0, 0, 0)
    assert result.best_val_ppl == result.init_val_ppl and result.test_ppl == reports[0]["test_ppl"] > 1
    assert [h.epoch for h in result.history] == [0]
    from kvsweep.pack import run_packed

    alone, trained = run_packed([cfg, _cfg(epochs=2, patience=5)], base=_base(), samples=samples, log=lambda m: None)
    assert (alone.status, alone.epochs_run, alone.test_ppl) == ("completed", 0, pytest.approx(result.test_ppl, rel=1e-5))
    assert trained.epochs_run == 2  # the other trial of the pack trains on


def test_evaluation_samples_may_be_longer_than_train_samples_and_set_the_buckets():
    samples = _samples(n_test=3, eval_len=48)
    cfg = TrialCfg(model=ModelCfg(name="small"), data=DataCfg(seq_len=T, eval_seq_len=48, train_samples=24, val_samples=6),
                   adapters=(AdapterSpec.parse("vdproj", rank=32),), loss=LossCfg.named("lm"),
                   train=TrainCfg(lr=3e-3, batch_size=8, epochs=1))
    result = run_trial(cfg, base=_base(), samples=samples, log=lambda m: None)
    assert result.eval_seq_len == 48 and samples.train.shape[1] == T
    assert [(p.split, p.lo, p.hi) for p in result.positions] == [(s, lo, hi) for s in ("validation", "test")
                                                                 for lo, hi in ((0, 16), (16, 32), (32, 48))]
    assert sum(p.tokens for p in result.positions if p.split == "test") == 3 * 47
    with pytest.raises(ConfigError, match="48 tokens long, but the trial's eval_seq_len is 32"):
        run_trial(_cfg(epochs=1), base=_base(), samples=samples, log=lambda m: None)
    max_cfg = TrialCfg(model=ModelCfg(name="small"), data=DataCfg(seq_len=T, eval_seq_len="max", train_samples=24),
                       adapters=(AdapterSpec.parse("vdproj", rank=32),))
    assert max_cfg.with_max_positions(_base().max_positions).data.eval_seq_len == 256  # the model's maximum context
