"""How a sweep's round picks its configurations: the whole grid, random points, or Optuna's multi-objective
sampler through Ray Tune's ``OptunaSearch``.

``grid`` hands its points out one by one through a Tune ``Searcher`` (``GridSearcher``), so that Tune's config
holds the fixed values only: Tune deep-copies that config for every trial it creates, and Ray's variant
generator with ``points_to_evaluate`` needs every searched field's values in it (a grid with thousands of
seeds then costs O(N) per trial, O(N^2) per round). A round that a version before this one started continues
with Ray's variant generator, whose saved state it left.

``optuna`` searches the same space as ``random`` (every searched field a categorical of its values) on two
objectives at once, both minimised: the trial's best validation PPL (``best_val_ppl`` of its last result:
the PPL it would enter the report with, also when the scheduler stopped it) and its KV bytes/token. The
sampler is Optuna's TPE (multivariate, seeded), which supports several objectives (Ozaki et al.,
"Multiobjective Tree-Structured Parzen Estimator", JAIR 2022) and needs no population, unlike NSGA-II, so
it works at the budgets of tens of trials a sweep affords. Its state survives a continued sweep: Tune saves
the searcher with the experiment and restores it when the round resumes. A grown search (``--grow`` with a
larger ``--num-samples``) is a new round whose study starts from the finished trials of the earlier rounds.
"""

from __future__ import annotations

import json
import math
from typing import Any

import optuna
from ray import tune
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, SearchAlgorithm, Searcher
from ray.tune.search.optuna import OptunaSearch

from ..config import SweepCfg
from .space import Space, space_values
from .writer import TrialRecord

OBJECTIVES = ("best_val_ppl", "kv_bytes_per_token")  # both minimised
SAMPLER_SEED = 0  # one sweep specification, one sequence of suggestions (given the same results)


def tune_value(value: Any) -> Any:
    """A search-space value as Tune's config holds it: a list of layer indices as ``"0,1,2"`` (Tune's variant
    generator takes lists in a config for nested search spaces)."""
    return ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else value


def objectives(rec: TrialRecord) -> list[float] | None:
    """A finished trial's values of ``OBJECTIVES`` (its last result's); ``None`` if it has none to tell."""
    last = rec.results[-1] if rec.results else {}
    values = [last.get(k) for k in OBJECTIVES]
    if rec.error or not rec.finished or any(not isinstance(v, (int, float)) or not math.isfinite(v) for v in values):
        return None
    return [float(v) for v in values]


class GridSearcher(Searcher):
    """The grid's points, each once and in their order: O(1) per trial. Its saved state (with the experiment,
    for a continued round) is the index of the next point.

    Args:
        points: the configurations, field -> Tune config value (``tune_value``).
    """

    def __init__(self, points: list[dict[str, Any]]):
        super().__init__()
        self.points = points
        self.next = 0

    def suggest(self, trial_id: str) -> dict[str, Any] | str:
        if self.next >= len(self.points):
            return Searcher.FINISHED
        self.next += 1
        return self.points[self.next - 1]  # Tune's SearchGenerator deep-copies it into the trial's config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass  # a grid learns nothing from its trials

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "w") as f:
            json.dump({"next": self.next, "points": len(self.points)}, f)

    def restore(self, checkpoint_path: str) -> None:
        """Raises:
            RuntimeError: the saved state is of a grid of another size (another round's)."""
        with open(checkpoint_path) as f:
            state = json.load(f)
        if state["points"] != len(self.points):
            raise RuntimeError(f"the saved grid searcher has {state['points']} points, this round {len(self.points)}")
        self.next = state["next"]


def round_search(sweep: SweepCfg, space: Space, points: list[dict] | None, max_concurrent: int | None,
                 history: list[TrialRecord] = (), variant_generator: bool = False) -> tuple[SearchAlgorithm, dict[str, Any]]:
    """The search algorithm of one round and the config ``tune.run`` gets with it.

    Args:
        sweep: ``sweep.search`` picks it: ``grid`` (``points``, each once), ``random`` or ``optuna``.
        space: the round's search space, field -> values (or a union of such grids, ``grid`` only).
        points: the grid's configurations (``grid`` only).
        max_concurrent: the most trials at once (``None``: no limit).
        history: trials of earlier rounds; ``optuna`` tells its study their objectives first.
        variant_generator: a ``grid`` round through Ray's variant generator (a round it started continues with it).
    """
    values = {k: [tune_value(v) for v in vs] for k, vs in space_values(space).items()}
    fixed = {k: v[0] for k, v in values.items() if len(v) == 1}
    searched = {k: v for k, v in values.items() if len(v) > 1}
    if sweep.search == "grid" and not variant_generator:  # Tune's config: the fixed values; the searcher: the rest
        return _limited(GridSearcher([{k: tune_value(v) for k, v in p.items() if k not in fixed} for p in points or []]),
                        max_concurrent), fixed
    if sweep.search in ("grid", "random"):  # Tune's variant generator: the grid's points each once, or random picks
        grid = [{k: tune_value(v) for k, v in p.items()} for p in points or []] if sweep.search == "grid" else None
        return (BasicVariantGenerator(points_to_evaluate=grid, max_concurrent=max_concurrent or 0),
                {**fixed, **{k: tune.choice(v) for k, v in searched.items()}})
    startup = min(10, max(2, (sweep.num_samples or 0) // 3))  # random suggestions before TPE models the results
    distributions = OptunaSearch.convert_search_space({k: tune.choice(v) for k, v in sorted(searched.items())}) if searched else None
    search = OptunaSearch(space=distributions, metric=list(OBJECTIVES),
                          mode=["min"] * len(OBJECTIVES),
                          sampler=optuna.samplers.TPESampler(seed=SAMPLER_SEED, multivariate=True, n_startup_trials=startup))
    if searched:
        _tell(search, searched, distributions, history)
    return _limited(search, max_concurrent), fixed


def _limited(searcher: Searcher, max_concurrent: int | None) -> Searcher:
    """``searcher`` under Ray's ``ConcurrencyLimiter`` when there is a limit."""
    return ConcurrencyLimiter(searcher, max_concurrent=max_concurrent) if max_concurrent else searcher


def _tell(search: OptunaSearch, searched: dict[str, list], distributions: dict, history: list[TrialRecord]) -> None:
    """Add the finished trials of earlier rounds to the study, with both objectives. (Ray 2.60's
    ``evaluated_rewards`` takes one objective only, so the trials go to the study Ray made for the space.)"""
    study = search._ot_study
    for rec in history:
        told = objectives(rec)
        params = {k: rec.config.get(k) for k in searched}
        if told is None or any(params[k] not in searched[k] for k in searched):
            continue
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, values=told))
