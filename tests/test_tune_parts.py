"""The sweep driver's parts, in this process and without Ray workers: the stored specification and what
continuing or growing may change, the results writer's state, the summary (the schedulers: test_scheduler.py)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from kvsweep.config import ConfigError, DataCfg, SweepCfg, TrainCfg
from kvsweep.data import Samples
from kvsweep.evaluate import PositionStats, SplitStats
from kvsweep.results import TRIAL_SCHEMA
from kvsweep.sweepargs import sweep_cfg, sweep_parser
from kvsweep.tune.driver import summarize
from kvsweep.tune.spec import SpecificationError, SweepRecord, data_digest, plan, round_points, specification
from kvsweep.tune.store import SweepStore
from kvsweep.tune.partwriter import ResultsWriter

SPACE = {"rank": [32, 64], "init": ["random", "pca"], "seed": [0]}


def _sweep(**kw) -> SweepCfg:
    return SweepCfg(name="s", data=DataCfg(train_samples=64, val_samples=16), train=TrainCfg(epochs=kw.pop("epochs", 2)), **kw)


def _spec(sweep: SweepCfg, space: dict, digest: str = "d") -> dict:
    return specification(sweep, space, digest)


def _stored(sweep: SweepCfg, space: dict) -> SweepRecord:
    p = plan(None, _spec(sweep, space), space, sweep)
    p.record.rounds[0].finished = True
    return SweepRecord.from_json(p.record.to_json(), "sweep.json")  # as read back from the storage


def test_a_new_sweep_is_one_round_of_the_whole_grid():
    sweep = _sweep()
    p = plan(None, _spec(sweep, SPACE), SPACE, sweep)
    assert p.todo == [0] and [r.tune for r in p.record.rounds] == ["tune-0"]
    assert len(round_points(p.record, 0, sweep)) == 4


def test_the_same_specification_continues_and_a_finished_sweep_has_nothing_to_run():
    sweep = _sweep()
    stored = _stored(sweep, SPACE)
    p = plan(stored, _spec(sweep, SPACE), SPACE, sweep, where="W")
    assert p.todo == [] and "nothing to run" in p.message
    stored.rounds[0].finished = False
    assert plan(stored, _spec(sweep, SPACE), SPACE, sweep).todo == [0]


def test_every_differing_field_is_named_once_with_old_and_new_value():
    sweep = _sweep()
    stored = _stored(sweep, SPACE)
    other = _sweep(epochs=3, grace_period=2)
    with pytest.raises(SpecificationError) as e:
        plan(stored, _spec(other, {**SPACE, "seed": [0, 1]}, "e"), {**SPACE, "seed": [0, 1]}, other, where="W")
    fields = [ln for ln in str(e.value).splitlines() if ln.startswith("  ")]
    assert fields == ['  data.digest: "d" -> "e"', "  scheduler.grace_period: 1 -> 2", "  space.seed: [0] -> [0, 1]",
                      "  train.epochs: 2 -> 3"]
    assert "--name" in str(e.value).splitlines()[-1]


def test_run_only_settings_are_not_part_of_the_specification():
    a = _sweep()
    b = SweepCfg(name="s", data=DataCfg(train_samples=64, val_samples=16), storage="/elsewhere", cpus_per_trial=2, pack=4,
                 max_concurrent=3, train=TrainCfg(epochs=2, loss_chunk=4096, eval_batch_size=64))
    assert _spec(a, SPACE) == _spec(b, SPACE)


def test_the_order_of_a_fields_values_is_not_part_of_the_specification():
    sweep = _sweep()
    assert _spec(sweep, {**SPACE, "rank": [64, 32]}) == _spec(sweep, SPACE)


def test_local_files_are_known_by_name_and_content_not_path(tmp_path):
    for where in ("a", "b"):
        (tmp_path / where).mkdir()
        (tmp_path / where / "corpus.txt").write_text("the same text")
    spec = {w: _spec(SweepCfg(name="s", data=DataCfg(source=str(tmp_path / w / "corpus.txt"), train_samples=8)), SPACE) for w in "ab"}
    assert spec["a"] == spec["b"] and spec["a"]["data.source"] == "corpus.txt"
    (tmp_path / "b" / "corpus.txt").write_text("other text")
    changed = _spec(SweepCfg(name="s", data=DataCfg(source=str(tmp_path / "b" / "corpus.txt"), train_samples=8)), SPACE)
    assert changed["data.source.digest"] != spec["a"]["data.source.digest"]


def test_grow_adds_only_the_new_grid_points():
    sweep = _sweep()
    stored = _stored(sweep, SPACE)
    grown = {**SPACE, "seed": [0, 1], "rank": [32, 64, 96]}
    p = plan(stored, _spec(sweep, grown), grown, sweep, grow=True)
    assert p.todo == [1] and "by 8 configuration(s)" in p.message
    new = round_points(p.record, 1, sweep)
    assert len(new) == 8 and all(q["seed"] == 1 or q["rank"] == 96 for q in new)
    # a field at its default value adds nothing: the same configurations
    same = {**SPACE, "lr": [None]}
    assert plan(stored, _spec(sweep, same), same, sweep, grow=True).todo == []


def test_grow_refuses_to_drop_configurations_or_change_anything_else():
    sweep = _sweep()
    stored = _stored(sweep, SPACE)
    fewer = {**SPACE, "rank": [32]}
    with pytest.raises(SpecificationError, match="only adds configurations: 2 configuration"):
        plan(stored, _spec(sweep, fewer), fewer, sweep, grow=True)
    with pytest.raises(SpecificationError, match="train.epochs: 2 -> 3"):
        plan(stored, _spec(_sweep(epochs=3), SPACE), SPACE, _sweep(epochs=3), grow=True)


def test_grow_of_a_random_search_raises_num_samples():
    sweep = _sweep(search="random", num_samples=4)
    stored = _stored(sweep, SPACE)
    more = _sweep(search="random", num_samples=10)
    p = plan(stored, _spec(more, SPACE), SPACE, more, grow=True)
    assert p.todo == [1] and p.record.rounds[1].num_samples == 6 and round_points(p.record, 1, more) is None
    with pytest.raises(SpecificationError, match="cannot lower"):
        plan(stored, _spec(_sweep(search="random", num_samples=2), SPACE), SPACE, _sweep(search="random", num_samples=2), grow=True)
    for other in (_sweep(), _sweep(search="optuna", num_samples=10)):  # another searcher is another sweep
        with pytest.raises(SpecificationError, match=f'search: "random" -> "{other.search}"'):
            plan(stored, _spec(other, SPACE), SPACE, other, grow=True)


def test_a_damaged_sweep_json_is_refused_naming_it():
    with pytest.raises(SpecificationError, match="sweep.json is not a sweep specification"):
        SweepRecord.from_json('{"format": 1, "name": "s"', "sweep.json")
    with pytest.raises(SpecificationError, match="format 7"):
        SweepRecord.from_json('{"format": 7}', "sweep.json")


def test_the_base_statistics_round_trip_bit_for_bit():
    val = PositionStats(np.array([1 / 3, 2.5e-17, 7.0]), np.array([3, 4, 5]))
    test = PositionStats(np.array([2 / 3, 1e-300, 9.5]), np.array([6, 7, 8]))
    def back(stats: SplitStats) -> SplitStats:
        r = SweepRecord("s", {})
        r.set_base_stats(stats)
        return SweepRecord.from_json(r.to_json(), "x").base_stats()

    both = back(SplitStats(val, test))
    assert both.val.nll_sum.tolist() == val.nll_sum.tolist() and both.val.tokens.tolist() == val.tokens.tolist()
    assert both.test.nll_sum.tolist() == test.nll_sum.tolist() and both.test.tokens.tolist() == test.tokens.tolist()
    assert back(SplitStats(val)).test is None  # a sweep without a test set


def test_the_data_digest_sees_any_change_of_the_samples():
    ids = np.arange(64, dtype=np.int32).reshape(4, 16)
    a = data_digest(Samples(train=ids[:3], val=ids[3:]))
    assert a == data_digest(Samples(train=ids[:3].copy(), val=ids[3:].copy()))
    changed = ids.copy()
    changed[0, 0] = 99
    assert a != data_digest(Samples(train=changed[:3], val=changed[3:]))
    assert a != data_digest(Samples(train=ids[:2], val=ids[2:]))
    assert a != data_digest(Samples(train=ids[:3], val=ids[3:], test=ids[2:3]))  # the test samples too


def test_the_results_writer_keeps_no_state_in_tunes_pickled_files(tmp_path):
    writer = ResultsWriter(_sweep(), SplitStats(PositionStats(np.ones(127), np.ones(127, dtype=np.int64))), SweepStore(str(tmp_path), "s"))
    writer.running["x"] = object()
    assert writer.get_state() is None  # Ray Tune pickles what get_state returns with the experiment


def _rows(*trials) -> pa.Table:
    rows = [{"trial_id": str(i), "status": s, "epochs_run": run, "max_epochs": 4, "best_val_ppl": 50.0, "base_val_ppl": 45.0,
             "variant": "v", "rank": 32} for i, (s, run) in enumerate(trials)]
    return pa.Table.from_pylist([{n: r.get(n) for n in TRIAL_SCHEMA.names} for r in rows], schema=TRIAL_SCHEMA)


def test_the_summary_counts_only_the_schedulers_stops_as_saved():
    text = summarize(_rows(("completed", 4), ("error", 1), ("early_stopped", 2)), "/r", None)
    assert "the scheduler stopped no trial" in text and "saved" not in text
    text = summarize(_rows(("completed", 4), ("asha_stopped", 1), ("error", 1)), "/r", None)
    assert "epochs run 6 of the 9 these trials would have run without the scheduler: it saved 3 (33%)" in text


def test_metrics_export_is_asked_for_with_a_port():
    assert sweep_cfg(sweep_parser("x", "v").parse_args(["--smoke-test"]), "v").metrics_port is None  # none by default
    assert sweep_cfg(sweep_parser("x", "v").parse_args(["--smoke-test", "--metrics-port", "0"]), "v").metrics_port == 0
    with pytest.raises(ConfigError, match="metrics_port"):
        SweepCfg(metrics_port=70000)


def test_a_methods_older_space_keys_are_the_same_fields_as_its_own():
    from kvsweep.adapters.options import canonical_space
    from kvsweep.config import ConfigError
    from kvsweep.tune.spec import canonical_specification

    sweep = _sweep()
    new = {"vdproj.rank": [32, 64], "vdproj.init": ["random", "pca"], "seed": [0]}
    assert canonical_space(SPACE) == new
    assert canonical_space({"ka": ["ka_gated"], "ka_layers": ["last"]}) == {"ka": ["ka_gated"], "ka.layers": ["last"]}
    stored = _stored(sweep, SPACE)  # a sweep.json written with the older keys
    stored.specification = canonical_specification(stored.specification)
    assert "space.vdproj.rank" in stored.specification and "space.rank" not in stored.specification
    p = plan(stored, _spec(sweep, new), new, sweep, where="W")
    assert p.todo == [] and "nothing to run" in p.message  # not refused: the same specification
    with pytest.raises(ConfigError, match="given twice"):
        canonical_space({"rank": [32], "vdproj.rank": [64]})


def test_methods_of_a_point_come_from_their_family_key_or_their_own_options():
    from kvsweep.adapters.options import specs_from_point
    from kvsweep.config import ConfigError

    assert [s.name for s in specs_from_point({"vdproj.rank": 8})] == ["vdproj"]
    # in registration order, V-DProj first: the order their inits are drawn in, as before methods came from the registry
    assert [s.name for s in specs_from_point({"ka": "ka_gated", "rank": 8})] == ["vdproj", "ka_gated"]
    assert specs_from_point({"rank": None, "ka": "none", "ka.layers": "0"}) == ()  # a family's options alone pick none of it
    (ka,) = specs_from_point({"ka": "ka_replace", "ka.layers": "0", "ka_replace.layers": "1"})
    assert ka.options.layers == (1,)  # the method's own key wins over its family's
    (ka,) = specs_from_point({"ka_gated.layers": "0"})
    assert ka.name == "ka_gated" and ka.options.layers == (0,)
    with pytest.raises(ConfigError, match="name it with the key 'ka'"):
        specs_from_point({"ka_gated.layers": "0", "ka_residual.layers": "1"})
    with pytest.raises(ConfigError, match="ka must be one of"):
        specs_from_point({"ka": "vdproj"})


def test_a_required_option_given_as_none_leaves_its_method_out():
    from kvsweep.adapters.options import specs_from_point

    assert [s.name for s in specs_from_point({"rank": None, "init": "pca", "ka": "ka_gated"})] == ["ka_gated"]
    assert [s.name for s in specs_from_point({"vdproj.rank": None, "vdproj.init": "pca"})] == []


UNION = [{"vdproj.rank": [32, 64], "schedule": ["rec_to_lm"], "seed": [0]},
         {"ka": ["ka_gated"], "ka.layers": ["last"], "seed": [0, 1]}]


def test_a_union_of_grids_is_each_parts_points_completed_with_what_the_part_leaves_the_others_at():
    from kvsweep.tune.space import grid_points, space_values, trial_cfg

    points = grid_points(UNION)
    assert len(points) == 4
    assert all(set(p) == {"vdproj.rank", "schedule", "seed", "ka", "ka.layers"} for p in points)
    vd, ka = points[:2], points[2:]
    assert all(p["ka"] == "none" and p["ka.layers"] is None and p["schedule"] == "rec_to_lm" for p in vd)
    assert all(p["vdproj.rank"] is None and p["schedule"] == "lm" for p in ka)  # the default schedule, not the other part's
    sweep = _sweep()
    assert [[s.name for s in trial_cfg(p, sweep).adapters] for p in points] == [["vdproj"]] * 2 + [["ka_gated"]] * 2
    values = space_values(UNION)
    assert values["vdproj.rank"] == [32, 64, None] and values["seed"] == [0, 1] and values["ka"] == ["none", "ka_gated"]
    # a part that gives a method through its options, not its family key, keeps that method when another part names the family
    mixed = [{"vdproj.rank": [32]}, {"vdproj": ["none"], "ka": ["ka_gated"]}]
    assert grid_points(mixed)[0]["vdproj"] == "vdproj" and grid_points(mixed)[1]["vdproj"] == "none"


def test_a_union_of_grids_is_one_specification_field_and_grows_by_its_new_points():
    sweep = _sweep()
    spec = _spec(sweep, UNION)
    assert "space" in spec and not any(k.startswith("space.") for k in spec)
    assert _spec(sweep, UNION[::-1]) == spec  # the parts' order changes no configuration
    stored = _stored(sweep, UNION)
    assert plan(stored, spec, UNION, sweep).todo == []
    grown = [UNION[0], {**UNION[1], "seed": [0, 1, 2]}]
    p = plan(stored, _spec(sweep, grown), grown, sweep, grow=True)
    new = round_points(p.record, 1, sweep)
    assert p.todo == [1] and len(new) == 1 and new[0]["seed"] == 2 and new[0]["ka"] == "ka_gated"
    with pytest.raises(SpecificationError, match="only adds configurations"):
        plan(stored, _spec(sweep, UNION[:1]), UNION[:1], sweep, grow=True)


def test_a_union_of_grids_needs_the_grid_search():
    from kvsweep.tune.space import check_space_shape, validate_space

    with pytest.raises(ConfigError, match="union of 2 grids runs with --search grid, not random"):
        validate_space(UNION, _sweep(search="random", num_samples=4))
    with pytest.raises(ConfigError, match="at least one part"):
        check_space_shape([])
    with pytest.raises(ConfigError, match="unknown field 'nope'"):
        check_space_shape([{"seed": [0]}, {"nope": [1]}])


def test_a_changed_union_names_the_parts_it_lost_and_gained():
    sweep = _sweep()
    stored = _stored(sweep, UNION)
    changed = [UNION[0], {**UNION[1], "ka.layers": ["0"]}]
    with pytest.raises(SpecificationError) as e:
        plan(stored, _spec(sweep, changed), changed, sweep, where="W")
    lines = [ln for ln in str(e.value).splitlines() if ln.startswith("  ")]
    assert len(lines) == 2 and lines[0].startswith("  space: part removed: ") and '"ka.layers": ["last"]' in lines[0]
    assert lines[1].startswith("  space: part added: ") and '"ka.layers": ["0"]' in lines[1]
