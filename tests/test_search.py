"""Searchers: the grid, random picks and Optuna's multi-objective sampler (``kvsweep.tune.search``)."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from kvsweep.config import ConfigError, SweepCfg
from kvsweep.sweepargs import sweep_cfg, sweep_parser
from kvsweep.tune.search import OBJECTIVES, objectives, round_search
from kvsweep.tune.spec import canonical_specification
from kvsweep.tune.writer import TrialRecord

from .sweeps import run, tables

SPACE = {"vdproj.rank": [16, 32, 64], "schedule": ["lm", "rec_to_lm"], "seed": [0]}


def _rec(rank: int, schedule: str, ppl: float | None, **kw) -> TrialRecord:
    result = {"epoch": 2, "val_ppl": ppl, "best_val_ppl": ppl, "kv_bytes_per_token": 1000 + 10 * rank}
    return TrialRecord(f"t{rank}{schedule}", {"vdproj.rank": rank, "schedule": schedule, "seed": 0}, [result], **kw)


def _args(*argv: str) -> SweepCfg:
    return sweep_cfg(sweep_parser("test", "vdproj").parse_args(list(argv)), "vdproj")


def test_the_searcher_follows_the_flags():
    assert (_args().search, _args().num_samples) == ("grid", None)
    assert (_args("--num-samples", "5").search, _args("--num-samples", "5").num_samples) == ("random", 5)
    assert _args("--search", "optuna", "--num-samples", "8").search == "optuna"
    with pytest.raises(ConfigError, match="num_samples is the budget of a random or optuna search"):
        _args("--search", "optuna")
    with pytest.raises(ConfigError, match="num_samples is the budget"):
        _args("--search", "grid", "--num-samples", "3")
    with pytest.raises(ConfigError, match="search must be one of"):
        SweepCfg(search="bayes", num_samples=3)


def test_a_specification_stored_before_the_searcher_was_named_continues():
    assert canonical_specification({"search.num_samples": None})["search"] == "grid"
    assert canonical_specification({"search.num_samples": 6})["search"] == "random"
    assert canonical_specification({"search": "optuna", "search.num_samples": 6})["search"] == "optuna"


def test_objectives_of_a_finished_trial_only():
    assert objectives(_rec(16, "lm", 30.5)) == [30.5, 1160.0]
    assert objectives(_rec(16, "lm", 30.5, error="boom")) is None
    assert objectives(_rec(16, "lm", 30.5, finished=False)) is None
    assert objectives(_rec(16, "lm", None)) is None
    assert objectives(_rec(16, "lm", math.nan)) is None
    assert objectives(TrialRecord("t", {}, [])) is None


def test_grid_and_random_rounds_keep_tunes_variant_generator():
    grid, config = round_search(SweepCfg(), SPACE, [{"vdproj.rank": 16, "schedule": "lm", "seed": 0}], None)
    assert isinstance(grid, BasicVariantGenerator) and config["seed"] == 0
    assert sorted(config["vdproj.rank"].categories) == [16, 32, 64]
    rand, _ = round_search(SweepCfg(search="random", num_samples=4), SPACE, None, 2)
    assert isinstance(rand, BasicVariantGenerator)


def test_an_optuna_round_searches_the_varied_fields_on_both_objectives():
    search, config = round_search(SweepCfg(search="optuna", num_samples=12), SPACE, None, None)
    assert isinstance(search, OptunaSearch)
    assert config == {"seed": 0}  # fixed values go to every trial; Optuna picks the rest
    assert search.metric == list(OBJECTIVES) and search.mode == ["min", "min"]
    study = search._ot_study
    assert study.directions == [optuna.study.StudyDirection.MINIMIZE] * 2
    limited, _ = round_search(SweepCfg(search="optuna", num_samples=12), SPACE, None, 3)
    assert isinstance(limited, ConcurrencyLimiter)


def test_a_grown_optuna_round_starts_from_the_earlier_trials():
    history = [_rec(16, "lm", 40.0), _rec(64, "rec_to_lm", 31.0), _rec(32, "lm", 35.0, error="crashed"),
               _rec(128, "lm", 20.0)]  # a rank no longer in the space: not told
    search, _ = round_search(SweepCfg(search="optuna", num_samples=12), SPACE, None, None, history)
    told = search._ot_study.trials
    assert [(t.params, t.values) for t in told] == [({"vdproj.rank": 16, "schedule": "lm"}, [40.0, 1160.0]),
                                                    ({"vdproj.rank": 64, "schedule": "rec_to_lm"}, [31.0, 1640.0])]
    suggested = search.suggest("new")  # and it suggests from the space
    assert suggested["vdproj.rank"] in SPACE["vdproj.rank"] and suggested["schedule"] in SPACE["schedule"]


def _study(experiment: Path):
    search = OptunaSearch()
    search.restore_from_dir(str(experiment))
    return search._ot_study


@pytest.mark.slow
def test_an_optuna_sweep_tells_its_study_both_objectives_and_grows_from_it(tiny_folder, tmp_path):
    proc = run("--search", "optuna", "--num-samples", "3", storage=tmp_path)
    assert "3 trials:" in proc.stdout
    folder = tmp_path / "vdproj-smoke"
    t = tables(folder)
    assert len(t["trials"]) == 3
    study = _study(folder / "tune-0")
    done = [tr for tr in study.trials if tr.values is not None]
    assert len(done) == 3
    by_id = {r["trial_id"]: r for r in t["trials"]}
    assert sorted(tr.values[1] for tr in done) == sorted(float(r["kv_bytes_per_token"]) for r in by_id.values())
    assert sorted(round(tr.values[0], 6) for tr in done) == sorted(round(r["best_val_ppl"], 6) for r in by_id.values())
    # growing the budget is a new round whose study starts from the three trials run
    grown = run("--search", "optuna", "--num-samples", "5", "--grow", storage=tmp_path)
    assert "growing the sweep" in grown.stdout
    assert len(tables(folder)["trials"]) == 5
    assert len([tr for tr in _study(folder / "tune-1").trials if tr.values is not None]) == 5
    # another searcher on the same name is another sweep
    other = run("--num-samples", "5", storage=tmp_path, expect=2)
    assert 'search: "optuna" -> "random"' in other.stderr
