"""A Ray head node the tests start and stop on their own: no `ray stop` (which ends every Ray on the machine).

`ray start --head --block` runs in its own session, so it leads a process group that holds the whole node (GCS,
raylet, dashboard, workers, the autoscaler and the fake nodes it launches); stopping means signalling that group
and any descendant that left it (job drivers get their own session). Each head has its own auth token file
(RAY_AUTH_TOKEN_PATH), so nothing depends on, or writes to, ~/.ray.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process_group(proc: subprocess.Popen, timeout: float = 5) -> list[str]:
    """SIGTERM the group `proc` leads and its descendants, SIGKILL what is left after `timeout` s (GCS and raylet
    can take 10 s and more to stop on SIGTERM; a test cluster has nothing to save). Returns survivors (none)."""
    import psutil

    try:
        family = psutil.Process(proc.pid).children(recursive=True)  # incl. job drivers in their own sessions
    except psutil.NoSuchProcess:
        family = []
    alive = family
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        for p in alive:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        deadline = time.monotonic() + wait
        _, alive = psutil.wait_procs(alive, timeout=wait)
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            continue
        if not alive:
            break
    return [f"{p.pid} {' '.join(p.cmdline())[:120]}" for p in alive if p.is_running()]


@dataclass
class Head:
    env: dict[str, str]  # for every client command: PATH with our venv, RAY_AUTH_MODE=token, the token file
    gcs_address: str
    dashboard: str  # http://127.0.0.1:<port>
    temp_dir: str
    log: Path


@contextmanager
def ray_head(work: Path, num_cpus: int = 2, port: int | None = None, extra_args: list[str] = (),
             extra_env: dict[str, str] | None = None, dashboard: bool = True) -> Iterator[Head]:
    """A running head node with token auth (token file `work/auth_token`); stopped, and checked gone, on exit."""
    import ray.util

    token = work / "auth_token"
    if not token.is_file():
        token.write_text(secrets.token_hex(32))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(token), **(extra_env or {})}
    env.pop("RAY_ADDRESS", None)
    port, dash = port or free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    log_path = work / "head.log"
    log = open(log_path, "w")
    # Every port of its own: Ray's defaults (agent 52365, client server 10001, ...) are already taken when this
    # test run's in-process Ray session is up, and a head whose job agent cannot bind never accepts a job.
    ports = [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
        "ray-client-server-port", "node-manager-port", "object-manager-port")]
    cmd = [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", f"--num-cpus={num_cpus}",
           "--disable-usage-stats", f"--temp-dir={temp_dir}", *ports, *extra_args]
    cmd += ["--include-dashboard=true", f"--dashboard-port={dash}"] if dashboard else ["--include-dashboard=false"]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log_path.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start --head failed:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield Head(env, f"{ray.util.get_node_ip_address()}:{port}", f"http://127.0.0.1:{dash}", temp_dir, log_path)
    finally:
        left = stop_process_group(proc)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"processes of the test's Ray head survived its shutdown: {left}"
