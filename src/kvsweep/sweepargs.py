"""Command-line arguments shared by the sweep scripts in ``sweeps/`` (no Ray here)."""

from __future__ import annotations

import argparse

from .config import SCHEDULERS, SEARCHES, ConfigError, DataCfg, ModelCfg, SweepCfg, TrainCfg, default_train_samples

PACKED_LOSS_CHUNK = 4096  # a pack's stacked batch would otherwise hold float32 logits for all its trials' tokens
SMOKE = {"train_samples": 64, "val_samples": 16, "test_samples": 16, "eval_seq_len": 256, "epochs": 2}
"""What ``--smoke-test`` changes: a few samples, evaluated at 256 tokens (beyond the 128 trained on, but far below
the model's maximum, which costs minutes on CPU), 2 epochs."""


def sweep_parser(description: str, default_name: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke-test", action="store_true", help="the tiny preset, a handful of trials, 2 epochs: minutes on 2 CPU cores")
    p.add_argument("--name", default=None, help=f"experiment name; running the same name again continues it (default: {default_name}, {default_name}-smoke)")
    p.add_argument("--storage", default="~/kvsweep_results", help="results folder, or s3://bucket/path, gs://bucket/path (default: ~/kvsweep_results)")
    p.add_argument("--grow", action="store_true", help="add the configurations the search space gained (more --seeds, ranks, "
                   "--num-samples) to the sweep of this --name; only the new ones run, the results hold old and new")
    p.add_argument("--metrics-port", type=int, default=None, help="a local sweep's Ray exports Prometheus metrics on "
                   "127.0.0.1:PORT (0: a free port; default: no metrics export)")
    p.add_argument("--verbose", action="store_true", help="Ray Tune's status tables, Ray's info lines and every trial's own "
                   "output on the console (default: one line per trial event and a progress line; the trials' output stays in "
                   "Ray's logs)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else Ray starts in-process)")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=None, help="preset, hub id or local folder (default: tiny; pythia-70m for a full sweep on the hub)")
    g.add_argument("--revision", default=None)
    g.add_argument("--random-init", action="store_true")
    g.add_argument("--tokenizer", default=None)
    g.add_argument("--dtype", default="float32")
    g.add_argument("--data", default=None, help="tiny, wikitext-2, a hub dataset or a local file (default: tiny)")
    g.add_argument("--encoding", default="utf-8", help="encoding of a text or JSON Lines file, e.g. latin-1 (default: utf-8)")
    g.add_argument("--seq-len", type=int, default=128, help="tokens per train sample (default: 128)")
    g.add_argument("--eval-seq-len", default=None, help="tokens per validation and test sample, or 'max': the model's "
                   f"maximum context (default: max, 2048 on Pythia and tiny; {SMOKE['eval_seq_len']} with --smoke-test)")
    g.add_argument("--train-samples", default=None, help="train samples or 'all' (default: 10000; 'all' on tiny)")
    g.add_argument("--val-samples", default=None, help="validation samples or 'all' (default: all)")
    g.add_argument("--test-samples", default=None, help="test samples, 'all' or 0 (no test set) (default: all)")
    g.add_argument("--val-fraction", type=float, default=0.1, help="a single file: the fraction of its windows, before the "
                   "test range, that is validation (default: 0.1)")
    g.add_argument("--test-fraction", type=float, default=0.1, help="a single file: its last fraction of windows is the test "
                   "range (default: 0.1)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=None, help="epochs per trial, the scheduler's max_t (default: 30)")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--patience", type=int, default=3)
    g.add_argument("--loss-chunk", type=int, default=None, help="compute the LM loss from hidden states, this many tokens' "
                   "logits at a time, instead of the whole batch's logits (not with a KL weight); 0: off "
                   f"(default: {PACKED_LOSS_CHUNK} with --pack, else 0)")
    g.add_argument("--compile", default="off", choices=("off", "default", "reduce-overhead"),
                   help="torch.compile the training forward (reduce-overhead: CUDA graphs; default: off)")
    g.add_argument("--seeds", default="0", help="comma-separated training seeds (default: 0)")
    g = p.add_argument_group("scheduling")
    g.add_argument("--cpus-per-trial", type=float, default=1.0)
    g.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs per trial; fractions share a GPU (default: 0)")
    g.add_argument("--max-concurrent", type=int, default=None)
    g.add_argument("--pack", type=int, default=1, help="train up to this many trials together on one copy of the base, in "
                   "one batched forward per step (one pack process per GPU; it gets --cpus/--gpus-per-trial); "
                   "results are those of unpacked trials (default: 1, each trial in its own process)")
    g.add_argument("--packs", type=int, default=None, help="pack processes (default: as many as --gpus-per-trial fits the "
                   "cluster's GPUs, else 1)")
    g.add_argument("--search", default=None, choices=SEARCHES,
                   help="grid: every configuration of the search space once; random: --num-samples random picks; optuna: "
                        "--num-samples trials picked by Optuna's multi-objective sampler on (best validation PPL, KV bytes/token) "
                        "(default: random with --num-samples, else grid)")
    g.add_argument("--num-samples", type=int, default=None, help="trials of a random or optuna search (default: the full grid)")
    g.add_argument("--scheduler", choices=SCHEDULERS, default=None,
                   help="moasha: multi-objective ASHA, keeps the best 1/--reduction-factor of each rung by non-dominated sorting "
                   "on (val PPL, KV bytes/token); asha: by val PPL alone; fifo: every trial runs to its end (early stopping "
                   "still applies). A rung judges a trial once its LM weight is half its schedule's peak (default: moasha)")
    g.add_argument("--grace-period", type=int, default=1, help="(MO)ASHA: epochs before a trial can be stopped (default: 1)")
    g.add_argument("--reduction-factor", type=float, default=2.0, help="(MO)ASHA: keep 1/this of the trials at each rung (default: 2)")
    g.add_argument("--no-asha", action="store_true", help="deprecated: --scheduler fifo")
    g.add_argument("--max-failures", type=int, default=2, help="restarts of a crashed trial from its last checkpoint (default: 2)")
    g.add_argument("--report-dir", default="reports", help="where reports/<name>/ is written (default: reports)")
    g.add_argument("--inject-fault-at-epoch", type=int, default=None, help=argparse.SUPPRESS)  # tests: each trial crashes once
    return p


def scheduler_name(a: argparse.Namespace) -> str:
    """``--scheduler``, with ``--no-asha`` (deprecated) as ``fifo``.

    Raises:
        ConfigError: ``--no-asha`` with another ``--scheduler``.
    """
    if a.no_asha and a.scheduler not in (None, "fifo"):
        raise ConfigError(f"--no-asha is --scheduler fifo; it cannot go with --scheduler {a.scheduler}")
    return "fifo" if a.no_asha else a.scheduler or SCHEDULERS[0]


def sweep_cfg(a: argparse.Namespace, default_name: str) -> SweepCfg:
    smoke = a.smoke_test
    model = ModelCfg(name=a.model or "tiny", revision=a.revision, random_init=a.random_init, tokenizer=a.tokenizer, dtype=a.dtype)
    data = DataCfg(
        source=a.data or "tiny", seq_len=a.seq_len, encoding=a.encoding,
        eval_seq_len=a.eval_seq_len if a.eval_seq_len is not None else (SMOKE["eval_seq_len"] if smoke else "max"),
        train_samples=a.train_samples or (SMOKE["train_samples"] if smoke else default_train_samples(a.data or "tiny")),
        val_samples=a.val_samples or (SMOKE["val_samples"] if smoke else "all"),
        test_samples=a.test_samples if a.test_samples is not None else (SMOKE["test_samples"] if smoke else "all"),
        val_fraction=a.val_fraction, test_fraction=a.test_fraction,
    )
    train = TrainCfg(lr=a.lr, batch_size=a.batch_size, epochs=a.epochs if a.epochs is not None else (SMOKE["epochs"] if smoke else 30), patience=a.patience,
                     compile=a.compile, loss_chunk=a.loss_chunk if a.loss_chunk is not None else (PACKED_LOSS_CHUNK if a.pack > 1 else 0))
    return SweepCfg(
        name=a.name or (f"{default_name}-smoke" if smoke else default_name), model=model, data=data, train=train,
        storage=a.storage, address=a.address, cpus_per_trial=a.cpus_per_trial, gpus_per_trial=a.gpus_per_trial,
        max_concurrent=a.max_concurrent, pack=a.pack, packs=a.packs, search=a.search or ("grid" if a.num_samples is None else "random"),
        num_samples=a.num_samples, grace_period=a.grace_period,
        reduction_factor=a.reduction_factor, scheduler=scheduler_name(a), max_failures=a.max_failures, report_dir=a.report_dir,
        fail_once_at_epoch=a.inject_fault_at_epoch, metrics_port=a.metrics_port,
        verbose=a.verbose,
    )


def seeds(a: argparse.Namespace) -> list[int]:
    return [int(s) for s in str(a.seeds).split(",") if s.strip()]


def sweep_main(doc: str, default_name: str, search_space, argv=None) -> int:
    """The body of a sweep script: parse arguments, build the space from the model's dims, run the sweep.

    ``search_space(dims, smoke, seeds) -> dict`` is the script's own part.
    """
    import sys

    from .config import KvsweepError

    args = sweep_parser(doc.strip().splitlines()[0], default_name).parse_args(argv)
    from .tune import model_dims, run_sweep

    try:
        sweep = sweep_cfg(args, default_name)
        run_sweep(sweep, search_space(model_dims(sweep), args.smoke_test, seeds(args)), grow=args.grow)
    except KvsweepError as e:
        print(f"kvsweep: error: {e}", file=sys.stderr)
        return 2
    return 0
