"""Packed trials: several trials share one copy of the frozen base in one process. No Ray here.

A trial alone at the default batch of 8 x 128 tokens leaves a GPU mostly idle, waiting on kernel
launches. A pack stacks the batches of its trials into one batch and runs the base once over it:

    ids = cat(batch_1, ..., batch_K)               # (sum B_i, T)
    logits = base_with_routers(ids)                # (sum B_i, T, V): rows of trial i see trial i's adapters
    loss = sum_i loss_i(logits[rows_i])            # one backward; the trials' parameters are disjoint

At every tap point (K and V of a layer, its attention output) a ``Router`` sends each trial's rows
through that trial's own adapter module, and the rows of trials without an adapter there through
unchanged. Each trial keeps its own adapters, optimizer, learning rate, loss schedule, batch order,
early stopping and checkpoints (a ``TrialRun``), so its metrics are those it would have alone (to the
last bit in float32 where the base's kernels compute a row independently of the batch's other rows,
within rounding otherwise). Trials join and leave a pack between steps; a trial that has stopped costs
nothing more.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch

from .adapters import TAPS
from .data import Samples
from .evaluate import PositionStats
from .models import Base
from .train import Report, TrialCfg, TrialRun, train_step

Rows = list[tuple[TrialRun, "int | None"]]  # (trial, its rows of the stacked batch; None: all of them)


class Router(torch.nn.Module):
    """The function of one tap point of a packed base: each trial's rows through that trial's module.

    ``fns`` maps a trial to its module there (``(k, v) -> (k, v)`` or ``a -> a``); ``rows`` is the layout
    of the current batch. The modules are not registered as submodules: the base's parameters stay the
    base's own.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fns: dict[TrialRun, torch.nn.Module] = {}
        self.rows: Rows = []

    def forward(self, *xs: torch.Tensor):
        single = len(xs) == 1
        rows = self.rows
        if not any(run in self.fns for run, _ in rows):
            return xs[0] if single else xs
        if len(rows) == 1 and rows[0][1] is None:  # one trial, the whole batch
            return self.fns[rows[0][0]](*xs)
        outs, start = [], 0
        for run, n in rows:
            part = tuple(x[start : start + n] for x in xs)  # each (n, T, d): this trial's rows
            start += n
            fn = self.fns.get(run)
            out = fn(*part) if fn is not None else (part[0] if single else part)
            outs.append((out,) if single else tuple(out))
        cat = tuple(torch.cat(group) for group in zip(*outs, strict=True))  # back to (sum n, T, d)
        return cat[0] if single else cat


class Pack:
    """Trials sharing ``base``: add them, step them together, remove them when they stop."""

    def __init__(self, base: Base, samples: Samples, *, log: Callable[[str], None] = print):
        self.base, self.samples, self.log = base, samples, log
        self.routers: dict[tuple[str, int], Router] = {}
        self._untap: list[Callable[[], None]] = []
        self.runs: list[TrialRun] = []

    def add(self, cfg: TrialCfg, *, base_stats: PositionStats | None = None, report: Report | None = None,
            checkpoint_dir: str | Path | None = None, resume_from: str | Path | None = None,
            log: Callable[[str], None] | None = None) -> TrialRun:
        """A new trial in the pack: adapters built (seeded as alone), routed, calibrated or resumed."""
        run = TrialRun(cfg, self.base, self.samples, report=report, checkpoint_dir=checkpoint_dir,
                       resume_from=resume_from, log=log or self.log)
        run.alone = partial(self.routing, [(run, None)])
        device = self.base.device
        for a in run.adapters:
            a.to(device)
            for layer in a.layers:
                router = self._router(a.tap, layer)
                router.fns[run] = a.layer_module(layer)
                a._undo.append(partial(router.fns.pop, run, None))  # detach() takes it out of the router
        self.runs.append(run)
        try:
            run.start(base_stats)
        except BaseException:
            self.remove(run)
            raise
        return run

    def remove(self, run: TrialRun) -> None:
        for a in run.adapters:
            a.detach()
        if run in self.runs:
            self.runs.remove(run)

    def step(self, runs: list[TrialRun]) -> None:
        """One optimizer step for each of ``runs`` (a subset of the pack), in one forward and backward."""
        train_step(self.base.model, runs, route=self.routing)

    @contextmanager
    def routing(self, rows: Rows) -> Iterator[None]:
        """Inside the block the base computes the stacked batch laid out as ``rows`` (``[]``: the base alone)."""
        before = {k: r.rows for k, r in self.routers.items()}
        for r in self.routers.values():
            r.rows = rows
        try:
            yield
        finally:
            for k, r in self.routers.items():
                r.rows = before.get(k, [])

    def close(self) -> None:
        for run in list(self.runs):
            self.remove(run)
        while self._untap:
            self._untap.pop()()
        self.routers.clear()

    def _router(self, tap: str, layer: int) -> Router:
        key = (tap, layer)
        if key not in self.routers:
            router = Router()
            self._untap.append(TAPS[tap](self.base.model, layer, router))
            self.routers[key] = router
        return self.routers[key]


def run_packed(cfgs: list[TrialCfg], *, base: Base, samples: Samples, base_stats: PositionStats | None = None,
               reports: list[Report] | None = None, checkpoint_dirs: list[str | Path | None] | None = None,
               log: Callable[[str], None] = print) -> list[dict]:
    """Train ``cfgs`` together on one base until each completes, stops early or fails; their results in order.

    A trial whose loss turns non-finite ends with status ``error`` (and ``error``, the message); the
    others go on.
    """
    pack = Pack(base, samples, log=log)
    try:
        runs = [pack.add(cfg, base_stats=base_stats, report=reports[i] if reports else None,
                         checkpoint_dir=checkpoint_dirs[i] if checkpoint_dirs else None) for i, cfg in enumerate(cfgs)]
        while live := [r for r in runs if not r.done]:
            pack.step(live)
            for r in live:
                if r.done:
                    pack.remove(r)
                elif r.epoch_finished:
                    r.finish_epoch()
                    if r.done:
                        pack.remove(r)
        return [{**r.result(), **({"error": str(r.error)} if r.error is not None else {})} for r in runs]
    finally:
        pack.close()
