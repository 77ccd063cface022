"""``kvsweep.tune.tunefs``: what Ray Tune writes onto a local storage appears whole or not at all."""

from __future__ import annotations

import pickle
import signal
import subprocess
import sys

import pyarrow.fs as pafs
import pytest

from kvsweep.tune.tunefs import _SMALL, _AtomicFile, atomic_local_fs, tune_filesystem

_WRITE_PART_AND_DIE = """
import os, signal, sys
import pyarrow.fs as pafs
from kvsweep.tune.tunefs import atomic_local_fs
fs = atomic_local_fs() if sys.argv[1] == "atomic" else pafs.LocalFileSystem()
with fs.open_output_stream(sys.argv[2]) as f:
    f.write(b'{"trial_data": [' * int(sys.argv[3]))
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("repeats", [1000, 200_000])  # gathered in memory; larger than _SMALL, streamed to the temporary
@pytest.mark.parametrize("fs", ["local", "atomic"])
def test_a_writer_killed_in_the_middle_of_a_file(tmp_path, fs, repeats):
    """pyarrow's local filesystem writes in place (what Ray Tune's uploads left after a kill); the atomic one leaves the
    file as it was, and at most a hidden temporary beside it (a small file is gathered in memory until it closes)."""
    path = tmp_path / "experiment_state-2026.json"
    path.write_text('{"trial_data": []}')
    proc = subprocess.run([sys.executable, "-c", _WRITE_PART_AND_DIE, fs, str(path), str(repeats)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    others = [p.name for p in tmp_path.iterdir() if p != path]
    if fs == "local":
        assert path.read_text() == '{"trial_data": [' * repeats and others == []  # truncated: no longer JSON
    else:
        assert path.read_text() == '{"trial_data": []}'
        assert all(o.startswith(".experiment_state-2026.json.") and o.endswith(".tmp") for o in others) and len(others) == (repeats * 16 > _SMALL)


def test_copies_through_the_atomic_filesystem_are_whole_and_leave_nothing_else(tmp_path):
    source = tmp_path / "staging"
    (source / "trial_0" / "checkpoint_000001").mkdir(parents=True)
    files = {"experiment_state-1.json": b"{}", "trial_0/result.json": b"{}\n" * 3000,
             "trial_0/checkpoint_000001/adapters.safetensors": bytes(range(256)) * 9000}  # larger than one write
    for name, data in files.items():
        (source / name).write_bytes(data)
    dest = tmp_path / "storage" / "tune-0"
    dest.mkdir(parents=True)
    (dest / "experiment_state-1.json").write_bytes(b"old")  # overwritten, as each snapshot overwrites the last
    fs = tune_filesystem(pafs.LocalFileSystem())
    pafs.copy_files(str(source), str(dest), destination_filesystem=fs)
    copied = {str(p.relative_to(dest)): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert copied == files
    fs.copy_file(str(dest / "trial_0" / "result.json"), str(dest / "copy.json"))
    with fs.open_input_stream(str(dest / "copy.json")) as f:
        assert f.read() == files["trial_0/result.json"]
    again = pickle.loads(pickle.dumps(fs))  # Ray sends the storage's filesystem to the trials
    with again.open_output_stream(str(dest / "from-a-trial.json")) as f:
        f.write(b"[]")
    assert (dest / "from-a-trial.json").read_bytes() == b"[]"
    assert not [p for p in tmp_path.rglob(".*.tmp")]


def test_a_failed_write_leaves_the_file_as_it_was(tmp_path):
    path = tmp_path / "search_gen_state-1.json"
    path.write_text("{}")
    f = _AtomicFile(str(path))
    f.write(b"[1, ")
    with pytest.raises(TypeError):
        f.write("not bytes")
    f.close()
    assert path.read_text() == "{}" and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_tune_gets_the_atomic_filesystem_for_a_local_storage_only():
    assert tune_filesystem(pafs.LocalFileSystem()).type_name == "py::local+atomic"
    other = pafs.SubTreeFileSystem("/tmp", pafs.LocalFileSystem())  # as an object store's: given to Tune as it is
    assert tune_filesystem(other) is other
    assert atomic_local_fs() == atomic_local_fs()


def test_a_failed_write_to_a_large_file_leaves_the_file_as_it_was(tmp_path):
    path = tmp_path / "adapters.safetensors"
    path.write_bytes(b"old")
    f = _AtomicFile(str(path), {})
    f.write(b"x" * (_SMALL + 1))  # streamed into the temporary
    with pytest.raises(TypeError):
        f.write("not bytes")
    f.close()
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == [path.name]


def _stamps(folder):
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def test_an_unchanged_file_is_not_written_again(tmp_path):
    """Tune uploads its whole staging folder at every snapshot: a file whose bytes this filesystem wrote there last,
    and which is still that file, is left alone; a changed one, or one changed or removed at the destination, is
    written (atomically) again."""
    source, dest = tmp_path / "staging", tmp_path / "storage"
    (source / "trial_0").mkdir(parents=True)
    (source / "trial_1").mkdir()
    files = {"experiment_state-1.json": b'{"trial_data": []}', "trial_0/result.json": b"{}\n", "trial_1/result.json": b"{}\n",
             "trial_1/big.bin": bytes(range(256)) * (_SMALL // 256 + 1)}
    for name, data in files.items():
        (source / name).write_bytes(data)
    dest.mkdir()
    fs = tune_filesystem(pafs.LocalFileSystem())
    pafs.copy_files(str(source), str(dest), destination_filesystem=fs)
    first = _stamps(dest)
    (source / "experiment_state-1.json").write_bytes(b'{"trial_data": [1]}')  # the next snapshot
    (dest / "trial_1" / "result.json").write_bytes(b"changed by someone else")
    (dest / "trial_0" / "result.json").unlink()
    (dest / "trial_0" / "result.json").write_bytes(b"{}\n")  # the same bytes, but not the file this filesystem wrote
    touched = _stamps(dest)
    pafs.copy_files(str(source), str(dest), destination_filesystem=fs)
    second = _stamps(dest)
    assert {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()} == {
        **files, "experiment_state-1.json": b'{"trial_data": [1]}'}
    assert second["trial_0/result.json"] != touched["trial_0/result.json"]  # rewritten
    assert second["trial_1/result.json"] != touched["trial_1/result.json"]
    assert second["experiment_state-1.json"] != first["experiment_state-1.json"]
    assert second["trial_1/big.bin"] != first["trial_1/big.bin"]  # large files are always written
    pafs.copy_files(str(source), str(dest), destination_filesystem=fs)
    third = _stamps(dest)
    assert {k: third[k] == second[k] for k in third} == {
        "experiment_state-1.json": True, "trial_0/result.json": True, "trial_1/result.json": True, "trial_1/big.bin": False}
    assert not list(tmp_path.rglob(".*.tmp"))
