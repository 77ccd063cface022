"""Load a trained trial (a ``kvsweep train --out DIR`` folder) for inference: its base and its adapters."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Callable

from ..adapters import Adapter, AdapterSpec, check_combination, make_adapter
from ..checkpoint import CheckpointError, has_checkpoint, load_best_adapter_states
from ..config import ConfigError, MissingFileError, ModelCfg
from ..models import Base, dims, load_base, model_config, resolve_model


def trial_specs(config: dict) -> tuple[ModelCfg, tuple[AdapterSpec, ...]]:
    """The base and the adapter specs of a trial from its ``TrialCfg.to_dict()``."""
    try:
        model = ModelCfg(**config["model"])
        specs = tuple(AdapterSpec.parse(d["name"], **{k: v for k, v in d.items() if k != "name"}) for d in config["adapters"])
    except (KeyError, TypeError) as e:
        raise ConfigError(f"trial config is not one kvsweep train wrote: {e}") from None
    check_combination(specs)
    return model, specs


def load_trial(folder: str | Path, *, device: str | None = None, log: Callable[[str], None] = print) -> tuple[Base, list[Adapter], dict]:
    """The frozen base, the trial's adapters with their best epoch's weights (else the last epoch's) from its
    ``checkpoint`` folder, in eval mode, and the trial's config. ``device`` overrides the trial's.

    Raises:
        MissingFileError: no ``trial.json``, or no checkpoint (the trial was never trained) for adapters with weights
            (training-free ones, without any, need none).
        CheckpointError: the checkpoint is damaged, does not fit the trial's adapters, or is an older
            kvsweep's pickle (refused unread: unpickling can run code).
        ConfigError: ``trial.json`` is not one ``kvsweep train`` wrote.
    """
    folder = Path(folder).expanduser()
    record_path = folder / "trial.json"
    if not record_path.is_file():
        raise MissingFileError(f"trial: {record_path} not found (give a folder written by kvsweep train --out DIR)")
    config = json.loads(record_path.read_text())["config"]
    model_cfg, specs = trial_specs(config)
    if not specs:
        raise ConfigError(f"trial {folder} has no adapters")
    if device is not None:
        model_cfg = replace(model_cfg, device=device)
    ckpt = folder / "checkpoint"
    if not has_checkpoint(ckpt):
        d = dims(model_config(resolve_model(model_cfg)))
        if any(make_adapter(spec, d).state_dict() for spec in specs):
            raise MissingFileError(f"trial: no checkpoint in {ckpt} (was it trained?)")
        base = load_base(model_cfg, log=log)  # training-free methods (no weights): nothing to load
        log(f"{', '.join(s.name for s in specs)}: no weights, no checkpoint needed")
        return base, [make_adapter(spec, dims(base.config)).to(base.device).eval() for spec in specs], config
    states, which = load_best_adapter_states(ckpt)
    base = load_base(model_cfg, log=log)
    adapters = [make_adapter(spec, dims(base.config)) for spec in specs]
    if len(states) != len(adapters):
        raise ConfigError(f"trial {folder}: the checkpoint holds {len(states)} adapters, the config {len(adapters)}")
    for a, spec, sd in zip(adapters, specs, states):
        try:
            a.load_state_dict(sd)
        except RuntimeError as e:  # missing, unexpected or differently shaped weights
            raise CheckpointError(f"trial {folder}: the checkpoint's weights do not fit {spec.name}: {e}") from None
        a.to(base.device).eval()
    log(f"loaded the {which}'s weights of {', '.join(s.name for s in specs)} from {ckpt}")
    return base, adapters, config
