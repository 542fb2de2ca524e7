"""Ray job submission: run any ``blt-data`` command on a Ray cluster through the head's job API.

Invariant: a submission id is a pure function of the command, its arguments and the store
settings (``blt-<16 hex>``). Submitting the same job again finds the first submission instead of
running it twice; only a FAILED or STOPPED one is submitted again, as ``<id>-r1``, ``<id>-r2``, …
The commands themselves resume from the registry (DESIGN.md §5), so a resubmission redoes only
what did not finish.

What travels with a job:

- the code: the four packages (``blt_data``, ``blt_model``, ``pipelines``, ``cli``) as Ray
  ``py_modules``, located from this checkout or installation, so only source goes up, never
  ``.venv``, a local store, ``.git``, benchmarks or tests. ``working_dir`` would upload whatever
  folder the package sits in, which for an installed package is all of site-packages. The
  dependencies (torch, pyarrow, …) must already be installed on the cluster (the worker image);
- the store settings as environment variables: ``BLT_STORE`` and the AWS endpoint and region
  variables. Never credentials: the cluster's workers take theirs from their own environment,
  files or instance role, and a command line that holds a credential's value is refused.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shlex
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict

from blt_data.storage import DEFAULT_STORE, STORE_ENV

# Store settings a job needs to reach the same store as the submitter.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION")
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
PACKAGES = ("blt_data", "blt_model", "pipelines", "cli")
# -P for every Python that honours it (3.11+): without it, `python -m` puts the job's working
# folder first on sys.path, and an old checkout there would shadow the code sent with the job.
JOB_ENV = {"PYTHONSAFEPATH": "1", "PYTHONUNBUFFERED": "1"}
ALIVE = ("PENDING", "RUNNING", "SUCCEEDED")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
PROBE_TIMEOUT_S = 5.0


class SubmitError(Exception):
    """A submission or job query that cannot go ahead; the message says why and where."""


class JobSpec(BaseModel):
    """One ``blt-data`` command as a Ray job: what is hashed into its submission id."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    args: tuple[str, ...]  # the blt-data command and its arguments
    env_vars: dict[str, str]  # store settings for the job; never credentials

    @property
    def submission_id(self) -> str:
        key = json.dumps({"args": list(self.args), "env": self.env_vars}, sort_keys=True)
        return "blt-" + hashlib.sha256(key.encode()).hexdigest()[:16]

    @property
    def entrypoint(self) -> str:
        return shlex.join(["python", "-m", "cli.blt_data", *self.args])


class JobRecord(BaseModel):
    """What the cluster says about one submitted job."""

    submission_id: str
    status: str
    entrypoint: str
    message: Optional[str] = None
    start_time: Optional[datetime] = None
    end_time: Optional[datetime] = None


class Submission(BaseModel):
    submission_id: str
    status: str
    submitted: bool  # False: an earlier submission of the same job was found and kept
    replaces: Optional[str] = None  # the FAILED/STOPPED submission this one retries


@dataclass(frozen=True)
class Cluster:
    """A Ray cluster reached through its head's job API (the dashboard port, 8265 by default)."""

    address: str
    client: Any  # ray.job_submission.JobSubmissionClient


def build_job_spec(args: list[str], store: str | None, environ: Mapping[str, str]) -> JobSpec:
    """The job for ``blt-data ARGS``; ``store`` (else ``$BLT_STORE``, else ``./blt-store``) goes with it.

    A local store path becomes absolute: the job runs in another folder, and a local store only
    makes sense on a cluster whose nodes share that filesystem (use s3:// otherwise).
    """
    if not args:
        raise SubmitError("no command to submit: blt-data submit -- COMMAND ARGS...")
    url = store or environ.get(STORE_ENV) or DEFAULT_STORE
    if "://" not in url:
        url = os.path.abspath(url)
    env = {STORE_ENV: url} | {k: environ[k] for k in FORWARDED_ENV if environ.get(k)}
    for var in CREDENTIAL_ENV:
        secret = environ.get(var)
        if secret and len(secret) >= 4 and any(secret in a for a in (*args, *env.values())):
            raise SubmitError(
                f"the command holds the value of ${var}; credentials never travel with a job: "
                "the cluster's workers use their own (environment, credentials file or instance role)"
            )
    return JobSpec(args=tuple(args), env_vars=env)


def runtime_env(spec: JobSpec) -> dict[str, Any]:
    return {
        "py_modules": [str(package_dir(name)) for name in PACKAGES],
        "excludes": ["__pycache__/", "*.pyc"],
        "env_vars": JOB_ENV | spec.env_vars,
    }


def package_dir(name: str) -> Path:
    import importlib

    return Path(importlib.import_module(name).__file__).parent


def normalize_address(address: str) -> str:
    address = address.strip().rstrip("/")
    if address.startswith("ray://"):
        raise SubmitError(f"{address} is a Ray Client address; jobs go to the head's job API, e.g. http://HEAD:8265")
    return address if "://" in address else "http://" + address


def connect(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> Cluster:
    """Reach the job API at ``address``, or fail within ``timeout_s`` naming it."""
    address = normalize_address(address)
    parts = urlsplit(address)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    # Ray's client has no connect timeout: an address that drops packets would hang for minutes.
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        raise SubmitError(f"cannot reach the Ray job API at {address}: {e.strerror or e} (is the head running? the dashboard listens on port 8265 by default)") from None
    from ray.job_submission import JobSubmissionClient

    try:
        return Cluster(address, JobSubmissionClient(address))
    except Exception as e:  # noqa: BLE001  (Ray raises ConnectionError, RuntimeError or ValueError here)
        raise SubmitError(f"cannot use the Ray job API at {address}: {first_line(e)} (is this the dashboard port?)") from None


def submit(cluster: Cluster, spec: JobSpec) -> Submission:
    """Submit ``spec`` unless the same job is already pending, running or done."""
    base = spec.submission_id
    for _ in range(3):  # a second submitter may take the same id between our list and submit
        seen = {j.submission_id: str(j.status.value) for j in call(cluster, cluster.client.list_jobs) if j.submission_id}
        candidate, retry = base, 0
        while candidate in seen:
            if seen[candidate] in ALIVE:
                return Submission(submission_id=candidate, status=seen[candidate], submitted=False)
            retry += 1
            candidate = f"{base}-r{retry}"
        try:
            submit_when_ready(cluster, spec, candidate, metadata={"blt_data_job": base})
        except Exception as e:  # noqa: BLE001
            if "already exists" in str(e):
                continue
            raise SubmitError(f"submitting to {cluster.address} failed: {first_line(e)}") from None
        previous = base if retry == 1 else f"{base}-r{retry - 1}" if retry else None
        return Submission(submission_id=candidate, status="PENDING", submitted=True, replaces=previous)
    raise SubmitError(f"submission id {base} kept changing hands at {cluster.address}; try again")


def submit_when_ready(cluster: Cluster, spec: JobSpec, submission_id: str, metadata: dict[str, str], wait_s: float = 60) -> None:
    # A head that has just started answers before its job agent is up ("No available agent").
    deadline = time.monotonic() + wait_s
    while True:
        try:
            cluster.client.submit_job(
                entrypoint=spec.entrypoint, submission_id=submission_id, runtime_env=runtime_env(spec), metadata=metadata,
            )
            return
        except Exception as e:  # noqa: BLE001
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(1)


def job_record(cluster: Cluster, submission_id: str) -> JobRecord:
    return to_record(call(cluster, cluster.client.get_job_info, submission_id))


def list_jobs(cluster: Cluster) -> list[JobRecord]:
    """Every submitted job the head remembers, oldest first (drivers started by hand are left out)."""
    jobs = [to_record(j) for j in call(cluster, cluster.client.list_jobs) if j.submission_id]
    return sorted(jobs, key=lambda r: (r.start_time is None, r.start_time or datetime.min.replace(tzinfo=timezone.utc)))


def job_logs(cluster: Cluster, submission_id: str) -> str:
    return call(cluster, cluster.client.get_job_logs, submission_id)


def stop_job(cluster: Cluster, submission_id: str) -> bool:
    """Ask the job to stop; False when it had already ended."""
    job_record(cluster, submission_id)  # a clear error for an unknown id
    return call(cluster, cluster.client.stop_job, submission_id)


def follow_job(cluster: Cluster, submission_id: str, write: Callable[[str], None], poll_s: float = 0.5) -> JobRecord:
    """Stream the job's logs to ``write`` from its start until it ends; returns its final record."""
    job_record(cluster, submission_id)

    async def stream() -> None:
        async for chunk in cluster.client.tail_job_logs(submission_id):
            write(chunk)

    try:
        asyncio.run(stream())
    except Exception as e:  # noqa: BLE001  a dropped stream is not the job's failure
        write(f"[log stream from {cluster.address} closed: {first_line(e)}; waiting for the job to end]\n")
    while (record := job_record(cluster, submission_id)).status not in TERMINAL:
        time.sleep(poll_s)
    return record


def call(cluster: Cluster, method: Callable[..., Any], *args: Any) -> Any:
    """One job API call, with Ray's HTTP errors turned into messages that name the job and the head."""
    try:
        return method(*args)
    except Exception as e:  # noqa: BLE001
        if "does not exist" in str(e) and args:
            raise SubmitError(f"no job {args[0]!r} at {cluster.address} (blt-data jobs list shows the known ones)") from None
        raise SubmitError(f"the Ray job API at {cluster.address} failed: {first_line(e)}") from None


def to_record(details: Any) -> JobRecord:
    def when(ms: int | None) -> datetime | None:
        return datetime.fromtimestamp(ms / 1000, tz=timezone.utc) if ms else None

    return JobRecord(
        submission_id=details.submission_id, status=str(details.status.value), entrypoint=details.entrypoint,
        message=details.message, start_time=when(details.start_time), end_time=when(details.end_time),
    )


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
