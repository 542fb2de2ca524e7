"""Fixtures shared by the whole run: a real S3 HTTP server on loopback (moto's server mode,
reached through s3fs exactly as production reaches AWS or MinIO), store URLs on it or on disk,
and one local Ray instance.
"""

from __future__ import annotations

import logging
import os
import uuid

import pytest
from hypothesis import HealthCheck, settings

# Dummy credentials, set before anything imports botocore. A distinctive secret lets tests check
# that it never appears in output.
TEST_SECRET = "s3cr3t-TEST-KEY-do-not-print-4242"
os.environ.update(
    AWS_ACCESS_KEY_ID="testing-key-id",
    AWS_SECRET_ACCESS_KEY=TEST_SECRET,
    AWS_DEFAULT_REGION="us-east-1",
    AWS_EC2_METADATA_DISABLED="true",
    RAY_AUTH_MODE="disabled",
)

# Property-based fuzzing (issue 14). "ci", the default: derandomised (the same examples on every
# run and machine) with a fixed budget, so the fuzz set stays under ~2 minutes. "fuzz"
# (HYPOTHESIS_PROFILE=fuzz, `make fuzz`): random seeds, many more examples, failures remembered in
# .hypothesis/ so a rerun tries them first.
_FUZZ_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]
settings.register_profile("ci", derandomize=True, max_examples=40, deadline=None, database=None,
                          print_blob=True, suppress_health_check=_FUZZ_HEALTH)
settings.register_profile("fuzz", max_examples=2000, deadline=None, print_blob=True,
                          suppress_health_check=_FUZZ_HEALTH)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 and a free port; sets AWS_ENDPOINT_URL for the run."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    old = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    yield endpoint
    if old is None:
        os.environ.pop("AWS_ENDPOINT_URL", None)
    else:
        os.environ["AWS_ENDPOINT_URL"] = old
    server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket per test: returns ``s3://<bucket>``."""
    import boto3

    name = f"blt-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    import fsspec

    fsspec.filesystem("s3").invalidate_cache()
    return f"s3://{name}"


@pytest.fixture(params=["local", "s3"])
def store_url(request, tmp_path):
    """A fresh, empty store: a local folder, then a prefix in a bucket on the loopback S3 server."""
    if request.param == "local":
        return str(tmp_path / "store")
    bucket = request.getfixturevalue("s3_bucket")
    return f"{bucket}/store"


@pytest.fixture
def local_store_url(tmp_path):
    return str(tmp_path / "store")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole run (starting one takes seconds); yields its GCS address, which
    a subprocess driver can join with ``--ray-address``. 4 logical CPUs on whatever cores there
    are: actors take fractions of them, so a pool never starves another task (ENVIRONMENT.md)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()
