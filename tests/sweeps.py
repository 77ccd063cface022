"""Running sweeps as users run them, in their own processes, and reading their results (for the sweep tests)."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
from tensorboardX.proto import event_pb2

ROOT = Path(__file__).resolve().parents[1]
TABLES = ("trials", "epochs", "positions")
CONSOLE = "console.txt"  # a finished sweep's console output (stdout, then stderr), beside its folder in the session fixtures


def env() -> dict:
    e = os.environ.copy()
    e.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_DEDUP_LOGS="0", PYTHONUNBUFFERED="1")
    return e


# A smoke trial ends before a second trial's process has finished starting (importing torch): Tune then hands the next
# trial to the first process and stops the second one half-started, so a sweep of smoke trials at two at once runs them
# one at a time anyway, and pays a wasted process start per trial (about a fifth of a sweep's CPU). The sweeps of the
# tests run them one at a time unless they set the concurrency themselves; the session's smoke sweep runs as users run it.
ONE_AT_A_TIME = ("--max-concurrent", "1")


def sweep_cmd(*args: str, storage: Path, as_users_run: bool = False) -> list[str]:
    """``python sweeps/vdproj.py --smoke-test --storage STORAGE --report-dir STORAGE/reports ARGS``, one trial at a time
    unless ``ARGS`` set ``--max-concurrent`` or ``--pack`` (``ONE_AT_A_TIME``) or ``as_users_run``."""
    own = as_users_run or any(a.split("=")[0] in ("--max-concurrent", "--pack") for a in args)
    return [sys.executable, str(ROOT / "sweeps" / "vdproj.py"), "--smoke-test", "--storage", str(storage),
            "--report-dir", str(storage / "reports"), *(() if own else ONE_AT_A_TIME), *args]


def run(*args: str, storage: Path, timeout: int = 600, expect: int = 0, as_users_run: bool = False) -> subprocess.CompletedProcess:
    """``sweep_cmd(*ARGS)`` in a subprocess; asserts its exit code."""
    proc = subprocess.run(sweep_cmd(*args, storage=storage, as_users_run=as_users_run), capture_output=True, text=True, env=env(),
                          timeout=timeout, cwd=ROOT)
    assert proc.returncode == expect, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def shared_sweep(key: str, *args: str, storage_factory) -> Path:
    """The results folder of ``python sweeps/vdproj.py --smoke-test ARGS``, run once per test session (``key`` names it),
    for all the session's pytest-xdist workers: the first to ask runs it, the others wait for it. Its console output is
    ``CONSOLE`` beside the folder. Tests that change anything copy the folder first."""
    import shutil
    import tempfile

    from filelock import FileLock

    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")  # the same in every worker of one run
    if run_id is None:
        storage = storage_factory.mktemp(f"{key}-sweep")
    else:
        storage = Path(tempfile.gettempdir()) / f"kvsweep-test-{key}-sweep-{run_id}"
        storage.mkdir(exist_ok=True)
    with FileLock(f"{storage}.lock"):
        if not (storage / CONSOLE).is_file():
            try:
                proc = run(*args, storage=storage, as_users_run=key == "smoke")
            except BaseException:
                shutil.rmtree(storage / "vdproj-smoke", ignore_errors=True)  # the next worker to ask starts afresh
                raise
            (storage / CONSOLE).write_text(proc.stdout + proc.stderr)  # last: its presence says the sweep is whole
    return storage / "vdproj-smoke"


def script(code: str, *, cwd: Path, timeout: int = 600, expect: int = 0) -> subprocess.CompletedProcess:
    """``python -c CODE`` in a subprocess (for sweeps with a search space of the test's own)."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(), timeout=timeout, cwd=cwd)
    assert proc.returncode == expect, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def tables(folder: Path) -> dict[str, list[dict]]:
    return {n: pq.read_table(folder / f"{n}.parquet").to_pylist() for n in TABLES}


def check_once(t: dict, n_trials: int) -> None:
    """Every trial exactly once, every (trial, epoch) once, epochs 0 (the adapters at init) and 1..epochs_run for each
    trial that trained an epoch."""
    ids = [r["trial_id"] for r in t["trials"]]
    assert len(ids) == len(set(ids)) == n_trials, f"{n_trials} trials expected, each once; the trials table holds {sorted(ids)}"
    pairs = [(r["trial_id"], r["epoch"]) for r in t["epochs"]]
    assert len(pairs) == len(set(pairs)), f"(trial, epoch) twice in the epochs table: {sorted(p for p in set(pairs) if pairs.count(p) > 1)}"
    for r in t["trials"]:
        assert r["status"] in ("completed", "early_stopped", "asha_stopped", "error"), (r["trial_id"], r["status"])
        epochs = sorted(e["epoch"] for e in t["epochs"] if e["trial_id"] == r["trial_id"])
        assert epochs == ([0] if r["epochs_run"] else []) + list(range(1, r["epochs_run"] + 1)), \
            f"trial {r['trial_id']} ({r['status']}, {r['epochs_run']} epochs run) has the epochs {epochs}"


def outcome(t: dict) -> dict:
    """(configuration without its trial id) -> (status, epochs run, best epoch, best val PPL): what the sweep decided."""
    def key(config: str) -> str:
        c = json.loads(config)
        c["train"].pop("loss_chunk", None)
        return json.dumps(c, sort_keys=True)

    return {key(r["config"]): (r["status"], r["epochs_run"], r["best_epoch"], round(r["best_val_ppl"], 6)) for r in t["trials"]}


def result_lines(experiment: Path) -> dict[str, int]:
    """Trial folder name -> lines of its result.json (one per reported epoch)."""
    return {p.parent.name: len(p.read_text().splitlines()) for p in experiment.glob("*/result.json")}


def start(cmd: list[str], **kw) -> subprocess.Popen:
    """A driver in its own process group (so that it and the Ray it starts can be killed together)."""
    return subprocess.Popen(cmd, env=env(), start_new_session=True, **{"cwd": ROOT, **kw})


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL the driver and everything in its process group (only what this test started)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | None = None, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        assert proc is None or proc.poll() is None, f"the driver exited before {what}"
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def tensorboard_events(folder: Path) -> list[tuple[str, int, str, float | None]]:
    """Every event of the TensorBoard event files in ``folder`` (file name, step, scalar tag or ``session_start``,
    value), read with tensorboardX's protobuf classes from the TFRecord framing (length, its CRC, data, its CRC)."""
    out = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            ev = event_pb2.Event()
            ev.ParseFromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            if ev.HasField("session_log") and ev.session_log.status == event_pb2.SessionLog.START:
                out.append((path.name, ev.step, "session_start", None))
            out += [(path.name, ev.step, v.tag, v.simple_value) for v in ev.summary.value if v.HasField("simple_value")]
    return out


def scalars(folder: Path, tag: str) -> dict[int, float]:
    """Step -> value of the scalar ``tag`` in ``folder``'s event files (the last file's value where steps repeat)."""
    return {step: value for _, step, t, value in tensorboard_events(folder) if t == tag}
