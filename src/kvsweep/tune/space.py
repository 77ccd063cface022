"""The search space: its fields, their translation into typed trial configs, and its validation.

A search space maps field names (``space_fields()``) to lists of values; a point of it (one value per
field) is one trial's configuration, Ray's flat ``config`` dict. A grid search may also take a list of such
dicts, a union of grids (``[{"vdproj.rank": [64, 128]}, {"lowrank.k_rank": [8], "lowrank.group": [1, 2]}]``):
its points are every part's points, each completed with the fields of the other parts set to what the part
leaves them at (its own methods, no other, the default training values). ``trial_cfg`` is the one place where
such a dict becomes a typed ``TrialCfg``. The methods' fields come from the registry
(``kvsweep.adapters.options``): a family's key picks its method (``"ka": "ka_gated"``), and
``"<method>.<option>"`` (``"vdproj.rank": 64``) or ``"<family>.<option>"`` sets an option. No Ray here.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..adapters import bind_adapters, check_taps, kv_layout_of, make_adapter
from ..adapters.options import canonical_space, families, space_keys, specs_from_point, variant_label
from ..config import ConfigError, SweepCfg
from ..kvcache import base_layout
from ..data import resolve_source
from ..losses import LossCfg
from ..models import Dims, check_seq_len, dims, model_config, resolve_model
from ..train import TrialCfg

TRAINING_FIELDS = {
    "schedule": "named loss schedule",
    "kl_weight": "constant KL weight",
    "seed": "adapter init and batch order",
    "lr": "learning rate",
    "epochs": "the trial's most epochs, up to the sweep's --epochs (0: training-free, the methods at init evaluated once)",
}
DEFAULT_POINT: dict[str, Any] = {"schedule": "lm", "kl_weight": 0.0, "seed": 0, "lr": None, "epochs": None}
"""The training fields' values where a point does not give them; a method's options default to its own."""


def space_fields() -> dict[str, str]:
    """Every field a search space may have, with what it means: the registered methods' and the training fields."""
    return {**space_keys(), **TRAINING_FIELDS}
RUN_ONLY_TRAIN = ("compile", "loss_chunk", "eval_batch_size")
"""Training settings that change how a trial runs, not what it computes: not part of its identity."""


def trial_cfg(point: dict, sweep: SweepCfg) -> TrialCfg:
    """The typed trial config of one point of the search space (Ray's flat config dict).

    Raises:
        ConfigError: a field outside ``space_fields()`` or a value its method or schedule rejects.
    """
    fields = space_fields()
    unknown = sorted(k for k in point if k not in fields)
    if unknown:
        raise ConfigError(f"search space: unknown field {unknown[0]!r}; valid fields: {', '.join(fields)}")
    p = {**DEFAULT_POINT, **point}
    specs = specs_from_point(p)
    epochs = sweep.train.epochs if p["epochs"] is None else p["epochs"]
    if isinstance(epochs, bool) or not isinstance(epochs, int) or not 0 <= epochs <= sweep.train.epochs:
        raise ConfigError(f"search space: epochs must be a whole number in 0..{sweep.train.epochs} (the sweep's --epochs); got {epochs!r}")
    train = replace(sweep.train, seed=p["seed"], lr=p["lr"] if p["lr"] is not None else sweep.train.lr, epochs=epochs)
    return TrialCfg(model=sweep.model, data=sweep.data, adapters=specs,
                    loss=LossCfg.named(p["schedule"], kl=p["kl_weight"]), train=train)


def point_key(point: dict, sweep: SweepCfg) -> str:
    """The identity of a configuration: its trial config as canonical JSON, without the run-only settings.

    Two points that train the same trial (``{"lr": None}`` and ``{"lr": 1e-4}`` when 1e-4 is the sweep's
    learning rate, or a point with and without a field at its default) have the same key.
    """
    cfg = trial_cfg(point, sweep).to_dict()
    for name in RUN_ONLY_TRAIN:
        cfg["train"].pop(name, None)
    cfg["model"].pop("device", None)
    return json.dumps(cfg, sort_keys=True)


Space = dict[str, list] | list[dict[str, list]]
"""One grid (field -> values) or a union of grids."""


def space_parts(space: Space) -> list[dict[str, list]]:
    """The grids of a space: the space itself, or the parts of a union."""
    return list(space) if isinstance(space, (list, tuple)) else [space]


def is_union(space: Space) -> bool:
    return len(space_parts(space)) > 1


def canonical(space: Space) -> Space:
    """``canonical_space`` of each part; a union of one part is that part."""
    parts = [canonical_space(part) for part in space_parts(space)]
    return parts[0] if len(parts) == 1 else parts


def _left_at(point: dict, key: str) -> Any:
    """What ``point`` (a part's point) leaves a field it does not give at: a family at its chosen method (or none), a
    training field at its default, a method's option unset."""
    if key in families():
        chosen = [s.name for s in specs_from_point(point) if s.name in families()[key]]
        return chosen[0] if chosen else "none"
    return DEFAULT_POINT.get(key)


def grid_points(space: Space) -> list[dict]:
    """Every combination of the space's values, in the order of its fields (the last one fastest); for a union,
    each part's in turn, every point holding every field of the union (see the module's docstring)."""
    parts = space_parts(space)
    points = []
    for part in parts:
        keys = list(part)
        points += [dict(zip(keys, values)) for values in itertools.product(*(part[k] for k in keys))]
    if len(parts) == 1:
        return points
    union = list(dict.fromkeys(k for part in parts for k in part))
    return [{k: p[k] if k in p else _left_at(p, k) for k in union} for p in points]


def space_values(space: Space) -> dict[str, list]:
    """Each field's distinct values over the space's points, in order of appearance."""
    if not is_union(space):
        return dict(space_parts(space)[0])
    out: dict[str, list] = {}
    for p in grid_points(space):
        for k, v in p.items():
            seen = out.setdefault(k, [])
            if v not in seen:
                seen.append(v)
    return out


def check_space_shape(space: Space) -> None:
    """Every part a non-empty dict of known fields, each given as a non-empty list of values.

    Raises:
        ConfigError: naming the first bad field.
    """
    if isinstance(space, (list, tuple)) and not space:
        raise ConfigError("search space: a union of grids needs at least one part")
    fields = space_fields()
    for part in space_parts(space):
        if not isinstance(part, dict) or not part:
            raise ConfigError(f"search space: a dict of field -> list of values (or a list of them), got {part!r}")
        for key, values in part.items():
            if key not in fields:
                raise ConfigError(f"search space: unknown field {key!r}; valid fields: {', '.join(fields)}")
            if not isinstance(values, (list, tuple)) or not values:
                raise ConfigError(f"search space: {key} must be a non-empty list of values, got {values!r}")


def validate_space(space: Space, sweep: SweepCfg) -> list[TrialCfg]:
    """Check every value of every field, then every combination, against the model; before Ray starts.

    Raises:
        ConfigError: naming the field and value, or the combination, that cannot run; a union of grids under a
            search other than ``grid`` (random picks and Optuna draw each field on its own).
    """
    check_space_shape(space)
    if is_union(space) and sweep.search != "grid":
        raise ConfigError(f"search space: a union of {len(space_parts(space))} grids runs with --search grid, not {sweep.search}")
    cfgs = []
    for part in space_parts(space):
        cfgs += _validate_grid(part, sweep)
    return cfgs


def _validate_grid(space: dict[str, list], sweep: SweepCfg) -> list[TrialCfg]:
    source = resolve_model(sweep.model)
    resolve_source(sweep.data)
    config = model_config(source)
    check_seq_len(config, sweep.data.seq_len, sweep.model.name)
    check_seq_len(config, sweep.data.eval_len, sweep.model.name, what="eval_seq_len")
    d = dims(config)
    first = {k: v[0] for k, v in space.items()}
    for key, values in space.items():
        for value in values:
            try:
                for spec in trial_cfg({**first, key: value}, sweep).adapters:
                    make_adapter(spec, d)
            except ConfigError as e:
                raise ConfigError(f"search space: {key}={value!r}: {e}") from None
    cfgs, built = [], set()
    for point in grid_points(space):
        try:
            cfg = trial_cfg(point, sweep)
            check_taps(cfg.adapters, d)
            for spec in cfg.adapters:  # each distinct method setting built once, against the model
                if spec not in built:
                    make_adapter(spec, d)
                    built.add(spec)
            if len(cfg.adapters) > 1:  # methods that read each other (quant of a low-rank code): bound, as a trial binds them
                adapters = [make_adapter(spec, d) for spec in cfg.adapters]
                bind_adapters(adapters)
                kv_layout_of(adapters, base_layout(d.layers, d.hidden))
            cfgs.append(cfg)
        except ConfigError as e:
            raise ConfigError(f"search space: the combination {point}: {e}") from None
    return cfgs


def variant_name(cfg: TrialCfg) -> str:
    """The methods' labels and the schedule (``training-free`` for a trial of 0 epochs), without rank and seed: the colour
    of a trial in the report."""
    return variant_label(cfg.adapters, schedule_label(cfg))


def schedule_label(cfg: TrialCfg, trainable_params: int | None = None) -> str:
    """The trial's loss schedule, or ``training-free`` when it trains no epoch: 0 epochs, or methods without trainable
    parameters (``trainable_params`` 0, where known)."""
    return "training-free" if cfg.train.epochs == 0 or trainable_params == 0 else cfg.loss.name


def absolute_paths(sweep: SweepCfg) -> SweepCfg:
    """Local model, tokenizer, corpus and data paths made absolute: Ray runs each trial in its own folder."""

    def absolute(value: str | None) -> str | None:
        if value is None:
            return None
        prefix = "tiny:" if value.startswith("tiny:") else ""
        path = Path(value[len(prefix):]).expanduser()
        return prefix + str(path.resolve()) if value[len(prefix):] and path.exists() else value

    model = replace(sweep.model, name=absolute(sweep.model.name), tokenizer=absolute(sweep.model.tokenizer))
    return replace(sweep, model=model, data=replace(sweep.data, source=absolute(sweep.data.source)))


def with_eval_len(sweep: SweepCfg) -> SweepCfg:
    """The sweep with an ``eval_seq_len`` of ``"max"`` set to its base's maximum context (read from its config, no
    weights loaded), so that its specification and trials hold the number."""
    if sweep.data.eval_seq_len != "max":
        return sweep
    config = model_config(resolve_model(sweep.model))
    return replace(sweep, data=sweep.data.with_max_positions(config.max_position_embeddings))


def model_dims(sweep: SweepCfg) -> Dims:
    """Layers, width and heads of the sweep's base, read from its config (no weights loaded)."""
    return dims(model_config(resolve_model(sweep.model)))
