"""The filesystem Ray Tune writes a sweep's local storage through: each file it writes appears whole or not at all.

Ray Tune copies its experiment snapshot (``experiment_state-<time>.json``, one per driver run, overwritten at every
snapshot), its searcher's state, the trials' results and their checkpoints from a local staging folder onto the
storage with pyarrow's ``copy_files``, which writes into the destination file in place. A driver killed during such a
copy leaves the file truncated; a truncated newest snapshot makes the next ``tune.run`` resuming the round, and
``ExperimentAnalysis``, fail to parse it (``JSONDecodeError``): the sweep could not be continued.

On a local (or mounted) storage Tune therefore gets ``atomic_local_fs()``: pyarrow's ``LocalFileSystem`` except that
an output stream writes a hidden temporary file beside its destination (``.<name>.<random>.tmp``) and renames it into
place when it closes without a failed write. A kill leaves at most such a temporary, which no reader of Tune's files
matches. Object stores need nothing: an object appears only once its upload completes.

Cost. Tune uploads its whole staging folder at every snapshot (every trial's ``result.json``, ``progress.csv``,
``params.json`` ...; only checkpoints are excluded), so a snapshot copies O(trials) files, nearly all of them
unchanged since the last one, and through this Python handler each copy holds the GIL that Tune's event loop needs.
A small file (under ``_SMALL`` bytes) is therefore gathered in memory and, when its bytes are those this filesystem
last wrote at that path and the file there is still the one it wrote (inode, size and modification time), left as it is:
the upload of an unchanged file costs one ``stat``. Larger files (checkpoints) are streamed to the temporary.
``benchmarks/scale.py`` measures the driver with and without it.
"""

from __future__ import annotations

import hashlib
import os
import secrets

import pyarrow as pa
import pyarrow.fs as pafs

_SMALL = 1 << 20  # bytes: files up to this size are compared with what was last written; larger ones are streamed


class _AtomicFile:
    """A binary file written to a hidden temporary beside ``path`` that ``close`` renames onto ``path``. After a failed
    write the temporary is removed and ``path`` is left as it was. Up to ``_SMALL`` bytes are kept in memory, and when
    they are what ``written`` (the handler's record: path -> (digest, inode, size, mtime_ns)) says is already at ``path``,
    ``close`` writes nothing."""

    def __init__(self, path: str, written: dict[str, tuple[bytes, int, int, int]] | None = None):
        self.path = path
        folder, name = os.path.split(path)
        self.tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
        self._written = written
        self._parts: list[bytes] | None = []  # None once streaming to the temporary
        self._size = 0
        self._f = None
        self._failed = False
        self.closed = False

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self._size

    def _open_tmp(self):
        try:
            return open(self.tmp, "xb")  # noqa: SIM115 (closed by close(), which pyarrow calls)
        except FileNotFoundError:  # as pyarrow's LocalFileSystem, create the missing folders
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            return open(self.tmp, "xb")  # noqa: SIM115

    def write(self, data) -> int:
        try:
            data = memoryview(data).cast("B")
            if self._parts is not None and self._size + len(data) <= _SMALL:
                self._parts.append(bytes(data))
            else:
                if self._f is None:
                    self._f = self._open_tmp()
                    self._f.writelines(self._parts or ())
                    self._parts = None
                self._f.write(data)
            self._size += len(data)
            return len(data)
        except BaseException:
            self._failed = True
            raise

    def flush(self) -> None:
        if self._f is not None:
            self._f.flush()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if self._failed:  # the write raised already; pyarrow closes the stream after it
                return
            if self._f is None:
                data = b"".join(self._parts)
                digest = hashlib.blake2b(data, digest_size=16).digest()
                if self._unchanged(digest):
                    return
                self._f = self._open_tmp()
                self._f.write(data)
            else:
                digest = None
            self._f.close()
            os.replace(self.tmp, self.path)
            self._f = None
            if self._written is not None:
                if digest is None:
                    self._written.pop(self.path, None)
                else:
                    st = os.stat(self.path)
                    self._written[self.path] = (digest, st.st_ino, st.st_size, st.st_mtime_ns)
        finally:
            if self._f is not None:  # failed: leave path as it was
                self._f.close()
                try:
                    os.unlink(self.tmp)
                except FileNotFoundError:
                    pass

    def _unchanged(self, digest: bytes) -> bool:
        last = self._written.get(self.path) if self._written is not None else None
        if last is None or last[0] != digest:
            return False
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        return (st.st_ino, st.st_size, st.st_mtime_ns) == last[1:]


class AtomicLocalHandler(pafs.FileSystemHandler):
    """pyarrow's ``LocalFileSystem`` for ``pyarrow.fs.PyFileSystem``, with atomic output streams and copies, and
    uploads of unchanged small files skipped (module docstring). Picklable: Ray sends the filesystem to the trials,
    which write their checkpoints through it (each process keeps its own record of what it wrote)."""

    def __init__(self):
        self._fs = pafs.LocalFileSystem()
        self._written: dict[str, tuple[bytes, int, int, int]] = {}

    def __eq__(self, other):
        return isinstance(other, AtomicLocalHandler)

    def __ne__(self, other):
        return not self == other

    def __reduce__(self):
        return AtomicLocalHandler, ()

    def get_type_name(self) -> str:
        return "local+atomic"

    def normalize_path(self, path: str) -> str:
        return self._fs.normalize_path(path)

    def get_file_info(self, paths):
        return self._fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self._fs.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self._fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self._fs.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        raise OSError("kvsweep: refusing to delete the contents of the root folder")

    def delete_file(self, path: str) -> None:
        self._fs.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self._fs.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        with self._fs.open_input_stream(src) as source, self.open_output_stream(dest, None) as out:
            while chunk := source.read(1 << 20):
                out.write(chunk)

    def open_input_stream(self, path: str):
        return self._fs.open_input_stream(path)

    def open_input_file(self, path: str):
        return self._fs.open_input_file(path)

    def open_output_stream(self, path: str, metadata):
        return pa.PythonFile(_AtomicFile(path, self._written), mode="w")

    def open_append_stream(self, path: str, metadata):
        return self._fs.open_append_stream(path, metadata=metadata)


def atomic_local_fs() -> pafs.PyFileSystem:
    """A local filesystem whose every written file appears whole or not at all (module docstring)."""
    return pafs.PyFileSystem(AtomicLocalHandler())


def tune_filesystem(fs: pafs.FileSystem) -> pafs.FileSystem:
    """The filesystem to give Ray Tune for a sweep's storage on ``fs``: ``atomic_local_fs()`` for a local one, ``fs``
    itself for an object store."""
    return atomic_local_fs() if isinstance(fs, pafs.LocalFileSystem) else fs
