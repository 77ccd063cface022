"""A trial's checkpoint on disk: written atomically, read without running any of its contents.

A checkpoint is one flat folder (it travels between processes as ``{file name: bytes}``) of files that
hold data only: tensors as safetensors under torchtune-style named keys, everything else as JSON.

    state.json                 {"format": "kvsweep-checkpoint", "version": 1, "adapters": n,
                                "trial": {"epoch", "step", "best_val_ppl", ..., "history": [{metric: value}]},
                                "optimizer": {"param_groups": [{"lr", "betas", ..., "params": [0, 1, ...]}],
                                              "values": {"optimizer.state.<p>.<name>": number}},
                                "rng": {"numpy": {"bit_generator": "MT19937", "key": [624 x uint32],
                                                  "pos", "has_gauss", "cached_gaussian"}}}
    adapters.safetensors       adapter.<i>.<param>                  adapter i's weights after this epoch
    best_adapters.safetensors  adapter.<i>.<param>                  the best epoch's weights (once there is one)
    optimizer.safetensors      optimizer.state.<p>.<name>           AdamW's exp_avg, exp_avg_sq, step of parameter p
    rng.safetensors            rng.torch                            torch's CPU generator state, uint8 (5056,)

JSON floats keep NaN and +-inf (as Python's ``json`` writes them) and round-trip bit for bit, so a
resumed trial continues exactly where it stopped. Older kvsweep versions wrote pickles (``state.pt``,
``best_adapters.pt``); unpickling can run arbitrary code, so they are refused, never opened. No
function here unpickles anything.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors, save as save_tensors

from .atomic import atomic_path
from .config import KvsweepError

STATE_FILE = "state.json"
ADAPTERS_FILE = "adapters.safetensors"
BEST_ADAPTERS_FILE = "best_adapters.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
PICKLED_FILES = ("state.pt", "best_adapters.pt")  # older kvsweep versions: refused, never read

FORMAT = "kvsweep-checkpoint"
VERSION = 1
ADAPTER_PREFIX = "adapter"
OPTIMIZER_PREFIX = "optimizer.state"
TORCH_RNG_KEY = "rng.torch"
_INDEX = r"(0|[1-9][0-9]*)"  # one spelling per index: "adapter.01.x" is no alias of "adapter.1.x"
ADAPTER_KEY = re.compile(rf"{re.escape(ADAPTER_PREFIX)}\.{_INDEX}\.(.+)", re.ASCII)
OPTIMIZER_KEY = re.compile(rf"{re.escape(OPTIMIZER_PREFIX)}\.{_INDEX}\.([^.]+)", re.ASCII)
GROUP_LISTS = ("params", "param_names")  # param-group lists that stay lists; others (betas) are tuples
_TENSOR_PARSE_ERRORS = (SafetensorError, ValueError, TypeError, KeyError, RuntimeError)

StateDict = dict[str, torch.Tensor]


class CheckpointError(KvsweepError):
    """A checkpoint that is missing, damaged, pickled by an older kvsweep, or not this trial's."""


# ----------------------------------------------------------------------------- writing


def save_checkpoint(folder: str | os.PathLike, adapters: Sequence[torch.nn.Module], optimizer: torch.optim.Optimizer | None,
                    trial_state: dict, best: Sequence[StateDict] | None, previous: str | os.PathLike | None = None) -> None:
    """Write the checkpoint ``folder`` in one atomic replace: the adapters' weights, the optimizer's state,
    torch's and numpy's global RNG states (as they are now) and ``trial_state``.

    ``trial_state`` is plain data (str keys; ints, floats including NaN/inf, bools, None, lists, dicts).
    ``best`` is the best epoch's adapter state dicts when this epoch is the best; when ``None``, the best
    weights are carried over from ``folder`` itself or from ``previous`` (the checkpoint a restarted
    trial resumed from), whichever has them first.

    Raises:
        TypeError: ``trial_state`` holds a value JSON cannot hold.
    """
    folder = Path(folder)
    opt = optimizer.state_dict() if optimizer is not None else {"state": {}, "param_groups": []}
    opt_tensors: StateDict = {}
    opt_values: dict[str, Any] = {}
    for p, entries in opt["state"].items():
        for name, value in entries.items():
            key = f"{OPTIMIZER_PREFIX}.{p}.{name}"
            if isinstance(value, torch.Tensor):
                opt_tensors[key] = value
            else:
                opt_values[key] = value
    numpy_rng = np.random.get_state()  # ("MT19937", key (624,) uint32, pos, has_gauss, cached_gaussian)
    state = {
        "format": FORMAT,
        "version": VERSION,
        "adapters": len(adapters),
        "trial": trial_state,
        "optimizer": {"param_groups": opt["param_groups"], "values": opt_values},
        "rng": {"numpy": {"bit_generator": numpy_rng[0], "key": [int(k) for k in numpy_rng[1]], "pos": int(numpy_rng[2]),
                          "has_gauss": int(numpy_rng[3]), "cached_gaussian": float(numpy_rng[4])}},
    }
    text = json.dumps(state, indent=1, default=_plain) + "\n"
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        _write_tensors(tmp / ADAPTERS_FILE, _adapter_tensors([a.state_dict() for a in adapters]))
        _write_tensors(tmp / OPTIMIZER_FILE, opt_tensors)
        _write_tensors(tmp / RNG_FILE, {TORCH_RNG_KEY: torch.get_rng_state()})
        if best is not None:
            _write_tensors(tmp / BEST_ADAPTERS_FILE, _adapter_tensors(best))
        else:
            for source in (folder, previous):  # a restarted trial writes into a new folder: carry them over
                if source is not None and (Path(source) / BEST_ADAPTERS_FILE).is_file():
                    (tmp / BEST_ADAPTERS_FILE).write_bytes((Path(source) / BEST_ADAPTERS_FILE).read_bytes())
                    break
        (tmp / STATE_FILE).write_text(text)


def _plain(value: Any) -> Any:
    """JSON for numpy scalars (``json.dumps``' ``default``)."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"checkpoint: a {type(value).__name__} cannot be written as JSON: {value!r}")


def _adapter_tensors(states: Sequence[StateDict]) -> StateDict:
    return {f"{ADAPTER_PREFIX}.{i}.{name}": t for i, sd in enumerate(states) for name, t in sd.items()}


def _write_tensors(path: Path, tensors: StateDict) -> None:
    # safetensors wants contiguous CPU tensors that share no memory: own copies, bitwise equal
    path.write_bytes(save_tensors({k: t.detach().to("cpu", copy=True).contiguous() for k, t in tensors.items()},
                                  metadata={"format": FORMAT, "version": str(VERSION)}))


# ----------------------------------------------------------------------------- reading


def has_checkpoint(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a checkpoint this kvsweep reads (its files are checked when loaded).

    Raises:
        CheckpointError: the folder holds only an older kvsweep's pickled checkpoint.
    """
    folder = Path(folder)
    if (folder / STATE_FILE).is_file():
        return True
    _refuse_pickles(folder)
    return False


def saved_epoch(folder: str | os.PathLike) -> int:
    """The number of epochs trained when the checkpoint ``folder`` was written (0 before the first).

    Raises:
        CheckpointError: the folder holds no checkpoint, a pickled one, or a damaged ``state.json``.
    """
    return _read_state(Path(folder))["trial"]["epoch"]


def saved_progress(folder: str | os.PathLike) -> tuple[int, dict | None]:
    """The checkpoint's epoch (as ``saved_epoch``) and the metrics the trial reported for it (the last of its
    history; ``None`` before the first), from one read of ``state.json``.

    Raises:
        CheckpointError: the folder holds no checkpoint, a pickled one, or a damaged ``state.json``.
    """
    trial = _read_state(Path(folder))["trial"]
    history = trial.get("history") or []
    return trial["epoch"], (dict(history[-1]) if history and isinstance(history[-1], dict) else None)


def load_checkpoint(folder: str | os.PathLike, adapters: Sequence[torch.nn.Module],
                    optimizer: torch.optim.Optimizer | None) -> dict:
    """Restore ``adapters``' weights, ``optimizer``'s state and the global torch and numpy RNG states from
    the checkpoint ``folder``; return its trial state (the ``trial_state`` given to ``save_checkpoint``).

    Every file is read and checked against ``adapters`` before anything is changed.

    Raises:
        CheckpointError: a file is missing, truncated or not what kvsweep writes (naming it); the folder
            holds an older kvsweep's pickled checkpoint; the weights do not fit ``adapters``.
    """
    folder = Path(folder)
    state = _read_state(folder)
    weights = _adapter_states(folder / ADAPTERS_FILE, state["adapters"])
    if len(weights) != len(adapters):
        raise CheckpointError(f"{folder / ADAPTERS_FILE} holds {len(weights)} adapters; this trial has {len(adapters)}")
    for i, (a, sd) in enumerate(zip(adapters, weights)):
        _check_fits(sd, a.state_dict(), f"{folder / ADAPTERS_FILE}, adapter {i}")
    opt_state = _optimizer_state(folder, state, optimizer) if optimizer is not None else None
    torch_rng = _read_tensors(folder / RNG_FILE).get(TORCH_RNG_KEY)
    try:
        torch.Generator().set_state(torch_rng)  # checks it on a private generator first
    except (TypeError, RuntimeError) as e:
        raise CheckpointError(f"{folder / RNG_FILE}: no valid {TORCH_RNG_KEY} state ({e})") from None
    numpy_rng = _numpy_rng(state["rng"], folder / STATE_FILE)

    for a, sd in zip(adapters, weights):
        a.load_state_dict(sd)
    if optimizer is not None:
        try:
            optimizer.load_state_dict(opt_state)
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{folder / OPTIMIZER_FILE}: the optimizer state does not fit this trial ({e})") from None
    torch.set_rng_state(torch_rng)
    np.random.set_state(numpy_rng)
    return state["trial"]


def checkpoint_adapter_states(folder: str | os.PathLike) -> list[StateDict]:
    """The adapters' state dicts (CPU tensors) saved in the checkpoint ``folder``, in the trial's order, unchecked against
    any adapter (a trial whose calibration shapes its adapters takes their shapes from them before it resumes).

    Raises:
        CheckpointError: a file is missing, truncated or not what kvsweep writes.
    """
    folder = Path(folder)
    return _adapter_states(folder / ADAPTERS_FILE, _read_state(folder)["adapters"])


def load_best_adapter_states(folder: str | os.PathLike) -> tuple[list[StateDict], str]:
    """The adapters' state dicts (CPU tensors) of the best epoch, else of the last epoch, and which
    (``"best epoch"`` or ``"last epoch"``).

    Raises:
        CheckpointError: the folder holds no checkpoint, a pickled one, or a damaged file (naming it).
    """
    folder = Path(folder)
    state = _read_state(folder)
    if (folder / BEST_ADAPTERS_FILE).is_file():
        return _adapter_states(folder / BEST_ADAPTERS_FILE, state["adapters"]), "best epoch"
    return _adapter_states(folder / ADAPTERS_FILE, state["adapters"]), "last epoch"


def _refuse_pickles(folder: Path) -> None:
    for name in PICKLED_FILES:
        if (folder / name).is_file():
            raise CheckpointError(f"{folder} holds a pickled checkpoint ({name}) of an older kvsweep; kvsweep no longer "
                                  "loads pickles, which can run code when loaded: train the trial again without --resume")


def _read_state(folder: Path) -> dict:
    """``state.json`` of ``folder``, checked for the fields every reader relies on."""
    path = folder / STATE_FILE
    if not path.is_file():
        _refuse_pickles(folder)
        raise CheckpointError(f"{path} not found: {folder} holds no kvsweep checkpoint")
    try:
        state = json.loads(path.read_bytes())
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read: {e}") from None
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"{path} is not valid JSON (truncated or damaged?): {e}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a kvsweep checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path} is a checkpoint of version {state.get('version')!r}; this kvsweep reads version {VERSION}")
    n, trial = state.get("adapters"), state.get("trial")
    if not _is_int(n) or n < 0:
        raise CheckpointError(f"{path}: 'adapters' must be a count >= 0, not {n!r}")
    if not isinstance(trial, dict) or not _is_int(trial.get("epoch")) or trial["epoch"] < 0:
        raise CheckpointError(f"{path}: 'trial' must hold the trial state with an epoch >= 0")
    if not isinstance(state.get("optimizer"), dict) or not isinstance(state.get("rng"), dict):
        raise CheckpointError(f"{path}: 'optimizer' and 'rng' must be objects")
    return state


def _read_tensors(path: Path) -> StateDict:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found: the checkpoint is incomplete") from None
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read: {e}") from None
    try:
        return load_tensors(data)
    except _TENSOR_PARSE_ERRORS as e:
        raise CheckpointError(f"{path} is not a valid safetensors file (truncated or damaged?): {e}") from None


def _adapter_states(path: Path, n: int) -> list[StateDict]:
    states: list[StateDict] = [{} for _ in range(n)]
    for key, t in _read_tensors(path).items():
        m = ADAPTER_KEY.fullmatch(key)
        if m is None or int(m[1]) >= n:
            raise CheckpointError(f"{path}: unexpected key {key!r} (expected {ADAPTER_PREFIX}.<0..{n - 1}>.<param>)")
        states[int(m[1])][m[2]] = t
    return states


def _check_fits(saved: StateDict, current: StateDict, where: str) -> None:
    if saved.keys() != current.keys():
        missing, unexpected = sorted(current.keys() - saved.keys()), sorted(saved.keys() - current.keys())
        raise CheckpointError(f"{where}: the weights do not fit (missing {missing}, unexpected {unexpected})")
    for name, t in current.items():
        if saved[name].shape != t.shape:
            raise CheckpointError(f"{where}: {name} has shape {tuple(saved[name].shape)}, the adapter {tuple(t.shape)}")


def _optimizer_state(folder: Path, state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """The ``optimizer.state_dict()`` that ``save_checkpoint`` wrote, checked against ``optimizer``'s parameters."""
    path, groups = folder / OPTIMIZER_FILE, state["optimizer"].get("param_groups")
    values = state["optimizer"].get("values", {})
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups) \
            or not isinstance(values, dict):
        raise CheckpointError(f"{folder / STATE_FILE}: 'optimizer' must hold param_groups with their params")
    saved_ids = [i for g in groups for i in g["params"]]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if len(saved_ids) != len(params) or len(groups) != len(optimizer.param_groups):
        raise CheckpointError(f"{folder / STATE_FILE}: the optimizer state is of {len(saved_ids)} parameters in "
                              f"{len(groups)} groups; this trial has {len(params)} in {len(optimizer.param_groups)}")
    param_of = dict(zip(saved_ids, params))
    per_param: dict[int, dict[str, Any]] = {}
    for key, value in [*_read_tensors(path).items(), *values.items()]:
        m = OPTIMIZER_KEY.fullmatch(key)
        if m is None or int(m[1]) not in param_of:
            raise CheckpointError(f"{path}: unexpected key {key!r} (expected {OPTIMIZER_PREFIX}.<param index>.<name>)")
        shape = param_of[int(m[1])].shape
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != shape:
            raise CheckpointError(f"{path}: {key} has shape {tuple(value.shape)}, its parameter {tuple(shape)}")
        per_param.setdefault(int(m[1]), {})[m[2]] = value
    groups = [{k: (tuple(v) if isinstance(v, list) and k not in GROUP_LISTS else v) for k, v in g.items()} for g in groups]
    return {"state": per_param, "param_groups": groups}


def _numpy_rng(rng: dict, path: Path) -> tuple:
    """numpy's legacy global state tuple from its JSON, checked on a private generator."""
    s = rng.get("numpy")
    try:
        value = (s["bit_generator"], np.array(s["key"], dtype=np.uint32), s["pos"], s["has_gauss"], s["cached_gaussian"])
        np.random.RandomState().set_state(value)
    except (TypeError, KeyError, ValueError, OverflowError) as e:
        raise CheckpointError(f"{path}: no valid numpy RNG state ({type(e).__name__}: {e})") from None
    return value


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
