"""A sweep's life beyond one clean run: continued with another specification (refused), grown, killed and
continued (the same scheduler decisions), two drivers at once (one refused), unwritable and full storage.

Each sweep runs as users run it, in its own process with its own in-process Ray; a test kills only the
processes it started.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from kvsweep.config import KvsweepError
from kvsweep.report import ReportError, load_results
from kvsweep.tune.guard import StorageGuard
from kvsweep.tune.journal import read_state
from kvsweep.tune.spec import SpecificationError
from kvsweep.tune.store import SweepStore

from .sweeps import check_once, kill, outcome, result_lines, run, script, start, sweep_cmd, tables, wait_for

pytestmark = pytest.mark.slow

SMOKE_SPACE = {"rank": [32, 64], "init": ["random", "pca"], "schedule": ["rec_to_lm"], "seed": [0]}  # sweeps/vdproj.py's


@pytest.fixture
def finished(smoke_sweep) -> Path:
    """The folder of a finished smoke sweep (the session's); tests copy it before they change anything."""
    return smoke_sweep


def _copy(finished: Path, storage: Path) -> Path:
    shutil.copytree(finished, storage / "vdproj-smoke")
    return storage / "vdproj-smoke"


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file() and p.name != ".driver.lock"}


def test_a_continued_sweep_with_another_specification_is_refused_before_any_work(finished, tmp_path):
    folder = _copy(finished, tmp_path)
    before = _files(folder)
    cases = [  # arguments, one line per differing field (stored -> now), what the last line suggests
        (["--epochs", "3"], ["  train.epochs: 2 -> 3"], "--name"),
        (["--seeds", "0,1"], ["  space.seed: [0] -> [0, 1]"], "--grow"),
        (["--train-samples", "32"], ["  data.train_samples: 64 -> 32"], "--name"),  # refused before tokenizing
        (["--lr", "0.001", "--scheduler", "fifo"], ['  scheduler: "moasha" -> "fifo"', "  scheduler.grace_period: 1 -> (not set)",
                                          "  scheduler.reduction_factor: 2.0 -> (not set)", "  train.lr: 0.0001 -> 0.001"], "--name"),
    ]
    for args, lines, hint in cases:
        proc = run(*args, storage=tmp_path, expect=2)
        err = proc.stderr.strip().splitlines()
        assert err[0].startswith("kvsweep: error: the sweep vdproj-smoke") and "another specification" in err[0]
        fields = [e for e in err if e.startswith("  ")]
        assert len(fields) == len(lines) and all(f.startswith(line) for f, line in zip(fields, lines)), (lines, err)
        assert "--name" in err[-1] and hint in err[-1] and "Traceback" not in proc.stderr
        assert "Ray instance" not in proc.stdout + proc.stderr  # refused before Ray started
    assert _files(folder) == before  # nothing written, nothing run


def test_another_set_of_search_space_fields_is_refused_in_process(finished, tmp_path):
    import ray

    from kvsweep.sweepargs import sweep_cfg, sweep_parser
    from kvsweep.tune import run_sweep

    _copy(finished, tmp_path)
    sweep = sweep_cfg(sweep_parser("x", "vdproj").parse_args(["--smoke-test", "--storage", str(tmp_path)]), "vdproj")
    with pytest.raises(SpecificationError) as e:
        run_sweep(sweep, {**SMOKE_SPACE, "kl_weight": [0.0, 1.0]}, log=lambda m: None)
    assert "  space.kl_weight: (not set) -> [0.0, 1.0]" in str(e.value).splitlines()
    with pytest.raises(SpecificationError, match="only adds configurations"):  # growing cannot drop what ran
        run_sweep(sweep, {**SMOKE_SPACE, "rank": [32]}, grow=True, log=lambda m: None)
    with pytest.raises(SpecificationError, match="everything but the search space"):
        run_sweep(sweep_cfg(sweep_parser("x", "vdproj").parse_args(["--smoke-test", "--storage", str(tmp_path), "--epochs", "3"]),
                            "vdproj"), SMOKE_SPACE, grow=True, log=lambda m: None)
    assert not ray.is_initialized()


def test_growing_a_sweep_runs_only_the_new_configurations(finished, tmp_path):
    folder = _copy(finished, tmp_path)
    old = tables(folder)
    old_lines = result_lines(folder / "tune-0")
    proc = run("--seeds", "0,1", "--grow", storage=tmp_path)
    assert "growing the sweep" in proc.stdout and "by 4 configuration(s)" in proc.stdout
    t = tables(folder)
    check_once(t, 8)
    assert result_lines(folder / "tune-0") == old_lines  # the old trials did not run again
    by_id = {r["trial_id"]: r for r in t["trials"]}
    for r in old["trials"]:  # and their rows are what they were
        assert by_id[r["trial_id"]] == r
    new = [r for r in t["trials"] if r["trial_id"] not in {o["trial_id"] for o in old["trials"]}]
    assert sorted((r["vdproj.rank"], r["vdproj.init"], r["seed"]) for r in new) == [(32, "pca", 1), (32, "random", 1), (64, "pca", 1), (64, "random", 1)]
    assert len(result_lines(folder / "tune-1")) == 4
    report = (tmp_path / "reports" / "vdproj-smoke" / "report.md").read_text()
    assert re.search(r"\| vdproj-smoke \| +8 \|", report)  # the report covers old and new trials
    again = run("--seeds", "0,1", storage=tmp_path)  # the grown sweep, continued as it now is: nothing to run
    assert "it is finished, nothing to run" in again.stdout and tables(folder) == t


def _rungs_script(storage: Path, name: str) -> str:
    return f"""
from kvsweep.config import DataCfg, SweepCfg, TrainCfg
from kvsweep.tune import run_sweep
sweep = SweepCfg(name={name!r}, storage={str(storage)!r}, report_dir=None, max_concurrent=1, grace_period=1, reduction_factor=2,
                 data=DataCfg(train_samples=64, val_samples=16), train=TrainCfg(epochs=3))
run_sweep(sweep, {{"rank": [32], "init": ["pca", "random"], "schedule": ["rec_to_lm"]}})
"""


@pytest.fixture(scope="module")
def uninterrupted(tiny_folder, tmp_path_factory) -> dict:
    """The 2-trial sweep of ``_rungs_script`` (the default scheduler, moasha) run without interruption: the decisions to match."""
    storage = tmp_path_factory.mktemp("uninterrupted")
    script(_rungs_script(storage, "whole"), cwd=storage)
    t = tables(storage / "whole")
    # rec_to_lm over 3 epochs: LM weight 1/3 at epoch 1 (rung 1 passes both trials), 2/3 at epoch 2 (rung 2 judges)
    assert sorted((r["status"], r["epochs_run"]) for r in t["trials"]) == [("asha_stopped", 2), ("completed", 3)]
    return t


def _first_trial_finished(folder: Path) -> bool:
    try:  # while the sweep runs, its finished trials are in parts/: read as a report reads them
        return any(r["status"] == "completed" for r in load_results(str(folder)).trials.to_pylist())
    except ReportError:
        return False


def _second_trial_stopped(folder: Path) -> bool:
    try:  # the decision is written (to scheduler.json's journal) before Tune acts on it
        state = read_state(SweepStore(str(folder.parent), folder.name))
    except (KvsweepError, ValueError):  # read between the listing of a journal entry and its deletion
        return False
    return state is not None and bool(state["stopped"])


@pytest.mark.parametrize("kill_when", [_first_trial_finished, _second_trial_stopped], ids=["rungs", "decision"])
def test_a_killed_driver_continues_with_the_scheduler_decisions_of_an_uninterrupted_run(uninterrupted, tmp_path, kill_when):
    """The scheduler stops the random-init trial at rung 2, the first that judges its schedule (the PCA-init trial
    before it is far better). The driver is killed as soon as the first trial finished (Ray Tune keeps rung records
    in memory only: they were lost) or right after the stop decision (Tune may not have saved it yet); the
    continued sweep must decide the same."""
    driver = start([sys.executable, "-c", _rungs_script(tmp_path, "killed")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   cwd=tmp_path)
    folder = tmp_path / "killed"
    try:
        wait_for(lambda: kill_when(folder), 400, kill_when.__name__, proc=driver, every=0.05)
    finally:
        kill(driver)
    script(_rungs_script(tmp_path, "killed"), cwd=tmp_path)
    t = tables(folder)
    check_once(t, 2)
    assert outcome(t) == outcome(uninterrupted)  # the same statuses, epochs and best PPL as without the kill
    assert [e["epoch"] for e in t["epochs"] if e["trial_id"] != next(r["trial_id"] for r in t["trials"] if r["status"] == "completed")] == [0, 1, 2]


_KILLED_IN_SNAPSHOT = """
import os, signal
import ray.train._internal.storage as storage
_copy, _snapshots = storage._pyarrow_fs_copy_files, []
def _copy_killed_in_the_second_snapshot(source, destination, **kw):  # Tune's upload of its staging folder to the storage
    names = [n for n in os.listdir(source) if n.startswith("experiment_state-")] if os.path.isdir(source) else []
    if names and kw.get("destination_filesystem") is not None:
        _snapshots.append(names[0])
        if len(_snapshots) == 2:  # the copy writes half the snapshot into its file on the storage, and the driver dies
            data = open(os.path.join(source, names[0]), "rb").read()
            with kw["destination_filesystem"].open_output_stream(f"{destination.rstrip('/')}/{names[0]}") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
    return _copy(source, destination, **kw)
storage._pyarrow_fs_copy_files = _copy_killed_in_the_second_snapshot
"""


def test_a_driver_killed_while_tune_uploads_its_snapshot_continues(uninterrupted, tmp_path):
    """Ray Tune copies its experiment snapshot onto the storage in place; a driver killed during that copy left a
    truncated ``experiment_state-*.json`` that the continued sweep could not parse. Tune now writes through
    ``kvsweep.tune.tunefs``: the storage keeps the snapshot before, and the same command continues."""
    log = tmp_path / "killed.log"
    with log.open("w") as out:
        driver = start([sys.executable, "-c", _KILLED_IN_SNAPSHOT + _rungs_script(tmp_path, "killed")], stdout=out, stderr=out,
                       cwd=tmp_path)
        try:
            driver.wait(timeout=600)
        finally:
            kill(driver)  # the Ray it started
    assert driver.returncode == -9, log.read_text()[-5000:]  # killed in its second snapshot's upload
    folder = tmp_path / "killed"
    for state in (folder / "tune-0").glob("experiment_state-*.json"):
        json.loads(state.read_text())  # whole: the one before the kill
    script(_rungs_script(tmp_path, "killed"), cwd=tmp_path)
    t = tables(folder)
    check_once(t, 2)
    assert outcome(t) == outcome(uninterrupted)


_VARIANT_GENERATOR = """
import kvsweep.tune.rounds as rounds
_round_search = rounds.round_search
rounds.round_search = lambda *a, **k: _round_search(*a, **{**k, "variant_generator": True})  # as kvsweep before GridSearcher
"""


def test_a_grid_round_that_rays_variant_generator_started_continues_with_it(uninterrupted, tmp_path):
    """A round started when grids went through Ray's variant generator, killed after its first trial: the continued
    round hands out only the points that generator had not (a new grid searcher would run them all again)."""
    driver = start([sys.executable, "-c", _VARIANT_GENERATOR + _rungs_script(tmp_path, "killed")], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, cwd=tmp_path)
    folder = tmp_path / "killed"
    try:
        wait_for(lambda: _first_trial_finished(folder), 400, "the first trial finished", proc=driver, every=0.05)
    finally:
        kill(driver)
    assert list((folder / "tune-0").glob("basic-variant-state-*.json"))
    script(_rungs_script(tmp_path, "killed"), cwd=tmp_path)
    t = tables(folder)
    check_once(t, 2)
    assert outcome(t) == outcome(uninterrupted)
    assert not list((folder / "tune-0").glob("search_gen_state-*.json"))


def test_one_driver_per_sweep_and_a_killed_one_leaves_no_lock(tiny_folder, tmp_path):
    first = start(sweep_cmd("--name", "X", "--max-concurrent", "1", storage=tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = tmp_path / "X" / ".driver.lock"
    try:
        wait_for(lambda: lock.is_file() and lock.read_text().strip(), 120, "the first driver's lock", proc=first)
        t0 = time.monotonic()
        second = run("--name", "X", storage=tmp_path, expect=2)
        assert time.monotonic() - t0 < 60
        err = second.stderr.strip().splitlines()
        assert len(err) == 1 and f"held by the driver pid {first.pid} " in err[0] and "--name" in err[0], err
        wait_for(lambda: list((tmp_path / "X").rglob("result.json")), 300, "a first result", proc=first)
    finally:
        kill(first)  # SIGKILL: no chance to release anything
    # the same command continues at once; packed now (how trials run is not the sweep's specification)
    third = run("--name", "X", "--max-concurrent", "1", "--pack", "2", storage=tmp_path)
    assert "resuming" in third.stdout and "packed: 1 pack process(es)" in third.stdout
    check_once(tables(tmp_path / "X"), 4)
    assert all(r["status"] != "running" for r in tables(tmp_path / "X")["trials"])


def test_unwritable_storage_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    t0 = time.monotonic()
    proc = run(storage=blocker / "results", expect=2)
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"kvsweep: error: cannot write to --storage {blocker / 'results'}"), err
    assert "Ray instance" not in proc.stdout + proc.stderr and "tokenized" not in proc.stdout
    assert time.monotonic() - t0 < 60


def _mount_tmpfs(path: Path, size: str, *options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    opts = ",".join((f"size={size}", *options))
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode == 0


def test_read_only_storage_is_refused_before_any_work(tmp_path):
    storage = tmp_path / "ro"
    if not _mount_tmpfs(storage, "1m", "ro"):
        pytest.skip("mounting a file system needs root")
    try:
        proc = run(storage=storage, expect=2)
        err = proc.stderr.strip().splitlines()
        assert len(err) == 1 and "cannot write to --storage" in err[0] and "Read-only file system" in err[0], err
    finally:
        subprocess.run(["umount", str(storage)], check=True)


def test_a_full_disk_stops_the_sweep_cleanly_and_the_same_command_continues(tiny_folder, tmp_path):
    storage = tmp_path / "small"
    if not _mount_tmpfs(storage, "48m"):
        pytest.skip("mounting a file system needs root")
    try:
        filler = storage / "filler"
        free = shutil.disk_usage(storage).free
        filler.write_bytes(b"\0" * (free - (12 << 20)))  # 12 MiB left: room to start, not to finish
        proc = run("--max-concurrent", "1", storage=storage, expect=2)
        out = proc.stdout + proc.stderr
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("kvsweep: error:")]
        assert len(errors) == 1 and "free" in errors[0] and "run the same command" in errors[0], proc.stderr[-3000:]
        assert "Traceback" not in out and "No space left on device" not in out and "EOFError" not in out
        assert "trials:" in proc.stdout  # the summary of what ran
        partial = pq.read_table(storage / "vdproj-smoke" / "trials.parquet").to_pylist()  # readable
        assert len(partial) < 4 or any(r["status"] == "running" for r in partial)  # stopped before the end
        filler.unlink()  # free the space; the same command continues
        again = run("--max-concurrent", "1", storage=storage)
        t = tables(storage / "vdproj-smoke")
        check_once(t, 4)
        assert "resuming" in again.stdout and all(r["status"] != "running" for r in t["trials"])
    finally:
        subprocess.run(["umount", "-l", str(storage)])


class _Status:
    """A trial whose status is counted when read."""

    reads = 0

    @property
    def status(self):
        _Status.reads += 1
        return "RUNNING"


def test_the_storage_guard_counts_the_running_trials_only_when_it_looks_at_the_free_space(tmp_path):
    """Tune calls ``on_step_begin`` at every event with all the sweep's trials: counting them there costs O(trials) per
    event, O(trials^2) per sweep. The guard counts them once per look at the free space (``every`` seconds)."""
    guard = StorageGuard(SweepStore(str(tmp_path), "s"), every=3600.0)
    trials = [_Status() for _ in range(100)]
    for step in range(50):
        guard.on_step_begin(step, trials)
    assert _Status.reads == 100 and guard.running == 100  # the first step looked; the next 49 were within the hour
    guard._last -= 3600.0
    guard.on_step_begin(50, trials)
    assert _Status.reads == 200
