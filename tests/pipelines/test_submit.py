"""``blt-data submit`` and ``blt-data jobs`` against a real Ray head started with ``ray start --head``.

The head lives in its own session and temp dir, and teardown kills exactly that session's
processes: ``ray stop`` would kill every Ray process on the machine, including the in-process
Ray other tests of the run share.
"""

from __future__ import annotations

import ctypes
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from blt_data.registry import Registry
from blt_data.storage import Store
from pipelines.submit import SubmitError, build_job_spec, connect, runtime_env
from tests.cli.test_blt_data_cli import blt
from tests.conftest import TEST_SECRET


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
    """Linux: SIGTERM the head when the test process dies, even by SIGKILL; its reaper then
    takes down the rest of its process group."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on loopback with its dashboard; yields its job API address."""
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Unix socket paths are capped near 107 bytes
    dashboard = f"http://127.0.0.1:{(dashboard_port := free_port())}"
    # The cluster's own environment keeps the (dummy) credentials but not the S3 endpoint, which
    # must come with each job: that is what production looks like.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")}
    env.update(
        RAY_AUTH_MODE="disabled",  # token auth is on by default in Ray 2.60 (ENVIRONMENT.md)
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # bind to 127.0.0.1, not the machine's interface
        RAY_USAGE_STATS_ENABLED="0",
        # The cluster's `python` is this venv's: jobs find the dependencies the way a worker image does.
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    cmd = [
        str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
        f"--port={free_port()}", f"--dashboard-port={dashboard_port}", "--dashboard-host=127.0.0.1",
        "--num-cpus=2", "--include-dashboard=true", f"--temp-dir={temp_dir}", "--disable-usage-stats",
        # Every other listening port too: the defaults (52365 for the job agent, 10001 for the
        # client server, ...) are taken by the in-process Ray the rest of the suite shares, and a
        # job agent that cannot bind leaves the head answering "No available agent" forever.
        *(f"--{opt}={free_port()}" for opt in (
            "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
            "runtime-env-agent-port", "ray-client-server-port", "node-manager-port", "object-manager-port",
        )),
    ]
    log = open(os.path.join(temp_dir, "head.log"), "w")
    # Its own session, started from the temp dir: the head and every worker it spawns share the
    # session id, and no `cli/` in the working folder can shadow the code a job is sent with.
    head = subprocess.Popen(cmd, env=env, cwd=temp_dir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=die_with_parent)
    try:
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + 90
        while True:
            if head.poll() is not None:
                pytest.fail(f"ray start --head exited {head.returncode}: {Path(log.name).read_text()[-3000:]}")
            try:
                JobSubmissionClient(dashboard).list_jobs()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        warm_up(JobSubmissionClient(dashboard), head, log.name)
        yield dashboard
    finally:
        sid = os.getsid(head.pid) if head.poll() is None else head.pid
        if sid != os.getsid(0):
            for pid in session_pids(sid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        head.wait(timeout=30)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def warm_up(client, head: subprocess.Popen, log_path: str) -> None:
    """Run one trivial job to the end. The job API answers before the head's job agent and its
    first worker are up, and on a loaded 2-core machine that gap can outlast the submit command's
    own wait; the tests measure our commands, not the head's start-up."""
    deadline = time.monotonic() + 240
    while True:
        try:
            job = client.submit_job(entrypoint="python -c pass")
            break
        except Exception as e:
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the Ray head accepts no job: {e}\n{Path(log_path).read_text()[-3000:]}")
            time.sleep(1)
    while (status := client.get_job_status(job).value) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        if time.monotonic() > deadline:
            pytest.fail(f"warm-up job still {status} after 240 s")
        time.sleep(0.5)
    assert status == "SUCCEEDED", client.get_job_logs(job)


def submission_ids(address: str) -> list[str]:
    return [r["submission_id"] for r in json.loads(blt("jobs", "list", "--address", address, "--json"))]


def test_submit_follow_then_dedupe(ray_head, local_store_url):
    command = ["download", "stdlib", "--name", "s", "--limit", "20", "-q"]
    out = blt("submit", "--address", ray_head, "--follow", "--store", local_store_url, "--", *command)
    assert "submitted blt-" in out and "s@v1 (documents): 20 documents" in out and "SUCCEEDED" in out
    job_id = out.split("submitted ", 1)[1].split(":", 1)[0]
    m = Registry(Store.open(local_store_url)).resolve("s")
    assert m.stats.documents == 20

    jobs_before = submission_ids(ray_head)
    again = blt("submit", "--address", ray_head, "--store", local_store_url, "--", *command)
    assert f"{job_id}: already SUCCEEDED" in again and "not submitted again" in again
    assert submission_ids(ray_head) == jobs_before
    assert Registry(Store.open(local_store_url)).versions("s") == [1]

    status = blt("jobs", "status", job_id, "--address", ray_head)
    assert f"{job_id}: SUCCEEDED" in status and "python -m cli.blt_data download stdlib" in status
    assert "s@v1 (documents): 20 documents" in blt("jobs", "logs", job_id, "--address", ray_head)
    assert "s@v1 (documents): 20 documents" in blt("jobs", "logs", job_id, "--follow", "--address", ray_head)
    assert job_id in blt("jobs", "list", "--address", ray_head)
    assert "already ended: SUCCEEDED" in blt("jobs", "stop", job_id, "--address", ray_head)

    # What the cluster holds for the job: store settings, no credentials anywhere.
    info = connect(ray_head).client.get_job_info(job_id)
    sent = info.entrypoint + json.dumps(info.runtime_env) + json.dumps(info.metadata)
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"):
        assert os.environ[var] not in sent
    env_vars = info.runtime_env["env_vars"]
    assert env_vars["BLT_STORE"] == local_store_url and env_vars["AWS_DEFAULT_REGION"] == "us-east-1"
    assert not {"AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN"} & set(env_vars)


def test_submit_to_s3_store(ray_head, s3_bucket, s3_server):
    store = f"{s3_bucket}/reg"
    out = blt("submit", "--address", ray_head, "--follow", "--store", store, "--", "download", "stdlib", "--name", "s3docs", "--limit", "5", "-q")
    assert "s3docs@v1 (documents): 5 documents" in out
    assert Registry(Store.open(store)).resolve("s3docs").stats.documents == 5
    job_id = out.split("submitted ", 1)[1].split(":", 1)[0]
    env_vars = connect(ray_head).client.get_job_info(job_id).runtime_env["env_vars"]
    assert env_vars["AWS_ENDPOINT_URL"] == s3_server and env_vars["BLT_STORE"] == store


def test_failed_job_is_resubmitted_under_a_new_id(ray_head, local_store_url):
    command = ["shuffle", "ghost", "--name", "y", "-q"]
    out = blt("submit", "--address", ray_head, "--follow", "--store", local_store_url, "--", *command, code=1)
    assert "no dataset named 'ghost'" in out and "FAILED" in out
    first = out.split("submitted ", 1)[1].split(":", 1)[0]
    out = blt("submit", "--address", ray_head, "--store", local_store_url, "--", *command)
    assert f"submitted {first}-r1 (retrying {first})" in out
    assert f"{first}-r1" in submission_ids(ray_head)


def test_stop_a_running_job(ray_head, local_store_url):
    # A job that outlives the test unless stopped: the whole stdlib corpus, to a store we discard.
    out = blt("submit", "--address", ray_head, "--store", local_store_url, "--", "download", "stdlib", "--name", "big")
    job_id = out.split("submitted ", 1)[1].split(":", 1)[0]
    assert f"stop requested for {job_id}" in blt("jobs", "stop", job_id, "--address", ray_head)
    cluster = connect(ray_head)
    deadline = time.monotonic() + 30
    while (status := cluster.client.get_job_status(job_id).value) != "STOPPED" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert status == "STOPPED"
    assert f"{job_id}: STOPPED" in blt("jobs", "status", job_id, "--address", ray_head)


def test_clear_errors(ray_head):
    out = blt("jobs", "status", "blt-nothing", "--address", ray_head, code=2)
    assert f"no job 'blt-nothing' at {ray_head}" in out
    assert "no job" in blt("jobs", "logs", "blt-nothing", "--address", ray_head, code=2)
    assert "no job" in blt("jobs", "stop", "blt-nothing", "--address", ray_head, code=2)

    closed = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    out = blt("jobs", "list", "--address", closed, code=2)
    assert f"cannot reach the Ray job API at {closed}" in out
    out = blt("submit", "--address", closed, "--", "download", "stdlib", "--name", "x", code=2)
    assert f"cannot reach the Ray job API at {closed}" in out
    assert time.monotonic() - started < 10  # a refused connection fails at once, never after Ray's retries

    assert "not a blt-data command" in blt("submit", "--address", ray_head, "--", "frobnicate", code=2)
    assert "not a blt-data command" in blt("submit", "--address", ray_head, "--", "submit", "x", code=2)


def test_job_spec(tmp_path, monkeypatch):
    environ = {"AWS_SECRET_ACCESS_KEY": TEST_SECRET, "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SESSION_TOKEN": "tok-123",
               "AWS_ENDPOINT_URL": "http://minio:9000", "AWS_REGION": "eu-west-1"}
    args = ["patch", "docs", "--name", "it's a name", "--threshold", "1.5"]
    spec = build_job_spec(args, "s3://bucket/reg", environ)
    assert shlex.split(spec.entrypoint) == ["python", "-m", "cli.blt_data", *args]
    assert spec.env_vars == {"BLT_STORE": "s3://bucket/reg", "AWS_ENDPOINT_URL": "http://minio:9000", "AWS_REGION": "eu-west-1"}
    assert spec.submission_id.startswith("blt-") and len(spec.submission_id) == 4 + 16
    assert build_job_spec(args, "s3://bucket/reg", environ).submission_id == spec.submission_id
    assert build_job_spec(args, "s3://bucket/other", environ).submission_id != spec.submission_id
    assert build_job_spec([*args, "-q"], "s3://bucket/reg", environ).submission_id != spec.submission_id

    sent = json.dumps(runtime_env(spec)) + spec.entrypoint
    assert not any(environ[v] in sent for v in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN"))
    assert sorted(Path(p).name for p in runtime_env(spec)["py_modules"]) == ["blt_data", "blt_model", "cli", "pipelines"]

    with pytest.raises(SubmitError, match=r"\$AWS_SECRET_ACCESS_KEY"):
        build_job_spec(["download", f"s3://x:{TEST_SECRET}@b/k", "--name", "n"], None, environ)

    monkeypatch.chdir(tmp_path)
    assert build_job_spec(["demo"], None, {}).env_vars["BLT_STORE"] == str(tmp_path / "blt-store")
    assert build_job_spec(["demo"], None, {"BLT_STORE": "rel"}).env_vars["BLT_STORE"] == str(tmp_path / "rel")


def test_submitted_patch_job_joins_the_cluster(ray_head, local_store_url):
    # No --ray-address: inside a Ray job the patch job must join the job's cluster (RAY_ADDRESS).
    blt("download", "stdlib", "--name", "few", "--limit", "6", "-q", "--store", local_store_url)
    out = blt("submit", "--address", ray_head, "--follow", "--store", local_store_url, "--",
              "patch", "few", "--name", "few-static", "--scheme", "static", "--workers", "1", "-q")
    assert "SUCCEEDED" in out, out
    m = Registry(Store.open(local_store_url)).resolve("few-static")
    assert m.kind == "patches" and m.stats.documents == 6
