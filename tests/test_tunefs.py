"""``kvsweep.tune.tunefs``: what Ray Tune writes onto a local storage appears whole or not at all."""

from __future__ import annotations

import pickle
import signal
import subprocess
import sys

import pyarrow.fs as pafs
import pytest

from kvsweep.tune.tunefs import _AtomicFile, atomic_local_fs, tune_filesystem

_WRITE_PART_AND_DIE = """
import os, signal, sys
import pyarrow.fs as pafs
from kvsweep.tune.tunefs import atomic_local_fs
fs = atomic_local_fs() if sys.argv[1] == "atomic" else pafs.LocalFileSystem()
with fs.open_output_stream(sys.argv[2]) as f:
    f.write(b'{"trial_data": [' * 1000)
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("fs", ["local", "atomic"])
def test_a_writer_killed_in_the_middle_of_a_file(tmp_path, fs):
    """pyarrow's local filesystem writes in place (what Ray Tune's uploads left after a kill); the atomic one leaves the
    file as it was, and a hidden temporary folder beside it."""
    path = tmp_path / "experiment_state-2026.json"
    path.write_text('{"trial_data": []}')
    proc = subprocess.run([sys.executable, "-c", _WRITE_PART_AND_DIE, fs, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    others = [p.name for p in tmp_path.iterdir() if p != path]
    if fs == "local":
        assert path.read_text() == '{"trial_data": [' * 1000 and others == []  # truncated: no longer JSON
    else:
        assert path.read_text() == '{"trial_data": []}'
        assert len(others) == 1 and others[0].startswith(".experiment_state-2026.json.") and others[0].endswith(".tmp")


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
