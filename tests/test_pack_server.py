"""The pack process of packed sweeps, driven in this process without Ray: epochs on request, checkpoints
that resume the trial anywhere, stopped trials forgotten, a restarted trial superseding its dead caller."""

from __future__ import annotations

import threading

import pytest

from kvsweep.checkpoint import BEST_ADAPTERS_FILE, STATE_FILE
from kvsweep.config import DataCfg, SweepCfg, TrainCfg
from kvsweep.tune import evaluate_base, prepare_samples
from kvsweep.tune import packed as kpacked

POINT_A = {"rank": 32, "seed": 0, "schedule": "lm"}
POINT_B = {"rank": 64, "init": "pca", "seed": 1, "schedule": "lm"}


@pytest.fixture(scope="module")
def setup(tiny_folder):
    sweep = SweepCfg(name="packtest", pack=2, data=DataCfg(train_samples=16, val_samples=4, test_samples=4, seq_len=32),
                     train=TrainCfg(epochs=3, batch_size=4, lr=1e-3))
    samples = prepare_samples(sweep, log=lambda m: None)
    return sweep, samples, evaluate_base(sweep, samples)


def _server(setup) -> kpacked.PackServer:
    sweep, samples, base_stats = setup
    return kpacked.PackServer(sweep, samples, base_stats, sweep.pack)


def _together(*calls):
    out = [None] * len(calls)

    def go(i, fn):
        try:
            out[i] = fn()
        except Exception as e:  # noqa: BLE001  (the test looks at it)
            out[i] = e

    threads = [threading.Thread(target=go, args=(i, fn)) for i, fn in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return out


def test_epochs_on_request_and_resume_from_the_returned_checkpoint(setup):
    server = _server(setup)
    a1, b1 = _together(lambda: server.epoch("a", POINT_A, 0, None), lambda: server.epoch("b", POINT_B, 0, None))
    assert a1["metrics"].epoch == b1["metrics"].epoch == 1 and not a1["done"]
    assert {STATE_FILE, BEST_ADAPTERS_FILE} <= set(a1["files"])
    a2 = server.epoch("a", POINT_A, 1, None)  # parked in the pack: goes on at once
    assert a2["metrics"].epoch == 2 and server.stats()["trials"] == 2
    # a fresh pack does not hold the trial: it asks for the checkpoint, then resumes from it
    other = _server(setup)
    assert other.epoch("a", POINT_A, 2, None) == {"need_checkpoint": True}
    a3 = other.epoch("a", POINT_A, 2, a2["files"])
    a3_here = server.epoch("a", POINT_A, 2, None)
    assert a3["done"] and a3_here["done"] and a3["metrics"].epoch == 3
    assert a3["metrics"].val_ppl == pytest.approx(a3_here["metrics"].val_ppl, rel=1e-6)
    assert "a" not in server._runs  # a finished trial leaves its pack


def test_a_trial_that_stops_asking_is_forgotten_while_the_others_train(setup, monkeypatch):
    monkeypatch.setattr(kpacked, "PARK_SECONDS", 0.0)  # forget parked trials at once
    server = _server(setup)
    _, b1 = _together(lambda: server.epoch("a", POINT_A, 0, None), lambda: server.epoch("b", POINT_B, 0, None))
    # "a" (stopped by ASHA, say) never asks again; "b" goes on, resending its checkpoint as its trial does
    reply = server.epoch("b", POINT_B, 1, None)
    if reply.get("need_checkpoint"):
        reply = server.epoch("b", POINT_B, 1, b1["files"])
    assert reply["metrics"].epoch == 2
    assert "a" not in server._runs
    assert server.epoch("a", POINT_A, 1, None) == {"need_checkpoint": True}


def test_a_trial_without_trainable_parameters_gets_its_epoch_0_without_a_checkpoint(setup, frozen_vdproj):
    server = _server(setup)
    reply = server.epoch("f", {"frozen_vdproj.rank": 32, "frozen_vdproj.init": "identity", "seed": 0, "schedule": "lm"}, 0, None)
    assert reply["done"] and reply["files"] is None
    report = reply["metrics"]
    assert report.epoch == 0 and report.best_epoch == 0 and report.early_stopped is False
    assert report.trial.trainable_params == 0 and report.test_ppl > 1 and report.trial.base_test_ppl > 1
    assert "f" not in server._runs


def test_a_restarted_trial_supersedes_its_dead_caller(setup):
    server = _server(setup)
    first, second = _together(lambda: server.epoch("a", POINT_A, 0, None), lambda: server.epoch("a", POINT_A, 0, None))
    errors = [r for r in (first, second) if isinstance(r, Exception)]
    replies = [r for r in (first, second) if isinstance(r, dict)]
    assert len(replies) == 1 and replies[0]["metrics"].epoch == 1
    assert len(errors) == 1 and "superseded" in str(errors[0])


def test_compile_is_refused_with_packs():
    from kvsweep.config import ConfigError

    with pytest.raises(ConfigError, match="compile must be 'off' with pack > 1"):
        SweepCfg(pack=2, train=TrainCfg(compile="reduce-overhead"))
    assert SweepCfg(pack=1, train=TrainCfg(compile="reduce-overhead")).train.compile == "reduce-overhead"
