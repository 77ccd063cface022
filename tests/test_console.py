"""The sweep's compact console and its TensorBoard files, on Trial-like objects and results in this process (no Ray
workers): the lines of each trial event, the progress line and its pace, the event files' names, steps and
purge on a continued trial, and ``--verbose`` outside the specification."""

from __future__ import annotations

import io
import logging
import os
import time
from pathlib import Path
from types import SimpleNamespace

from kvsweep.config import DataCfg, SweepCfg, TrainCfg
from kvsweep.results import BucketPPL, EpochMetrics, EpochReport, TrialConstants
from kvsweep.sweepargs import sweep_cfg, sweep_parser
from kvsweep.tune.console import (AUTH_LOGGER, NEW_OUTPUT_ENV, SNAPSHOT_WARNING_ENV, TRIAL_ERRORS_ENV, ConsoleCallback, duration,
                                  quiet_ray, quiet_ray_start, ray_init_kwargs)
from kvsweep.tune.spec import specification
from kvsweep.tune.tensorboard import FLUSH_SECONDS, SCALARS, TensorBoardCallback, tensorboard_scalars

from .sweeps import scalars, tensorboard_events, wait_for

SWEEP = SweepCfg(name="s", data=DataCfg(train_samples=64, val_samples=16), train=TrainCfg(epochs=2, patience=3))
URI = "/results/s/tune-0"


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeTrial:
    """What the callbacks read of a Tune ``Trial``."""

    def __init__(self, index: int, folder: Path, **config):
        self.trial_id = f"abcde_{index:05d}"
        self.config = config
        self.evaluated_params = dict(config)
        self.status, self.last_result, self.num_failures = "PENDING", {}, 0
        self.path = self.local_path = str(folder / f"trial_{self.trial_id}")
        self.run_metadata = SimpleNamespace(error_filename=None)

    def init_local_path(self) -> None:
        Path(self.local_path).mkdir(parents=True, exist_ok=True)


def result(epoch: int, val: float, *, best: tuple[float, int] | None = None, early: bool = False, resumed: bool = False,
           kv: int = 1280) -> dict:
    best_val, best_epoch = best or (val, epoch)
    return EpochReport(
        EpochMetrics(epoch=epoch, train_ppl=val - 1, val_ppl=val, loss=3.0, loss_lm=2.5, loss_rec=0.5, loss_kl=0.0, w_lm=0.5,
                     w_rec=0.5, w_kl=0.0, lr=1e-4, steps=8 * epoch, seconds=1.5),
        buckets=(BucketPPL(0, 16, val + 2), BucketPPL(16, 32, val - 2)),
        trial=TrialConstants(base_val_ppl=50.0, init_val_ppl=70.0, kv_bytes_per_token=kv, kv_bytes_per_token_measured=kv,
                             kv_ratio=0.625, trainable_params=33408, total_params=1875328, fixed_bytes=66816),
        best_val_ppl=best_val, best_epoch=best_epoch, early_stopped=early, test_ppl=200.0, resumed=resumed,
    ).to_report()


def console(tty: bool = False) -> tuple[ConsoleCallback, io.StringIO, Clock]:
    out, clock = io.StringIO(), Clock()
    cb = ConsoleCallback(SWEEP, ["vdproj.init", "vdproj.rank"], experiment_uri=URI, out=out, tty=tty, clock=clock,
                         logs_dir="/tmp/ray/session_x/logs")
    cb.setup(total_num_samples=4)
    return cb, out, clock


def start(cb, trials, trial) -> None:
    trial.status = "RUNNING"
    cb.on_trial_start(iteration=0, trials=trials, trial=trial)


def report(cb, trials, trial, res: dict) -> None:
    trial.last_result = res
    cb.on_trial_result(iteration=0, trials=trials, trial=trial, result=res)


def complete(cb, trials, trial) -> None:
    cb.on_trial_complete(iteration=0, trials=trials, trial=trial)  # Tune sets the status after its callbacks
    trial.status = "TERMINATED"


def test_each_trial_event_is_one_line_and_progress_follows_each_trials_end(tmp_path):
    cb, out, clock = console()
    trials = [FakeTrial(i, tmp_path, **{"vdproj.rank": 32 * (1 + i // 2), "vdproj.init": ("random", "pca")[i % 2]})
              for i in range(4)]
    done, stopped, early, failed = trials
    for t in trials:
        start(cb, trials, t)
    clock.now += 5
    report(cb, trials, done, result(1, 54.377))
    report(cb, trials, stopped, result(1, 78.979))
    complete(cb, trials, stopped)
    clock.now += 5
    report(cb, trials, done, result(2, 54.372))
    complete(cb, trials, done)
    report(cb, trials, early, result(1, 60.0, best=(58.0, 0), early=True, kv=1536))
    complete(cb, trials, early)
    report(cb, trials, failed, result(1, 55.0))
    report(cb, trials, failed, EpochReport.failed(2, "the loss turned NaN at step 9").to_report())
    complete(cb, trials, failed)
    lines = out.getvalue().splitlines()
    assert lines[:4] == ["[0:00] trial abcde_00000 started: vdproj.init=random vdproj.rank=32",
                         "[0:00] trial abcde_00001 started: vdproj.init=pca vdproj.rank=32",
                         "[0:00] trial abcde_00002 started: vdproj.init=random vdproj.rank=64",
                         "[0:00] trial abcde_00003 started: vdproj.init=pca vdproj.rank=64"]
    assert lines[4:8] == [
        "[0:05] trial abcde_00000 epoch 1/2: val PPL 54.377, train PPL 53.377",
        "[0:05] trial abcde_00001 epoch 1/2: val PPL 78.979, train PPL 77.979",
        "[0:05] trial abcde_00001 asha_stopped by moasha at the rung of epoch 1: best val PPL 78.979 (epoch 1), 1,280 KV bytes/token",
        "[0:05] progress: 1/4 trials done, 2/7 epochs, 5s elapsed, ETA 12s"]  # 2 epochs in 5 s, 5 epochs still possible
    assert lines[9] == "[0:10] trial abcde_00000 completed: best val PPL 54.372 (epoch 2), 1,280 KV bytes/token"
    assert lines[12] == ("[0:10] trial abcde_00002 early_stopped at epoch 1 (no better val PPL for 3 epochs): best val PPL "
                         "58.000 (epoch 0), 1,536 KV bytes/token")
    assert lines[15].startswith("[0:10] trial abcde_00003 error: the loss turned NaN at step 9; traceback: "
                                f"{URI}/trial_abcde_00003/error.txt; its output: Ray's worker logs in /tmp/ray/session_x/logs")
    assert "epoch 2/2" not in lines[14] and lines[-1] == "[0:10] progress: 4/4 trials done, 5/5 epochs, 10s elapsed, done"
    assert len(lines) == 17 and sum("progress:" in ln for ln in lines) == 4


def test_a_failed_trial_names_its_error_file_and_a_restart_or_a_resumed_trial_says_so(tmp_path):
    cb, out, _ = console()
    trial = FakeTrial(0, tmp_path, **{"vdproj.rank": 32, "vdproj.init": "pca"})
    trial.init_local_path()
    (Path(trial.local_path) / "error.txt").write_text("Traceback (most recent call last):\n  ...\nRuntimeError: boom\n")
    trial.run_metadata.error_filename = "error.txt"
    report(cb, [trial], trial, {**result(1, 60.0), "pid": 4242, "hostname": "node-a"})
    cb.on_trial_recover(iteration=0, trials=[trial], trial=trial)
    trial.num_failures = 1
    start(cb, [trial], trial)
    cb.on_trial_error(iteration=0, trials=[trial], trial=trial)
    other = FakeTrial(1, tmp_path, **{"vdproj.rank": 64, "vdproj.init": "pca"})
    other.last_result = result(1, 60.0)  # a trial of an earlier run of the sweep, continued
    start(cb, [trial, other], other)
    lines = out.getvalue().splitlines()
    assert lines[1] == (f"[0:00] trial abcde_00000 failed: RuntimeError: boom; traceback: {URI}/trial_abcde_00000/error.txt; "
                        "restarting from its last checkpoint")
    assert lines[2] == "[0:00] trial abcde_00000 restarted (1 of at most 2 restarts): vdproj.init=pca vdproj.rank=32"
    assert lines[3] == (f"[0:00] trial abcde_00000 error: RuntimeError: boom; traceback: {URI}/trial_abcde_00000/error.txt; its "
                        "output: Ray's worker logs in /tmp/ray/session_x/logs on node-a (pid 4242), or run with --verbose")
    assert lines[5] == "[0:00] trial abcde_00001 resumed after epoch 1: vdproj.init=pca vdproj.rank=64"


def test_off_a_terminal_the_progress_line_comes_at_most_every_30_seconds(tmp_path):
    cb, out, clock = console()
    trials = [FakeTrial(0, tmp_path, **{"vdproj.rank": 32, "vdproj.init": "pca"})]
    for dt in (1, 28, 2, 10, 20):  # at 101, 129, 131, 141, 161 s
        clock.now += dt
        cb.on_step_end(iteration=0, trials=trials)
    assert [ln.split(" progress")[0] for ln in out.getvalue().splitlines()] == ["[0:31]", "[1:01]"]
    assert "\r" not in out.getvalue()


def test_on_a_terminal_the_progress_line_is_redrawn_in_place_and_kept_at_the_end(tmp_path):
    cb, out, clock = console(tty=True)
    trial = FakeTrial(0, tmp_path, **{"vdproj.rank": 32, "vdproj.init": "pca"})
    clock.now += 1
    cb.on_step_end(iteration=0, trials=[trial])
    clock.now += 0.5
    cb.on_step_end(iteration=0, trials=[trial])  # within a second: not redrawn
    start(cb, [trial], trial)
    clock.now += 1
    cb.on_step_end(iteration=0, trials=[trial])
    cb.on_experiment_end(trials=[trial])
    text = out.getvalue()
    assert text.count("progress:") == 3 and text.count("\x1b[K") == 4  # two redraws, each cleared before the next line
    assert text.startswith("\r[0:01] progress: 0/4 trials done") and "\r\x1b[K[0:01] trial abcde_00000 started" in text
    assert text.endswith("progress: 0/4 trials done, 0/8 epochs, 2s elapsed, ETA ?\n")


class CountedTrial(FakeTrial):
    """A trial that counts how often its last result is read."""

    reads = 0

    @property
    def last_result(self) -> dict:
        self.reads += 1
        return self._last

    @last_result.setter
    def last_result(self, value: dict) -> None:
        self._last = value


def test_the_progress_line_reads_each_trial_at_its_own_events_not_at_every_line(tmp_path):
    """A progress line follows each trial's end; summing every trial's last result for it made the console's work
    grow with the square of the sweep (a 1,000-trial sweep: a million reads). Each trial is read at its own events."""
    cb, out, _ = console()
    trials = [CountedTrial(i, tmp_path, **{"vdproj.rank": 32, "vdproj.init": "pca"}) for i in range(300)]
    cb.setup(total_num_samples=len(trials))
    for t in trials:
        start(cb, trials, t)
    for t in trials:
        report(cb, trials, t, result(1, 60.0))
        report(cb, trials, t, result(2, 59.0))
        complete(cb, trials, t)
    assert max(t.reads for t in trials) <= 8
    assert out.getvalue().splitlines()[-1].endswith("progress: 300/300 trials done, 600/600 epochs, 0s elapsed, done")


def test_durations_read_as_seconds_minutes_and_hours():
    assert [duration(s) for s in (0, 42.4, 185, 3725)] == ["0s", "42s", "3:05", "1:02:05"]


def test_tensorboard_files_hold_the_named_metrics_with_the_epoch_as_step(tmp_path):
    trial = FakeTrial(0, tmp_path, **{"vdproj.rank": 32, "vdproj.init": "pca"})
    tb = TensorBoardCallback()
    tb.on_trial_start(iteration=0, trials=[trial], trial=trial)
    for epoch, val in ((1, 60.0), (2, 55.0)):
        tb.on_trial_result(iteration=epoch, trials=[trial], trial=trial, result=result(epoch, val))
    tb.on_trial_complete(iteration=2, trials=[trial], trial=trial)
    folder = Path(trial.local_path)
    assert scalars(folder, "ppl/val") == {0: 70.0, 1: 60.0, 2: 55.0}  # epoch 0: the adapters at init
    assert scalars(folder, "kv/bytes_per_token") == {1: 1280.0, 2: 1280.0}
    assert scalars(folder, "ppl_by_position/16-32") == {1: 58.0, 2: 53.0}
    assert tensorboard_events(folder)[0][1:3] == (0, "session_start")
    tags = {tag for _, _, tag, _ in tensorboard_events(folder)}
    assert set(SCALARS) <= tags and not any(t.startswith("ray/tune") for t in tags)
    assert tensorboard_scalars(EpochReport.failed(3, "boom")) == {}
    # TensorBoard's own reader (what `tensorboard --logdir` shows): every scalar, one point per epoch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    assert set(SCALARS) <= set(acc.Tags()["scalars"])
    assert [(s.step, s.value) for s in acc.Scalars("ppl/val")] == [(0, 70.0), (1, 60.0), (2, 55.0)]
    assert [(s.step, s.value) for s in acc.Scalars("ppl_by_position/16-32")] == [(1, 58.0), (2, 53.0)]


def test_a_continued_trial_starts_a_new_event_file_purging_from_its_repeated_epoch(tmp_path):
    trial = FakeTrial(0, tmp_path, **{"vdproj.rank": 32})
    first = TensorBoardCallback()
    first.on_trial_start(iteration=0, trials=[trial], trial=trial)
    for epoch in (1, 2):
        first.on_trial_result(iteration=epoch, trials=[trial], trial=trial, result=result(epoch, 60.0 - epoch))
    # on the disk within FLUSH_SECONDS of the report, without the trial's end; then the driver is killed, and another
    # continues the trial, which reports its checkpoint's epoch again
    t0 = time.monotonic()
    wait_for(lambda: {2} <= set(scalars(Path(trial.local_path), "ppl/val")), 30, "epoch 2 on the disk", every=0.05)
    assert time.monotonic() - t0 < FLUSH_SECONDS + 5
    (old,) = {name for name, *_ in tensorboard_events(Path(trial.local_path))}
    second = TensorBoardCallback()
    second.on_trial_start(iteration=0, trials=[trial], trial=trial)
    second.on_trial_result(iteration=1, trials=[trial], trial=trial, result=result(2, 58.0, resumed=True))
    second.on_trial_result(iteration=2, trials=[trial], trial=trial, result=result(3, 57.0))
    second.on_trial_complete(iteration=2, trials=[trial], trial=trial)
    events = tensorboard_events(Path(trial.local_path))
    new = [e for e in events if e[0] != old]
    assert new[0][1:3] == (2, "session_start")  # TensorBoard drops what earlier files hold from step 2 on
    assert sorted(step for _, step, tag, _ in new if tag == "ppl/val") == [2, 3]  # no second epoch 0
    assert scalars(Path(trial.local_path), "ppl/val") == {0: 70.0, 1: 59.0, 2: 58.0, 3: 57.0}


def test_verbose_is_a_flag_of_every_sweep_script_and_not_part_of_the_specification():
    parse = sweep_parser("x", "v").parse_args
    quiet, verbose = sweep_cfg(parse(["--smoke-test"]), "v"), sweep_cfg(parse(["--smoke-test", "--verbose"]), "v")
    assert not quiet.verbose and verbose.verbose
    space = {"vdproj.rank": [32, 64]}
    assert specification(quiet, space, "d") == specification(verbose, space, "d")


def test_ray_is_quiet_unless_verbose_and_the_environment_is_restored(monkeypatch):
    monkeypatch.delenv(SNAPSHOT_WARNING_ENV, raising=False)
    monkeypatch.setenv(NEW_OUTPUT_ENV, "1")  # the user's own choice stays
    monkeypatch.delenv(TRIAL_ERRORS_ENV, raising=False)
    with quiet_ray(False):
        assert os.environ[SNAPSHOT_WARNING_ENV] == os.environ[TRIAL_ERRORS_ENV] == "0" and os.environ[NEW_OUTPUT_ENV] == "1"
    assert SNAPSHOT_WARNING_ENV not in os.environ and TRIAL_ERRORS_ENV not in os.environ and os.environ[NEW_OUTPUT_ENV] == "1"
    with quiet_ray(True):
        assert SNAPSHOT_WARNING_ENV not in os.environ
    assert ray_init_kwargs(False) == {"log_to_driver": False, "logging_level": logging.WARNING}
    assert ray_init_kwargs(True) == {"log_to_driver": True, "logging_level": logging.INFO}
    level = logging.getLogger(AUTH_LOGGER).level
    with quiet_ray_start(False):
        assert logging.getLogger(AUTH_LOGGER).level == logging.ERROR
    assert logging.getLogger(AUTH_LOGGER).level == level
