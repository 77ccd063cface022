"""``TrialRun``: one trial's state and steps on a frozen base it may share (adapters, optimizer, schedule
position, batch order, early stopping, checkpoints). No Ray here."""

from __future__ import annotations

import math
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..adapters import bind_adapters, disabled, kv_layout_of, make_adapter
from ..checkpoint import checkpoint_adapter_states, save_checkpoint
from ..config import ConfigError, position_buckets
from ..data import Samples
from ..evaluate import PositionStats, SplitStats, evaluate_splits
from ..kvcache import base_layout, bytes_per_token, layer_bytes
from ..latent import measure_bytes
from ..losses import kl_divergence
from ..models import Base, dims
from ..results import EpochMetrics, EpochReport, TrialConstants, TrialResult, position_metrics

from .cfg import Report, TrialCfg, TrialError, init_metrics
from .state import EpochSums, TrialState, autocast, buckets_of, epoch_batches, load_trial_checkpoint


class TrialRun:
    """One trial's training on a frozen base that it may share with other trials (see ``Driver``).

    Holds the trial's adapters, optimizer, loss schedule position, batch order, early-stopping state and
    checkpoints. A driver wires the adapters to the base (attached directly, or routed to this trial's rows
    of a packed batch), then calls ``setup``, evaluates the adapters at init and calls ``begin``; then
    ``next_batch``/``loss``/``update`` per step (``train_step``) and ``finish_epoch`` with each epoch's
    validation statistics (and its test statistics when ``improves`` says the epoch is the best so far).
    ``alone(run)`` is the context in which the model computes for this trial alone (for calibration and
    evaluation): nothing to do when the adapters are attached directly.

    Selection is on validation alone: the best epoch is the first with the lowest validation PPL, the init
    (epoch 0) included, and early stopping counts the epochs since it. The test set is evaluated for the
    best epoch only (at init and whenever validation improves), so a trial's test PPL is its best epoch's
    and no decision ever reads it. A trial without trainable parameters (a training-free method) or with
    ``epochs`` 0 is its epoch 0: reported once, completed.

    Raises (constructor):
        ConfigError: a half-precision base with ``amp`` off, or evaluation samples of another length than the
            trial's ``eval_seq_len``.
    """

    def __init__(self, cfg: TrialCfg, base: Base, samples: Samples, *, report: Report | None = None,
                 checkpoint_dir: str | Path | None = None, resume_from: str | Path | None = None,
                 alone: Callable[[TrialRun], AbstractContextManager] | None = None, log: Callable[[str], None] = print):
        cfg = cfg.with_max_positions(base.max_positions)
        self.cfg, self.base, self.samples, self.log = cfg, base, samples, log
        self._alone = alone
        self.report = report or (lambda metrics, ckpt: None)
        self.model, self.device, tc = base.model, base.device, cfg.train
        self.base_dtype = next(self.model.parameters()).dtype  # the base's embedding comes first
        if self.base_dtype != torch.float32 and tc.amp == "off":
            raise ConfigError(f"amp 'off' needs a float32 base; the base is {self.base_dtype} (use amp auto, or dtype float32)")
        if samples.eval_len != cfg.data.eval_len:
            raise ConfigError(f"the evaluation samples are {samples.eval_len} tokens long, but the trial's eval_seq_len is "
                              f"{cfg.data.eval_len}")
        self.ranges = position_buckets(cfg.data.eval_len, cfg.buckets)
        d = dims(base.config)
        torch.manual_seed(tc.seed)
        self.adapters = [make_adapter(spec, d) for spec in cfg.adapters]
        self.base_params = base.num_params  # before the adapters are attached (their taps hold them)
        self.kv_base = bytes_per_token(base_layout(d.layers, d.hidden), tc.cache_dtype)
        self._bind()
        self.ckpt_path = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.resume_from = Path(resume_from) if resume_from is not None else None
        self.train_ids = torch.from_numpy(np.array(samples.train, dtype=np.int64))  # (N, T), a writable copy
        self.steps_per_epoch = math.ceil(len(self.train_ids) / tc.batch_size) if tc.batch_size else 0
        self.total_steps = self.steps_per_epoch * tc.epochs
        self.use_kl = cfg.loss.kl.peak > 0
        self.state = TrialState()
        self.status: str | None = None  # "completed" | "early_stopped" | "error" once done
        self.error: TrialError | None = None
        self.measured: dict | None = None  # the cache a latent-cache decode holds (setup)
        self.base_stats: SplitStats | None = None  # the base's validation and test statistics (setup)
        self.constant: TrialConstants | None = None  # what every report carries (begin)
        self._batches: list[torch.Tensor] = []
        self._pos = 0  # steps taken in the current epoch
        self._t_epoch = 0.0
        self._sums = EpochSums()
        self._last: tuple[torch.Tensor, ...] | None = None  # the last step's loss, its components and NLL (detached)
        self._reported = False
        self._init_weights: list[dict] | None = None  # the adapters at init, for the first checkpoint's best weights
        self.first_step_at: float | None = None  # time.time() of the first training step (start-up ends there)

    def _bind(self) -> None:
        """The trainable parameters, the optimizer over them and the cache layout of the adapters as they are now
        (again after a calibration that shaped them)."""
        tc, d = self.cfg.train, dims(self.base.config)
        self.trainable = [p for a in self.adapters for p in a.parameters() if p.requires_grad]
        bind_adapters(self.adapters)
        self.layout = kv_layout_of(self.adapters, base_layout(d.layers, d.hidden))
        self.kv_bytes = bytes_per_token(self.layout, tc.cache_dtype)
        self.opt = torch.optim.AdamW(self.trainable, lr=tc.lr, weight_decay=tc.weight_decay) if self.trainable else None

    def alone(self) -> AbstractContextManager:
        """The context in which the model computes for this trial alone."""
        return self._alone(self) if self._alone is not None else nullcontext()

    # -- set-up
    def setup(self, base_stats: SplitStats | None = None) -> None:
        """Evaluate the base on validation and test (unless given), calibrate the adapters or load the checkpoint (an
        adapter whose calibration shapes its modules calibrates first), measure the cache."""
        tc, model = self.cfg.train, self.model
        with self.alone():
            if base_stats is None:
                with disabled(self.adapters), self.autocast():
                    base_stats = evaluate_splits(model, self.samples.val, self.samples.test, batch_size=tc.eval_batch_size)
            resumed = self.resume_from is not None
            saved = checkpoint_adapter_states(self.resume_from) if resumed and any(a.shaped_by_calibration for a in self.adapters) else None
            for k, a in enumerate(self.adapters):  # each measures the base: the other adapters pass through meanwhile
                if saved is not None and a.shaped_by_calibration and k < len(saved):
                    a.load_state_dict(saved[k])  # the shapes its calibration gave when the trial started, whatever it gave now
                elif not resumed:
                    with disabled([o for o in self.adapters if o is not a]), self.autocast():
                        a.calibrate(model, self.samples.train)
            if any(a.shaped_by_calibration for a in self.adapters):
                self._bind()
                for a in self.adapters:
                    if a.shaped_by_calibration:
                        self.log(f"{a.name} after calibration: {a.extra_repr()}")
            if resumed:
                self.state = load_trial_checkpoint(self.resume_from, self.adapters, self.opt)
                self.log(f"resumed from {self.resume_from} after epoch {self.state.epoch}")
        # The cache a short latent-cache decode really holds; raises if it differs from the accounting.
        self.measured = measure_bytes(model, self.adapters, tc.cache_dtype)
        self.base_stats = base_stats

    def begin(self, init_stats: PositionStats | None = None, init_test: PositionStats | None = None) -> None:
        """After ``setup``: the constant metrics and, for a trial that starts afresh, epoch 0 (its validation
        statistics at init, ``init_stats``, and its test statistics ``init_test``, the samples having a test set;
        ``None`` when resumed) in its history, as the best epoch so far; for a trial with nothing left to train, its
        status. Epoch 0 is reported only when the trial trains no epoch (``epochs`` 0, or no trainable parameters);
        otherwise its validation PPL goes with every report as ``init_val_ppl``."""
        tc, base_stats = self.cfg.train, self.base_stats
        if self.resume_from is not None:
            init_val_ppl = self.state.history[0].trial.init_val_ppl if self.state.history and self.state.history[0].trial else math.nan
        else:
            if init_stats is None or (init_test is None) != (base_stats.test is None):
                raise ValueError("a trial that starts afresh needs its validation (and, with a test set, test) statistics at init")
            init_val_ppl = init_stats.ppl
        self.constant = TrialConstants(
            base_val_ppl=base_stats.val.ppl,
            base_test_ppl=base_stats.test.ppl if base_stats.test is not None else None,
            init_val_ppl=init_val_ppl,
            kv_bytes_per_token=self.kv_bytes,
            kv_bytes_per_token_measured=self.measured["measured_bytes_per_token"],
            kv_ratio=self.kv_bytes / self.kv_base,
            trainable_params=sum(p.numel() for p in self.trainable),
            total_params=self.base_params + sum(p.numel() for p in self.trainable),
            fixed_bytes=sum(a.fixed_bytes(tc.cache_dtype) for a in self.adapters),
        )
        if self.resume_from is None:
            self.state.new_best(0, init_stats, init_test, self.ranges)  # the init is the first candidate for the best epoch
            self._init_weights = [{k: v.detach().clone() for k, v in a.state_dict().items()} for a in self.adapters]
            evaluate_only = tc.epochs == 0 or not self.trainable  # the init is the trial's only epoch
            init = EpochReport(init_metrics(self.cfg, init_val_ppl), buckets_of(init_stats, self.ranges), self.constant,
                               early_stopped=False if evaluate_only else None, **self.state.best())
            self.state.history.append(init)
            if evaluate_only:
                if self.ckpt_path is not None:  # the adapters at init (calibrated): what kvsweep cache --trial loads
                    save_checkpoint(self.ckpt_path, self.adapters, self.opt, self.state.to_dict(), self._init_weights)
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
            self._batches = epoch_batches(len(self.train_ids), self.cfg.train.batch_size, self.cfg.train.seed, epoch)
            self._pos, self._t_epoch = 0, time.perf_counter()
            self._sums = EpochSums()
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

    def improves(self, val: PositionStats) -> bool:
        """Whether validation statistics ``val`` make a better epoch than the best so far (lower validation PPL)."""
        return val.ppl < self.state.best_val_ppl

    def finish_epoch(self, val: PositionStats, test: PositionStats | None = None) -> None:
        """End the epoch with ``val``, this trial's validation statistics after it, and ``test``, its test statistics
        (given exactly when ``improves(val)`` and the samples have a test set): update the best epoch and early
        stopping, write the checkpoint, report; sets ``status`` at the end.

        Raises:
            ValueError: ``test`` is missing for an epoch that improves, or given for one that does not.
        """
        tc, state = self.cfg.train, self.state
        improved = self.improves(val)
        if (test is not None) != (improved and len(self.samples.test) > 0):
            raise ValueError(f"test statistics are evaluated for an epoch that improves, and only then (improves: {improved})")
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
        if improved:
            state.new_best(epoch, val, test, self.ranges)
        else:
            state.bad_epochs += 1
        stop = state.bad_epochs >= tc.patience
        report = EpochReport(metrics, buckets_of(val, self.ranges), self.constant, early_stopped=stop, **self.state.best())
        state.history.append(report)
        self.log(f"epoch {epoch}/{tc.epochs}: train PPL {metrics.train_ppl:.3f}  val PPL {val.ppl:.3f}  "
                 f"(base {self.constant.base_val_ppl:.3f}, best {state.best_val_ppl:.3f} at epoch {state.best_epoch})  "
                 f"{metrics.seconds:.1f} s")
        if stop:
            self.status = "early_stopped"
        elif epoch >= tc.epochs:
            self.status = "completed"
        if self.ckpt_path is not None:
            best = [a.state_dict() for a in self.adapters] if improved else None
            if best is None and state.best_epoch == 0:
                best = self._init_weights  # the first checkpoint of a trial whose init is still its best epoch
            self._init_weights = None
            save_checkpoint(self.ckpt_path, self.adapters, self.opt, state.to_dict(), best, previous=self.resume_from)
        first = not self._reported  # the first report carries the first step's time, for start-up times
        self._reported = True
        self.report(replace(report, first_step_at=self.first_step_at) if first else report, self.ckpt_path)
        if stop:
            self.log(f"early stop: no better val PPL for {tc.patience} epochs (best {state.best_val_ppl:.3f} at epoch {state.best_epoch})")

    def result(self, seconds: float = math.nan) -> TrialResult:
        state, c, base = self.state, self.constant, self.base_stats
        base_ppl = base.val.ppl
        best = state.best()
        positions = position_metrics(best["best_buckets"], base.val.buckets(self.ranges)) if best["best_buckets"] else []
        if best["test_buckets"] and base.test is not None:
            positions += position_metrics(best["test_buckets"], base.test.buckets(self.ranges), "test")
        return TrialResult(
            status=self.status,
            epochs_run=state.epoch,
            best_epoch=state.best_epoch,
            best_val_ppl=state.best_val_ppl,
            base_val_ppl=base_ppl,
            init_val_ppl=c.init_val_ppl,
            test_ppl=state.best_test_ppl,
            base_test_ppl=c.base_test_ppl,
            eval_seq_len=self.cfg.data.eval_len,
            degradation_pct=100.0 * (state.best_val_ppl - base_ppl) / base_ppl,
            kv_bytes_per_token=self.kv_bytes,
            kv_bytes_per_token_measured=self.measured["measured_bytes_per_token"],
            kv_bytes_per_layer_measured=self.measured["measured_bytes_per_layer"],
            kv_bytes_per_token_base=self.kv_base,
            kv_ratio=self.kv_bytes / self.kv_base,
            kv_bytes_per_layer=layer_bytes(self.layout, self.cfg.train.cache_dtype),
            trainable_params=c.trainable_params,
            total_params=c.total_params,
            fixed_bytes=c.fixed_bytes,
            history=list(state.history),
            positions=positions,
            seconds=seconds,
            error=str(self.error) if self.error is not None else None,
        )
