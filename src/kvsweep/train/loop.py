"""The one loop that drives trials (``Driver``), the training step they share (``train_step``) and
``run_trial``, a trial alone. No Ray here."""

from __future__ import annotations

import time
import weakref
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..adapters import Adapter, check_taps, disabled, make_adapter
from ..config import ConfigError, calibration_samples
from ..data import Samples, load_samples, resolve_source
from ..evaluate import PositionStats, SplitStats, evaluate, token_nll
from ..chunked import linear_nll
from ..models import Base, check_seq_len, dims, final_hidden, load_base, model_config, output_weight, resolve_model
from ..results import TrialResult

from .cfg import Report, TrialCfg
from .run import TrialRun


def prepare(cfg: TrialCfg, *, base: Base | None = None, samples: Samples | None = None,
            log: Callable[[str], None] = print) -> tuple[Base, Samples]:
    """Check the trial against the model (before loading it), then load base and samples if not given; the samples'
    evaluation length is the trial's ``eval_seq_len`` (``"max"``: the model's maximum context)."""
    if base is None:
        source = resolve_model(cfg.model)
        resolve_source(cfg.data)
        config = model_config(source)
        cfg = cfg.with_max_positions(config.max_position_embeddings)
        check_seq_len(config, cfg.data.seq_len, cfg.model.name)
        check_seq_len(config, cfg.data.eval_len, cfg.model.name, what="eval_seq_len")
        for spec in cfg.adapters:  # rank and layer indices against the model, before any weights load
            make_adapter(spec, dims(config))
        check_taps(cfg.adapters, dims(config))
        if cfg.model.random_init and cfg.model.tokenizer is None:
            raise ConfigError(f"model {cfg.model.name} with random weights has no tokenizer; give one with --tokenizer")
        base = load_base(cfg.model, log=log)
    cfg = cfg.with_max_positions(base.max_positions)
    if base.tokenizer is None and samples is None:
        raise ConfigError(f"model {cfg.model.name} has no tokenizer; give one with --tokenizer")
    if samples is None:  # evaluating only: no train samples but those the adapters calibrate on
        used = calibration_samples(s.options for s in cfg.adapters) if cfg.train.epochs == 0 else None
        samples = load_samples(cfg.data, base.tokenizer, log=log, train_used=used)
    if cfg.train.epochs > 0 and cfg.train.batch_size > len(samples.train):
        raise ConfigError(f"batch_size {cfg.train.batch_size} is larger than the {len(samples.train)} train samples; "
                          f"valid range 1..{len(samples.train)}")
    return base, samples


def run_trial(cfg: TrialCfg, report: Report | None = None, *, checkpoint_dir: str | Path | None = None,
              resume_from: str | Path | None = None, base: Base | None = None, samples: Samples | None = None,
              base_stats: SplitStats | None = None, progress: bool = False,
              log: Callable[[str], None] = print) -> TrialResult:
    """Train one trial; return its result (status, best epoch with its validation and test PPL, the base's, KV
    bytes, parameters, history).

    ``base``, ``samples`` and ``base_stats`` (the base's validation and test statistics) may be passed in when a
    sweep shares them between trials; otherwise they are loaded and computed here.

    Raises:
        TrialError: the trial's loss turned NaN or infinite.
        KvsweepError: a bad model, data or checkpoint (``prepare``, ``CheckpointError``).
    """
    t_start = time.perf_counter()
    base, samples = prepare(cfg, base=base, samples=samples, log=log)
    if cfg.train.compile != "off":  # a new trial's adapters: compile afresh (and stay under dynamo's recompile limit)
        torch._dynamo.reset()
        _COMPILED.pop(base.model.gpt_neox, None)
    driver = Driver(base, samples, log=log)
    try:
        run = driver.add(cfg, base_stats=base_stats, report=report, checkpoint_dir=checkpoint_dir, resume_from=resume_from)
        driver.run([run], progress=progress)
    finally:
        driver.close()
    if run.error is not None:
        raise run.error
    return run.result(seconds=time.perf_counter() - t_start)


class Driver:
    """The one loop of a trial's life, for one trial or several on one base: ``add`` (adapters wired to the base,
    set up, evaluated at init or resumed), ``step`` (one optimizer step for each given trial, in one forward
    and backward), ``finish_epochs`` (evaluate, checkpoint, report), ``remove``; ``advance`` is a step and the
    end of the epochs it ended, ``run`` advances trials until each is done.

    This driver runs one trial at a time, its adapters attached directly to the base (``run_trial``);
    ``kvsweep.pack.Pack`` drives several at once, each routed to its rows of a stacked batch.
    """

    def __init__(self, base: Base, samples: Samples, *, log: Callable[[str], None] = print):
        self.base, self.samples, self.log = base, samples, log
        self.runs: list[TrialRun] = []
        self.ending: list[TrialRun] = []  # the trials whose epochs the last ``advance`` ended (or was ending)
        self.step_seconds = 0.0  # the last ``advance``'s step alone, without the end of epochs

    # -- what a way of running trials decides
    def _wire(self, run: TrialRun) -> None:
        """Put ``run``'s adapters into the base's computation (here: attach them; one trial at a time)."""
        if self.runs:
            raise RuntimeError("a Driver runs one trial at a time; use kvsweep.pack.Pack for several")
        done: list[Adapter] = []
        try:
            for a in run.adapters:
                a.attach(self.base.model)
                done.append(a)
        except BaseException:
            for a in reversed(done):
                a.detach()
            raise

    def _alone(self, run: TrialRun) -> AbstractContextManager:
        """The context in which the base computes for ``run`` alone (here: its adapters are the only ones)."""
        return nullcontext()

    def step(self, runs: list[TrialRun]) -> None:
        """One optimizer step for each of ``runs``, in one forward and backward."""
        train_step(self.base.model, runs)

    def evaluate(self, runs: list[TrialRun], samples: np.ndarray | None = None) -> list[PositionStats]:
        """Statistics of each of ``runs`` (its adapters in eval mode) on ``samples`` (N, E): the validation samples
        unless told otherwise."""
        samples = self.samples.val if samples is None else samples
        out = []
        for r in runs:
            for a in r.adapters:
                a.eval()
            with r.alone(), r.autocast():
                out.append(evaluate(self.base.model, samples, batch_size=r.cfg.train.eval_batch_size))
        return out

    def _tests(self, runs: list[TrialRun]) -> dict[TrialRun, PositionStats]:
        """Test statistics of ``runs`` (the trials whose epoch is their best so far), none without a test set."""
        if not runs or not len(self.samples.test):
            return {}
        return dict(zip(runs, self.evaluate(runs, self.samples.test), strict=True))

    # -- the life of a trial
    def add(self, cfg: TrialCfg, *, base_stats: SplitStats | None = None, report: Report | None = None,
            checkpoint_dir: str | Path | None = None, resume_from: str | Path | None = None,
            log: Callable[[str], None] | None = None) -> TrialRun:
        """A new trial: adapters built (seeded as alone), wired, calibrated and evaluated at init, or resumed.

        Raises:
            KvsweepError: whatever the trial's set-up raises (a bad checkpoint, say); the trial is not added.
        """
        run = self.add_many([{"cfg": cfg, "base_stats": base_stats, "report": report, "checkpoint_dir": checkpoint_dir,
                              "resume_from": resume_from, "log": log}])[0]
        if isinstance(run, BaseException):
            raise run
        return run

    def add_many(self, trials: list[dict]) -> list[TrialRun | Exception]:
        """Several new trials (each ``add``'s arguments as a dict), their initial evaluations (validation, and test:
        the init is the best epoch so far) done together; for a trial that cannot start, the exception instead of its
        run (the others start)."""
        runs: list[TrialRun | Exception] = []
        for kw in trials:
            try:
                runs.append(self._join(**kw))
            except Exception as e:  # noqa: BLE001  (handed to the caller with the trial it belongs to)
                runs.append(e)
        fresh = [r for r in runs if isinstance(r, TrialRun) and r.resume_from is None]
        try:
            initial = dict(zip(fresh, self.evaluate(fresh), strict=True)) if fresh else {}
            tests = self._tests(fresh)
        except Exception as e:  # noqa: BLE001
            for r in fresh:
                self.remove(r)
            return [e if r in fresh else r for r in runs]
        for i, r in enumerate(runs):
            if isinstance(r, TrialRun):
                try:
                    r.begin(initial.get(r), tests.get(r))
                except Exception as e:  # noqa: BLE001
                    self.remove(r)
                    runs[i] = e
        return runs

    def _join(self, cfg: TrialCfg, *, base_stats: SplitStats | None = None, report: Report | None = None,
              checkpoint_dir: str | Path | None = None, resume_from: str | Path | None = None,
              log: Callable[[str], None] | None = None) -> TrialRun:
        run = TrialRun(cfg, self.base, self.samples, report=report, checkpoint_dir=checkpoint_dir,
                       resume_from=resume_from, alone=self._alone, log=log or self.log)
        self._wire(run)
        self.runs.append(run)
        try:
            run.setup(base_stats)
        except BaseException:
            self.remove(run)
            raise
        return run

    def finish_epochs(self, runs: list[TrialRun]) -> None:
        """End the epoch of each of ``runs`` (all at the end of one), evaluating them together on validation, then those
        whose epoch is their best so far on test (always through ``evaluate``, so a trial's figures do not depend on
        which trials ended an epoch with it)."""
        if not runs:
            return
        vals = self.evaluate(runs)
        tests = self._tests([r for r, val in zip(runs, vals, strict=True) if r.improves(val)])
        for run, val in zip(runs, vals, strict=True):
            run.finish_epoch(val, tests.get(run))

    def advance(self, runs: list[TrialRun]) -> list[TrialRun]:
        """One step for each of ``runs``, then the end of the epochs that step ended; those trials.

        Whatever the step or the end of the epochs raises propagates; ``ending`` then tells which failed: the
        trials whose epochs were ending (empty when the step itself failed, for all of ``runs``).
        """
        self.ending = []
        t0 = time.perf_counter()
        self.step(runs)
        self.step_seconds = time.perf_counter() - t0
        self.ending = [r for r in runs if not r.done and r.epoch_finished]
        self.finish_epochs(self.ending)
        return self.ending

    def run(self, runs: list[TrialRun], *, progress: bool = False) -> None:
        """Advance ``runs`` until each completes, stops early or fails; each leaves the driver when done.
        ``progress``: a progress bar per epoch of each trial (on a terminal)."""
        bars: dict[TrialRun, object] = {}
        while live := [r for r in runs if not r.done]:
            if progress:
                for r in live:
                    if r not in bars:
                        bars[r] = _progress(r.steps_per_epoch, r.state.epoch + 1, r.cfg.train.epochs)
            ended = self.advance(live)
            for r in live:
                bar = bars.get(r)
                if bar is not None:
                    bar.update(1)
                    if r.done or r in ended:
                        bars.pop(r).close()
                if r.done:
                    self.remove(r)

    def remove(self, run: TrialRun) -> None:
        """``run`` leaves: its adapters out of the base's computation."""
        for a in run.adapters:
            a.detach()
        if run in self.runs:
            self.runs.remove(run)

    def close(self) -> None:
        for run in list(self.runs):
            self.remove(run)


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled(module: torch.nn.Module, mode: str) -> Callable:
    """``module`` itself for mode ``off``, else its ``torch.compile`` wrapper, made once per module and mode.
    The wrapper runs whatever modules are attached when it is called (attaching adapters recompiles)."""
    if mode == "off":
        return module
    per_mode = _COMPILED.setdefault(module, {})
    if mode not in per_mode:
        per_mode[mode] = torch.compile(module, mode=mode)
    return per_mode[mode]


def train_step(model, runs: list[TrialRun], route: Callable[[list[tuple[TrialRun, int]]], AbstractContextManager] | None = None) -> None:
    """One optimizer step for each of ``runs``: one forward over their batches stacked, one backward.

    ``route(rows)`` (for several runs) is the context in which each run's adapters see only its own rows
    of the stacked batch; the runs' parameters are disjoint, so the gradient of the summed losses is each
    run's own gradient. A run whose loss is not finite ends in error and steps no further.
    """
    batches = [r.next_batch() for r in runs]  # each (B_i, T)
    ids = torch.cat(batches) if len(batches) > 1 else batches[0]  # (sum B_i, T)
    rows = [(r, len(b)) for r, b in zip(runs, batches)]
    first = runs[0]
    mode = first.cfg.train.compile
    with (route(rows) if route is not None else nullcontext()), first.autocast():
        hidden = final_hidden(model, ids, wrap=lambda m: compiled(m, mode))  # (sum B_i, T, d)
        weight = output_weight(model)  # (V, d)
        kl_runs = [i for i, r in enumerate(runs) if r.use_kl]
        teacher: dict[int, torch.Tensor] = {}
        if kl_runs:  # the base's logits, for the rows of the trials with a KL term only
            with torch.no_grad(), (route([]) if route is not None else disabled(first.adapters)):
                t_logits = model(input_ids=torch.cat([batches[i] for i in kl_runs]), use_cache=False).logits
            teacher = dict(zip(kl_runs, t_logits.split([len(batches[i]) for i in kl_runs]), strict=True))
        losses, start = [], 0
        for i, (r, b) in enumerate(zip(runs, batches)):
            part = slice(start, start + len(b))
            start += len(b)
            chunk = r.cfg.train.loss_chunk
            if chunk > 0 and not r.use_kl:  # no full logits for this trial
                own = None
                nll = linear_nll(hidden[part, :-1], weight, b[:, 1:], chunk_rows=chunk)  # (B, T-1) float32
            else:
                own = F.linear(hidden[part], weight)  # (B, T, V): the model's logits
                nll = token_nll(own, b)  # (B, T-1) float32
            loss = r.loss(nll, own, teacher.get(i))
            if loss is not None:
                losses.append(loss)
    live = [r for r in runs if r.error is None]
    for r in live:
        r.zero_grad()
    if losses:
        total = torch.stack(losses).sum() if len(losses) > 1 else losses[0]
        if total.requires_grad:
            total.backward()
    for r in live:
        r.update()


def _progress(steps: int, epoch: int, epochs: int):
    from tqdm.auto import tqdm

    return tqdm(total=steps, desc=f"epoch {epoch}/{epochs}", leave=False, unit="step", disable=None)  # off when not a terminal
