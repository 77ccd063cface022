"""A local sweep's Ray listens on loopback only, exports no node metrics, and keeps its token file private.

Ray runs in a subprocess (its own session and HOME), so this test process never imports ray; the test
stops only that subprocess' process group.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]

START_LOCAL_RAY = "from kvsweep.tune.local import start_local_ray\nstart_local_ray(num_cpus=2, num_gpus=0)"

# Starts Ray with `START` (a code string: the function under test), runs what a sweep runs (a remote task
# with num_cpus/num_gpus, an actor, a Tune run of 2 trials x 2 results under ASHA), prints the facts as
# one JSON line while an actor is still alive, and shuts down when stdin closes.
CHILD = textwrap.dedent("""
    import json, os, sys, tempfile
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    exec(os.environ["KVSWEEP_TEST_START"])

    @ray.remote(num_cpus=1, num_gpus=0)
    def plus_one(x):
        return x + 1

    @ray.remote(num_cpus=0)
    class Holder:
        def ping(self):
            return "pong"

    def trainable(config):
        for epoch in (1, 2):
            tune.report({"epoch": epoch, "val_ppl": config["x"] / epoch})

    task = ray.get(plus_one.remote(1), timeout=120)
    holder = Holder.remote()
    ping = ray.get(holder.ping.remote(), timeout=120)
    grid = tune.Tuner(
        trainable, param_space={"x": tune.grid_search([1.0, 2.0])},
        tune_config=tune.TuneConfig(metric="val_ppl", mode="min",
                                    scheduler=ASHAScheduler(time_attr="epoch", max_t=2, grace_period=1)),
        run_config=tune.RunConfig(storage_path=tempfile.mkdtemp(prefix="kvsweep-ray-local-"), verbose=0)).fit()
    node = ray._private.worker._global_node
    info = next(n for n in ray.nodes() if n["NodeID"] == node.node_id)
    print("FACTS " + json.dumps({
        "ports": {"gcs": int(node.gcs_address.rsplit(":", 1)[1]), "node manager": info["NodeManagerPort"],
                  "object manager": info["ObjectManagerPort"], "metrics agent (gRPC)": info.get("MetricsAgentPort"),
                  "runtime env agent": info.get("RuntimeEnvAgentPort"), "dashboard agent (HTTP)": info.get("DashboardAgentListenPort")},
        "session_dir": node.get_session_dir_path(), "node_ip": node.node_ip_address,
        "metrics_export_port": node.address_info.get("metrics_export_port"),
        "task": task, "ping": ping, "errors": [str(r.error) for r in grid if r.error],
        "epochs": sorted(len(r.metrics_dataframe) for r in grid),
    }), flush=True)
    sys.stdin.read()
    ray.shutdown()
""")


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # a dual-stack socket bound to ::ffff:127.0.0.1
    return addr.is_loopback


def _ray_processes(root: psutil.Process, session_dir: str) -> dict[int, psutil.Process]:
    """The subprocess, its descendants, and any process whose command line names its Ray session."""
    procs = {root.pid: root}
    procs.update({p.pid: p for p in root.children(recursive=True)})
    for p in psutil.process_iter(["cmdline"]):
        if session_dir in " ".join(p.info["cmdline"] or []):
            procs[p.pid] = p
            try:
                procs.update({c.pid: c for c in p.children(recursive=True)})
            except psutil.Error:
                pass
    return procs


def _listeners(procs: dict[int, psutil.Process]) -> list[tuple[str, str, int, str]]:
    """(protocol, address, port, process) of every listening TCP and unconnected UDP socket of procs."""
    found = set()
    for p in procs.values():
        try:
            cmd = p.cmdline()
            name = os.path.basename(cmd[0]) if cmd else p.name()
            script = next((a for a in cmd[1:] if a.endswith(".py") or a == "-c"), None)
            if name.startswith("python") and script:
                name += " " + os.path.basename(script)
            conns = p.net_connections(kind="inet")
        except psutil.Error:  # a worker that exited meanwhile
            continue
        for c in conns:
            if c.type == socket.SOCK_STREAM and c.status == psutil.CONN_LISTEN:
                found.add(("tcp", c.laddr.ip, c.laddr.port, name))
            elif c.type == socket.SOCK_DGRAM and not c.raddr:
                found.add(("udp", c.laddr.ip, c.laddr.port, name))
    return sorted(found)


def _outward_addresses() -> list[str]:
    """This machine's addresses that other machines could reach (not loopback, not link-local)."""
    out = []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                ip = ipaddress.ip_address(a.address.split("%")[0])
                if not (ip.is_loopback or ip.is_link_local):
                    out.append(str(ip))
    return out


def _answers(ip: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        return s.connect_ex((ip, port)) == 0


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)  # the subprocess started in a session of its own: only its group
    except ProcessLookupError:
        pass


def inspect_ray(start: str, home: Path, timeout: float = 240) -> dict:
    """Start Ray with the code `start` in a subprocess whose HOME is `home`; return what listens, and more."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), KVSWEEP_TEST_START=start, PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0")
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT, start_new_session=True)
    lines: list[str] = []
    timer = threading.Timer(timeout, _kill_group, (proc.pid,))  # ends a hung start
    timer.start()
    try:
        facts = None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("FACTS "):
                facts = json.loads(line[len("FACTS "):])
                break
        assert facts is not None, "".join(lines[-80:])
        procs = _ray_processes(psutil.Process(proc.pid), facts["session_dir"])
        facts["listeners"] = _listeners(procs)
        facts["answering_outward"] = [(ip, port) for ip in _outward_addresses()
                                      for port in sorted({lst[2] for lst in facts["listeners"] if lst[0] == "tcp"})
                                      if _answers(ip, port)]
        proc.stdin.close()
        proc.wait(timeout=timeout)
        return facts
    finally:
        timer.cancel()
        if proc.poll() is None:
            _kill_group(proc.pid)
            proc.wait()


def check_loopback_only(facts: dict) -> None:
    public = [lst for lst in facts["listeners"] if not _is_loopback(lst[1])]
    assert not public, f"listening beyond loopback (Ray's ports: {facts['ports']}):\n" + "\n".join(map(str, public))
    assert not facts["answering_outward"], f"answering on an outward address: {facts['answering_outward']}"
    assert facts["metrics_export_port"] in (None, -1), f"metrics exporter on port {facts['metrics_export_port']}"


@pytest.mark.slow
def test_local_ray_listens_on_loopback_only_and_keeps_its_token_private(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    facts = inspect_ray(START_LOCAL_RAY, home)
    assert facts["task"] == 2 and facts["ping"] == "pong" and not facts["errors"]
    assert facts["epochs"] == [1, 2] or facts["epochs"] == [2, 2]  # ASHA may stop the worse trial at its rung
    assert facts["node_ip"] == "127.0.0.1"
    assert any(lst[0] == "tcp" for lst in facts["listeners"])  # the listing sees Ray's sockets at all
    check_loopback_only(facts)
    token = home / ".ray" / "auth_token"
    if token.exists():  # Ray 2.60 turns token authentication on for a new local Ray
        assert token.stat().st_mode & 0o777 == 0o600
        assert token.parent.stat().st_mode & 0o077 == 0


def test_an_existing_token_file_is_made_private_and_a_new_one_is_never_readable_by_others(tmp_path):
    script = textwrap.dedent("""
        import os, stat, sys
        from pathlib import Path
        from kvsweep.tune.local import _ensure_private_token
        home = Path(os.environ["HOME"])
        path = _ensure_private_token()
        assert path == home / ".ray" / "auth_token", path
        assert len(path.read_text()) == 64 and stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        path.write_text("existing-token")
        path.chmod(0o644)
        assert _ensure_private_token() == path and path.read_text() == "existing-token"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        os.environ["RAY_AUTH_MODE"] = "disabled"
        assert _ensure_private_token() is None
    """)
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120, umask=0o022)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
