"""A trial's state between steps and across checkpoints (``TrialState``: where training is, its history and its best
epoch so far), the current epoch's sums, its batch order and the precision trials compute in. No Ray here."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from ..adapters import Adapter
from ..checkpoint import CheckpointError, load_checkpoint
from ..evaluate import PositionStats
from ..results import BucketPPL, EpochReport


def buckets_of(stats: PositionStats, ranges: list[tuple[int, int]]) -> tuple[BucketPPL, ...]:
    """``stats``' PPL per bucket of ``ranges``."""
    return tuple(BucketPPL(b["lo"], b["hi"], b["ppl"]) for b in stats.buckets(ranges))


@dataclass
class TrialState:
    """What a checkpoint holds besides weights: where training is, what it has seen, and its best epoch so far
    (chosen on validation; 0: the init), with that epoch's validation and test figures."""

    epoch: int = 0
    step: int = 0
    best_val_ppl: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    history: list[EpochReport] = field(default_factory=list)
    best_positions: list = field(default_factory=list)  # PositionStats.buckets of the best epoch, on validation
    best_test_ppl: float | None = None  # the best epoch's test PPL (None without a test set)
    best_test_positions: list = field(default_factory=list)  # and its PositionStats.buckets on test

    def new_best(self, epoch: int, val: PositionStats, test: PositionStats | None, ranges: list[tuple[int, int]]) -> None:
        """``epoch`` (validation statistics ``val``, test statistics ``test``) is the best epoch now; patience restarts."""
        self.best_val_ppl, self.best_epoch, self.bad_epochs = val.ppl, epoch, 0
        self.best_positions = val.buckets(ranges)
        self.best_test_ppl = test.ppl if test is not None else None
        self.best_test_positions = test.buckets(ranges) if test is not None else []

    def best(self) -> dict:
        """The best epoch so far as an ``EpochReport``'s fields (``best_val_ppl``, ``best_epoch``, ``best_buckets``,
        ``test_ppl``, ``test_buckets``)."""
        return {"best_val_ppl": self.best_val_ppl, "best_epoch": self.best_epoch, "test_ppl": self.best_test_ppl,
                "best_buckets": tuple(BucketPPL(b["lo"], b["hi"], b["ppl"]) for b in self.best_positions),
                "test_buckets": tuple(BucketPPL(b["lo"], b["hi"], b["ppl"]) for b in self.best_test_positions)}

    def to_dict(self) -> dict:
        """Plain data for the checkpoint: the history as the flat dicts a trial reports."""
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, "history": [h.to_report() for h in self.history]}

    @classmethod
    def from_dict(cls, trial: dict) -> "TrialState":
        """Raises: TypeError or ValueError: ``trial`` is not what ``to_dict`` writes."""
        history = trial.get("history") or []
        if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
            raise TypeError("history is not a list of reports")
        return cls(**{**trial, "history": [EpochReport.from_report(h) for h in history]})


@dataclass
class EpochSums:
    """The current epoch's sums over its steps: loss and components (each a step's mean), NLL over its tokens."""

    loss: float = 0.0
    loss_lm: float = 0.0
    loss_rec: float = 0.0
    loss_kl: float = 0.0
    nll: float = 0.0
    tokens: int = 0


def autocast(device: torch.device, amp: str, base_dtype: torch.dtype = torch.float32):
    """The precision trials compute in: bf16 autocast on CUDA (``auto``), or the base's own dtype when the
    frozen base is held in bf16/fp16 (the float32 adapters then run under autocast too)."""
    if amp == "off":
        return nullcontext()
    if device.type == "cuda" and amp in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16 if base_dtype == torch.float32 else base_dtype)
    if amp == "bf16" or base_dtype != torch.float32:
        return torch.autocast(device.type, dtype=torch.bfloat16 if base_dtype == torch.float32 else base_dtype)
    return nullcontext()


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """This epoch's shuffled batches of sample indices, the same for the same (seed, epoch)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=gen)
    return list(order.split(batch_size))


def load_trial_checkpoint(path: Path, adapters: list[Adapter], opt: torch.optim.Optimizer | None) -> TrialState:
    """Restore the adapters, optimizer and RNG states from the checkpoint folder ``path``; its trial state.

    Raises:
        CheckpointError: the checkpoint is missing, damaged, pickled by an older kvsweep, or not this trial's.
    """
    trial = load_checkpoint(path, adapters, opt)
    try:
        return TrialState.from_dict(trial)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: the trial state does not fit this kvsweep ({e})") from None
