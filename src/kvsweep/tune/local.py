"""The in-process Ray of a local sweep: every listener on loopback, no metrics export, a private token file.

Joining a cluster (``--address`` / ``RAY_ADDRESS``) does not come through here.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path
from typing import Any

import ray
from ray._private import ray_constants

LOOPBACK = "127.0.0.1"
# Ray on Linux takes the machine's outward address as the node address unless this is "0"; Ray reads it once,
# when ray_constants is imported, so start_local_ray sets the module's value as well as the environment's.
_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_OWNED = {"address", "include_dashboard", "dashboard_host", "_node_ip_address", "_system_config", "_metrics_export_port"}


def start_local_ray(*, num_cpus: int | None = None, num_gpus: int | None = None, log_to_driver: bool = True,
                    metrics: bool = False, metrics_port: int | None = None, **init_kwargs: Any):
    """Start a new Ray in this process, reachable from this machine only; return ``ray.init``'s context.

    Always a new Ray (``address="local"``): neither ``RAY_ADDRESS`` nor a Ray that ``ray start`` left
    running on this machine is joined. Tune trials, actors and tasks with ``num_cpus``/``num_gpus`` run as
    with a plain ``ray.init()``; ``log_to_driver`` forwards the workers' output to this process.

    The node address is 127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` while Ray starts; the
    driver itself is that node, so the rewriting of 127.0.0.1 that breaks ``ray start
    --node-ip-address=127.0.0.1`` does not apply). With a loopback node address every Ray process binds
    its TCP listeners to 127.0.0.1 (the C++ gRPC servers as ``::ffff:127.0.0.1`` on a dual-stack socket);
    no UDP port is opened. Afterwards these listen, all on loopback, on ports Ray picks unless noted:

    - GCS server (gRPC);
    - raylet: node manager and object manager (gRPC);
    - every worker, the driver included: its core worker gRPC server;
    - dashboard agent: gRPC (the metrics agent port), and HTTP on port 52365 (Ray's default);
    - runtime-env agent: HTTP;
    - dashboard head, a process Ray starts even without the dashboard (``include_dashboard=False``
      leaves out the web UI and the HTTP API): Prometheus metrics of its own process on port 44227
      (``DASHBOARD_METRIC_PORT``);
    - autoscaler monitor: Prometheus metrics (pending and active nodes) on port 44217
      (``AUTOSCALER_METRIC_PORT``).

    The last two cannot be switched off by any setting of Ray 2.60 (they start whenever
    ``prometheus_client`` is installed, which ``ray[default]`` installs); a loopback node address is what
    binds them to 127.0.0.1 instead of every interface. The node's metrics exporter, the endpoint that
    publishes the metrics of every Ray process and of the tasks, is off (``enable_metrics_collection=False``)
    unless ``metrics=True``, and then listens on loopback too, on ``metrics_port`` or a free port. The raylet
    and the plasma store also listen on Unix sockets in the session directory (``/tmp/ray/session_*``).

    Ray turns token authentication on for a new local Ray unless ``RAY_AUTH_MODE`` says otherwise, and
    writes a token to ``~/.ray/auth_token`` if it finds none, with the permissions of the umask (0644 as
    a rule). This function writes that file itself first, mode 0600, in a ``~/.ray`` it creates with mode
    0700, and sets the token file it uses (``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``) to mode 0600
    before and after Ray starts, if this user owns it.

    ``init_kwargs`` go to ``ray.init`` (e.g. ``object_store_memory``, ``runtime_env``), except the ones
    this function sets. Raises ``RuntimeError`` if Ray is already initialized in this process.
    """
    owned = sorted(_OWNED & set(init_kwargs))
    if owned:
        raise ValueError(f"start_local_ray sets {', '.join(owned)} itself")
    if ray.is_initialized():
        raise RuntimeError("Ray is already initialized in this process; start_local_ray starts a new one")
    token = _ensure_private_token()
    saved_env, saved_flag = os.environ.get(_CLUSTER_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_CLUSTER_ENV] = "0"  # for the processes Ray starts (GCS, raylet, agents, workers)
    ray_constants.ENABLE_RAY_CLUSTER = False  # for this process, which read the variable at import
    try:
        context = ray.init(
            address="local", num_cpus=num_cpus, num_gpus=num_gpus, log_to_driver=log_to_driver,
            include_dashboard=False, dashboard_host=LOOPBACK, _node_ip_address=LOOPBACK,
            _system_config={} if metrics else {"enable_metrics_collection": False},
            _metrics_export_port=metrics_port if metrics else None, **init_kwargs)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(_CLUSTER_ENV, None)
        else:
            os.environ[_CLUSTER_ENV] = saved_env
    node_ip = context.address_info.get("node_ip_address")
    if node_ip != LOOPBACK:
        ray.shutdown()
        raise RuntimeError(f"Ray started with node address {node_ip!r}, not {LOOPBACK}; stopped it")
    if token is not None:
        _make_private(token)
    elif (path := _token_path()) is not None and path.exists():  # Ray wrote one after all
        _make_private(path)
    return context


def _token_path() -> Path | None:
    """The token file a new local Ray uses; ``None`` when token authentication is off or the token is in the environment."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.strip().lower() != "token":
        return None
    if os.environ.get("RAY_AUTH_TOKEN"):
        return None
    custom = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if custom and _has_content(Path(custom)):
        return Path(custom)
    return Path.home() / ".ray" / "auth_token"  # where Ray reads, and writes a new token


def _ensure_private_token() -> Path | None:
    path = _token_path()
    if path is None:
        return None
    if not _has_content(path):
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        except FileExistsError:  # empty, or written by another process meanwhile
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))  # the form of Ray's own tokens: 256 random bits
    _make_private(path)
    return path


def _make_private(path: Path) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return
    if st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) & 0o077:
        path.chmod(0o600)


def _has_content(path: Path) -> bool:
    try:
        return path.is_file() and path.stat().st_size > 0
    except OSError:
        return False
