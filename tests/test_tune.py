"""Sweeps with Ray Tune, run as a user runs them: the sweep scripts, in their own processes.

Each sweep starts its own in-process Ray in a subprocess; a test stops only the processes it started.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvsweep.config import ConfigError, DataCfg, SweepCfg, TrainCfg

from .sweeps import CONSOLE, ROOT, check_once as _check_once, env as _env, run, scalars, shared_sweep, tables as _tables

pytestmark = pytest.mark.slow


def _sweep(*args: str, storage: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return run(*args, storage=storage, timeout=timeout)


@pytest.fixture(scope="session")
def fifo_sweep(tiny_folder, tmp_path_factory) -> Path:
    """A finished ``--smoke-test --scheduler fifo`` sweep's folder (its console output beside it), run once per test
    session: the fifo case of the smoke test and the unpacked trials the packed test compares with."""
    return shared_sweep("fifo", "--scheduler", "fifo", storage_factory=tmp_path_factory)


@pytest.mark.parametrize("scheduler", [None, "asha", "fifo"], ids=["moasha", "asha", "fifo"])
def test_smoke_sweep_runs_and_a_second_run_continues_it(request, tmp_path, scheduler):
    args = ["--scheduler", scheduler] if scheduler else []  # the default: moasha
    if scheduler == "asha":
        proc = _sweep(*args, storage=tmp_path / "asha")
        ran, console = tmp_path / "asha" / "vdproj-smoke", proc.stdout + proc.stderr
    else:  # the session's plain smoke sweep (moasha) and the module's fifo one: run once, shared with other tests
        ran = request.getfixturevalue("fifo_sweep" if scheduler == "fifo" else "smoke_sweep")
        console = (ran.parent / CONSOLE).read_text()
    assert "4 trials:" in console and "epochs run" in console and "results: " in console
    folder = tmp_path / "vdproj-smoke"
    shutil.copytree(ran, folder)  # continued below; the shared folders stay as they are
    t = _tables(folder)
    _check_once(t, 4)
    state = folder / "scheduler.json"
    if scheduler == "fifo":
        assert not state.exists() and all(r["status"] == "completed" for r in t["trials"])
    else:
        assert json.loads(state.read_text())["scheduler"] == (scheduler or "moasha")
    if scheduler is None:  # the lowest-byte trial with the better init is the front's low-byte end at rung 1: kept
        (low,) = [r for r in t["trials"] if r["vdproj.rank"] == 32 and r["vdproj.init"] == "pca"]
        assert low["status"] == "completed" and low["epochs_run"] == 2
    assert {r["vdproj.rank"] for r in t["trials"]} == {32, 64} and {r["vdproj.init"] for r in t["trials"]} == {"random", "pca"}
    for r in t["trials"]:
        assert r["kv_bytes_per_token"] == 4 * (128 + r["vdproj.rank"]) * 2 and r["kv_bytes_per_token_base"] == 4 * 256 * 2
        assert r["best_val_ppl"] > 0 and r["base_val_ppl"] > 0 and r["trainable_params"] > 0
        assert r["test_ppl"] > 0 and r["base_test_ppl"] > 0 and r["eval_seq_len"] == 256  # --smoke-test evaluates at 256
        epochs = {e["epoch"]: e["val_ppl"] for e in t["epochs"] if e["trial_id"] == r["trial_id"]}
        assert r["best_epoch"] == min(epochs, key=lambda e: (epochs[e], e)) and r["best_val_ppl"] == epochs[r["best_epoch"]]
    assert len({r["base_val_ppl"] for r in t["trials"]}) == len({r["base_test_ppl"] for r in t["trials"]}) == 1  # evaluated once
    assert len(t["positions"]) == 4 * 2 * 6  # validation and test, buckets [0,16) ... [96,128) [128,256)
    assert {(p["split"], p["hi"]) for p in t["positions"] if p["lo"] == 128} == {("validation", 256), ("test", 256)}
    _check_console_and_tensorboard(console, t, folder)
    if scheduler == "asha":
        return  # continuing: the moasha and fifo cases
    # the same command again continues the finished sweep: nothing is trained again, the results stay as they are
    lines = {p: p.read_text() for p in folder.rglob("result.json")}
    again = _sweep(*args, storage=tmp_path)
    assert "continuing the sweep" in again.stdout and "nothing to run" in again.stdout
    assert _tables(folder) == t
    assert {p: p.read_text() for p in folder.rglob("result.json")} == lines


def _check_console_and_tensorboard(console: str, t: dict, folder: Path) -> None:
    """The compact console: about 40 lines for 4 trials, without Tune's tables or Ray's notices, naming each trial's
    start, epochs and end; a TensorBoard event file in every trial folder with its validation PPL at every epoch."""
    lines = console.splitlines()
    assert len(lines) <= 45, console
    assert not any(s in console for s in ("╭", "Trial status", " INFO ", "Checkpoint successfully", "Token authentication")), console
    for r in t["trials"]:
        mine = [ln for ln in lines if f"trial {r['trial_id']} " in ln]
        epochs = {e["epoch"]: e["val_ppl"] for e in t["epochs"] if e["trial_id"] == r["trial_id"]}
        heads, name = [ln.split("] ", 1)[1].split(":")[0] for ln in mine], f"trial {r['trial_id']}"
        assert heads[:-1] == [f"{name} started"] + [f"{name} epoch {e}/2" for e in range(1, r["epochs_run"] + 1)], mine
        assert heads[-1].startswith(f"{name} {r['status']}"), mine  # e.g. "asha_stopped by moasha at the rung of epoch 1"
        (trial_folder,) = folder.glob(f"tune-0/*_{r['trial_id']}*")
        assert list(trial_folder.glob("events.out.tfevents.*"))
        assert scalars(trial_folder, "ppl/val") == pytest.approx(epochs, rel=1e-6)  # epoch 0 (the init) included
    assert lines[-1].startswith("trial start-up") and sum("progress: " in ln for ln in lines) >= 4


def _config_key(config: str) -> str:
    """A configuration without its run-only settings: it has another trial id in another experiment (and may
    compute its loss in chunks: the same loss, summed in another order)."""
    c = json.loads(config)
    c["train"].pop("loss_chunk")
    return json.dumps(c, sort_keys=True)


def _by_config(t: dict) -> dict:
    """(config, epoch) -> val PPL."""
    config = {r["trial_id"]: _config_key(r["config"]) for r in t["trials"]}
    return {(config[e["trial_id"]], e["epoch"]): e["val_ppl"] for e in t["epochs"]}


def test_packed_sweep_reports_what_unpacked_trials_report(fifo_sweep, tmp_path):
    assert "trial start-up (start to first training step): median" in (fifo_sweep.parent / CONSOLE).read_text()
    packed = _sweep("--pack", "4", "--name", "packed", storage=tmp_path)  # with moasha: some trials may stop after epoch 1
    out = packed.stdout
    assert "packed: 1 pack process(es) x up to 4 trials" in out and "trial start-up" in out
    alone_t, t = _tables(fifo_sweep), _tables(tmp_path / "packed")  # the same trials, unpacked
    alone = _by_config(alone_t)
    _check_once(t, 4)
    assert len([k for k in _by_config(t) if k[1] >= 1]) == sum(r["epochs_run"] for r in t["trials"])
    for key, ppl in _by_config(t).items():
        assert ppl == pytest.approx(alone[key], rel=1e-5)  # the same computation up to float32 rounding
    # each packed trial's row is the unpacked trial's row over the epochs the packed one ran
    alone_rows, alone_epochs = {_config_key(r["config"]): r for r in alone_t["trials"]}, _by_config(alone_t)
    for r in t["trials"]:
        a = alone_rows[_config_key(r["config"])]
        assert r["status"] == a["status"] or (r["status"] == "asha_stopped" and r["epochs_run"] < a["epochs_run"])
        best = min(alone_epochs[(_config_key(r["config"]), e)] for e in range(0, r["epochs_run"] + 1))  # epoch 0: the init
        assert r["best_val_ppl"] == pytest.approx(best, rel=1e-5)
        for col in ("kv_bytes_per_token", "kv_bytes_per_token_base", "trainable_params", "total_params", "init_val_ppl",
                    "base_test_ppl"):
            assert r[col] == pytest.approx(a[col], rel=1e-5), col
    # a packed trial that ran as long as the unpacked one has its best epoch and that epoch's test PPL
    same = [(r, alone_rows[_config_key(r["config"])]) for r in t["trials"]
            if r["epochs_run"] == alone_rows[_config_key(r["config"])]["epochs_run"]]
    assert same  # the first trial at each rung goes on
    for r, a in same:
        assert r["best_epoch"] == a["best_epoch"] and r["test_ppl"] == pytest.approx(a["test_ppl"], rel=1e-5) and r["test_ppl"] > 0
    # what the pack trained is exactly what the trials report: a stopped trial cost no further steps
    steps_per_epoch = 64 // 8
    line = next(ln for ln in out.splitlines() if ln.startswith("pack 0 on cpu:"))
    trial_steps = int(line.split(":")[1].split()[0])
    assert trial_steps == steps_per_epoch * sum(r["epochs_run"] for r in t["trials"])


@pytest.mark.parametrize("packed", [False, True], ids=["alone", "packed"])
def test_a_crashed_trial_restarts_from_its_checkpoint(tiny_folder, tmp_path, packed):
    name = "faultypack" if packed else "faulty"
    _sweep(*(["--pack", "4"] if packed else []), "--scheduler", "fifo", "--epochs", "2", "--inject-fault-at-epoch", "1", "--name", name,
           storage=tmp_path)
    t = _tables(tmp_path / name)
    _check_once(t, 4)
    assert all(r["status"] in ("completed", "early_stopped") for r in t["trials"])
    assert all(r["epochs_run"] == 2 or r["status"] == "early_stopped" for r in t["trials"])
    assert list((tmp_path / name).glob("tune-0/*/error.txt")), "the injected fault should have been recorded by Tune"


def test_a_nan_configuration_ends_as_error_and_the_others_complete(tiny_folder, tmp_path):
    script = f"""
import sys
from kvsweep.config import DataCfg, SweepCfg, TrainCfg
from kvsweep.tune import run_sweep
sweep = SweepCfg(name="nan", storage={str(tmp_path)!r}, report_dir={str(tmp_path / "reports")!r}, scheduler="fifo", max_failures=0,
                 data=DataCfg(train_samples=32, val_samples=8), train=TrainCfg(epochs=2))
run_sweep(sweep, {{"rank": [32], "layers": [[0, 1]], "ka": ["ka_replace"], "lr": [1e-3, 1e30]}})
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(), timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "the scheduler stopped no trial" in proc.stdout and "saved" not in proc.stdout  # an error saves nothing
    t = _tables(tmp_path / "nan")
    _check_once(t, 2)
    by_lr = {json.loads(r["config"])["train"]["lr"]: r for r in t["trials"]}
    assert by_lr[1e-3]["status"] == "completed"
    bad = by_lr[1e30]
    assert bad["status"] == "error" and ("nan" in bad["error"] or "inf" in bad["error"]) and "epoch" in bad["error"]


def test_invalid_search_space_is_rejected_before_ray_starts(tmp_path):
    import ray

    from kvsweep.tune import run_sweep

    sweep = SweepCfg(name="bad", storage=str(tmp_path), data=DataCfg(train_samples=32, val_samples=8), train=TrainCfg(epochs=2))
    for space, field in [({"rank": [32, 0]}, "rank"), ({"rank": [1000]}, "rank"), ({"schedule": ["warmup"]}, "schedule"),
                         ({"init": ["svd"], "rank": [8]}, "init"), ({"ka": ["ka_gated", "lora"]}, "ka"), ({"depth": [1]}, "depth"),
                         ({"rank": []}, "rank"), ({"rank": [None]}, "adapters")]:
        with pytest.raises(ConfigError, match=field):
            run_sweep(sweep, space, log=lambda m: None)
    assert not ray.is_initialized()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agent_log(temp_dir: str) -> str:
    """The end of the head's dashboard agent log: why its job agent did not register, if it did not."""
    logs = sorted(Path(temp_dir).glob("session_*/logs/dashboard_agent.log"))
    return "\n--- dashboard_agent.log ---\n" + logs[-1].read_text(errors="replace")[-2000:] if logs else ""


def test_ray_job_submit_against_a_local_head(tiny_folder, tmp_path):
    """`ray job submit --working-dir . -- python sweeps/vdproj.py --smoke-test` against `ray start --head`."""
    import socket
    import tempfile

    bin_dir = Path(sys.executable).parent
    env = _env()
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "token"  # token authentication on, for the head and the job CLI alike
    if not (Path.home() / ".ray" / "auth_token").is_file():
        subprocess.run([str(bin_dir / "ray"), "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)
    gcs, dash = _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="rayh")  # short: Ray's socket paths have a length limit
    default_agent_port = socket.socket()  # stands for another Ray on this machine, as a parallel test's often is
    try:
        default_agent_port.bind(("127.0.0.1", 52365))
        default_agent_port.listen()
    except OSError:
        pass  # something holds it already
    head = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dash}",
         f"--ray-client-server-port={_free_port()}", "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=2",
         # the job agent's HTTP port: Ray's default, 52365, is held by any other Ray on the machine (another test's
         # local Ray), and an agent that cannot bind it never registers ("No available agent to submit job")
         f"--dashboard-agent-listen-port={_free_port()}", f"--temp-dir={temp_dir}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 180
        while True:
            ok = subprocess.run([str(bin_dir / "ray"), "job", "list", "--address", address], env=env, capture_output=True, timeout=60)
            if ok.returncode == 0:
                break
            assert head.poll() is None, "the Ray head exited"
            assert time.monotonic() < deadline, ok.stderr.decode()[-2000:]
            time.sleep(2)
        storage = tmp_path / "results"
        deadline = time.monotonic() + 240  # a loaded machine registers the agent late
        while True:  # the dashboard answers before the head's job agent has registered: Ray says to try again later
            job = subprocess.run(
                [str(bin_dir / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
                 "python", "sweeps/vdproj.py", "--smoke-test", "--storage", str(storage), "--report-dir", str(tmp_path / "reports")],
                env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
            if job.returncode == 0 or "No available agent to submit job" not in job.stderr or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:] + _agent_log(temp_dir)
        assert "succeeded" in job.stdout.lower()
        _check_once(_tables(storage / "vdproj-smoke"), 4)
    finally:
        default_agent_port.close()
        os.killpg(head.pid, signal.SIGTERM)  # the head and everything it started: its own process group
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)


@pytest.mark.filterwarnings("ignore")
def test_local_paths_become_absolute_before_ray(tmp_path, monkeypatch):
    from kvsweep.config import ModelCfg
    from kvsweep.tune import absolute_paths

    (tmp_path / "model").mkdir()
    (tmp_path / "tok.json").write_text("{}")
    (tmp_path / "corpus.txt").write_text("text")
    monkeypatch.chdir(tmp_path)
    sweep = SweepCfg(model=ModelCfg(name="model", tokenizer="tok.json"), data=DataCfg(source="corpus.txt", train_samples=8))
    out = absolute_paths(sweep)
    assert out.model.name == str(tmp_path / "model") and out.model.tokenizer == str(tmp_path / "tok.json")
    assert out.data.source == str(tmp_path / "corpus.txt")
    tiny = absolute_paths(SweepCfg(model=ModelCfg(name="tiny:corpus.txt"), data=DataCfg(source="tiny", train_samples=8)))
    assert tiny.model.name == f"tiny:{tmp_path / 'corpus.txt'}" and tiny.data.source == "tiny"
    assert absolute_paths(SweepCfg(model=ModelCfg(name="EleutherAI/pythia-70m"))).model.name == "EleutherAI/pythia-70m"
