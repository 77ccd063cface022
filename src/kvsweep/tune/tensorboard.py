"""TensorBoard event files for every trial of a sweep, with the metrics named for people.

``TensorBoardCallback`` replaces Ray Tune's default ``TBXLoggerCallback`` (a subclass passed in ``callbacks``
takes its place): it writes, with tensorboardX, one event file per trial and driver run into the trial's folder
(``<storage>/<name>/tune-<k>/<trial>/events.out.tfevents.*``), the epoch as the step, under the names of
``SCALARS`` rather than Tune's ``ray/tune/<key>``; ``tensorboard --logdir <storage>/<name>`` shows each trial
as a run. Epoch 0 (the adapters at init) is written from the ``init_val_ppl`` the first epoch carries. At a
trial's end Tune's hyperparameter summary (the searched values against the last scalars) is written as before.

Each event file starts with tensorboardX's ``purge_step`` at the first step it writes: TensorBoard drops what
earlier files of the trial hold from that step on. A trial continued by another driver (a killed sweep run
again), or restarted after a failure, reports its checkpoint's epoch again (``EpochReport.resumed``, the same
figures) into a new file, and TensorBoard shows each epoch once.
"""

from __future__ import annotations

import itertools
import math
import os

from ray.tune.logger import TBXLoggerCallback
from tensorboardX.proto.summary_pb2 import Summary

from ..results import EpochReport

SCALARS = {
    "ppl/train": "the epoch's train PPL",
    "ppl/val": "validation PPL after the epoch (epoch 0: the adapters at init)",
    "ppl/val_best": "the best validation PPL so far (the init included)",
    "ppl/test_best": "test PPL at the best epoch so far",
    "ppl/val_base": "the base's validation PPL (the same every epoch: a reference line)",
    "loss/total": "the epoch's mean training loss",
    "loss/lm": "its LM cross-entropy term",
    "loss/rec": "its reconstruction term",
    "loss/kl": "its KL-distillation term",
    "weight/lm": "the LM term's weight at the epoch's end",
    "weight/rec": "the reconstruction term's weight",
    "weight/kl": "the KL term's weight",
    "train/lr": "learning rate",
    "train/steps": "optimizer steps so far",
    "time/epoch_seconds": "wall time of the epoch (training and evaluation)",
    "kv/bytes_per_token": "KV-cache bytes per token (measured; the accounting where not measured)",
    "kv/ratio": "KV bytes/token over the base's",
    "kv/fixed_bytes": "bytes the methods add that do not grow with the context",
    "params/trainable": "trainable (adapter) parameters",
}
"""The scalars each epoch writes, by name; also ``ppl_by_position/<lo>-<hi>``: validation PPL per position bucket."""

FLUSH_SECONDS = 2
"""An epoch's scalars are on the disk (what TensorBoard reads) at most this long after its report: tensorboardX's writer
thread writes each event as it comes and flushes its file this often (a flush from the driver's loop would not wait for
that thread)."""

_FILES = itertools.count()  # tensorboardX names a file by the second it opens it: two in one second would be one file


def tensorboard_scalars(report: EpochReport) -> dict[str, float]:
    """The scalars of one epoch's report, by the names of ``SCALARS`` (and ``ppl_by_position/<lo>-<hi>``); what the
    report lacks, or holds as NaN or an infinity, is left out. A failed trial's report has none."""
    if report.error:
        return {}
    m, t = report.metrics, report.trial
    values = {
        "ppl/train": m.train_ppl, "ppl/val": m.val_ppl, "ppl/val_best": report.best_val_ppl, "ppl/test_best": report.test_ppl,
        "loss/total": m.loss, "loss/lm": m.loss_lm, "loss/rec": m.loss_rec, "loss/kl": m.loss_kl,
        "weight/lm": m.w_lm, "weight/rec": m.w_rec, "weight/kl": m.w_kl,
        "train/lr": m.lr, "train/steps": m.steps, "time/epoch_seconds": m.seconds,
    }
    if t is not None:
        values.update({
            "ppl/val_base": t.base_val_ppl,
            "kv/bytes_per_token": t.kv_bytes_per_token_measured if t.kv_bytes_per_token_measured is not None else t.kv_bytes_per_token,
            "kv/ratio": t.kv_ratio, "kv/fixed_bytes": t.fixed_bytes, "params/trainable": t.trainable_params,
        })
    values.update({f"ppl_by_position/{b.lo}-{b.hi}": b.ppl for b in report.buckets})
    return {k: float(v) for k, v in values.items() if v is not None and math.isfinite(v)}


class TensorBoardCallback(TBXLoggerCallback):
    """Ray Tune's TensorBoard logger with kvsweep's names (``SCALARS``) and the epoch as the step.

    Raises:
        ImportError: tensorboardX is not installed (as ``TBXLoggerCallback``).
    """

    def log_trial_start(self, trial) -> None:
        """Close a writer the trial may have (a restart); the next one opens at its first report."""
        if trial in self._trial_writer:
            self._trial_writer.pop(trial).close()
        self._trial_result[trial] = {}

    def _writer(self, trial, first_step: int):
        """The trial's writer; a new one (a new file) purges, in TensorBoard, what earlier files hold from its first step."""
        writer = self._trial_writer.get(trial)
        if writer is None:
            trial.init_local_path()
            writer = self._trial_writer[trial] = self._summary_writer_cls(
                trial.local_path, flush_secs=FLUSH_SECONDS, purge_step=first_step, filename_suffix=f".{os.getpid()}.{next(_FILES)}")
            self._trial_result.setdefault(trial, {})
        return writer

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        try:
            report = EpochReport.from_report(result)
        except ValueError:  # no epoch: not a report of kvsweep's
            return
        scalars = tensorboard_scalars(report)
        if not scalars:
            return
        init = report.trial.init_val_ppl if report.epoch == 1 and not report.resumed and report.trial is not None else math.nan
        writer = self._writer(trial, 0 if math.isfinite(init) else report.epoch)
        if math.isfinite(init):
            writer.add_scalar("ppl/val", init, global_step=0)  # epoch 0: the adapters at init
        # one event holding every scalar of the epoch: a third of the driver's CPU of an event per scalar (add_scalar)
        writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=k, simple_value=v) for k, v in scalars.items()]),
                                       global_step=report.epoch)
        self._trial_result[trial] = scalars
