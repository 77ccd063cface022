"""The ``kvsweep`` command.

    kvsweep eval --model tiny --data tiny                 # baseline perplexity, overall and by position
    kvsweep eval --model EleutherAI/pythia-70m --revision step143000 --data wikitext-2 --out runs/base
    kvsweep eval --model pythia-70m --random-init --tokenizer tokenizer.json --data wiki.valid.raw   # the whole file
    kvsweep train --model tiny --data tiny --adapter vdproj --rank 32 --out runs/r32  # --overwrite / --resume an earlier one
    kvsweep tiny                                          # build (or show) the offline tiny preset
"""

from __future__ import annotations

import argparse
import json
import sys

from .config import DTYPES, Count, DataCfg, EvalCfg, KvsweepError, ModelCfg, calibration_samples, default_train_samples, parse_bounds


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny", help="preset (tiny, tiny:PATH, pythia-70m ... pythia-12b), hub id or local folder (default: tiny)")
    g.add_argument("--revision", default=None, help="hub revision: branch, tag, commit or training step such as step143000")
    g.add_argument("--random-init", action="store_true", help="build a Pythia architecture with random weights, no download")
    g.add_argument("--tokenizer", default=None, help="a tokenizer.json or a folder, for a model that has none")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    g.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of the frozen base (default: float32)")


def add_data_args(p: argparse.ArgumentParser, *, train: bool) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default="tiny", help="tiny, tiny:PATH, wikitext-2, wikitext-103, a hub dataset id, or a local .txt/.jsonl/.parquet file (default: tiny)")
    g.add_argument("--data-config", default=None, help="hub dataset config name (e.g. wikitext-2-raw-v1)")
    g.add_argument("--data-revision", default=None, help="hub dataset revision")
    g.add_argument("--train-split", default="train")
    g.add_argument("--val-split", default="validation")
    g.add_argument("--text-field", default="text", help="text column of JSON Lines, Parquet and hub rows (default: text)")
    g.add_argument("--seq-len", type=int, default=128, help="tokens per sample (default: 128)")
    g.add_argument("--encoding", default="utf-8", help="encoding of a text or JSON Lines file, e.g. latin-1, cp1252 (default: utf-8)")
    if train:
        g.add_argument("--train-samples", default=None, help="number of train samples or 'all' (default: all on tiny, else "
                       "10000; with --epochs 0 only what calibration uses)")
        g.add_argument("--val-fraction", type=float, default=0.1, help="for a single file: the last fraction of its windows is validation (default: 0.1)")
    else:
        g.add_argument("--val-fraction", type=float, default=None, help="for a single file: evaluate only the last fraction of its "
                       "windows, the validation range of a trial (default: the whole file)")
    g.add_argument("--val-samples", default="all", help="number of validation samples or 'all' (default: all)")
    g.add_argument("--data-seed", type=int, default=0, help="picks the samples when fewer than all are asked for (default: 0)")


def model_cfg(a: argparse.Namespace) -> ModelCfg:
    return ModelCfg(name=a.model, revision=a.revision, random_init=a.random_init, tokenizer=a.tokenizer, device=a.device, dtype=a.dtype)


def data_cfg(a: argparse.Namespace, train_samples: Count = 0) -> DataCfg:
    """The data arguments as a ``DataCfg``; ``--val-fraction`` left out (``kvsweep eval``) is the whole file."""
    return DataCfg(
        source=a.data, config_name=a.data_config, revision=a.data_revision, train_split=a.train_split,
        val_split=a.val_split, text_field=a.text_field, seq_len=a.seq_len, train_samples=train_samples,
        val_samples=a.val_samples, val_fraction=1.0 if a.val_fraction is None else a.val_fraction, seed=a.data_seed,
        encoding=a.encoding,
    )


def cmd_eval(a: argparse.Namespace) -> int:
    from .baseline import run_eval

    cfg = EvalCfg(model=model_cfg(a), data=data_cfg(a), batch_size=a.batch_size,
                  buckets=parse_bounds(a.buckets) if a.buckets else None)
    run_eval(cfg, a.out)
    return 0


def add_trial_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("adapters")
    g.add_argument("--adapter", action="append", default=[], help="vdproj, ka_residual, ka_replace or ka_gated; repeat to combine vdproj with one KA variant")
    g.add_argument("--rank", type=int, default=None, help="vdproj: compressed width r (1..hidden size)")
    g.add_argument("--layers", default=None, help="vdproj: 'all' (default) or comma-separated layer indices")
    g.add_argument("--target", default="v", help="vdproj: v, k or kv (keys are compressed before the rotary embedding)")
    g.add_argument("--init", default="random", help="vdproj: random, pca or identity")
    g.add_argument("--no-bias", action="store_true", help="vdproj: down and up without bias")
    g.add_argument("--calib-samples", type=int, default=64, help="vdproj init pca: train samples to measure V on")
    g.add_argument("--ka-layers", default=None, help="KA variants: 'last' (default) or comma-separated layer indices")
    g = p.add_argument_group("loss")
    g.add_argument("--schedule", default="lm", help="lm, rec_to_lm (the seed's), rec_to_lm_cosine, rec_to_lm_step, rec")
    g.add_argument("--kl-weight", type=float, default=0.0, help="constant weight of KL(base || adapted)")
    for term in ("lm", "rec", "kl"):
        g.add_argument(f"--w-{term}", default=None, help=f"custom schedule of the {term} weight: NUMBER or KIND:START:END[:AT]")
    g = p.add_argument_group("training")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--epochs", type=int, default=30, help="0 only evaluates the base and the adapters at init")
    g.add_argument("--patience", type=int, default=3, help="early stop after this many epochs without a better val PPL")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--seed", type=int, default=0, help="adapter init and batch order")
    g.add_argument("--cache-dtype", default="float16", help="dtype the KV cache is accounted at: float16, bfloat16, float32")
    g.add_argument("--amp", default="auto", help="auto (bf16 autocast on CUDA), bf16 or off")
    g.add_argument("--buckets", default=None, help="position bucket bounds (default: the seed's)")


def adapter_specs(a: argparse.Namespace) -> tuple:
    """The adapters named by ``--adapter`` (with their options), checked as a combination."""
    from .adapters import AdapterSpec, check_combination

    specs = []
    for name in a.adapter:
        if name == "vdproj":
            if a.rank is None:
                raise KvsweepError("vdproj needs --rank (the compressed width, 1..hidden size)")
            specs.append(AdapterSpec.parse("vdproj", rank=a.rank, layers=a.layers, target=a.target, init=a.init,
                                           bias=not a.no_bias, calib_samples=getattr(a, "calib_samples", 64)))
        else:
            specs.append(AdapterSpec.parse(name, layers=a.ka_layers))
    check_combination(tuple(specs))
    return tuple(specs)


def trial_cfg(a: argparse.Namespace):
    from .config import TrainCfg
    from .losses import LossCfg, Schedule
    from .train import TrialCfg

    specs = adapter_specs(a)
    loss = LossCfg.named(a.schedule, kl=a.kl_weight)
    custom = {t: Schedule.parse(getattr(a, f"w_{t}")) for t in ("lm", "rec", "kl") if getattr(a, f"w_{t}") is not None}
    if custom:
        loss = LossCfg(**{t: custom.get(t, getattr(loss, t)) for t in ("lm", "rec", "kl")}, name="custom")
    train = TrainCfg(lr=a.lr, batch_size=a.batch_size, epochs=a.epochs, patience=a.patience, weight_decay=a.weight_decay,
                     seed=a.seed, cache_dtype=a.cache_dtype, amp=a.amp)
    train_samples = a.train_samples
    if train_samples is None:  # evaluating only, without calibration: none; else the source's default
        idle = a.epochs == 0 and calibration_samples(s.options for s in specs) == 0
        train_samples = 0 if idle else default_train_samples(a.data)
    return TrialCfg(model=model_cfg(a), data=data_cfg(a, train_samples), adapters=specs, loss=loss, train=train,
                    buckets=parse_bounds(a.buckets) if a.buckets else None)


def cmd_train(a: argparse.Namespace) -> int:
    from .train import run_trial_to_folder

    run_trial_to_folder(trial_cfg(a), a.out, resume=a.resume, overwrite=a.overwrite)
    return 0


def cmd_tiny(a: argparse.Namespace) -> int:
    from .tiny import ensure_tiny

    folder = ensure_tiny(a.corpus)
    meta = json.loads((folder / "tiny.json").read_text())
    print(f"tiny preset: {folder}")
    print(f"  held-out PPL {meta['heldout_ppl']:.2f}, unigram {meta['unigram_ppl']:.2f} ({meta['gain_over_unigram']:.1f}x), "
          f"{meta['parameters']:,} parameters, {meta['train_tokens']:,} train tokens, built in {meta['build_seconds']:.0f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvsweep", description="KV-cache compression sweeps on frozen Pythia models.")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("eval", help="perplexity of a frozen base, overall and by position bucket")
    add_model_args(e)
    add_data_args(e, train=False)
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--buckets", default=None, help="position bucket bounds, e.g. 0,16,32,64,96,128 (default: the seed's, scaled to --seq-len)")
    e.add_argument("--out", default=None, help="folder for eval.json")
    e.set_defaults(func=cmd_eval)

    tr = sub.add_parser("train", help="train one trial's adapters on the frozen base, without Ray")
    add_model_args(tr)
    add_data_args(tr, train=True)
    add_trial_args(tr)
    tr.add_argument("--out", required=True, help="folder for trial.json, epochs.parquet, positions.parquet and the checkpoint")
    again = tr.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    again.add_argument("--overwrite", action="store_true", help="replace the trial already in --out (its results and checkpoint)")
    tr.set_defaults(func=cmd_train)

    from .report.cli import add_parser as add_report_parser

    add_report_parser(sub)
    from .latent.cli import add_parser as add_cache_parser

    add_cache_parser(sub)

    t = sub.add_parser("tiny", help="build (on first use) and describe the offline tiny preset")
    t.add_argument("--corpus", default=None, help="a text file to pretrain on instead of the standard library's documentation")
    t.set_defaults(func=cmd_tiny)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("eval", "train", "tiny", "cache"):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # weight loading and saving bars; hub downloads keep theirs
    try:
        return args.func(args)
    except KvsweepError as e:
        print(f"kvsweep: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
