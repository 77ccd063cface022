"""Packed trials (one base, one batched forward over several trials) against the same trials run alone."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from kvsweep.adapters import AdapterSpec
from kvsweep.config import DataCfg, ModelCfg, TrainCfg
from kvsweep.losses import LossCfg
from kvsweep.pack import Pack, Router, run_packed
from kvsweep.results import TrialResult
from kvsweep.train import TrialCfg, run_trial

from .conftest import pattern_samples as _samples, small_base as _base

T = 32


def _cfg(adapters, *, loss="rec_to_lm", kl=0.0, epochs=3, **train) -> TrialCfg:
    return TrialCfg(
        model=ModelCfg(name="small"), data=DataCfg(seq_len=T, train_samples=24, val_samples=6), adapters=tuple(adapters),
        loss=LossCfg.named(loss, kl=kl),
        train=TrainCfg(**{"lr": 3e-3, "batch_size": 8, "epochs": epochs, "patience": 5, **train}),
    )


VD = AdapterSpec.parse("vdproj", rank=32)
# Different adapters, ranks, inits, schedules, learning rates, seeds and batch sizes in one pack.
MIXED = [
    _cfg([VD]),
    _cfg([AdapterSpec.parse("vdproj", rank=16, init="pca", target="kv")], loss="lm", lr=1e-3, seed=1),
    _cfg([AdapterSpec.parse("ka_gated")], loss="lm", kl=0.5, seed=2),
    _cfg([AdapterSpec.parse("vdproj", rank=48, layers="1"), AdapterSpec.parse("ka_residual", layers="0")], loss="rec_to_lm_cosine",
         batch_size=6),
    _cfg([AdapterSpec.parse("ka_replace")], loss="lm", lr=1e-3, batch_size=4),
]


def _strip(m: dict) -> dict:
    return {k: v for k, v in m.items() if k not in ("seconds", "first_step_at")}


def _alone(cfg: TrialCfg, base=_base) -> tuple[TrialResult, list[dict]]:
    """``cfg`` trained alone on ``base()``; its result and its reports."""
    reports: list[dict] = []
    result = run_trial(cfg, lambda m, ckpt: reports.append(_strip(m.to_report())), base=base(), samples=_samples(), log=lambda m: None)
    return result, reports


def _packed(cfgs: list[TrialCfg], base=_base, **kw) -> tuple[list[TrialResult], list[list[dict]]]:
    """``cfgs`` trained in one pack on ``base()``; their results and reports."""
    reports: list[list[dict]] = [[] for _ in cfgs]
    results = run_packed(cfgs, base=base(), samples=_samples(), log=lambda m: None,
                         reports=[(lambda m, ckpt, i=i: reports[i].append(_strip(m.to_report()))) for i in range(len(cfgs))], **kw)
    return results, reports


def _close(a: dict, b: dict, rel: float) -> None:
    """The same keys; numbers equal within ``rel`` (NaN only where the other is NaN too), everything else equal."""
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, float) or isinstance(y, float):
            assert isinstance(x, (int, float)) and isinstance(y, (int, float)), k
            if math.isnan(x) or math.isnan(y):
                assert math.isnan(x) and math.isnan(y), k
            else:
                assert x == pytest.approx(y, rel=rel, abs=1e-7), k
        else:
            assert x == y, k


def test_the_closeness_check_itself():
    nan = float("nan")
    _close({"a": nan, "b": 1.0, "c": "x"}, {"a": nan, "b": 1.0 + 1e-9, "c": "x"}, rel=1e-5)
    for other in ({"a": 1.0}, {"a": None}, {"b": nan}):
        with pytest.raises(AssertionError):
            _close({"a": nan, "b": 1.0}, {"a": nan, "b": 1.0, **other}, rel=1e-5)
    with pytest.raises(AssertionError):
        _close({"a": 1.0}, {"a": 1.1}, rel=1e-5)


def test_packed_trials_report_what_they_report_alone():
    results, reports = _packed(MIXED)
    for cfg, result, rep in zip(MIXED, results, reports, strict=True):
        alone, alone_reports = _alone(cfg)
        assert len(rep) == len(alone_reports) == 3
        for m, ma in zip(rep, alone_reports, strict=True):
            _close(m, ma, rel=1e-5)
        assert result.status == alone.status == "completed"
        _close({k: v for k, v in result.to_json().items() if k not in ("positions", "seconds")},
               {k: v for k, v in alone.to_json().items() if k not in ("positions", "seconds")}, rel=1e-5)


def test_pack_of_identical_trials_matches_one_alone_exactly_in_float32():
    cfg = _cfg([VD], epochs=2)
    results, reports = _packed([cfg, cfg, cfg])
    _, alone = _alone(cfg)
    assert reports[0] == reports[1] == reports[2]
    for m, ma in zip(reports[0], alone, strict=True):
        _close(m, ma, rel=1e-6)


def test_a_trial_that_stops_leaves_the_pack_and_the_others_go_on():
    # patience 1 and a learning rate too small to change a float32 weight: no better val PPL than the init at epoch 1, stop
    stopper = _cfg([VD], loss="lm", lr=1e-30, patience=1, epochs=4)
    keeper = _cfg([VD], epochs=4)
    results, reports = _packed([stopper, keeper])
    alone_stop, _ = _alone(stopper)
    assert results[0].status == alone_stop.status == "early_stopped"
    assert results[0].epochs_run == alone_stop.epochs_run == 1 and len(reports[0]) == 1 and results[0].best_epoch == 0
    assert results[1].status == "completed" and len(reports[1]) == 4
    _, alone_keep = _alone(keeper)
    for m, ma in zip(reports[1], alone_keep, strict=True):
        _close(m, ma, rel=1e-5)


def test_a_trial_whose_loss_diverges_ends_in_error_and_the_others_go_on():
    bad = _cfg([VD], loss="lm", lr=1e30, grad_clip=0.0)
    good = _cfg([VD])
    results, reports = _packed([bad, good])
    assert results[0].status == "error" and "loss is" in results[0].error
    assert results[1].status == "completed" and len(reports[1]) == 3


def test_packed_trials_evaluate_test_for_their_best_epoch_as_alone():
    samples = _samples(n_test=4)
    cfgs = [_cfg([VD], epochs=2), _cfg([AdapterSpec.parse("ka_gated")], loss="lm", epochs=2, lr=1e-2)]
    packed = run_packed(cfgs, base=_base(), samples=samples, log=lambda m: None)
    for cfg, result in zip(cfgs, packed, strict=True):
        alone = run_trial(cfg, base=_base(), samples=samples, log=lambda m: None)
        assert result.best_epoch == alone.best_epoch and result.test_ppl == pytest.approx(alone.test_ppl, rel=1e-5)
        assert result.base_test_ppl == pytest.approx(alone.base_test_ppl, rel=1e-6) and result.test_ppl > 1
        assert [(p.split, p.lo) for p in result.positions] == [(s, lo) for s in ("validation", "test") for lo in (0, 16)]
        assert [p.ppl for p in result.positions] == pytest.approx([p.ppl for p in alone.positions], rel=1e-5)


def test_checkpoints_of_a_packed_trial_resume_alone(tmp_path):
    cfg = _cfg([VD], loss="lm", epochs=2)  # constant loss weights: 2 epochs then 1 more = 3 epochs at once
    _packed([cfg, _cfg([AdapterSpec.parse("ka_gated")], epochs=1)], checkpoint_dirs=[tmp_path / "a", tmp_path / "b"])
    # the packed trial's checkpoint after its last epoch is one the single-trial path reads
    extra = _cfg([VD], loss="lm", epochs=3)
    resumed: list[dict] = []
    result = run_trial(extra, lambda m, c: resumed.append(_strip(m.to_report())), base=_base(), samples=_samples(), log=lambda m: None,
                       resume_from=tmp_path / "a")
    assert [m["epoch"] for m in resumed] == [3] and result.epochs_run == 3
    _, alone = _alone(extra)
    _close(resumed[0], alone[2], rel=1e-5)


def test_routers_leave_the_base_untouched_when_nobody_is_routed():
    base = _base()
    ids = torch.from_numpy(_samples().val[:2].astype(np.int64))
    before = base.model(input_ids=ids).logits
    pack = Pack(base, _samples(), log=lambda m: None)
    run = pack.add(_cfg([VD]))
    with pack.routing([]):
        assert torch.equal(base.model(input_ids=ids).logits, before)
    with pack.routing([(run, None)]):
        assert not torch.allclose(base.model(input_ids=ids).logits, before)
    pack.close()
    assert not pack.routers and all(type(layer.attention.query_key_value) is torch.nn.Linear for layer in base.model.gpt_neox.layers)
    assert torch.equal(base.model(input_ids=ids).logits, before)


def test_router_splits_rows_and_passes_through_trials_without_a_module():
    r = Router()
    double, other, bystander = object(), object(), object()
    r.fns[double] = lambda a: 2 * a
    r.fns[other] = lambda a: a + 1
    x = torch.arange(6.0).view(6, 1, 1)
    r.rows = [(double, 2), (bystander, 1), (other, 3)]
    assert r(x).view(-1).tolist() == [0, 2, 2, 4, 5, 6]
    r.rows = []
    assert r(x) is x


def test_loss_from_hidden_states_in_chunks_matches_the_full_logits():
    cfgs = [_cfg([VD]), _cfg([AdapterSpec.parse("ka_gated")], loss="lm", seed=3)]
    _, full = _packed(cfgs)
    _, chunked = _packed([replace(c, train=replace(c.train, loss_chunk=7)) for c in cfgs])
    for a, b in zip(full, chunked, strict=True):
        for m, mc in zip(a, b, strict=True):
            _close(m, mc, rel=1e-5)
    _, alone = _alone(replace(cfgs[0], train=replace(cfgs[0].train, loss_chunk=7)))
    for m, ma in zip(chunked[0], alone, strict=True):
        _close(m, ma, rel=1e-6)


def test_same_shaped_adapters_run_as_one_batched_call_and_match_alone(monkeypatch):
    from kvsweep.adapters.vdproj import Compressor

    calls = []
    stacked = Compressor.forward_stacked
    monkeypatch.setattr(Compressor, "forward_stacked", staticmethod(lambda comps, x: calls.append(len(comps)) or stacked(comps, x)))
    kv = AdapterSpec.parse("vdproj", rank=24, target="kv", init="pca")
    cfgs = [_cfg([kv], seed=0), _cfg([VD], seed=3), _cfg([kv], seed=1, lr=1e-3), _cfg([kv], seed=2, loss="lm")]
    results, reports = _packed(cfgs)
    assert calls and max(calls) == 3  # the three rank-24 trials side by side, together; the rank-32 one alone
    for cfg, rep in zip(cfgs, reports, strict=True):
        _, alone = _alone(cfg)
        for m, ma in zip(rep, alone, strict=True):
            _close(m, ma, rel=1e-5)


def test_compiled_training_forward_matches_eager():
    cfg = _cfg([VD], epochs=2)
    _, eager = _alone(cfg)
    _, comp = _alone(replace(cfg, train=replace(cfg.train, compile="default")))
    for m, mc in zip(eager, comp, strict=True):
        _close(m, mc, rel=1e-4)
