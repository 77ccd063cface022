"""Baseline evaluation of a frozen base: overall and position-wise perplexity on validation samples.

A single file is evaluated whole unless ``val_fraction`` is below 1 (then its last fraction, a trial's
validation range); a source with splits is evaluated on its validation split. Which windows were
evaluated is printed and recorded in ``eval.json`` (``evaluated``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from . import __version__
from .atomic import write_json
from .config import ConfigError, DataCfg, EvalCfg
from .data import load_samples, resolve_source
from .evaluate import PositionStats, evaluate, format_table
from .models import check_seq_len, load_base, model_config, resolve_model


def run_eval(cfg: EvalCfg, out: str | Path | None = None, *, log: Callable[[str], None] = print) -> dict:
    """Evaluate the base of ``cfg.model`` on ``cfg.data``'s validation samples; write ``out/eval.json``.

    Every input is checked (model name, data source, seq_len against the model's positions) before
    weights are loaded or text is tokenized.

    Raises:
        KvsweepError: a bad model, data source, seq_len or sample count (ConfigError, MissingFileError,
            DataError, HubUnavailableError), with one line saying what to change.
    """
    t0 = time.perf_counter()
    source = resolve_model(cfg.model)
    if cfg.model.random_init and cfg.model.tokenizer is None:
        raise ConfigError(f"model {cfg.model.name} with random weights has no tokenizer; give one with --tokenizer (a tokenizer.json or a folder)")
    resolve_source(cfg.data)
    check_seq_len(model_config(source), cfg.data.seq_len, cfg.model.name)
    base = load_base(cfg.model, log=log)
    if base.tokenizer is None:
        raise ConfigError(f"model {cfg.model.name} has no tokenizer; give one with --tokenizer (a tokenizer.json or a folder)")
    samples = load_samples(cfg.data, base.tokenizer, log=log)
    stats = evaluate(base.model, samples.val, batch_size=cfg.batch_size)
    result = eval_record(stats, cfg, samples.info, base.model_path, str(base.device), time.perf_counter() - t0)
    log(format_table(stats, cfg.bucket_ranges, title=f"{cfg.model.name} on {samples.info['source']}: "
                     f"{len(samples.val):,} validation samples of {cfg.data.seq_len} tokens"))
    log(result["evaluated"]["text"])
    if out is not None:
        path = Path(out) / "eval.json"
        write_json(path, result)
        log(f"wrote {path}")
    return result


def eval_record(stats: PositionStats, cfg: EvalCfg, data_info: dict, model_path: str | None, device: str, seconds: float) -> dict:
    """The ``eval.json`` record of one evaluation."""
    return {
        "val_ppl": stats.ppl,
        "tokens": stats.total_tokens,
        "nll_sum": stats.total_nll,
        "positions": stats.buckets(cfg.bucket_ranges),
        "model": cfg.model.name,
        "model_path": model_path,
        "revision": cfg.model.revision,
        "random_init": cfg.model.random_init,
        "data": data_info,
        "seq_len": cfg.data.seq_len,
        "val_samples": data_info["val_samples"],
        "evaluated": evaluated_range(cfg.data, data_info),
        "batch_size": cfg.batch_size,
        "dtype": cfg.model.dtype,
        "device": device,
        "seconds": seconds,
        "kvsweep_version": __version__,
    }


def evaluated_range(data: DataCfg, info: dict) -> dict:
    """Which windows were evaluated: ``windows`` [lo, hi) of ``total_windows``, the ``split`` (None for a single
    file), ``whole_file``, the ``samples`` drawn from them, and ``text``, the line ``kvsweep eval`` prints."""
    n_samples = info["val_samples"]
    if "val_range" in info:  # a single file
        (lo, hi), split = info["val_range"], None
        whole = lo == 0
        where = "the whole file" if whole else f"the last {data.val_fraction:g} of the file"
    else:
        lo, hi, split, whole = 0, info["val_windows"], info["val_split"], False
        where = f"the {split} split of {info['source']}"
    drawn = "" if n_samples == hi - lo else f"{n_samples:,} samples of "
    text = f"evaluated {drawn}windows {lo}..{hi - 1} of {hi} ({where})"
    return {"split": split, "windows": [lo, hi], "total_windows": hi, "whole_file": whole, "samples": n_samples, "text": text}
