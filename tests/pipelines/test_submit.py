"""``blt-data submit`` and ``blt-data jobs`` against a real Ray head started with ``ray start --head``
(``tests/pipelines/ray_cluster.py``: its own session, so teardown kills exactly that head).
"""

from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path

import pytest

from blt_data.registry import Registry
from blt_data.storage import Store
from pipelines.submit import SubmitError, build_job_spec, connect, runtime_env
from tests.cli.test_blt_data_cli import blt
from tests.conftest import TEST_SECRET
from tests.pipelines.ray_cluster import RayNode, free_port, warm_up


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on loopback with its dashboard; yields its job API address."""
    head = RayNode(head=True, num_cpus=2)
    try:
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + 90
        while True:
            if not head.alive():
                pytest.fail(f"ray start --head exited {head.process.returncode}: {head.log_tail()}")
            try:
                JobSubmissionClient(head.dashboard).list_jobs()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        warm_up(head)
        yield head.dashboard
    finally:
        head.stop()


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
