"""The ``kvsweep downstream`` subcommand (lm-evaluation-harness on the base and on a sweep's trials).

    kvsweep downstream ~/kvsweep_results/vdproj --tasks lambada_openai,piqa,hellaswag,arc_easy    # the base and the front
    kvsweep downstream ~/kvsweep_results/vdproj --tasks piqa --trials 9c1d2e07,7f5741c0 --no-base
    kvsweep downstream runs/r64 --tasks kvsweep_cloze,kvsweep_choice --include-path tests/data/lm_eval --device cpu
"""

from __future__ import annotations

import argparse

from ..config import KvsweepError

DESCRIPTION = (
    "Run lm-evaluation-harness tasks on the base and on trials' adapters (the sweep's Pareto front unless --trials "
    "names some; or the trial of a kvsweep train folder). Scoring tasks (loglikelihood, multiple choice) run the adapted "
    "model's forward; generation tasks decode on the latent cache. The scores go to downstream.parquet in the results "
    "folder (trial_id, task, metric, value, stderr, ...; the base's rows have no trial_id), which kvsweep report draws "
    "against KV bytes/token. Hub tasks download their data; a task of your own is a YAML file under --include-path."
)


def add_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Add ``downstream`` to the ``kvsweep`` command's subparsers; its ``func`` is ``cmd_downstream``."""
    p = subparsers.add_parser("downstream", help="lm-evaluation-harness tasks on the base and on a sweep's front trials",
                              description=DESCRIPTION)
    p.add_argument("results", help="a sweep's results folder (with trials.parquet) or a kvsweep train --out folder")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval tasks, e.g. lambada_openai,piqa,hellaswag,arc_easy")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--front", action="store_true", help="the trials of every seed of each Pareto-front point (the default)")
    which.add_argument("--trials", default=None, help="comma-separated trial ids instead of the front")
    p.add_argument("--no-base", action="store_true", help="leave the base out (its rows from an earlier run are kept)")
    p.add_argument("--include-path", default=None, help="a folder of lm-eval task YAML files (tasks of your own, offline ones)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    p.add_argument("--limit", type=float, default=None, help="documents per task, or a fraction below 1 (default: all)")
    p.add_argument("--batch-size", type=int, default=8, help="scoring requests per forward (default: 8)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: each trial's own: a GPU where there is one)")
    p.add_argument("--cache-dtype", default="float16", choices=("float16", "bfloat16", "float32"),
                   help="what the latent cache stores in generation tasks (default: float16)")
    p.add_argument("--seed", type=int, default=0, help="lm-eval's seeds (few-shot sampling) (default: 0)")
    p.set_defaults(func=cmd_downstream)
    return p


def cmd_downstream(a: argparse.Namespace) -> int:
    try:
        from . import DownstreamCfg, run_downstream
    except ImportError as e:
        raise KvsweepError(f"kvsweep downstream needs lm-evaluation-harness: pip install -e '.[downstream]' ({e})") from None
    from ..report.downstream import downstream_text

    limit = a.limit if a.limit is None or a.limit < 1 else int(a.limit)
    cfg = DownstreamCfg(tasks=tuple(t.strip() for t in a.tasks.split(",") if t.strip()), include_path=a.include_path,
                        num_fewshot=a.num_fewshot, limit=limit, batch_size=a.batch_size, device=a.device,
                        cache_dtype=a.cache_dtype, seed=a.seed)
    trials = [t.strip() for t in a.trials.split(",") if t.strip()] if a.trials else None
    path, rows = run_downstream(a.results, cfg, trials=trials, front=True, base=not a.no_base)
    print(downstream_text(rows))
    print(f"wrote {path}")
    return 0
