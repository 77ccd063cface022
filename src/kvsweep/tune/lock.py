"""One driver per sweep.

On a local folder the driver holds an ``flock`` on ``<sweep>/.driver.lock`` for as long as it runs (the
kernel releases it when the driver dies, SIGKILL included) and writes who it is into that file. On an
object store, which has no locks, the driver holds a lease: ``driver.json`` names it and an expiry it
renews every ``LEASE_SECONDS / 3``; another driver takes a lease that expired, or at once one whose
holder is a dead process on its own host. Two drivers starting within a second of each other on an
object store both write, wait ``LEASE_SETTLE`` seconds and read back: the one whose lease is not there
steps back. No Ray here.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

from ..config import error_reason
from .store import StorageError, SweepBusyError, SweepStore

LOCK_FILE = ".driver.lock"
LEASE_FILE = "driver.json"
LEASE_SECONDS = 60.0
LEASE_SETTLE = 2.0


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (Linux: clock ticks since boot), to tell it from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return started is None or _process_start(pid) in (None, started)


def _holder() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "pid_started": _process_start(pid),
            "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv) or sys.executable, "token": uuid.uuid4().hex}


def _describe(info: dict | None) -> str:
    if not info:
        return "another driver"
    return (f"the driver pid {info.get('pid')} on {info.get('host')}, running since {info.get('started_at')} "
            f"({info.get('command')})")


class DriverLock:
    """One driver per (storage, sweep): a context manager held for the driver's whole run.

    Raises (on enter):
        SweepBusyError: another live driver holds the sweep, named in the message.
        StorageError: the lock cannot be written.
    """

    def __init__(self, store: SweepStore, *, lease_seconds: float = LEASE_SECONDS, settle: float = LEASE_SETTLE,
                 use_lease: bool | None = None, log: Callable[[str], None] = print):
        self.store, self.lease_seconds, self.settle, self.log = store, lease_seconds, settle, log
        self.use_lease = (not store.local) if use_lease is None else use_lease
        self.info = _holder()
        self.on_lost: Callable[[str], None] = lambda why: self.log(f"kvsweep: warning: {why}")
        self._renewed = 0.0
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _busy(self, holder: dict | None) -> SweepBusyError:
        return SweepBusyError(f"the sweep {self.store.name} in {self.store.storage_uri} is held by {_describe(holder)}; "
                              "wait for it to end, or use another --name")

    # -- local folders: flock
    def _acquire_flock(self) -> None:
        path = Path(self.store.root) / LOCK_FILE
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StorageError(f"cannot create the sweep's lock {path}: {error_reason(e)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = json.loads(os.pread(fd, 65536, 0) or b"null")
            except ValueError:
                holder = None
            os.close(fd)
            raise self._busy(holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self.info).encode(), 0)
        self._fd = fd

    # -- object stores: a lease
    def _stale(self, lease: dict) -> bool:
        if time.time() > float(lease.get("expires_at", 0)):
            return True
        return lease.get("host") == socket.gethostname() and not _alive(int(lease.get("pid", -1)), lease.get("pid_started"))

    def _write_lease(self) -> None:
        now = time.time()
        self.store.write_json(LEASE_FILE, {**self.info, "expires_at": now + self.lease_seconds})
        self._renewed = now

    def _acquire_lease(self) -> None:
        try:
            lease = self.store.read_json(LEASE_FILE)
        except StorageError:
            lease = None  # unreadable: treat as absent, the read-back below settles it
        if lease and lease.get("token") != self.info["token"] and not self._stale(lease):
            raise self._busy(lease)
        self._write_lease()
        time.sleep(self.settle)
        lease = self.store.read_json(LEASE_FILE)
        if not lease or lease.get("token") != self.info["token"]:
            raise self._busy(lease)
        self._thread = threading.Thread(target=self._renew, name="kvsweep-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        """Renew the lease every third of its time; if another driver holds it now (this one stalled past its
        expiry), or it could not be renewed before it expired, tell ``on_lost`` (the driver stops the sweep)."""
        while not self._stop.wait(self.lease_seconds / 3):
            try:
                lease = self.store.read_json(LEASE_FILE)
                if lease is not None and lease.get("token") != self.info["token"]:
                    self.on_lost(f"the sweep's lease was taken by {_describe(lease)} while this driver held it")
                    return
                self._write_lease()
            except Exception as e:  # the storage may be briefly unreachable; the lease lasts a while longer
                if time.time() > self._renewed + self.lease_seconds:
                    self.on_lost(f"the sweep's lease expired: it could not be renewed ({error_reason(e)})")
                    return
                self.log(f"kvsweep: warning: could not renew the sweep's lease: {error_reason(e)}")

    def __enter__(self) -> "DriverLock":
        if self.use_lease:
            self._acquire_lease()
        else:
            self._acquire_flock()
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=10)
            try:
                lease = self.store.read_json(LEASE_FILE)
                if lease and lease.get("token") == self.info["token"]:
                    self.store.delete(LEASE_FILE)
            except (StorageError, OSError):
                pass
