"""The ``kvsweep`` command.

    kvsweep eval --model tiny --data tiny                 # baseline perplexity, overall and by position
    kvsweep eval --model EleutherAI/pythia-70m --revision step143000 --data wikitext-2 --out runs/base
    kvsweep eval --model pythia-70m --random-init --tokenizer tokenizer.json --data wiki.valid.raw   # the whole file
    kvsweep train --model tiny --data tiny --vdproj.rank 32 --out runs/r32      # --overwrite / --resume an earlier one
    kvsweep train --adapter ka_gated --ka_gated.layers 1 --vdproj.rank 32 --vdproj.init pca --out runs/both
    kvsweep export runs/r32 -o exports/r32                # a trial's adapters to load elsewhere (kvsweep.load_exported)
    kvsweep export ~/ray_results/vdproj --trial 1a2b3c4d -o exports/best
    kvsweep downstream RESULTS --tasks lambada_openai,piqa  # lm-eval tasks on the base and the sweep's front
    kvsweep tiny                                          # build (or show) the offline tiny preset
"""

from __future__ import annotations

import argparse
import json
import sys

from .args import add_adapter_args, add_data_args, add_model_args, adapter_specs, data_cfg, model_cfg
from .config import EvalCfg, KvsweepError, calibration_samples, default_train_samples, parse_bounds


def cmd_eval(a: argparse.Namespace) -> int:
    from .baseline import run_eval

    cfg = EvalCfg(model=model_cfg(a), data=data_cfg(a, train=False), batch_size=a.batch_size,
                  buckets=parse_bounds(a.buckets) if a.buckets else None)
    run_eval(cfg, a.out)
    return 0


def add_trial_args(p: argparse.ArgumentParser) -> None:
    add_adapter_args(p)
    g = p.add_argument_group("loss")
    g.add_argument("--schedule", default="lm", help="lm, rec_to_lm (the seed's), rec_to_lm_cosine, rec_to_lm_step, rec")
    g.add_argument("--kl-weight", type=float, default=0.0, help="constant weight of KL(base || adapted)")
    for term in ("lm", "rec", "kl"):
        g.add_argument(f"--w-{term}", default=None, help=f"custom schedule of the {term} weight: NUMBER or KIND:START:END[:AT]")
    g = p.add_argument_group("training")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--epochs", type=int, default=30, help="0 only evaluates the base and the adapters at init (epoch 0, "
                   "as a method without trainable parameters always does)")
    g.add_argument("--patience", type=int, default=3, help="early stop after this many epochs without a better val PPL "
                   "than the best epoch's (the init, epoch 0, included)")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--seed", type=int, default=0, help="adapter init and batch order")
    g.add_argument("--cache-dtype", default="float16", help="dtype the KV cache is accounted at: float16, bfloat16, float32")
    g.add_argument("--amp", default="auto", help="auto (bf16 autocast on CUDA), bf16 or off")
    g.add_argument("--buckets", default=None, help="position bucket bounds of the evaluation samples (default: the seed's, "
                   "doubling beyond 128 to --eval-seq-len)")


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


def cmd_export(a: argparse.Namespace) -> int:
    from .export import export_trial

    export_trial(a.source, a.out, a.trial, overwrite=a.overwrite)
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
    e.add_argument("--buckets", default=None, help="position bucket bounds, e.g. 0,16,32,64,96,128 (default: the seed's, "
                   "doubling beyond 128 to --eval-seq-len)")
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
    from .report.compact import add_parser as add_compact_parser

    add_compact_parser(sub)
    from .latent.cli import add_parser as add_cache_parser

    add_cache_parser(sub)
    from .downstream.cli import add_parser as add_downstream_parser

    add_downstream_parser(sub)

    x = sub.add_parser("export", help="a trial's adapters (best epoch) as a folder to load elsewhere: weights, config, model card")
    x.add_argument("source", help="a kvsweep train --out folder, or a sweep's results folder (with --trial)")
    x.add_argument("--trial", default=None, help="the trial id (as in trials.parquet) or trial folder name, for a sweep's results")
    x.add_argument("-o", "--out", required=True, help="the export folder (new or empty)")
    x.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    x.set_defaults(func=cmd_export)

    t = sub.add_parser("tiny", help="build (on first use) and describe the offline tiny preset")
    t.add_argument("--corpus", default=None, help="a text file to pretrain on instead of the standard library's documentation")
    t.set_defaults(func=cmd_tiny)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("eval", "train", "tiny", "cache", "export", "downstream"):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # weight loading and saving bars; hub downloads keep theirs
    try:
        return args.func(args)
    except KvsweepError as e:
        print(f"kvsweep: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
