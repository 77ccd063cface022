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

from .cfg import Report, TrialCfg, TrialError, init_metrics
from .folder import format_trial, git_revision, run_trial_to_folder
from .loop import Driver, compiled, prepare, run_trial, train_step
from .run import TrialRun
from .state import TrialState, autocast

__all__ = ["Driver", "Report", "TrialCfg", "TrialError", "TrialRun", "TrialState", "autocast", "compiled", "format_trial", "git_revision",
           "init_metrics", "prepare", "run_trial", "run_trial_to_folder", "train_step"]
