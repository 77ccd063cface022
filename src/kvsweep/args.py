"""Command-line arguments shared by ``kvsweep train``, ``kvsweep eval`` and ``kvsweep cache``: model, data and
the methods (whose flags come from the registry, ``kvsweep.adapters.options``)."""

from __future__ import annotations

import argparse

from .adapters.options import add_method_args, specs_from_args
from .config import DTYPES, Count, DataCfg, ModelCfg


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny", help="preset (tiny, tiny:PATH, pythia-70m ... pythia-12b), hub id or local folder (default: tiny)")
    g.add_argument("--revision", default=None, help="hub revision: branch, tag, commit or training step such as step143000")
    g.add_argument("--random-init", action="store_true", help="build a Pythia architecture with random weights, no download")
    g.add_argument("--tokenizer", default=None, help="a tokenizer.json or a folder, for a model that has none")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    g.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of the frozen base (default: float32)")


def add_data_args(p: argparse.ArgumentParser, *, train: bool) -> None:
    """The data flags; ``train``: those of ``kvsweep train`` (train samples and lengths), else of ``kvsweep eval``
    (which evaluates only: its ``--seq-len`` is the evaluation length, ``--eval-seq-len``)."""
    g = p.add_argument_group("data")
    g.add_argument("--data", default="tiny", help="tiny, tiny:PATH, wikitext-2, wikitext-103, a hub dataset id, or a local .txt/.jsonl/.parquet file (default: tiny)")
    g.add_argument("--data-config", default=None, help="hub dataset config name (e.g. wikitext-2-raw-v1)")
    g.add_argument("--data-revision", default=None, help="hub dataset revision")
    g.add_argument("--train-split", default="train")
    g.add_argument("--val-split", default="validation")
    g.add_argument("--test-split", default="test")
    g.add_argument("--text-field", default="text", help="text column of JSON Lines, Parquet and hub rows (default: text)")
    if train:
        g.add_argument("--seq-len", type=int, default=128, help="tokens per train sample (default: 128)")
        g.add_argument("--eval-seq-len", default="max", help="tokens per validation and test sample, or 'max': the model's "
                       "maximum context (default: max; 2048 on Pythia and tiny)")
    else:
        g.add_argument("--eval-seq-len", "--seq-len", dest="eval_seq_len", default="max", help="tokens per validation and "
                       "test sample, or 'max': the model's maximum context (default: max; 2048 on Pythia and tiny)")
    g.add_argument("--encoding", default="utf-8", help="encoding of a text or JSON Lines file, e.g. latin-1, cp1252 (default: utf-8)")
    if train:
        g.add_argument("--train-samples", default=None, help="number of train samples or 'all' (default: all on tiny, else "
                       "10000; with --epochs 0 only what calibration uses)")
        g.add_argument("--val-fraction", type=float, default=0.1, help="for a single file: the fraction of its windows, before "
                       "the test range, that is validation (default: 0.1)")
        g.add_argument("--test-fraction", type=float, default=0.1, help="for a single file: its last fraction of windows is the "
                       "test range (default: 0.1; 0: no test set)")
    else:
        g.add_argument("--val-fraction", type=float, default=None, help="for a single file: evaluate a trial's validation range "
                       "(this fraction of the windows, before the test range) instead of the whole file")
        g.add_argument("--test-fraction", type=float, default=None, help="for a single file: evaluate a trial's test range, the "
                       "last fraction of the windows (default: 0.1 once --val-fraction or --test-fraction is given; without "
                       "either, the whole file is validation and there is no test set)")
    g.add_argument("--val-samples", default="all", help="number of validation samples or 'all' (default: all)")
    g.add_argument("--test-samples", default="all", help="number of test samples, 'all' or 0 (no test set) (default: all)")
    g.add_argument("--data-seed", type=int, default=0, help="picks the samples when fewer than all are asked for (default: 0)")


def model_cfg(a: argparse.Namespace) -> ModelCfg:
    return ModelCfg(name=a.model, revision=a.revision, random_init=a.random_init, tokenizer=a.tokenizer, device=a.device, dtype=a.dtype)


def data_cfg(a: argparse.Namespace, train_samples: Count = 0, *, train: bool = True) -> DataCfg:
    """The data arguments (``add_data_args(p, train=train)``'s) as a ``DataCfg``. ``kvsweep eval`` (``train`` False): without
    ``--val-fraction`` and ``--test-fraction`` a single file is evaluated whole, as validation; with either, a trial's
    validation and test ranges."""
    if train:
        seq_len, val_fraction, test_fraction = a.seq_len, a.val_fraction, a.test_fraction
    else:
        seq_len = 128  # no train samples: only the evaluation length matters
        ranges = a.val_fraction is not None or a.test_fraction is not None
        val_fraction = (0.1 if a.val_fraction is None else a.val_fraction) if ranges else 1.0
        test_fraction = (0.1 if a.test_fraction is None else a.test_fraction) if ranges else 0.0
    return DataCfg(
        source=a.data, config_name=a.data_config, revision=a.data_revision, train_split=a.train_split,
        val_split=a.val_split, test_split=a.test_split, text_field=a.text_field, seq_len=seq_len,
        eval_seq_len=a.eval_seq_len, train_samples=train_samples, val_samples=a.val_samples,
        test_samples=a.test_samples, val_fraction=val_fraction, test_fraction=test_fraction, seed=a.data_seed,
        encoding=a.encoding,
    )


def add_adapter_args(p: argparse.ArgumentParser, title: str = "adapters") -> argparse._ArgumentGroup:
    """``--adapter NAME`` and every registered method's option flags (``--vdproj.rank 64``; older flags such as
    ``--rank`` as aliases)."""
    g = p.add_argument_group(title, "a method is used when --adapter names it or one of its --<method>.<option> flags is given")
    add_method_args(g)
    return g


def adapter_specs(a: argparse.Namespace) -> tuple:
    """The methods the arguments name (with their options), checked as a combination."""
    return specs_from_args(a)
