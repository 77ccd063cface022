"""Downstream evaluation with EleutherAI's lm-evaluation-harness: the base and trials' adapters on lm-eval tasks.

    kvsweep downstream ~/kvsweep_results/vdproj --tasks lambada_openai,piqa           # the base and the sweep's front
    kvsweep downstream runs/r64 --tasks kvsweep_cloze --include-path tests/data/lm_eval  # a kvsweep train folder, offline

Needs the ``lm-eval`` package (``pip install -e '.[downstream]'``). This package's names load it on first use, so
that the ``kvsweep`` command does not import it for its other subcommands.
"""

from __future__ import annotations

import importlib

_NAMES = {"KvsweepLM": "harness", "DownstreamCfg": "run", "front_trials": "run", "run_downstream": "run", "score": "run",
          "task_manager": "run"}
__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
