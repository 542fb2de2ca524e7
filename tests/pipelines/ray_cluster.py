"""Real Ray nodes for tests: ``ray start`` heads and worker nodes on loopback, each in its own
process session, so that a test can kill exactly one node (and ``ray stop``, which kills every
Ray process on the machine, is never needed).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_pids(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def die_with_parent() -> None:
    """Linux: SIGTERM the node when the test process dies, even by SIGKILL; its reaper then
    takes down the rest of its process group."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def cluster_env() -> dict[str, str]:
    """The environment a node runs with: the (dummy) credentials but not the S3 endpoint, which
    must come with each job, as in production; loopback only; this venv's `python`."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")}
    env.update(
        RAY_AUTH_MODE="disabled",  # token auth is on by default in Ray 2.60 (ENVIRONMENT.md)
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # bind to 127.0.0.1, not the machine's interface
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    return env


class RayNode:
    count = 0  # nodes started by this process: node k listens on 127.0.0.(k + 1)

    """One ``ray start --block`` process tree. Every listening port is a free one: the defaults
    (52365 for the job agent, 10001 for the client server, ...) may be taken by the in-process
    Ray the rest of the suite shares, or by another node of the same test cluster."""

    def __init__(self, *, head: bool, num_cpus: float, address: str | None = None, temp_dir: str | None = None,
                 env: dict[str, str] | None = None):
        self.head = head
        # Short: Unix socket paths are capped near 107 bytes. Worker nodes use the head's.
        self.temp_dir = temp_dir or tempfile.mkdtemp(prefix="rh", dir="/tmp")
        # Each node its own loopback address (127.0.0.0/8 is all this machine): Ray rewrites a
        # literal 127.0.0.1 in a join address to the machine's interface address, and tells
        # nodes apart by address.
        RayNode.count += 1
        self.ip = f"127.0.0.{1 + RayNode.count}"
        self.gcs_address = address or f"{self.ip}:{free_port()}"
        self.dashboard = f"http://127.0.0.1:{free_port()}" if head else None
        ports = ["node-manager-port", "object-manager-port", "metrics-export-port", "runtime-env-agent-port",
                 "dashboard-agent-listen-port", "dashboard-agent-grpc-port"]
        cmd = [RAY, "start", "--block", f"--num-cpus={num_cpus}", "--disable-usage-stats", f"--node-ip-address={self.ip}"]
        if head:
            cmd += ["--head", f"--port={self.gcs_address.rsplit(':', 1)[1]}", f"--temp-dir={self.temp_dir}",
                    f"--dashboard-port={self.dashboard.rsplit(':', 1)[1]}", "--dashboard-host=127.0.0.1",
                    "--include-dashboard=true"]
            ports.append("ray-client-server-port")
        else:
            # The flag that keeps a head on loopback also refuses worker nodes ("multi-node
            # clusters are not supported"); a worker node is given its loopback address instead.
            cmd += [f"--address={self.gcs_address}"]
            env = (env or cluster_env()) | {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
        cmd += [f"--{opt}={free_port()}" for opt in ports]
        self.log_path = os.path.join(self.temp_dir, f"{'head' if head else 'node'}-{free_port()}.log")
        self._log = open(self.log_path, "w")
        # Its own session, started from the temp dir: the node and every worker it spawns share
        # the session id, and no `cli/` in the working folder can shadow the code a job is sent with.
        self.process = subprocess.Popen(
            cmd, env=env or cluster_env(), cwd=self.temp_dir, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=die_with_parent,
        )

    def log_tail(self, n: int = 3000) -> str:
        return Path(self.log_path).read_text(errors="replace")[-n:]

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL every process of the node (raylet, workers, actors): a machine lost at once."""
        sid = os.getsid(self.process.pid) if self.alive() else self.process.pid
        if sid != os.getsid(0):
            for pid in session_pids(sid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()

    def stop(self) -> None:
        self.kill()
        if self.head:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def wait_for_nodes(gcs_address: str, count: int, timeout_s: float = 120) -> list[dict]:
    """Block until the cluster has `count` alive nodes; returns them (``ray.nodes()`` rows).
    Asked through a subprocess, so this process's own Ray (if any) is left alone."""
    code = (
        "import json, ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
        "print(json.dumps([n for n in ray.nodes() if n['Alive']], default=str))"
    )
    deadline = time.monotonic() + timeout_s
    while True:
        out = subprocess.run([sys.executable, "-c", code, gcs_address], env=cluster_env(), capture_output=True,
                             text=True, timeout=timeout_s)
        if out.returncode == 0:
            import json

            nodes = json.loads(out.stdout.strip().splitlines()[-1])
            if len(nodes) >= count:
                return nodes
        if time.monotonic() > deadline:
            raise TimeoutError(f"the cluster at {gcs_address} has not {count} alive nodes: {out.stdout[-2000:]} {out.stderr[-2000:]}")
        time.sleep(1)


def warm_up(head: RayNode) -> None:
    """Run one trivial job to the end. The job API answers before the head's job agent and its
    first worker are up, and on a loaded 2-core machine that gap can outlast the submit command's
    own wait; the tests measure our commands, not the head's start-up."""
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + 240
    while True:
        try:
            client = JobSubmissionClient(head.dashboard)
            job = client.submit_job(entrypoint="python -c pass")
            break
        except Exception as e:
            if not head.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the Ray head accepts no job: {e}\n{head.log_tail()}") from None
            time.sleep(1)
    while (status := client.get_job_status(job).value) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"warm-up job still {status} after 240 s")
        time.sleep(0.5)
    assert status == "SUCCEEDED", client.get_job_logs(job)
