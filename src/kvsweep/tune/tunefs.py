"""The filesystem Ray Tune writes a sweep's local storage through: each file it writes appears whole or not at all.

Ray Tune copies its experiment snapshot (``experiment_state-<time>.json``, one per driver run, overwritten at every
snapshot), its searcher's state, the trials' results and their checkpoints from a local staging folder onto the
storage with pyarrow's ``copy_files``, which writes into the destination file in place. A driver killed during such a
copy leaves the file truncated; a truncated newest snapshot makes the next ``tune.run`` resuming the round, and
``ExperimentAnalysis``, fail to parse it (``JSONDecodeError``): the sweep could not be continued.

On a local (or mounted) storage Tune therefore gets ``atomic_local_fs()``: pyarrow's ``LocalFileSystem`` except that
an output stream writes into a hidden temporary folder beside its destination (``kvsweep.atomic.atomic_path``:
``.<name>.<random>.tmp/``) and renames the file into place when it closes without a failed write. A kill leaves at
most such a temporary folder, which no reader of Tune's files matches. Object stores need nothing: an object appears only once its upload completes.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.fs as pafs

from ..atomic import atomic_path


class _AtomicFile:
    """A binary file written inside ``kvsweep.atomic.atomic_path(path)``, which ``close`` leaves: the file replaces
    ``path`` in one rename, or, after a failed write, the temporary is removed and ``path`` is left as it was."""

    def __init__(self, path: str):
        self._atomic = atomic_path(path)
        self.tmp = self._atomic.__enter__()
        self._f = open(self.tmp, "wb")  # noqa: SIM115 (closed by close(), which pyarrow calls)
        self._failed = False

    @property
    def closed(self) -> bool:
        return self._f.closed

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self._f.tell()

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except BaseException:
            self._failed = True
            raise

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        if self._f.closed:
            return
        try:
            self._f.close()
        except BaseException:
            self._failed = True
            raise
        finally:
            failed = OSError(f"a write to {self.tmp} failed") if self._failed else None
            self._atomic.__exit__(type(failed) if failed else None, failed, None)


class AtomicLocalHandler(pafs.FileSystemHandler):
    """pyarrow's ``LocalFileSystem`` for ``pyarrow.fs.PyFileSystem``, with atomic output streams and copies (module
    docstring). Picklable: Ray sends the filesystem to the trials, which write their checkpoints through it."""

    def __init__(self):
        self._fs = pafs.LocalFileSystem()

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
        return pa.PythonFile(_AtomicFile(path), mode="w")

    def open_append_stream(self, path: str, metadata):
        return self._fs.open_append_stream(path, metadata=metadata)


def atomic_local_fs() -> pafs.PyFileSystem:
    """A local filesystem whose every written file appears whole or not at all (module docstring)."""
    return pafs.PyFileSystem(AtomicLocalHandler())


def tune_filesystem(fs: pafs.FileSystem) -> pafs.FileSystem:
    """The filesystem to give Ray Tune for a sweep's storage on ``fs``: ``atomic_local_fs()`` for a local one, ``fs``
    itself for an object store."""
    return atomic_local_fs() if isinstance(fs, pafs.LocalFileSystem) else fs
