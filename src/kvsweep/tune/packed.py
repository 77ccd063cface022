"""Packed sweeps (``--pack K``): up to K trials at a time train together in one pack process per GPU.

A pack process (``PackServer``, a Ray actor holding the GPU) loads the base once and trains the
epochs its trials ask for, all of them in one batched forward per step (``kvsweep.pack``). Each
configuration is still its own Tune trial: a thin trial process (``packed_trainable``, no GPU) asks its
pack for one epoch at a time, then reports the epoch's metrics and checkpoint to Tune. Tune, the scheduler, the
failure retries and the results see exactly the trials of an unpacked sweep:

- Tune decides after each report whether the trial goes on; a trial that the scheduler stops never asks for
  another epoch, so it costs its pack nothing more, while the others keep stepping.
- Checkpoints are the trial's own (the same files as unpacked); a restarted or continued trial sends
  its last checkpoint to whichever pack takes it.
- A trial's loss that turns non-finite ends that trial (status ``error``); a pack that fails as a whole
  (out of GPU memory, say) fails the epochs it was running, and Tune restarts them from their checkpoints.
"""

from __future__ import annotations

import random
import shutil
import tempfile
import threading
import time
import traceback
from collections import deque
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path

import ray
import torch
from ray import tune
from transformers.utils import logging as hf_logging

from ..adapters import ensure_registered
from ..config import SweepCfg
from ..data import Samples
from ..evaluate import SplitStats
from ..models import load_base
from ..pack import Pack
from ..results import EpochReport
from ..train import TrialRun
from .space import trial_cfg
from .trainable import resumed_report

CLIENT_CPUS = 0.01  # a packed trial's own process only waits on its pack
PARK_SECONDS = 120.0  # a trial between epochs keeps its state in its pack this long (then it resends its checkpoint)


class PackServer:
    """One base on one device, and the trials training on it. Runs as a threaded Ray actor: ``epoch``
    calls wait concurrently while a single thread does all the work on the model."""

    def __init__(self, sweep: SweepCfg, samples: Samples, base_stats: SplitStats, slots: int, methods: dict | None = None):
        ensure_registered(methods or {})  # the sweep's methods defined outside kvsweep
        hf_logging.disable_progress_bar()
        torch.set_num_threads(max(1, int(sweep.cpus_per_trial)))
        self.sweep, self.base_stats, self.slots = sweep, base_stats, slots
        self.base = load_base(replace(sweep.model, device="auto"), log=print)
        self.pack = Pack(self.base, samples, log=print)
        self.work = Path(tempfile.mkdtemp(prefix="kvsweep-pack-"))
        self._cv = threading.Condition()
        self._requests: deque = deque()
        self._runs: dict[str, TrialRun] = {}  # trial id -> its run, training or parked between epochs
        self._waiting: dict[str, Future] = {}  # trial id -> the reply to its requested epoch
        self._parked: dict[str, float] = {}  # trial id -> when its last epoch ended
        self.counters = {"steps": 0, "trial_steps": 0, "tokens": 0, "step_seconds": 0.0}
        threading.Thread(target=self._loop, name="kvsweep-pack", daemon=True).start()

    # -- called by the trials (any thread)
    def load(self) -> int:
        """Trials this pack holds or is about to (those parked between epochs included)."""
        with self._cv:
            return len(self._runs) + len(self._requests)

    def stats(self) -> dict:
        with self._cv:
            return {**self.counters, "device": str(self.base.device), "trials": len(self._runs)}

    def epoch(self, trial_id: str, config: dict, epoch: int, files: dict[str, bytes] | None) -> dict:
        """Train trial ``trial_id`` (at ``epoch`` epochs done) for one more epoch; its metrics and checkpoint.

        Replies ``{"need_checkpoint": True}`` when this pack does not hold the trial at that epoch and no
        checkpoint came with the call.
        """
        reply: Future = Future()
        with self._cv:
            self._requests.append((trial_id, config, epoch, files, reply))
            self._cv.notify()
        return reply.result()

    # -- the model's thread
    def _loop(self) -> None:
        while True:
            try:
                self._serve()
            except BaseException as e:  # never leave a trial waiting on a dead loop: fail what is pending, go on
                traceback.print_exc()
                with self._cv:
                    requests = list(self._requests)
                    self._requests.clear()
                for *_, reply in requests:
                    if not reply.done():
                        reply.set_exception(RuntimeError(f"pack process error: {e!r}"))
                for t in list(self._runs):
                    self._fail(t, RuntimeError(f"pack process error: {e!r}"))

    def _serve(self) -> None:
        """Admit new requests, take one step for the trials with an epoch to train, end the epochs that are done."""
        with self._cv:
            while not self._requests and not self._waiting:
                self._cv.wait(timeout=10.0)
                self._evict()
            requests = list(self._requests)
            self._requests.clear()
        joining: dict[str, tuple[Future, dict]] = {}  # new trials of this pass: set up, then evaluated together
        for request in requests:
            self._admit(*request, joining)
        if joining:
            runs = self.pack.add_many([kw for _, kw in joining.values()])
            for (trial_id, (reply, _)), run in zip(joining.items(), runs, strict=True):
                if isinstance(run, BaseException):
                    reply.set_exception(run)
                else:
                    self._runs[trial_id] = run
                    self._place(trial_id, run, reply)
        self._evict()
        ids = list(self._waiting)
        if not ids:
            return
        runs = [self._runs[t] for t in ids]
        try:  # the loop every trial's life goes through: one step, the end of the epochs it ended
            ended = self.pack.advance(runs)
        except Exception as e:
            if not self.pack.ending:  # the whole step failed (out of memory, say): fail these epochs, Tune restarts them
                for t in ids:
                    self._fail(t, e)
                return
            ending, ended = set(self.pack.ending), []  # evaluating or checkpointing failed: fail those epochs
            for t, run in zip(ids, runs, strict=True):
                if run in ending:
                    self._fail(t, e)
        self.counters["steps"] += 1
        self.counters["trial_steps"] += len(runs)
        self.counters["step_seconds"] += self.pack.step_seconds
        self.counters["tokens"] += sum(r.cfg.train.batch_size * r.cfg.data.seq_len for r in runs)
        for t, run in zip(ids, runs, strict=True):
            if t not in self._waiting:  # failed above
                continue
            if run.error is not None:
                self._reply(t, {"error": str(run.error), "epoch": run.state.epoch + 1})
                self._drop(t)
            elif run in ended:
                try:
                    reply = self._epoch_reply(run)
                except Exception as e:
                    self._fail(t, e)
                    continue
                self._reply(t, reply)
                if run.done:
                    self._drop(t)
                else:
                    self._parked[t] = time.monotonic()

    def _admit(self, trial_id: str, config: dict, epoch: int, files: dict[str, bytes] | None, reply: Future,
               joining: dict[str, tuple[Future, dict]]) -> None:
        """Queue the trial's next epoch, or (into ``joining``) the trial itself when this pack does not hold it."""
        superseded = RuntimeError("superseded by a restart of the trial")
        if trial_id in self._waiting:  # the trial's earlier process died waiting; this is its restart
            self._fail(trial_id, superseded)
        if trial_id in joining:
            joining.pop(trial_id)[0].set_exception(superseded)
        run = self._runs.get(trial_id)
        if run is not None and run.state.epoch != epoch:  # the trial went back to an older checkpoint
            self._drop(trial_id)
            run = None
        if run is not None:
            self._place(trial_id, run, reply)
            return
        if epoch > 0 and files is None:
            reply.set_result({"need_checkpoint": True})
            return
        folder = self.work / trial_id
        try:
            shutil.rmtree(folder, ignore_errors=True)
            resume = None
            if files:
                resume = folder / "resume"
                resume.mkdir(parents=True)
                for name, data in files.items():
                    (resume / name).write_bytes(data)
            cfg = trial_cfg(config, self.sweep)
        except Exception as e:
            reply.set_exception(e)
            return
        joining[trial_id] = (reply, {"cfg": cfg, "base_stats": self.base_stats, "checkpoint_dir": folder / "checkpoint",
                                     "resume_from": resume, "log": lambda m, t=trial_id: print(f"[{t}] {m}")})

    def _place(self, trial_id: str, run: TrialRun, reply: Future) -> None:
        self._parked.pop(trial_id, None)
        if run.done:  # a trial that trains nothing (its epoch 0 is its report), or resumed from a finished trial's checkpoint
            reply.set_result({"metrics": run.state.history[-1] if run.resume_from is None else None, "files": None, "done": True})
            self._drop(trial_id)
            return
        self._waiting[trial_id] = reply

    def _fail(self, trial_id: str, error: BaseException) -> None:
        """The trial's pending epoch fails (Tune restarts it from its checkpoint); its state here is dropped."""
        reply = self._waiting.pop(trial_id, None)
        self._drop(trial_id)
        if reply is not None and not reply.done():
            reply.set_exception(error)

    def _epoch_reply(self, run: TrialRun) -> dict:
        """The trial's report of the epoch it ended (``metrics``, an ``EpochReport`` with its first step's time), its
        checkpoint's files and whether it is done."""
        files = {p.name: p.read_bytes() for p in run.ckpt_path.iterdir() if p.is_file()}
        return {"metrics": replace(run.state.history[-1], first_step_at=run.first_step_at), "files": files, "done": run.done}

    def _reply(self, trial_id: str, value: dict) -> None:
        self._waiting.pop(trial_id).set_result(value)

    def _drop(self, trial_id: str) -> None:
        reply = self._waiting.pop(trial_id, None)
        if reply is not None and not reply.done():
            reply.set_exception(RuntimeError("the trial left its pack"))
        run = self._runs.pop(trial_id, None)
        self._parked.pop(trial_id, None)
        if run is not None:
            self.pack.remove(run)
        shutil.rmtree(self.work / trial_id, ignore_errors=True)

    def _evict(self) -> None:
        """Forget trials parked too long (the scheduler stopped them, most likely); they resend their checkpoint if not."""
        now = time.monotonic()
        for t, since in list(self._parked.items()):
            if now - since > PARK_SECONDS:
                self._drop(t)


def start_servers(sweep: SweepCfg, samples: Samples, base_stats: SplitStats, n: int, methods: dict | None = None) -> list:
    """``n`` pack processes, each with a trial's resources (``--cpus-per-trial``, ``--gpus-per-trial``), the CPU
    share of its K trial processes included (so that they fit wherever the pack fits)."""
    cpus = max(CLIENT_CPUS, sweep.cpus_per_trial - sweep.pack * CLIENT_CPUS)
    actor = ray.remote(num_cpus=cpus, num_gpus=sweep.gpus_per_trial, max_concurrency=sweep.pack + 8,
                       max_restarts=0)(PackServer)
    samples_ref = ray.put(samples)
    return [actor.remote(sweep, samples_ref, base_stats, sweep.pack, methods) for _ in range(n)]


def packed_trainable(config: dict, *, sweep: SweepCfg, servers: list) -> None:
    """One configuration of a packed sweep: asks a pack for epochs, reports each to Tune with its checkpoint."""
    t_start = time.time()
    trial_id = tune.get_context().get_trial_id()
    loads = {}
    for s in servers:
        try:
            loads[s] = ray.get(s.load.remote())
        except ray.exceptions.RayActorError:  # a pack process that died: its trials go to the others
            continue
    if not loads:
        raise RuntimeError("no pack process is alive")
    least = min(loads.values())
    server = random.choice([s for s, n in loads.items() if n == least])  # ties at random: trials starting together spread
    epoch, files = 0, None
    checkpoint = tune.get_checkpoint()
    with tempfile.TemporaryDirectory(prefix="kvsweep-trial-") as work:
        if checkpoint is not None:
            folder = Path(work) / "resume"
            checkpoint.to_directory(str(folder))
            files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
            epoch = resumed_report(folder)
        restarted = checkpoint is not None
        previous: Path | None = None
        while True:
            reply = ray.get(server.epoch.remote(trial_id, config, epoch, None))
            if reply.get("need_checkpoint"):
                reply = ray.get(server.epoch.remote(trial_id, config, epoch, files))
            if "error" in reply:  # deterministic: end the trial as an error instead of retrying it
                tune.report(EpochReport.failed(reply["epoch"], reply["error"]).to_report())
                return
            if reply["metrics"] is None:
                return
            report: EpochReport = reply["metrics"]
            startup = report.first_step_at - t_start if report.first_step_at is not None and epoch == 0 else None
            report = replace(report, first_step_at=None, startup_seconds=startup)
            if reply["files"] is None:  # a trial that trains nothing: its epoch 0, without a checkpoint
                tune.report(report.to_report())
                return
            files = reply["files"]
            if sweep.fail_once_at_epoch is not None and not restarted and report.epoch == sweep.fail_once_at_epoch + 1:
                # a crash while the next epoch trains: the restarted trial resumes from its checkpoint files
                raise RuntimeError(f"injected fault after epoch {sweep.fail_once_at_epoch} (--inject-fault-at-epoch)")
            epoch = report.epoch
            folder = Path(work) / f"checkpoint-{epoch}"
            folder.mkdir()
            for name, data in files.items():
                (folder / name).write_bytes(data)
            tune.report(report.to_report(), checkpoint=tune.Checkpoint.from_directory(str(folder)))
            if previous is not None:
                shutil.rmtree(previous, ignore_errors=True)  # Tune has its copy
            previous = folder
            if reply["done"]:
                return
