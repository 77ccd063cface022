"""Packed trials: several trials share one copy of the frozen base in one process. No Ray here.

A trial alone at the default batch of 8 x 128 tokens leaves a GPU mostly idle, waiting on kernel
launches. A pack stacks the batches of its trials into one batch and runs the base once over it:

    ids = cat(batch_1, ..., batch_K)               # (sum B_i, T)
    logits = base_with_routers(ids)                # (sum B_i, T, V): rows of trial i see trial i's adapters
    loss = sum_i loss_i(logits[rows_i])            # one backward; the trials' parameters are disjoint

At every tap point (K and V of a layer, its attention, its attention output) a ``Router`` sends each trial's rows
through that trial's own adapter module, and the rows of trials without an adapter there through
unchanged. Each trial keeps its own adapters, optimizer, learning rate, loss schedule, batch order,
early stopping and checkpoints (a ``TrialRun``), so its metrics are those it would have alone (to the
last bit in float32 where the base's kernels compute a row independently of the batch's other rows,
within rounding otherwise). Trials join and leave a pack between steps; a trial that has stopped costs
nothing more. A ``Pack`` is a ``kvsweep.train.Driver``: the same loop takes its trials through their life as
takes a trial alone; only how adapters reach the base, how a step runs and how trials are evaluated differ.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import torch

from .adapters import TAPS
from .chunked import linear_nll
from .data import Samples
from .evaluate import EVAL_CHUNK, PositionStats, SplitStats
from .models import Base, final_hidden, output_weight
from .results import TrialResult
from .train import Driver, Report, TrialCfg, TrialRun, train_step

Rows = list[tuple[TrialRun, "int | None"]]  # (trial, its rows of the stacked batch; None: all of them)


class Router(torch.nn.Module):
    """The function of one tap point of a packed base: each trial's rows through that trial's module.

    Consecutive trials whose modules have equal ``stack_key()`` (and as many rows) run as one batched
    call of the module class's ``forward_stacked``: two batched matmuls for all V-DProj layers of one
    shape instead of two kernels per trial. ``fns`` maps a trial to its module there (``(k, v) -> (k, v)`` or ``a -> a``); ``rows`` is the layout
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
        outs, start, i = [], 0, 0
        while i < len(rows):
            run, n = rows[i]
            fn = self.fns.get(run)
            j = i + 1
            key = fn.stack_key() if hasattr(fn, "stack_key") else None
            if key is not None:  # the next trials with the same kind of module and as many rows: one batched call
                while j < len(rows) and rows[j][1] == n and type(nxt := self.fns.get(rows[j][0])) is type(fn) \
                        and nxt.stack_key() == key:
                    j += 1
            m = j - i
            if m > 1:
                part = tuple(x[start : start + m * n].reshape(m, n * x.shape[1], x.shape[2]) for x in xs)  # (m, n*T, d)
                out = type(fn).forward_stacked([self.fns[r] for r, _ in rows[i:j]], *part)
                out = (out,) if single else tuple(out)
                outs.append(tuple(o.reshape(m * n, *xs[0].shape[1:]) for o in out))  # (m*n, T, d)
            else:
                part = tuple(x[start : start + n] for x in xs)  # each (n, T, d): this trial's rows
                out = fn(*part) if fn is not None else (part[0] if single else part)
                outs.append((out,) if single else tuple(out))
            start += m * n
            i = j
        cat = tuple(torch.cat(group) for group in zip(*outs, strict=True))  # back to (sum n, T, d)
        return cat[0] if single else cat


class AttentionRouter(Router):
    """The router of a layer's attention tap (``kvsweep.models.tap_attention``): each trial's rows of the queries,
    keys, values and mask through that trial's module there, the other rows through the base's attention."""

    def forward(self, query, key, value, attention_mask, scaling, base):  # (B, H, T|S, hs) each
        rows = self.rows
        if not any(run in self.fns for run, _ in rows):
            return base(query, key, value)
        if len(rows) == 1 and rows[0][1] is None:  # one trial, the whole batch
            return self.fns[rows[0][0]](query, key, value, attention_mask, scaling, base)
        outs, start = [], 0
        for run, n in rows:
            part = slice(start, start + n)
            mask = attention_mask if attention_mask is None or attention_mask.shape[0] == 1 else attention_mask[part]
            fn, own = self.fns.get(run), base.with_mask(mask)
            q, k, v = query[part], key[part], value[part]
            outs.append((fn(q, k, v, mask, scaling, own) if fn is not None else own(q, k, v))[0])  # (n, T, H, hs)
            start += n
        return torch.cat(outs), None


class Pack(Driver):
    """Trials sharing ``base``: add them, step them together, remove them when they stop (``Driver``'s life)."""

    def __init__(self, base: Base, samples: Samples, *, log: Callable[[str], None] = print):
        super().__init__(base, samples, log=log)
        self.routers: dict[tuple[str, int], Router] = {}
        self._untap: list[Callable[[], None]] = []

    def _wire(self, run: TrialRun) -> None:
        """Each of ``run``'s adapters routed: its module at each of its layers gets ``run``'s rows there."""
        device = self.base.device
        for a in run.adapters:
            a.to(device)
            a.route(partial(self._route, run, a.tap))  # detach() takes the modules out of the routers

    def _route(self, run: TrialRun, tap: str, layer: int, module: torch.nn.Module) -> Callable[[], None]:
        router = self._router(tap, layer)
        router.fns[run] = module
        return partial(router.fns.pop, run, None)

    def _alone(self, run: TrialRun):
        return self.routing([(run, None)])

    def step(self, runs: list[TrialRun]) -> None:
        """One optimizer step for each of ``runs`` (a subset of the pack), in one forward and backward; trials
        with the same adapters (up to weights) side by side, so that the routers batch their modules."""
        runs = sorted(runs, key=lambda r: repr([(s.name, s.options) for s in r.cfg.adapters]))
        train_step(self.base.model, runs, route=self.routing)

    @torch.no_grad()
    def evaluate(self, runs: list[TrialRun], samples: np.ndarray | None = None, max_rows: int = 256) -> list[PositionStats]:
        """Statistics of each of ``runs`` on ``samples`` (N, E; the validation samples unless told otherwise), several
        trials per forward (at most ``max_rows`` rows): each batch repeated once per trial, each copy through its
        trial's adapters, the NLL from hidden states (no full logits). The same statistics as ``evaluate`` for each
        trial alone."""
        val, first = (self.samples.val if samples is None else samples), runs[0]
        batch = first.cfg.train.eval_batch_size
        per_forward = max(1, max_rows // batch)
        model, weight = self.base.model, output_weight(self.base.model)
        stats = [PositionStats.zeros(val.shape[1]) for _ in runs]
        was_training = model.training
        model.eval()
        for a in (a for r in runs for a in r.adapters):
            a.eval()
        try:
            for start in range(0, len(val), batch):
                ids = torch.from_numpy(np.array(val[start : start + batch], dtype=np.int64)).to(self.base.device)  # (b, T)
                b = len(ids)
                for g in range(0, len(runs), per_forward):
                    group = runs[g : g + per_forward]
                    stacked = ids.repeat(len(group), 1)  # (len(group) * b, T): one copy per trial
                    with self.routing([(r, b) for r in group]), first.autocast():
                        hidden = final_hidden(model, stacked)  # (len(group) * b, T, d)
                        nll = linear_nll(hidden[:, :-1], weight, stacked[:, 1:], chunk_rows=EVAL_CHUNK)  # (len(group) * b, T-1)
                    for i, _ in enumerate(group):
                        stats[g + i].add(nll[i * b : (i + 1) * b])
        finally:
            model.train(was_training)
        return stats

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
        super().close()
        while self._untap:
            self._untap.pop()()
        self.routers.clear()

    def _router(self, tap: str, layer: int) -> Router:
        key = (tap, layer)
        if key not in self.routers:
            router = AttentionRouter() if tap == "attention" else Router()
            self._untap.append(TAPS[tap](self.base.model, layer, router))
            self.routers[key] = router
        return self.routers[key]


def run_packed(cfgs: list[TrialCfg], *, base: Base, samples: Samples, base_stats: SplitStats | None = None,
               reports: list[Report] | None = None, checkpoint_dirs: list[str | Path | None] | None = None,
               log: Callable[[str], None] = print) -> list[TrialResult]:
    """Train ``cfgs`` together on one base until each completes, stops early or fails; their results in order.

    A trial whose loss turns non-finite ends with status ``error`` (and ``error``, the message); the
    others go on.
    """
    pack = Pack(base, samples, log=log)
    try:
        runs = pack.add_many([{"cfg": cfg, "base_stats": base_stats, "report": reports[i] if reports else None,
                               "checkpoint_dir": checkpoint_dirs[i] if checkpoint_dirs else None} for i, cfg in enumerate(cfgs)])
        for r in runs:
            if isinstance(r, BaseException):
                raise r
        pack.run(runs)
        return [r.result() for r in runs]
    finally:
        pack.close()
