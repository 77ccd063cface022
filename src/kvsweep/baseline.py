"""Baseline evaluation of a frozen base: overall and position-wise perplexity on validation and test samples.

A single file is evaluated whole (as validation, no test set) unless ``val_fraction`` is below 1 (then the
validation and test ranges of a trial: ``kvsweep.data.load_samples``); a source with splits is evaluated on its
validation and test splits. Samples are ``eval_seq_len`` tokens long (``"max"``: the model's maximum context).
Which windows were evaluated is printed and recorded in ``eval.json`` (``evaluated``, and ``test.evaluated``).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from . import __version__
from .atomic import write_json
from .config import ConfigError, DataCfg, EvalCfg
from .data import load_samples, resolve_source
from .evaluate import PositionStats, evaluate, format_table
from .models import check_seq_len, load_base, model_config, resolve_model


def run_eval(cfg: EvalCfg, out: str | Path | None = None, *, log: Callable[[str], None] = print) -> dict:
    """Evaluate the base of ``cfg.model`` on ``cfg.data``'s validation and test samples; write ``out/eval.json``.

    Every input is checked (model name, data source, the evaluation length against the model's positions)
    before weights are loaded or text is tokenized.

    Raises:
        KvsweepError: a bad model, data source, eval_seq_len or sample count (ConfigError, MissingFileError,
            DataError, HubUnavailableError), with one line saying what to change.
    """
    t0 = time.perf_counter()
    source = resolve_model(cfg.model)
    if cfg.model.random_init and cfg.model.tokenizer is None:
        raise ConfigError(f"model {cfg.model.name} with random weights has no tokenizer; give one with --tokenizer (a tokenizer.json or a folder)")
    resolve_source(cfg.data)
    config = model_config(source)
    cfg = replace(cfg, data=cfg.data.with_max_positions(config.max_position_embeddings))
    check_seq_len(config, cfg.data.eval_len, cfg.model.name, what="eval_seq_len")
    base = load_base(cfg.model, log=log)
    if base.tokenizer is None:
        raise ConfigError(f"model {cfg.model.name} has no tokenizer; give one with --tokenizer (a tokenizer.json or a folder)")
    samples = load_samples(cfg.data, base.tokenizer, log=log)
    stats = evaluate(base.model, samples.val, batch_size=cfg.batch_size)
    test = evaluate(base.model, samples.test, batch_size=cfg.batch_size) if len(samples.test) else None
    result = eval_record(stats, test, cfg, samples.info, base.model_path, str(base.device), time.perf_counter() - t0)
    E = cfg.data.eval_len
    log(format_table(stats, cfg.bucket_ranges, title=f"{cfg.model.name} on {samples.info['source']}: "
                     f"{len(samples.val):,} validation samples of {E} tokens"))
    log(result["evaluated"]["text"])
    if test is not None:
        log("")
        log(format_table(test, cfg.bucket_ranges, title=f"{cfg.model.name} on {samples.info['source']}: "
                         f"{len(samples.test):,} test samples of {E} tokens"))
        log(result["test"]["evaluated"]["text"])
    if out is not None:
        path = Path(out) / "eval.json"
        write_json(path, result)
        log(f"wrote {path}")
    return result


def eval_record(stats: PositionStats, test: PositionStats | None, cfg: EvalCfg, data_info: dict, model_path: str | None,
                device: str, seconds: float) -> dict:
    """The ``eval.json`` record of one evaluation: the validation figures at the top level (``val_ppl``, ``tokens``,
    ``nll_sum``, ``positions``, ``evaluated``), the test figures under ``test`` (``None`` without a test set) and
    ``test_ppl``."""
    test_part = None if test is None else {
        "ppl": test.ppl, "tokens": test.total_tokens, "nll_sum": test.total_nll, "positions": test.buckets(cfg.bucket_ranges),
        "samples": data_info["test_samples"], "evaluated": evaluated_range(cfg.data, data_info, "test"),
    }
    return {
        "val_ppl": stats.ppl,
        "test_ppl": None if test is None else test.ppl,
        "tokens": stats.total_tokens,
        "nll_sum": stats.total_nll,
        "positions": stats.buckets(cfg.bucket_ranges),
        "test": test_part,
        "model": cfg.model.name,
        "model_path": model_path,
        "revision": cfg.model.revision,
        "random_init": cfg.model.random_init,
        "data": data_info,
        "seq_len": cfg.data.eval_len,
        "eval_seq_len": cfg.data.eval_len,
        "val_samples": data_info["val_samples"],
        "test_samples": data_info["test_samples"],
        "evaluated": evaluated_range(cfg.data, data_info),
        "batch_size": cfg.batch_size,
        "dtype": cfg.model.dtype,
        "device": device,
        "seconds": seconds,
        "kvsweep_version": __version__,
    }


def evaluated_range(data: DataCfg, info: dict, which: str = "validation") -> dict:
    """Which windows of ``which`` set (``validation`` or ``test``) were evaluated: ``windows`` [lo, hi) of
    ``total_windows``, the ``split`` (None for a single file), ``whole_file``, the ``samples`` drawn from them, and
    ``text``, the line ``kvsweep eval`` prints."""
    test = which == "test"
    n_samples = info["test_samples" if test else "val_samples"]
    if "val_range" in info:  # a single file
        (lo, hi), split, total = info["test_range" if test else "val_range"], None, info["eval_windows"]
        whole = not test and lo == 0 and hi == total
        if whole:
            where = "the whole file"
        elif test:
            where = f"the last {data.test_fraction:g} of the file"
        elif data.test_fraction > 0:
            where = f"{data.val_fraction:g} of the file, before its last {data.test_fraction:g}"
        else:
            where = f"the last {data.val_fraction:g} of the file"
    else:
        split = info["test_split" if test else "val_split"]
        lo, hi, whole = 0, info["test_windows" if test else "val_windows"], False
        total = hi
        where = f"the {split} split of {info['source']}"
    drawn = "" if n_samples == hi - lo else f"{n_samples:,} samples of "
    text = f"evaluated {drawn}windows {lo}..{hi - 1} of {total} ({where})"
    return {"split": split, "windows": [lo, hi], "total_windows": total, "whole_file": whole, "samples": n_samples, "text": text}
