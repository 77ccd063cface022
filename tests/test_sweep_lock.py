"""One driver per sweep: the lock on a local folder (flock), the lease on an object store, and two drivers of
one sweep on an S3 endpoint (moto, on loopback)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from kvsweep.tune.lock import LEASE_FILE, DriverLock
from kvsweep.tune.store import StorageError, SweepBusyError, SweepStore, join_uri

from .sweeps import check_once, env, kill, start, sweep_cmd, wait_for


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_lock_on_a_local_folder_is_refused_naming_the_holder(tmp_path):
    store = SweepStore(str(tmp_path), "s")
    with DriverLock(store):
        with pytest.raises(SweepBusyError, match=f"held by the driver pid {os.getpid()} on {socket.gethostname()}"):
            DriverLock(store).__enter__()
    with DriverLock(store):  # released on exit: the next driver takes it
        pass


def test_a_killed_holder_leaves_no_local_lock(tmp_path):
    code = (f"import os, time\nfrom kvsweep.tune.lock import DriverLock\nfrom kvsweep.tune.store import SweepStore\n"
            f"DriverLock(SweepStore({str(tmp_path)!r}, 's')).__enter__()\nprint('held', flush=True)\ntime.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SweepBusyError, match=f"pid {holder.pid} "):
            DriverLock(SweepStore(str(tmp_path), "s")).__enter__()
    finally:
        holder.kill()
        holder.wait()
    with DriverLock(SweepStore(str(tmp_path), "s")):  # SIGKILL released the flock
        pass


def _lease(store: SweepStore, **info) -> None:
    store.fs.create_dir(store.root, recursive=True)
    store.write_json(LEASE_FILE, {"host": socket.gethostname(), "pid": os.getpid(), "started_at": "earlier", "command": "x",
                                  "token": "other", "expires_at": time.time() + 60, **info})


def test_the_lease_rules_of_object_stores(tmp_path):
    store = SweepStore(str(tmp_path), "s")
    lease = lambda: DriverLock(store, use_lease=True, settle=0.05, lease_seconds=3)  # noqa: E731
    with lease():
        assert json.loads((tmp_path / "s" / LEASE_FILE).read_text())["pid"] == os.getpid()
        with pytest.raises(SweepBusyError, match=f"pid {os.getpid()} "):
            lease().__enter__()
    assert not (tmp_path / "s" / LEASE_FILE).exists()  # released
    _lease(store, host="elsewhere", pid=1)  # a live lease of another host
    with pytest.raises(SweepBusyError, match="on elsewhere"):
        lease().__enter__()
    _lease(store, host="elsewhere", pid=1, expires_at=time.time() - 1)  # expired: its driver stopped renewing it
    with lease():
        pass
    _lease(store, pid=_dead_pid())  # a dead process of this host: taken at once
    with lease():
        pass


def test_the_lease_is_renewed_while_the_driver_runs(tmp_path):
    store = SweepStore(str(tmp_path), "s")
    with DriverLock(store, use_lease=True, settle=0.05, lease_seconds=0.6):
        first = json.loads((tmp_path / "s" / LEASE_FILE).read_text())["expires_at"]
        time.sleep(1.0)
        assert json.loads((tmp_path / "s" / LEASE_FILE).read_text())["expires_at"] > first
        with pytest.raises(SweepBusyError):
            DriverLock(store, use_lease=True, settle=0.05, lease_seconds=0.6).__enter__()


def test_a_lease_written_over_by_another_driver_is_given_up(tmp_path):
    store = SweepStore(str(tmp_path), "s")
    lock = DriverLock(store, use_lease=True, settle=0.3, lease_seconds=3)
    threading.Timer(0.1, lambda: _lease(store, token="theirs", host="elsewhere", pid=1)).start()  # both wrote at once
    with pytest.raises(SweepBusyError, match="on elsewhere"):
        lock.__enter__()


def test_storage_uris_keep_their_query_at_the_end():
    assert join_uri("s3://b/p?endpoint_override=http://h:1&scheme=http", "x") == "s3://b/p/x?endpoint_override=http://h:1&scheme=http"
    assert join_uri("/tmp/r/", "x") == "/tmp/r/x"
    with pytest.raises(StorageError, match="--storage"):
        SweepStore("s3://b/p?not_an_option=1", "x")


@pytest.fixture
def s3(monkeypatch):
    """An S3 endpoint on loopback (moto) with a bucket; yields the storage URI of a folder in it."""
    moto_server = pytest.importorskip("moto.server")
    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(k, v)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    query = f"endpoint_override=http://{host}:{port}&scheme=http&region=us-east-1"
    import pyarrow.fs as pafs

    fs, _ = pafs.FileSystem.from_uri(f"s3://kvsweep?{query}&allow_bucket_creation=true")
    fs.create_dir("kvsweep")
    try:
        yield f"s3://kvsweep/results?{query}"
    finally:
        server.stop()


@pytest.mark.slow
def test_one_driver_per_sweep_on_an_object_store(tiny_folder, s3, tmp_path):
    import pyarrow.parquet as pq

    store = SweepStore(s3, "X")
    cmd = sweep_cmd("--name", "X", "--max-concurrent", "1", storage=tmp_path)
    cmd[cmd.index("--storage") + 1] = s3
    first = start(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: store.read_json(LEASE_FILE), 120, "the first driver's lease", proc=first)
        second = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=300)
        assert second.returncode == 2, second.stdout[-3000:] + second.stderr[-3000:]
        err = second.stderr.strip().splitlines()
        assert len(err) == 1 and f"held by the driver pid {first.pid} " in err[0], err
    finally:
        kill(first)  # SIGKILL: its lease stays behind, naming a dead process of this host
    third = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=600)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    tables = {n: pq.read_table(store.path(f"{n}.parquet"), filesystem=store.fs).to_pylist() for n in ("trials", "epochs", "positions")}
    check_once(tables, 4)
    assert store.read_json(LEASE_FILE) is None  # released at the end


def test_a_lease_taken_while_held_stops_the_holder(tmp_path):
    store = SweepStore(str(tmp_path), "s")
    lost: list[str] = []
    with DriverLock(store, use_lease=True, settle=0.05, lease_seconds=0.6) as lock:
        lock.on_lost = lost.append
        _lease(store, token="theirs", host="elsewhere", pid=1)  # this driver stalled; another took the sweep
        time.sleep(0.6)
    assert len(lost) == 1 and "taken by the driver pid 1 on elsewhere" in lost[0]
    assert json.loads((tmp_path / "s" / LEASE_FILE).read_text())["token"] == "theirs"  # not removed on exit
