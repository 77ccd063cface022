"""Load a trained trial (a ``kvsweep train --out DIR`` folder) for inference: its base and its adapters."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from ..adapters import Adapter, AdapterSpec, check_combination, make_adapter
from ..config import ConfigError, MissingFileError, ModelCfg
from ..models import Base, dims, load_base


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
    """The frozen base, the trial's adapters with their best weights (``checkpoint/best_adapters.pt``, else the
    last epoch's in ``checkpoint/state.pt``) in eval mode, and the trial's config. ``device`` overrides the
    trial's."""
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
    if (ckpt / "best_adapters.pt").is_file():
        states = torch.load(ckpt / "best_adapters.pt", map_location="cpu", weights_only=False)
        which = "best epoch"
    elif (ckpt / "state.pt").is_file():
        states = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)["adapters"]
        which = "last epoch"
    else:
        raise MissingFileError(f"trial: no checkpoint/best_adapters.pt or checkpoint/state.pt in {folder} (was it trained?)")
    base = load_base(model_cfg, log=log)
    adapters = [make_adapter(spec, dims(base.config)) for spec in specs]
    if len(states) != len(adapters):
        raise ConfigError(f"trial {folder}: the checkpoint holds {len(states)} adapters, the config {len(adapters)}")
    for a, sd in zip(adapters, states):
        a.load_state_dict(sd)
        a.to(base.device).eval()
    log(f"loaded the {which}'s weights of {', '.join(s.name for s in specs)} from {ckpt}")
    return base, adapters, config
