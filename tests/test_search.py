"""Searchers: the grid, random picks and Optuna's multi-objective sampler (``kvsweep.tune.search``)."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, Searcher
from ray.tune.search.optuna import OptunaSearch

from kvsweep.config import ConfigError, SweepCfg
from kvsweep.sweepargs import sweep_cfg, sweep_parser
from kvsweep.tune.rounds import started_by_variant_generator
from kvsweep.tune.search import OBJECTIVES, GridSearcher, objectives, round_search
from kvsweep.tune.spec import canonical_specification
from kvsweep.tune.store import SweepStore
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


_POINTS = [{"vdproj.rank": r, "schedule": s, "seed": 0} for r in (16, 32, 64) for s in ("lm", "rec_to_lm")]


def test_a_grid_round_hands_out_each_point_once_in_order_and_tunes_config_holds_the_fixed_values_only():
    """Tune deep-copies its config for every trial: with the searched fields' values in it, a grid of N seeds costs
    O(N) per trial."""
    grid, config = round_search(SweepCfg(), SPACE, _POINTS, None)
    assert isinstance(grid, GridSearcher) and config == {"seed": 0}
    got = [grid.suggest(f"t{i}") for i in range(7)]
    assert got == [{"vdproj.rank": p["vdproj.rank"], "schedule": p["schedule"]} for p in _POINTS] + [Searcher.FINISHED]
    layers, config = round_search(SweepCfg(), {"vdproj.layers": [[0, 1], [2]]}, [{"vdproj.layers": [0, 1]}, {"vdproj.layers": [2]}], None)
    assert config == {} and layers.suggest("a") == {"vdproj.layers": "0,1"}  # lists as Tune's config holds them
    limited, _ = round_search(SweepCfg(), SPACE, _POINTS, 2)
    assert isinstance(limited, ConcurrencyLimiter) and isinstance(limited.searcher, GridSearcher)
    assert [limited.suggest(t) for t in "abc"] == [got[0], got[1], None]  # two at once
    limited.on_trial_complete("a")
    assert limited.suggest("c") == got[2]
    rand, config = round_search(SweepCfg(search="random", num_samples=4), SPACE, None, 2)
    assert isinstance(rand, BasicVariantGenerator) and sorted(config["vdproj.rank"].categories) == [16, 32, 64]


def test_a_grid_searcher_continues_from_its_saved_state_and_refuses_another_grids(tmp_path):
    searcher = GridSearcher(_POINTS)
    first = [searcher.suggest(t) for t in "ab"]
    searcher.save_to_dir(str(tmp_path), "2026-11-30")  # as Tune saves it with the experiment
    again = GridSearcher(_POINTS)
    again.restore_from_dir(str(tmp_path))
    assert [again.suggest(t) for t in "cdef"] == [searcher.suggest(t) for t in "cdef"] and again.suggest("g") == Searcher.FINISHED
    assert first[0] != first[1]
    with pytest.raises(RuntimeError, match="6 points, this round 3"):
        GridSearcher(_POINTS[:3]).restore_from_dir(str(tmp_path))


def test_a_grid_round_started_by_rays_variant_generator_continues_with_it(tmp_path):
    store = SweepStore(str(tmp_path), "s")
    (tmp_path / "s" / "tune-0").mkdir(parents=True)
    assert not started_by_variant_generator(store, "tune-0")
    (tmp_path / "s" / "tune-0" / "search_gen_state-2026-11-30_10-00-00.json").write_text("{}")
    assert not started_by_variant_generator(store, "tune-0")
    (tmp_path / "s" / "tune-0" / "basic-variant-state-2026-11-29_10-00-00.json").write_text("{}")
    assert started_by_variant_generator(store, "tune-0")
    grid, config = round_search(SweepCfg(), SPACE, _POINTS, None, variant_generator=True)
    assert isinstance(grid, BasicVariantGenerator) and config["seed"] == 0
    assert sorted(config["vdproj.rank"].categories) == [16, 32, 64]


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
