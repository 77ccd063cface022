"""A sweep's folder on its storage: small files written atomically, free space.

The storage is a local folder (a shared mount on a cluster) or an object store (``s3://``, ``gs://``),
all through pyarrow filesystems; ``kvsweep.tune.lock`` keeps one driver per sweep. No Ray here.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from ..config import KvsweepError, error_reason

RETRIES = 4  # PUTs to an object store, 1 + 2 + 4 s apart


class StorageError(KvsweepError):
    """The sweep's storage cannot be read or written."""


class StorageFullError(StorageError):
    """The sweep's storage has no room for what the sweep must write next."""


class SweepBusyError(KvsweepError):
    """Another driver holds the sweep."""


def is_storage_full(e: BaseException) -> bool:
    """Whether ``e`` is a write that failed for want of space (ENOSPC, EDQUOT), as Python or pyarrow raise it."""
    return isinstance(e, OSError) and (e.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(e))


class SweepStore:
    """``<storage>/<name>`` on a pyarrow filesystem.

    Args:
        storage_uri: an absolute local path, or an ``s3://`` / ``gs://`` URI.
        name: the sweep's name (its folder).
    """

    def __init__(self, storage_uri: str, name: str):
        try:
            self.fs, base = pafs.FileSystem.from_uri(storage_uri)
        except (OSError, ValueError) as e:  # pyarrow's errors are OSError / ValueError subclasses
            raise StorageError(f"--storage {storage_uri}: {error_reason(e)}") from None
        self.storage_uri, self.name = storage_uri.rstrip("/"), name
        self.root = f"{base.rstrip('/')}/{name}"
        self.uri = join_uri(self.storage_uri, name)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def check_writable(self) -> None:
        """Create the sweep's folder and write and remove a file in it.

        Raises:
            StorageError: naming the storage and the reason (permissions, a missing bucket, a full disk).
        """
        probe = self.path(f".write-test-{socket.gethostname()}-{os.getpid()}")
        try:
            self.fs.create_dir(self.root, recursive=True)
            with self.fs.open_output_stream(probe) as f:
                f.write(b"kvsweep")
            self.fs.delete_file(probe)
        except (OSError, ValueError) as e:
            full = " (the disk is full)" if is_storage_full(e) else ""
            raise StorageError(f"cannot write to --storage {self.storage_uri}{full}: {error_reason(e)}") from None

    def names(self, folder: str = "") -> list[str]:
        """What the sweep's folder (or its subfolder ``folder``) holds: names, not paths; empty when it does not exist."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path(folder) if folder else self.root, allow_not_found=True))
        except OSError:
            return []
        return [i.base_name for i in infos]

    def read_bytes(self, name: str) -> bytes | None:
        """The file's bytes; ``None`` when it does not exist.

        Raises:
            StorageError: it exists but cannot be read.
        """
        try:
            with self.fs.open_input_stream(self.path(name)) as f:
                return f.readall()
        except FileNotFoundError:
            return None
        except OSError as e:
            if self.fs.get_file_info(self.path(name)).type == pafs.FileType.NotFound:
                return None
            raise StorageError(f"cannot read {self.uri}/{name}: {error_reason(e)}") from None

    def write_bytes(self, name: str, data: bytes) -> None:
        """Replace the file atomically: readers see the old content or the new one (local: a rename;
        object stores replace an object in one PUT, retried ``RETRIES`` times over a few seconds).

        Raises:
            OSError: a local write failed (a full disk: ``is_storage_full``).
            StorageError: an object store refused the PUT every time.
        """
        final = self.path(name)
        if not self.local:
            for attempt in range(RETRIES):
                try:
                    with self.fs.open_output_stream(final) as f:
                        f.write(data)
                    return
                except OSError as e:
                    if attempt == RETRIES - 1:
                        raise StorageError(f"cannot write {join_uri(self.uri, name)}: {error_reason(e)}") from None
                    time.sleep(2 ** attempt)
        folder, _, base = name.rpartition("/")  # a name may be inside a subfolder: the temporary goes beside it
        self.fs.create_dir(self.path(folder) if folder else self.root, recursive=True)
        tmp = self.path(f"{folder}/" * bool(folder) + f".{base}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            self.fs.move(tmp, final)
        except BaseException:
            try:
                self.fs.delete_file(tmp)
            except OSError:
                pass
            raise

    def read_json(self, name: str) -> Any | None:
        """The file's JSON; ``None`` when it does not exist.

        Raises:
            StorageError: it cannot be read, or is not JSON.
        """
        data = self.read_bytes(name)
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError as e:
            raise StorageError(f"{self.uri}/{name} is not valid JSON ({e})") from None

    def write_json(self, name: str, obj: Any) -> None:
        self.write_bytes(name, json.dumps(obj, indent=1).encode())

    def delete(self, name: str) -> None:
        try:
            self.fs.delete_file(self.path(name))
        except (FileNotFoundError, OSError):
            pass

    def free_bytes(self) -> int | None:
        """Free bytes on the local disk that holds the sweep; ``None`` for object stores."""
        if not self.local:
            return None
        folder = Path(self.root)
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        return shutil.disk_usage(folder).free

def join_uri(uri: str, name: str) -> str:
    """``uri`` with ``name`` appended to its path; a query (``s3://b/p?endpoint_override=...``) stays at the end."""
    base, sep, query = uri.partition("?")
    return f"{base.rstrip('/')}/{name}{sep}{query}"
