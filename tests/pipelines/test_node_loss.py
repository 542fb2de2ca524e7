"""A patch job on a real multi-node Ray cluster loses a node mid-job and still commits exactly
what an uninterrupted run commits (issue 13, DESIGN §6).

The cluster is three ``ray start`` process trees on loopback: a head with no CPUs (the driver's
node, as on a real cluster where the head schedules nothing) and two worker nodes of one CPU
each. The patch job's scorer actors are spread over both workers; when one worker node is
SIGKILLed (raylet, workers and actors at once, like a machine that vanishes) its actor's unit
fails, a fresh actor takes its slot on the surviving node, and the unit is redone there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blt_data.registry import Registry
from blt_data.storage import Store
from pipelines.submit import connect
from tests.cli.test_blt_data_cli import blt
from tests.pipelines.ray_cluster import RayNode, cluster_env, session_pids, wait_for_nodes, warm_up

REPO = Path(__file__).resolve().parents[2]
DOCS = 16  # stdlib files: ~0.3 MB of text in ~20 units, seconds of scoring per node
PATCH = ["--threshold", "2.551", "--workers", "2", "--unit-size", "16KB", "-q"]


@pytest.fixture(scope="module")
def cluster():
    # Node death noticed in ~2 s instead of the default ~30 s of missed health checks.
    env = cluster_env() | {"RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "4"}
    head = RayNode(head=True, num_cpus=0, env=env)
    nodes: list[RayNode] = []
    try:
        for _ in range(2):  # one after the other: nodes of one machine share the session folder
            add_node(head, nodes)
        yield head, nodes
    finally:
        for node in nodes:
            node.kill()
        head.stop()


def add_node(head: RayNode, nodes: list[RayNode]) -> None:
    alive = sum(n.alive() for n in nodes) + 1
    nodes.append(node := RayNode(head=False, num_cpus=1, address=head.gcs_address, temp_dir=head.temp_dir))
    try:
        wait_for_nodes(head.gcs_address, alive + 1)
    except TimeoutError as e:
        raise TimeoutError(f"{e}\n--- the new node's log:\n{node.log_tail()}") from None


def scorers_on(node: RayNode) -> int:
    """PatchWorker actor processes running on this node (Ray titles them ``ray::PatchWorker``)."""
    count = 0
    for pid in session_pids(os.getsid(node.process.pid)) if node.alive() else []:
        try:
            count += b"PatchWorker" in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            pass
    return count


def records(store_url: str) -> int:
    return len(list(Path(store_url, "datasets").glob("*/_jobs/*/_done/unit-*.json")))


def kill_one_node_mid_job(nodes: list[RayNode], store_url: str, is_running, timeout_s: float = 240) -> None:
    """Wait until both live worker nodes score and a few units are done, then kill one node."""
    live = [n for n in nodes if n.alive()][-2:]
    deadline = time.monotonic() + timeout_s
    while not (all(scorers_on(n) for n in live) and records(store_url) >= 2):
        assert is_running(), "the job ended before a node could be killed mid-job"
        assert time.monotonic() < deadline, f"scorers {[scorers_on(n) for n in live]}, records {records(store_url)}"
        time.sleep(0.2)
    live[-1].kill()
    assert is_running(), "the job ended before the node was lost"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, ray_local) -> list[tuple[str, int, str]]:
    """The same job, uninterrupted, on the suite's in-process Ray."""
    store = str(tmp_path_factory.mktemp("reference") / "store")
    blt("download", "stdlib", "--name", "docs", "--limit", str(DOCS), "-q", "--store", store)
    blt("patch", "docs", "--name", "p", *PATCH, "--store", store)
    return parts_of(store)


def parts_of(store_url: str) -> list[tuple[str, int, str]]:
    m = Registry(Store.open(store_url)).resolve("p")
    assert m.stats.documents == DOCS
    return [(p.split, p.rows, p.sha256) for p in m.parts]


def test_patch_job_survives_a_lost_node(cluster, tmp_path, reference):
    head, nodes = cluster
    store = str(tmp_path / "store")
    blt("download", "stdlib", "--name", "docs", "--limit", str(DOCS), "-q", "--store", store)
    driver = subprocess.Popen(
        [sys.executable, "-m", "cli.blt_data", "patch", "docs", "--name", "p", *PATCH[:-1],  # not -q: its notes
         "--ray-address", head.gcs_address, "--store", store],
        env=cluster_env() | {"PYTHONPATH": str(REPO)}, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        kill_one_node_mid_job(nodes, store, lambda: driver.poll() is None)
        out, _ = driver.communicate(timeout=400)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, out
    assert "died" in out, f"no unit was lost with the node: {out}"
    assert parts_of(store) == reference


def test_submitted_patch_job_survives_a_lost_node(cluster, tmp_path, reference):
    head, nodes = cluster
    add_node(head, nodes)  # two live worker nodes again
    warm_up(head)
    store = str(tmp_path / "store")
    blt("download", "stdlib", "--name", "docs", "--limit", str(DOCS), "-q", "--store", store)
    out = blt("submit", "--address", head.dashboard, "--store", store, "--", "patch", "docs", "--name", "p", *PATCH)
    job_id = out.split("submitted ", 1)[1].split(":", 1)[0]
    client = connect(head.dashboard).client
    status = lambda: client.get_job_status(job_id).value  # noqa: E731
    kill_one_node_mid_job(nodes, store, lambda: status() in ("PENDING", "RUNNING"))
    deadline = time.monotonic() + 400
    while status() not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, client.get_job_logs(job_id)[-3000:]
        time.sleep(1)
    assert status() == "SUCCEEDED", client.get_job_logs(job_id)[-3000:]
    assert parts_of(store) == reference
