"""A trial's adapters as a folder to load elsewhere: ``kvsweep export`` writes it, ``load_exported`` reads it back.

    adapters.safetensors   adapters.<i>.<param>     the best epoch's weights of adapter i (torchtune-style named keys)
    kvsweep_adapters.json  {"format": "kvsweep-adapters", "version": 1,
                            "adapters": [{"name", "options", "label", "source"}],  the methods as built: ranks a
                                        calibration allocated written out, so loading needs no calibration data
                            "trained_as": [{"name", ...}],       the methods as the trial gave them
                            "base": ModelCfg (name, revision, dtype, tokenizer, random_init, seed, device),
                            "cache_dtype", "trial": {"id", "sweep", "source", "config"}, "data": DataCfg,
                            "figures": TrialFigures, "kvsweep_version", "git_revision" (the trial's),
                            "exported_by_git_revision"}
    README.md              the model card (``kvsweep.export_card``)

``kvsweep.export_info`` reads and writes the JSON (``ExportInfo``).

Weights are data only (safetensors, JSON): nothing is unpickled when an export loads.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors, save as save_tensors

from . import __version__
from .adapters import Adapter, attached, make_adapter
from .atomic import atomic_path
from .config import ConfigError, KvsweepError
from .export_card import model_card
from .export_info import FORMAT, VERSION, ExportError, ExportInfo
from .latent.decoder import LatentDecoder
from .latent.generate import Generation, generate
from .latent.trial import find_trial, trial_adapters, trial_specs
from .models import Base, dims, load_base, model_config, resolve_model
from .train.folder import git_revision

WEIGHTS_FILE = "adapters.safetensors"
INFO_FILE = "kvsweep_adapters.json"
CARD_FILE = "README.md"
KEY_PREFIX = "adapters"


def export_trial(source: str | Path, out: str | Path, trial_id: str | None = None, *, overwrite: bool = False,
                 log: Callable[[str], None] = print) -> Path:
    """Write the export of a trial (a ``kvsweep train --out`` folder, or trial ``trial_id`` of a sweep's results folder)
    into the folder ``out``, in one atomic replace; return ``out``. Only the base's config is read, not its weights.

    Raises:
        ConfigError: ``out`` is a file, or a folder that is not empty (and not ``overwrite``, or not an export).
        KvsweepError: what ``kvsweep.latent.trial.find_trial`` and ``trial_adapters`` raise (no such trial, no checkpoint).
    """
    out = Path(out).expanduser()
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"out: {out} is a file; give a folder for the export")
        if any(out.iterdir()) and not (overwrite and (out / INFO_FILE).is_file()):
            raise ConfigError(f"out: {out} is not empty; give a new folder" + ("" if overwrite else
                              " (or --overwrite to replace an earlier export)"))
    record = find_trial(source, trial_id)
    model, _ = trial_specs(record.config)
    adapters = trial_adapters(record, dims(model_config(resolve_model(model))))
    info = ExportInfo(
        adapters=tuple(a.resolved_spec() for a in adapters), trained_as=tuple(record.config["adapters"]),
        base=replace(model, device="auto"), cache_dtype=record.config["train"]["cache_dtype"], trial_id=record.trial_id,
        sweep=record.sweep, source=str(record.source.resolve()), config=record.config, figures=record.figures,
        kvsweep_version=__version__, exported_by_git_revision=git_revision())
    tensors = {f"{KEY_PREFIX}.{i}.{name}": t.detach().to("cpu", copy=True).contiguous()
               for i, a in enumerate(adapters) for name, t in a.state_dict().items()}
    with atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / WEIGHTS_FILE).write_bytes(save_tensors(tensors, metadata={"format": FORMAT, "version": str(VERSION)}))
        (tmp / INFO_FILE).write_text(json.dumps(info.to_json(), indent=1) + "\n")
        (tmp / CARD_FILE).write_text(model_card(info, adapters))
    log(f"exported trial {record.trial_id} ({', '.join(s.name for s in info.adapters)}, best epoch "
        f"{info.figures.best_epoch}) to {out}")
    return out


def read_export(folder: str | Path) -> tuple[ExportInfo, list[dict[str, torch.Tensor]]]:
    """The info and the weights (per adapter, CPU tensors) of an export folder.

    Raises:
        ExportError: the folder is not an export (no ``kvsweep_adapters.json``), is one of a newer format version, or
            its files are damaged.
    """
    folder = Path(folder).expanduser()
    path = folder / INFO_FILE
    if not path.is_file():
        raise ExportError(f"{folder} is not a kvsweep export: it has no {INFO_FILE} (write one with kvsweep export)")
    try:
        info = ExportInfo.from_json(json.loads(path.read_text()), str(path))
    except ValueError as e:
        if isinstance(e, KvsweepError):
            raise
        raise ExportError(f"{path} is not valid JSON (truncated or damaged?): {e}") from None
    try:
        tensors = load_tensors((folder / WEIGHTS_FILE).read_bytes())
    except FileNotFoundError:
        raise ExportError(f"{folder / WEIGHTS_FILE} not found: the export is incomplete") from None
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise ExportError(f"{folder / WEIGHTS_FILE} is not a valid safetensors file: {e}") from None
    states: list[dict[str, torch.Tensor]] = [{} for _ in info.adapters]
    for key, t in tensors.items():
        prefix, _, rest = key.partition(".")
        index, _, name = rest.partition(".")
        if prefix != KEY_PREFIX or not index.isdigit() or int(index) >= len(states) or not name:
            raise ExportError(f"{folder / WEIGHTS_FILE}: unexpected key {key!r} (expected {KEY_PREFIX}.<0..{len(states) - 1}>.<param>)")
        states[int(index)][name] = t
    return info, states


class ExportedTrial:
    """A loaded export: the frozen ``base`` with the trial's ``adapters`` attached to ``base.model`` (``model``) until
    ``close()`` (or the end of a ``with`` block); ``info`` what the export recorded, ``config`` the trial's config."""

    def __init__(self, base: Base, adapters: list[Adapter], info: ExportInfo):
        self.base, self.adapters, self.info = base, adapters, info
        self._stack = ExitStack()
        self._stack.enter_context(attached(base.model, adapters))

    @property
    def model(self):
        """The base model with the adapters attached: ``model(input_ids=ids).logits`` (B, T, V) are the adapted logits."""
        return self.base.model

    @property
    def config(self) -> dict:
        return self.info.config

    def decoder(self, cache_dtype: str | None = None, **kwargs) -> LatentDecoder:
        """A ``LatentDecoder`` over the model and the adapters: its cache holds what the methods cache (their codes).
        ``cache_dtype``: float16, bfloat16 or float32 (default: the trial's); other arguments as ``LatentDecoder``'s."""
        return LatentDecoder(self.model, self.adapters, cache_dtype=cache_dtype or self.info.cache_dtype, **kwargs)

    def generate(self, prompt_ids: torch.Tensor, max_new_tokens: int, *, cache_dtype: str | None = None, **kwargs) -> Generation:
        """``max_new_tokens`` after ``prompt_ids`` (B, T) with the latent cache (greedy unless ``temperature`` > 0; other
        arguments as ``kvsweep.latent.generate``'s); ``.tokens`` (B, max_new_tokens) are the new tokens."""
        return generate(self.decoder(cache_dtype), prompt_ids.to(self.base.device), max_new_tokens, **kwargs)

    def close(self) -> None:
        """Detach the adapters: ``model`` is the base again."""
        self._stack.close()

    def __enter__(self) -> "ExportedTrial":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_exported(folder: str | Path, *, device: str | None = None, log: Callable[[str], None] = print) -> ExportedTrial:
    """Load an export written by ``kvsweep export``: the base it names (``device`` overrides the default, ``auto``) with
    the trial's adapters attached, built from their resolved options (no calibration) and loaded with its weights.

        trial = kvsweep.load_exported("exports/vdproj-r64")
        logits = trial.model(input_ids=ids).logits             # (B, T, V), adapted
        new = trial.generate(ids, 32).tokens                   # (B, 32), greedy, with the latent cache
        trial.close()                                          # the base again

    Raises:
        ExportError: not an export, an export of a newer format version, or weights that do not fit its adapters.
        KvsweepError: the base cannot be loaded (e.g. a hub model while offline).
    """
    folder = Path(folder).expanduser()
    info, states = read_export(folder)
    model = info.base if device is None else replace(info.base, device=device)
    d = dims(model_config(resolve_model(model)))
    adapters = [make_adapter(spec, d) for spec in info.adapters]
    for i, (a, sd) in enumerate(zip(adapters, states)):
        try:
            a.load_state_dict(sd)
        except RuntimeError as e:  # missing, unexpected or differently shaped weights
            raise ExportError(f"{folder / WEIGHTS_FILE}: the weights of adapter {i} ({a.name}) do not fit it: {e}") from None
    base = load_base(model, log=log)
    log(f"loaded {', '.join(a.name for a in adapters)} of trial {info.trial_id} from {folder}")
    return ExportedTrial(base, [a.to(base.device).eval() for a in adapters], info)
