"""Cluster runs: the files in ``cluster/`` and real autoscaling.

- The cluster-launcher configs (AWS, GCP, the one-machine ``fake_multinode`` cluster) pass Ray's own
  config validation, and a broken copy of each does not.
- The KubeRay manifests parse and carry what a cluster run needs: the in-tree autoscaler, GPU worker
  groups that scale from zero, token authentication, the sweep's entrypoint.
- End to end: a ``fake_multinode`` cluster whose head has no GPUs gets a smoke sweep with
  ``--gpus-per-trial 1`` through ``ray job submit``; the autoscaler adds GPU workers, the sweep
  completes, and the idle workers are removed again. The test stops only the Ray it started.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER_CONFIGS = ["aws.yaml", "gcp.yaml", "local-autoscaling.yaml"]


# --------------------------------------------------------------------------- launcher configs


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _ray_validate(config: dict) -> dict:
    """Ray's own checks of a cluster-launcher config; raises on a bad one.

    ``ray up`` merges a cloud config with the provider's defaults (``prepare_config``) and validates the
    result against Ray's JSON schema (``validate_config``). The autoscaler of a head started with
    ``--autoscaling-config`` validates the file as written (the wheel ships no defaults for
    ``fake_multinode``), so that one is validated as it is.
    """
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = copy.deepcopy(config)
    if config["provider"]["type"] != "fake_multinode":
        config = prepare_config(config)
    validate_config(config)
    return config


def _node_types(config: dict) -> tuple[dict, dict]:
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    return head, workers


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_passes_rays_validation(name):
    config = _load(name)
    merged = _ray_validate(config)
    head, workers = _node_types(config)
    assert head["resources"].get("GPU", 0) == 0, "the head must have no GPUs: GPU trials go to workers"
    gpu_workers = {k: v for k, v in workers.items() if v["resources"].get("GPU", 0) > 0}
    assert gpu_workers, "at least one GPU worker type"
    for kind, spec in gpu_workers.items():
        assert spec["min_workers"] == 0, f"{kind} must scale from 0"
        assert spec["max_workers"] >= 1, kind
    assert 0 < merged["idle_timeout_minutes"] <= 30
    assert merged["max_workers"] >= max(v["max_workers"] for v in gpu_workers.values())


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_cloud_configs_sync_install_and_secure_the_project(name):
    text = (CLUSTER / name).read_text()
    config = _load(name)
    _, workers = _node_types(config)
    # results on the cloud's object store, shown in the header
    scheme = "s3://" if name == "aws.yaml" else "gs://"
    header = text.split("\ncluster_name:")[0]
    assert f"--storage {scheme}" in header and "ray job submit" in header and "--working-dir ." in header
    # the project is synced to every node and installed there, with a CUDA torch
    assert config["file_mounts"]["~/kvsweep"] == "."
    commands = " ".join(config["setup_commands"] + config.get("head_setup_commands", []) + config.get("worker_setup_commands", []))
    assert "pip install" in commands and "-e" in commands and "torch" in commands
    # token authentication: the token is synced and every node starts Ray with RAY_AUTH_MODE=token
    assert any(k.endswith(".ray/auth_token") for k in config["file_mounts"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("RAY_AUTH_MODE=token" in c for c in config[key]), key
    # the dashboard (and job API, port 8265) listens on loopback only: reach it with `ray dashboard`
    assert not any("0.0.0.0" in c for c in config["head_start_ray_commands"])
    # spot / preemptible GPU workers
    for spec in workers.values():
        node = spec["node_config"]
        if name == "aws.yaml":
            assert node["InstanceMarketOptions"]["MarketType"] == "spot"
        else:
            assert node["scheduling"]["preemptible"] is True and node["scheduling"]["onHostMaintenance"] == "TERMINATE"
            assert node["guestAccelerators"][0]["acceleratorCount"] == spec["resources"]["GPU"]


def _sweep_commands(text: str) -> list[list[str]]:
    """The arguments of every `python sweeps/vdproj.py ...` command in a file's comments."""
    lines = [re.sub(r"^\s*#\s?", "", line) for line in text.splitlines() if line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))  # shell line continuations
    return [shlex.split(m.group(1).split("#")[0]) for m in re.finditer(r"python sweeps/vdproj\.py([^\n]*)", joined)]


@pytest.mark.parametrize("name", [*LAUNCHER_CONFIGS, "kuberay/raycluster.yaml"])
def test_the_sweep_commands_in_the_headers_parse(name):
    from kvsweep.sweepargs import sweep_parser

    commands = _sweep_commands((CLUSTER / name).read_text())
    assert commands
    for argv in commands:
        args = sweep_parser("vdproj", "vdproj").parse_args(argv)  # exits (SystemExit) on a bad argument
        assert args.gpus_per_trial > 0
        assert re.match(r"(s3|gs)://", args.storage) or name == "local-autoscaling.yaml"


def _breakages(config: dict):
    """Broken copies of a valid config, each with one mistake Ray's validation must catch."""
    head_name, head = config["head_node_type"], config["available_node_types"][config["head_node_type"]]
    worker = next(k for k in config["available_node_types"] if k != head_name)

    def typo(c):  # a misspelled key in a node type
        c["available_node_types"][worker]["min_worker"] = c["available_node_types"][worker].pop("min_workers")

    def fractional_gpu(c):  # resources of a node type are whole numbers
        c["available_node_types"][worker]["resources"]["GPU"] = 0.5

    def unknown_head(c):
        c["head_node_type"] = "no-such-type"

    def string_commands(c):  # a command list given as one string
        c["worker_start_ray_commands"] = "ray start --address=$RAY_HEAD_IP:6379"

    def no_resources(c):
        del c["available_node_types"][worker]["resources"]

    for breakage in (typo, fractional_gpu, unknown_head, string_commands, no_resources):
        broken = copy.deepcopy(config)
        breakage(broken)
        yield breakage.__name__, broken


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_a_broken_launcher_config_is_rejected(name):
    import jsonschema

    for what, broken in _breakages(_load(name)):
        with pytest.raises((jsonschema.ValidationError, ValueError)):
            _ray_validate(broken)
            pytest.fail(f"{name} with {what} passed validation")


# --------------------------------------------------------------------------- KubeRay manifests


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / "kuberay" / name).read_text()) if d]


def _check_ray_cluster_spec(spec: dict) -> None:
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert spec["authOptions"]["mode"] == "token"
    assert spec["authOptions"].get("secretName"), "a Secret holding the token, created by the user"
    assert tuple(int(x) for x in spec["rayVersion"].split(".")[:2]) >= (2, 52)  # token auth needs Ray >= 2.52
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", "never expose the head (port 8265) to the internet"
    assert str(head["rayStartParams"].get("num-gpus", "0")) == "0"
    for c in head["template"]["spec"]["containers"]:
        assert "nvidia.com/gpu" not in c.get("resources", {}).get("limits", {})
    groups = spec["workerGroupSpecs"]
    assert groups
    for g in groups:
        assert g["minReplicas"] == 0 and g.get("replicas", 0) == 0 and g["maxReplicas"] >= 1, g["groupName"]
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1, g["groupName"]


def test_kuberay_raycluster_manifest():
    docs = _docs("raycluster.yaml")
    clusters = [d for d in docs if d["kind"] == "RayCluster"]
    assert len(clusters) == 1 and clusters[0]["apiVersion"] == "ray.io/v1"
    _check_ray_cluster_spec(clusters[0]["spec"])


def test_kuberay_rayjob_manifest():
    from kvsweep.sweepargs import sweep_parser

    docs = _docs("rayjob.yaml")
    jobs = [d for d in docs if d["kind"] == "RayJob"]
    assert len(jobs) == 1 and jobs[0]["apiVersion"] == "ray.io/v1"
    spec = jobs[0]["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "sweeps/vdproj.py"]
    args = sweep_parser("vdproj", "vdproj").parse_args(argv[2:])  # the arguments are the sweep's own
    assert args.gpus_per_trial > 0 and re.match(r"(s3|gs)://", args.storage) and args.name
    _check_ray_cluster_spec(spec["rayClusterSpec"])


# --------------------------------------------------------------------------- autoscaling, end to end


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _session_processes(sid: int) -> list[tuple[int, int, str]]:
    """(pid, pgid, command) of every process in session ``sid``."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,pgid=,sid=,args="], capture_output=True, text=True, check=True).stdout
    procs = []
    for line in out.splitlines():
        parts = line.split(None, 3)
        if len(parts) >= 3 and int(parts[2]) == sid:
            procs.append((int(parts[0]), int(parts[1]), parts[3] if len(parts) > 3 else ""))
    return procs


def _stop_session(leader: subprocess.Popen) -> None:
    """Stop the Ray this test started: every process in the session its head leads, nothing else."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        for pid, _, _ in _session_processes(leader.pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            leader.poll()
            if not [p for p in _session_processes(leader.pid) if "<defunct>" not in p[2]]:
                break
            time.sleep(0.5)
    try:
        leader.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _status(ray: str, env: dict) -> tuple[int, float, str] | None:
    """(active GPU workers, GPUs in the cluster, raw text) from `ray status`, or None if it failed."""
    proc = subprocess.run([ray, "status", "--address", "127.0.0.1:6379"], env=env, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        return None
    text = proc.stdout
    active = text.split("Active:", 1)[1].split("Pending:", 1)[0] if "Active:" in text else ""
    workers = sum(int(m.group(1)) for m in re.finditer(r"^\s*(\d+)\s+gpu_worker\s*$", active, re.M))
    gpus = re.search(r"([\d.]+)/([\d.]+)\s+GPU", text)
    return workers, float(gpus.group(2)) if gpus else 0.0, text


@pytest.mark.slow
def test_gpu_workers_scale_up_for_a_sweep_and_back_down(tiny_folder, tmp_path):
    """`ray job submit` a smoke sweep with --gpus-per-trial 1 to a fake_multinode cluster with a GPU-less head."""
    if _port_taken(6379):
        pytest.skip("port 6379 is taken on 127.0.0.1 (another Ray?); the fake workers can only join a head on 6379")
    bin_dir = Path(sys.executable).parent
    ray = str(bin_dir / "ray")
    env = os.environ.copy()  # with the session's KVSWEEP_CACHE and HF_HUB_OFFLINE=1
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_DEDUP_LOGS="0", PYTHONUNBUFFERED="1", RAY_AUTH_MODE="token",
               PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}")
    assert env.get("KVSWEEP_CACHE") and env.get("HF_HUB_OFFLINE") == "1"
    if not (Path.home() / ".ray" / "auth_token").is_file():
        subprocess.run([ray, "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)
    dash = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="rayc")  # short: Ray's socket paths have a length limit
    head_log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen(
        [ray, "start", "--head", "--block", "--port=6379", "--num-cpus=1", "--num-gpus=0",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
         f"--temp-dir={temp_dir}", f"--autoscaling-config={CLUSTER / 'local-autoscaling.yaml'}"],
        stdout=head_log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True,
        env={**env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
    address = f"http://127.0.0.1:{dash}"
    job = None
    samples: list[tuple[float, int, float]] = []  # (seconds since submit, GPU workers, cluster GPUs)
    raylets: list[tuple[int, int, str]] | None = None  # this cluster's raylets while GPU workers are up
    outside: list[str] = []
    passed = False
    try:
        deadline = time.monotonic() + 120
        while True:
            ok = subprocess.run([ray, "job", "list", "--address", address], env=env, capture_output=True, text=True, timeout=60)
            if ok.returncode == 0:
                break
            assert head.poll() is None, "the Ray head exited: " + (tmp_path / "head.log").read_text()[-3000:]
            assert time.monotonic() < deadline, ok.stderr[-2000:]
            time.sleep(2)
        first = _status(ray, env)
        assert first is not None and first[0] == 0 and first[1] == 0, "the head must start with no GPU workers"
        wrong = subprocess.run([ray, "job", "list", "--address", address], env={**env, "RAY_AUTH_TOKEN": "not-the-token"},
                               capture_output=True, text=True, timeout=60)
        assert wrong.returncode != 0 and "authentication" in (wrong.stdout + wrong.stderr).lower(), "a wrong token must be refused"

        storage = tmp_path / "results"
        # local://ROOT: the repository root is the job's working directory in place. An uploaded copy
        # (--working-dir ROOT) is unpacked again, with an rmtree first, by the runtime-env agent of every
        # fake worker node into the one session folder all fake nodes share, which deletes the running
        # driver's current directory (Tune then fails in os.getcwd()); real nodes have disks of their own.
        job_log = open(tmp_path / "job.log", "w")
        job = subprocess.Popen(
            [ray, "job", "submit", "--address", address, "--working-dir", f"local://{ROOT}", "--",
             "python", "sweeps/vdproj.py", "--smoke-test", "--gpus-per-trial", "1",
             "--storage", str(storage), "--report-dir", str(tmp_path / "reports")],
            stdout=job_log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        start = time.monotonic()
        while job.poll() is None:
            assert time.monotonic() - start < 360, "the sweep did not finish in 6 minutes"
            s = _status(ray, env)
            if s is not None:
                samples.append((round(time.monotonic() - start, 1), s[0], s[1]))
                if s[0] > 0 and raylets is None:  # fake worker nodes are up: are they in the head's session?
                    session = _session_processes(head.pid)
                    raylets = [(pid, pgid, cmd[:100]) for pid, pgid, cmd in session if "/raylet " in cmd]
                    found = subprocess.run(["pgrep", "-f", f"raylet.*{re.escape(temp_dir)}/"], capture_output=True, text=True).stdout.split()
                    outside = [p for p in found if int(p) not in {pid for pid, _, _ in session}]
            time.sleep(2)
        done_at = time.monotonic() - start
        job_log.close()
        out = (tmp_path / "job.log").read_text()
        assert job.returncode == 0 and "succeeded" in out.lower(), out[-5000:]
        assert raylets is not None and len(raylets) >= 2, raylets  # the head's and at least one worker's
        assert not outside, f"raylets of this cluster outside the head's session: {outside}"
        up = [t for t, w, g in samples if w > 0 and g > 0]
        assert up, f"no GPU worker was ever added: {samples}"
        assert max(w for _, w, _ in samples) <= 2  # local-autoscaling.yaml's max_workers

        rows = pq.read_table(storage / "vdproj-smoke" / "trials.parquet").to_pylist()
        ids = [r["trial_id"] for r in rows]
        assert len(rows) == 4 and len(set(ids)) == 4
        assert all(r["status"] in ("completed", "early_stopped", "asha_stopped") for r in rows), rows

        # idle GPU workers are removed again (idle_timeout_minutes 0.2 = 12 s)
        deadline = time.monotonic() + 120
        while True:
            s = _status(ray, env)
            if s is not None:
                samples.append((round(time.monotonic() - start, 1), s[0], s[1]))
                if s[0] == 0 and s[1] == 0:
                    break
            assert time.monotonic() < deadline, f"GPU workers not removed: {samples[-5:]}\n{s[2] if s else ''}"
            time.sleep(2)
        passed = True
        print(f"\nGPU workers 0 -> {max(w for _, w, _ in samples)} from t={min(up):.0f}s after submit; sweep done at "
              f"t={done_at:.0f}s; back to 0 GPU workers at t={samples[-1][0]:.0f}s\n(seconds, GPU workers, GPUs): {samples}\n"
              f"raylets (pid, pgid, command) with the head {head.pid} as session leader: {raylets}")
    finally:
        if job is not None and job.poll() is None:
            job.kill()
            job.wait(timeout=30)
        _stop_session(head)
        head_log.close()
        left = [p for p in _session_processes(head.pid) if "<defunct>" not in p[2]]
        assert not left, f"processes of the test's Ray still running: {left}"
        if passed:  # keep Ray's logs of a failed run
            shutil.rmtree(temp_dir, ignore_errors=True)
