"""One trial: train adapters on a frozen base, report every epoch, checkpoint, resume. No Ray here.

``run_trial(cfg, report)`` attaches the trial's adapters to the frozen base, evaluates them at init
(epoch 0), trains them with AdamW under the loss schedules, and after each epoch evaluates, writes a
checkpoint (adapter weights, optimizer, schedule position, early-stopping state, RNG state, the epochs so
far) and calls ``report(epoch_report, checkpoint_dir)`` with a typed ``kvsweep.results.EpochReport``.
Given a checkpoint it resumes where it stopped and reports what an uninterrupted run would have
reported. Batches are shuffled from (seed, epoch), so a resumed trial sees the same batches.

One loop drives a trial's life (``Driver``: add, step, finish the epochs that ended, remove), whether the
trial runs alone (``run_trial``), in a pack (``kvsweep.pack.Pack``, a ``Driver`` that routes several
trials through one base) or in a sweep's pack process (``kvsweep.tune.packed``).
"""

from __future__ import annotations

import math
import shutil
import time
import weakref
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .adapters import ADAPTERS, Adapter, AdapterSpec, adapter_class, check_combination, disabled, make_adapter
from .atomic import write_json
from .checkpoint import CheckpointError, has_checkpoint, load_checkpoint, save_checkpoint
from .config import ConfigError, DataCfg, KvsweepError, ModelCfg, TrainCfg, calibration_samples, position_buckets
from .data import Samples, load_samples, resolve_source
from .evaluate import PositionStats, evaluate, token_nll
from .kvcache import base_layout, bytes_per_token, layer_bytes
from .latent import measure_bytes
from .losses import LossCfg, kl_divergence
from .chunked import linear_nll
from .models import Base, check_seq_len, dims, final_hidden, load_base, model_config, output_weight, resolve_model
from .results import (BucketPPL, EpochMetrics, EpochReport, TrialConstants, TrialResult, epoch_table, position_metrics,
                      position_table, write_parquet)

Report = Callable[[EpochReport, "Path | None"], None]


class TrialError(KvsweepError):
    """A trial that cannot go on (a loss that turned NaN or infinite)."""


@dataclass(frozen=True)
class TrialCfg:
    """Everything one trial needs: base, data, adapters, loss schedules, optimisation."""

    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=lambda: DataCfg(train_samples=10_000))
    adapters: tuple[AdapterSpec, ...] = ()
    loss: LossCfg = field(default_factory=LossCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    buckets: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "adapters", tuple(self.adapters))
        check_combination(self.adapters)
        position_buckets(self.data.seq_len, self.buckets)
        has_rec = any("rec" in adapter_class(s.name).loss_terms for s in self.adapters)
        if self.loss.rec.peak > 0 and not has_rec and self.loss.lm.peak == 0 and self.loss.kl.peak == 0:
            rec = [n for n, cls in ADAPTERS.items() if "rec" in cls.loss_terms]
            raise ConfigError("loss schedule: only the reconstruction weight is > 0, but no adapter reconstructs anything "
                              f"(add one of {', '.join(rec)})")
        if self.train.epochs > 0:
            if not self.adapters:
                raise ConfigError("adapters: a trial needs at least one adapter to train (epochs 0 evaluates the base alone)")
            if self.data.train_samples == 0:
                raise ConfigError("train_samples must be >= 1 (or 'all') to train; use epochs 0 to only evaluate")
            if isinstance(self.data.train_samples, int) and self.train.batch_size > self.data.train_samples:
                raise ConfigError(f"batch_size {self.train.batch_size} is larger than train_samples "
                                  f"{self.data.train_samples}; valid range 1..{self.data.train_samples}")
        calib = calibration_samples(s.options for s in self.adapters)
        if calib > 0 and self.data.train_samples == 0:  # epochs 0: the adapters are still initialised from data
            raise ConfigError(f"train_samples is 0, but the adapters calibrate on up to {calib} train samples (calib_samples) "
                              "before the first evaluation; give train_samples >= 1 or 'all', or an init that needs no data")

    def to_dict(self) -> dict:
        return {
            "model": asdict(self.model),
            "data": asdict(self.data),
            "adapters": [s.to_dict() for s in self.adapters],
            "loss": {"name": self.loss.name, **{k: asdict(getattr(self.loss, k)) for k in ("lm", "rec", "kl")}},
            "train": asdict(self.train),
            "buckets": list(self.buckets) if self.buckets else None,
        }


def init_metrics(cfg: TrialCfg, val_ppl: float) -> EpochMetrics:
    """Epoch 0 of a trial: its adapters at init (validation PPL ``val_ppl``), before any step; the loss weights
    at the schedule's start; no training figures."""
    w = cfg.loss.weights(0.0)
    return EpochMetrics(epoch=0, val_ppl=val_ppl, w_lm=w["lm"], w_rec=w["rec"], w_kl=w["kl"], lr=cfg.train.lr, steps=0)


def _buckets(stats: PositionStats, ranges: list[tuple[int, int]]) -> tuple[BucketPPL, ...]:
    return tuple(BucketPPL(b["lo"], b["hi"], b["ppl"]) for b in stats.buckets(ranges))


@dataclass
class _State:
    """What a checkpoint holds besides weights: where training is and what it has seen."""

    epoch: int = 0
    step: int = 0
    best_val_ppl: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    history: list[EpochReport] = field(default_factory=list)
    best_positions: list = field(default_factory=list)  # PositionStats.buckets of the best epoch

    def to_dict(self) -> dict:
        """Plain data for the checkpoint: the history as the flat dicts a trial reports."""
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, "history": [h.to_report() for h in self.history]}

    @classmethod
    def from_dict(cls, trial: dict) -> "_State":
        """Raises: TypeError or ValueError: ``trial`` is not what ``to_dict`` writes."""
        history = trial.get("history") or []
        if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
            raise TypeError("history is not a list of reports")
        return cls(**{**trial, "history": [EpochReport.from_report(h) for h in history]})


@dataclass
class _EpochSums:
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


def _batches(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """This epoch's shuffled batches of sample indices, the same for the same (seed, epoch)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=gen)
    return list(order.split(batch_size))


def _load_checkpoint(path: Path, adapters: list[Adapter], opt: torch.optim.Optimizer | None) -> _State:
    """Restore the adapters, optimizer and RNG states from the checkpoint folder ``path``; its trial state.

    Raises:
        CheckpointError: the checkpoint is missing, damaged, pickled by an older kvsweep, or not this trial's.
    """
    trial = load_checkpoint(path, adapters, opt)
    try:
        return _State.from_dict(trial)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: the trial state does not fit this kvsweep ({e})") from None


def prepare(cfg: TrialCfg, *, base: Base | None = None, samples: Samples | None = None,
            log: Callable[[str], None] = print) -> tuple[Base, Samples]:
    """Check the trial against the model (before loading it), then load base and samples if not given."""
    if base is None:
        source = resolve_model(cfg.model)
        resolve_source(cfg.data)
        config = model_config(source)
        check_seq_len(config, cfg.data.seq_len, cfg.model.name)
        for spec in cfg.adapters:  # rank and layer indices against the model, before any weights load
            make_adapter(spec, dims(config))
        if cfg.model.random_init and cfg.model.tokenizer is None:
            raise ConfigError(f"model {cfg.model.name} with random weights has no tokenizer; give one with --tokenizer")
        base = load_base(cfg.model, log=log)
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
              base_stats: PositionStats | None = None, progress: bool = False,
              log: Callable[[str], None] = print) -> TrialResult:
    """Train one trial; return its result (status, best and base PPL, KV bytes, parameters, history).

    ``base``, ``samples`` and ``base_stats`` (the base's validation statistics) may be passed in when a
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


class TrialRun:
    """One trial's training on a frozen base that it may share with other trials (see ``Driver``).

    Holds the trial's adapters, optimizer, loss schedule position, batch order, early-stopping state and
    checkpoints. A driver wires the adapters to the base (attached directly, or routed to this trial's rows
    of a packed batch), then calls ``setup``, evaluates the adapters at init and calls ``begin``; then
    ``next_batch``/``loss``/``update`` per step (``train_step``) and ``finish_epoch`` with each epoch's
    validation statistics. ``alone(run)`` is the context in which the model computes for this trial alone
    (for calibration and evaluation): nothing to do when the adapters are attached directly.
    """

    def __init__(self, cfg: TrialCfg, base: Base, samples: Samples, *, report: Report | None = None,
                 checkpoint_dir: str | Path | None = None, resume_from: str | Path | None = None,
                 alone: Callable[[TrialRun], AbstractContextManager] | None = None, log: Callable[[str], None] = print):
        self.cfg, self.base, self.samples, self.log = cfg, base, samples, log
        self._alone = alone
        self.report = report or (lambda metrics, ckpt: None)
        self.model, self.device, tc = base.model, base.device, cfg.train
        self.base_dtype = next(self.model.parameters()).dtype  # the base's embedding comes first
        if self.base_dtype != torch.float32 and tc.amp == "off":
            raise ConfigError(f"amp 'off' needs a float32 base; the base is {self.base_dtype} (use amp auto, or dtype float32)")
        self.ranges = position_buckets(cfg.data.seq_len, cfg.buckets)
        d = dims(base.config)
        torch.manual_seed(tc.seed)
        self.adapters = [make_adapter(spec, d) for spec in cfg.adapters]
        self.trainable = [p for a in self.adapters for p in a.parameters() if p.requires_grad]
        self.base_params = base.num_params  # before the adapters are attached (their taps hold them)
        self.layout = base_layout(d.layers, d.hidden)
        for a in self.adapters:
            self.layout = a.kv_layout(self.layout)
        self.kv_bytes = bytes_per_token(self.layout, tc.cache_dtype)
        self.kv_base = bytes_per_token(base_layout(d.layers, d.hidden), tc.cache_dtype)
        self.opt = torch.optim.AdamW(self.trainable, lr=tc.lr, weight_decay=tc.weight_decay) if self.trainable else None
        self.ckpt_path = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.resume_from = Path(resume_from) if resume_from is not None else None
        self.train_ids = torch.from_numpy(np.array(samples.train, dtype=np.int64))  # (N, T), a writable copy
        self.steps_per_epoch = math.ceil(len(self.train_ids) / tc.batch_size) if tc.batch_size else 0
        self.total_steps = self.steps_per_epoch * tc.epochs
        self.use_kl = cfg.loss.kl.peak > 0
        self.state = _State()
        self.status: str | None = None  # "completed" | "early_stopped" | "error" once done
        self.error: TrialError | None = None
        self.measured: dict | None = None  # the cache a latent-cache decode holds (setup)
        self.base_stats: PositionStats | None = None  # the base's validation statistics (setup)
        self.constant: TrialConstants | None = None  # what every report carries (begin)
        self._batches: list[torch.Tensor] = []
        self._pos = 0  # steps taken in the current epoch
        self._t_epoch = 0.0
        self._sums = _EpochSums()
        self._last: tuple[torch.Tensor, ...] | None = None  # the last step's loss, its components and NLL (detached)
        self._reported = False
        self.first_step_at: float | None = None  # time.time() of the first training step (start-up ends there)

    def alone(self) -> AbstractContextManager:
        """The context in which the model computes for this trial alone."""
        return self._alone(self) if self._alone is not None else nullcontext()

    # -- set-up
    def setup(self, base_stats: PositionStats | None = None) -> None:
        """Measure the cache, evaluate the base (unless given), calibrate the adapters or load the checkpoint."""
        tc, model = self.cfg.train, self.model
        # The cache a short latent-cache decode really holds; raises if it differs from the accounting.
        self.measured = measure_bytes(model, self.adapters, tc.cache_dtype)
        with self.alone():
            if base_stats is None:
                with disabled(self.adapters), self.autocast():
                    base_stats = evaluate(model, self.samples.val, batch_size=tc.eval_batch_size)
            if self.resume_from is not None:
                self.state = _load_checkpoint(self.resume_from, self.adapters, self.opt)
                self.log(f"resumed from {self.resume_from} after epoch {self.state.epoch}")
            else:
                for a in self.adapters:  # each measures the base: the other adapters pass through meanwhile
                    with disabled([o for o in self.adapters if o is not a]), self.autocast():
                        a.calibrate(model, self.samples.train)
        self.base_stats = base_stats

    def begin(self, init_stats: PositionStats | None = None) -> None:
        """After ``setup``: the constant metrics and, for a trial that starts afresh, epoch 0 (its validation
        statistics at init, ``init_stats``; ``None`` when resumed) in its history; for a trial with nothing left to
        train, its status. Epoch 0 is reported only when the trial trains no epoch (``epochs`` 0); otherwise its
        validation PPL goes with every report as ``init_val_ppl``."""
        tc, base_stats = self.cfg.train, self.base_stats
        if self.resume_from is not None:
            init_val_ppl = self.state.history[0].trial.init_val_ppl if self.state.history and self.state.history[0].trial else math.nan
        else:
            if init_stats is None:
                raise ValueError("a trial that starts afresh needs its validation statistics at init")
            init_val_ppl = init_stats.ppl
        self.constant = TrialConstants(
            base_val_ppl=base_stats.ppl,
            init_val_ppl=init_val_ppl,
            kv_bytes_per_token=self.kv_bytes,
            kv_bytes_per_token_measured=self.measured["measured_bytes_per_token"],
            kv_ratio=self.kv_bytes / self.kv_base,
            trainable_params=sum(p.numel() for p in self.trainable),
            total_params=self.base_params + sum(p.numel() for p in self.trainable),
        )
        if self.resume_from is None:
            evaluate_only = tc.epochs == 0
            if evaluate_only:  # the init is the trial's only epoch, so its best
                self.state.best_val_ppl, self.state.best_positions = init_val_ppl, init_stats.buckets(self.ranges)
            init = EpochReport(init_metrics(self.cfg, init_val_ppl), _buckets(init_stats, self.ranges), self.constant,
                               best_val_ppl=init_val_ppl if evaluate_only else None, early_stopped=False if evaluate_only else None)
            self.state.history.append(init)
            if evaluate_only:
                self.report(init, None)
                self.status = "completed"
                return
        if self.state.bad_epochs >= tc.patience:  # resumed from the checkpoint of an early-stopped trial
            self.status = "early_stopped"
        elif self.state.epoch >= tc.epochs:
            self.status = "completed"

    def autocast(self):
        return autocast(self.device, self.cfg.train.amp, self.base_dtype)

    # -- training, a step at a time
    @property
    def done(self) -> bool:
        return self.status is not None

    @property
    def epoch_finished(self) -> bool:
        return bool(self._batches) and self._pos == len(self._batches)

    def next_batch(self) -> torch.Tensor:
        """The token ids (B, T) of this trial's next step, on the base's device; starts an epoch if due."""
        if self.first_step_at is None:
            self.first_step_at = time.time()
        if not self._batches:
            epoch = self.state.epoch + 1
            self._batches = _batches(len(self.train_ids), self.cfg.train.batch_size, self.cfg.train.seed, epoch)
            self._pos, self._t_epoch = 0, time.perf_counter()
            self._sums = _EpochSums()
            for a in self.adapters:
                a.train()
        return self.train_ids[self._batches[self._pos]].to(self.device)

    def loss(self, nll: torch.Tensor, logits: torch.Tensor | None, teacher: torch.Tensor | None) -> torch.Tensor | None:
        """This step's loss from this trial's per-token NLL (B, T-1) (and its logits (B, T, V) and the base's,
        for KL); ``None`` (and the trial ends in error) when it is not finite. Call inside the forward's autocast."""
        w = self.cfg.loss.weights(self.state.step / self.total_steps)
        ce = nll.mean()
        recs = [r for a in self.adapters if (r := a.reconstruction_loss()) is not None]
        rec = torch.stack(recs).sum() if recs else torch.zeros((), device=self.device)
        kl = kl_divergence(logits[:, :-1], teacher[:, :-1]) if self.use_kl else torch.zeros((), device=self.device)
        loss = w["lm"] * ce + w["rec"] * rec + w["kl"] * kl
        if not torch.isfinite(loss):
            self.error = TrialError(f"loss is {loss.item()} at epoch {self.state.epoch + 1}, step {self._pos + 1} of "
                                    f"{self.steps_per_epoch} (lm {ce.item():.4g}, rec {rec.item():.4g}, kl {kl.item():.4g}); try a lower lr")
            self.status = "error"
            return None
        self._last = (loss.detach(), ce.detach(), rec.detach(), kl.detach(), nll.detach())
        return loss

    def update(self) -> None:
        """After the backward pass: clip, step the optimizer, count the step."""
        tc = self.cfg.train
        if self.opt is not None and any(p.grad is not None for p in self.trainable):
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.trainable, tc.grad_clip)
            self.opt.step()
        self.state.step += 1
        self._pos += 1
        loss, ce, rec, kl, nll = self._last
        s = self._sums
        s.nll += float(nll.double().sum())
        s.tokens += nll.numel()
        s.loss += float(loss)
        s.loss_lm += float(ce)
        s.loss_rec += float(rec)
        s.loss_kl += float(kl)

    def zero_grad(self) -> None:
        if self.opt is not None:
            self.opt.zero_grad(set_to_none=True)

    def finish_epoch(self, val: PositionStats) -> None:
        """End the epoch with ``val``, this trial's validation statistics after it: update early stopping, write the
        checkpoint, report; sets ``status`` at the end."""
        tc, state = self.cfg.train, self.state
        for a in self.adapters:
            a.eval()
        epoch = state.epoch = state.epoch + 1
        w_end = self.cfg.loss.weights(state.step / self.total_steps)
        s, n = self._sums, self.steps_per_epoch
        metrics = EpochMetrics(
            epoch=epoch, train_ppl=math.exp(s.nll / s.tokens), val_ppl=val.ppl,
            loss=s.loss / n, loss_lm=s.loss_lm / n, loss_rec=s.loss_rec / n, loss_kl=s.loss_kl / n,
            w_lm=w_end["lm"], w_rec=w_end["rec"], w_kl=w_end["kl"],
            lr=tc.lr, steps=state.step, seconds=time.perf_counter() - self._t_epoch,
        )
        self._batches, self._pos = [], 0
        improved = val.ppl < state.best_val_ppl
        if improved:
            state.best_val_ppl, state.best_epoch, state.bad_epochs = val.ppl, epoch, 0
            state.best_positions = val.buckets(self.ranges)
        else:
            state.bad_epochs += 1
        stop = state.bad_epochs >= tc.patience
        report = EpochReport(metrics, _buckets(val, self.ranges), self.constant, best_val_ppl=state.best_val_ppl, early_stopped=stop)
        state.history.append(report)
        self.log(f"epoch {epoch}/{tc.epochs}: train PPL {metrics.train_ppl:.3f}  val PPL {val.ppl:.3f}  "
                 f"(base {self.constant.base_val_ppl:.3f}, best {state.best_val_ppl:.3f})  {metrics.seconds:.1f} s")
        if stop:
            self.status = "early_stopped"
        elif epoch >= tc.epochs:
            self.status = "completed"
        if self.ckpt_path is not None:
            best = [a.state_dict() for a in self.adapters] if improved else None
            save_checkpoint(self.ckpt_path, self.adapters, self.opt, state.to_dict(), best, previous=self.resume_from)
        first = not self._reported  # the first report carries the first step's time, for start-up times
        self._reported = True
        self.report(replace(report, first_step_at=self.first_step_at) if first else report, self.ckpt_path)
        if stop:
            self.log(f"early stop: no better val PPL for {tc.patience} epochs (best {state.best_val_ppl:.3f} at epoch {state.best_epoch})")

    def result(self, seconds: float = math.nan) -> TrialResult:
        state, c = self.state, self.constant
        base_ppl = self.base_stats.ppl
        best = [BucketPPL(b["lo"], b["hi"], b["ppl"]) for b in state.best_positions]
        return TrialResult(
            status=self.status,
            epochs_run=state.epoch,
            best_epoch=state.best_epoch,
            best_val_ppl=state.best_val_ppl,
            base_val_ppl=base_ppl,
            init_val_ppl=c.init_val_ppl,
            degradation_pct=100.0 * (state.best_val_ppl - base_ppl) / base_ppl,
            kv_bytes_per_token=self.kv_bytes,
            kv_bytes_per_token_measured=self.measured["measured_bytes_per_token"],
            kv_bytes_per_layer_measured=self.measured["measured_bytes_per_layer"],
            kv_bytes_per_token_base=self.kv_base,
            kv_ratio=self.kv_bytes / self.kv_base,
            kv_bytes_per_layer=layer_bytes(self.layout, self.cfg.train.cache_dtype),
            trainable_params=c.trainable_params,
            total_params=c.total_params,
            history=list(state.history),
            positions=position_metrics(best, self.base_stats.buckets(self.ranges)) if best else [],
            seconds=seconds,
            error=str(self.error) if self.error is not None else None,
        )


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

    def evaluate(self, runs: list[TrialRun]) -> list[PositionStats]:
        """Validation statistics of each of ``runs`` (its adapters in eval mode)."""
        out = []
        for r in runs:
            for a in r.adapters:
                a.eval()
            with r.alone(), r.autocast():
                out.append(evaluate(self.base.model, self.samples.val, batch_size=r.cfg.train.eval_batch_size))
        return out

    # -- the life of a trial
    def add(self, cfg: TrialCfg, *, base_stats: PositionStats | None = None, report: Report | None = None,
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
        """Several new trials (each ``add``'s arguments as a dict), their initial evaluations done together;
        for a trial that cannot start, the exception instead of its run (the others start)."""
        runs: list[TrialRun | Exception] = []
        for kw in trials:
            try:
                runs.append(self._join(**kw))
            except Exception as e:  # noqa: BLE001  (handed to the caller with the trial it belongs to)
                runs.append(e)
        fresh = [r for r in runs if isinstance(r, TrialRun) and r.resume_from is None]
        try:
            initial = dict(zip(fresh, self.evaluate(fresh), strict=True)) if fresh else {}
        except Exception as e:  # noqa: BLE001
            for r in fresh:
                self.remove(r)
            return [e if r in fresh else r for r in runs]
        for i, r in enumerate(runs):
            if isinstance(r, TrialRun):
                try:
                    r.begin(initial.get(r))
                except Exception as e:  # noqa: BLE001
                    self.remove(r)
                    runs[i] = e
        return runs

    def _join(self, cfg: TrialCfg, *, base_stats: PositionStats | None = None, report: Report | None = None,
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
        """End the epoch of each of ``runs`` (all at the end of one), evaluating them together (always through
        ``evaluate``, so a trial's figures do not depend on which trials ended an epoch with it)."""
        if not runs:
            return
        for run, val in zip(runs, self.evaluate(runs), strict=True):
            run.finish_epoch(val)

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


def git_revision() -> str | None:
    """The commit of the kvsweep checkout this runs from (with ``+dirty`` for local changes), if any."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def run_trial_to_folder(cfg: TrialCfg, out: str | Path, *, resume: bool = False, overwrite: bool = False,
                        log: Callable[[str], None] = print) -> TrialResult:
    """``kvsweep train``: one trial with a progress bar; writes trial.json, epochs.parquet (epoch 0, the adapters at
    init, first), positions.parquet.

    ``out`` may be new or empty. One that holds an earlier trial (trial.json or checkpoint/) needs
    ``resume`` (continue from its checkpoint) or ``overwrite`` (replace it: its results and checkpoint are
    deleted once this trial's base and samples have loaded).

    Raises:
        ConfigError: ``out`` holds an earlier trial and neither ``resume`` nor ``overwrite`` is given (checked
            before any model loads), both are given, or ``out`` is a file.
        KvsweepError: whatever the trial raises (a bad model or data, TrialError, CheckpointError).
    """
    out = Path(out)
    ckpt = out / "checkpoint"
    outputs = ("trial.json", "epochs.parquet", "positions.parquet", "checkpoint")
    if resume and overwrite:
        raise ConfigError("resume and overwrite exclude each other: continue the trial in out, or replace it")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out: {out} is a file; give a folder for the trial's results")
    earlier = [name for name in ("trial.json", "checkpoint") if (out / name).exists()]
    if earlier and not (resume or overwrite):
        raise ConfigError(f"out: {out} already holds a trial ({' and '.join(earlier)}); continue it with --resume, "
                          "replace it with --overwrite, or give another --out")
    resume_from = ckpt if resume and has_checkpoint(ckpt) else None
    if resume and resume_from is None:
        log(f"no checkpoint in {ckpt}; starting from the beginning")
    record = {"config": cfg.to_dict(), "git_revision": git_revision()}
    base, samples = prepare(cfg, log=log)
    if overwrite and earlier:  # the new trial is under way: nothing of the old one may be mistaken for its own
        for name in outputs:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        log(f"replaced the earlier trial in {out}")
    try:
        result = run_trial(cfg, checkpoint_dir=ckpt, resume_from=resume_from, base=base, samples=samples, progress=True, log=log)
    except TrialError as e:
        write_json(out / "trial.json", {**record, "status": "error", "error": str(e)})
        raise
    trial_id = out.name
    final = result.history[-1].to_report() if result.history else None
    write_json(out / "trial.json", {**record, **result.to_json(), "final": final})
    write_parquet(epoch_table((trial_id, h.metrics) for h in result.history), out / "epochs.parquet")
    write_parquet(position_table((trial_id, p) for p in result.positions), out / "positions.parquet")
    log(format_trial(result))
    log(f"wrote {out / 'trial.json'}, epochs.parquet, positions.parquet")
    return result


def format_trial(result: TrialResult) -> str:
    """The seed's overall and position-wise tables for one trial against its base."""
    base, best = result.base_val_ppl, result.best_val_ppl
    lines = [
        f"status {result.status} after {result.epochs_run} epochs (best epoch {result.best_epoch})",
        f"KV cache: {result.kv_bytes_per_token:,} bytes/token ({100 * result.kv_ratio:.1f}% of the base's "
        f"{result.kv_bytes_per_token_base:,}); trainable parameters {result.trainable_params:,} of {result.total_params:,}",
        "",
        f"| {'model':>8} | {'val PPL':>10} | {'diff':>9} | {'degr. %':>8} |",
        f"|{'-' * 10}|{'-' * 12}|{'-' * 11}|{'-' * 10}|",
        f"| {'base':>8} | {base:>10.4f} | {'':>9} | {'':>8} |",
        f"| {'adapted':>8} | {best:>10.4f} | {best - base:>+9.4f} | {100 * (best - base) / base:>+8.2f} |",
        "",
        f"| {'positions':>10} | {'base PPL':>10} | {'PPL':>10} | {'diff':>9} | {'degr. %':>8} |",
        f"|{'-' * 12}|{'-' * 12}|{'-' * 12}|{'-' * 11}|{'-' * 10}|",
    ]
    for p in result.positions:
        lines.append(f"| {str(p.lo) + '-' + str(p.hi):>10} | {p.base_ppl:>10.4f} | {p.ppl:>10.4f} | {p.diff:>+9.4f} | "
                     f"{p.degradation_pct:>+8.2f} |")
    return "\n".join(lines)
