"""A real Ray head on 127.0.0.1 started with `ray start --head`, private to one test.

It gets its own temp dir and ports, and stopping it kills only the processes it started (found by
that temp dir in their command lines, plus their children): `ray stop` would kill every Ray on the
machine, another test session's included.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli() -> str:
    return str(Path(sys.executable).with_name("ray"))


def cluster_env(**extra: str) -> dict[str, str]:
    """The environment of every process of the test cluster: loopback only, token auth for all."""
    env = dict(os.environ)
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_AUTH_MODE="token",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        **extra,
    )
    env.pop("RAY_ADDRESS", None)
    return env


class LocalRayHead:
    def __init__(self, temp_dir: Path, num_cpus: int = 2):
        # Ray's socket paths must stay short (AF_UNIX limit), so the temp dir lives under /tmp.
        self.temp_dir = temp_dir
        self.num_cpus = num_cpus
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.env = cluster_env()

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self) -> "LocalRayHead":
        command = [
            ray_cli(), "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
            f"--port={self.gcs_port}", f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
            f"--temp-dir={self.temp_dir}", f"--num-cpus={self.num_cpus}", "--disable-usage-stats",
        ]
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=180)
        if done.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed:\n{done.stdout}\n{done.stderr}")
        return self

    def own_processes(self) -> set[psutil.Process]:
        marker = str(self.temp_dir)
        found: set[psutil.Process] = set()
        for proc in psutil.process_iter(["cmdline"]):
            if any(marker in part for part in proc.info["cmdline"] or []):
                found.add(proc)
                try:
                    found.update(proc.children(recursive=True))
                except psutil.NoSuchProcess:
                    pass
        return found

    def stop(self) -> None:
        procs = self.own_processes()
        for proc in procs:
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(list(procs), timeout=15)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def train_worker_pids() -> list[int]:
    """PIDs of the live Ray Train workers of the connected cluster (its state API, from outside the run)."""
    from ray.util.state import list_actors

    actors = list_actors(address=connected_address(), filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
                         raise_on_missing_output=False)
    return sorted(int(a.pid) for a in actors if a.pid)


def train_worker_count() -> int:
    """Ray Train workers this cluster has started, dead ones included (a restart adds a group)."""
    from ray.util.state import list_actors

    return len(list_actors(address=connected_address(), filters=[("class_name", "=", "RayTrainWorker")], limit=1000,
                           raise_on_missing_output=False))


def connected_address() -> str:
    """This process's own cluster: with other local Rays on the machine, "auto" would be ambiguous."""
    import ray

    return ray.get_runtime_context().gcs_address
