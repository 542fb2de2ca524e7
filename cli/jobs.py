"""``blt-data submit`` and ``blt-data jobs status | logs | stop | list``: blt-data commands as Ray jobs.

The library (``pipelines.submit``) is imported inside each command: Ray loads only when used.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from cli.common import JsonOpt, StoreOpt, fail, new_app

app = new_app("Run blt-data commands as Ray jobs.")
jobs_app = new_app("Status, logs, stop and list of jobs submitted to a Ray cluster.")

AddressOpt = Annotated[
    str,
    typer.Option(
        "--address",
        envvar="RAY_ADDRESS",
        help="The Ray head's job API (dashboard) address.",
        show_default=True,
    ),
]
DEFAULT_RAY_ADDRESS = "http://127.0.0.1:8265"


def print_record(r, as_json: bool) -> None:
    if as_json:
        typer.echo(r.model_dump_json(indent=2))
        return
    typer.echo(f"{r.submission_id}: {r.status}")
    typer.echo(f"  entrypoint  {r.entrypoint}")
    if r.start_time:
        typer.echo(f"  started     {r.start_time:%Y-%m-%d %H:%M:%S} UTC")
    if r.end_time:
        typer.echo(f"  ended       {r.end_time:%Y-%m-%d %H:%M:%S} UTC")
    if r.message:
        typer.echo(f"  message     {r.message}")


def follow_to_end(cluster, submission_id: str) -> None:
    """Stream logs until the job ends; exit 1 unless it succeeded. Ctrl-C leaves the job running."""
    from pipelines.submit import follow_job

    try:
        record = follow_job(cluster, submission_id, lambda chunk: typer.echo(chunk, nl=False))
    except KeyboardInterrupt:
        typer.echo(f"\nstopped following; {submission_id} goes on (blt-data jobs stop {submission_id} ends it)", err=True)
        raise typer.Exit(130)
    if record.status != "SUCCEEDED":
        fail(f"job {submission_id} {record.status}" + (f": {record.message}" if record.message else ""), code=1)
    typer.echo(f"job {submission_id} SUCCEEDED")


@app.command(context_settings={"allow_interspersed_args": False})
def submit(
    ctx: typer.Context,
    command: Annotated[list[str], typer.Argument(metavar="COMMAND", help="The blt-data command and its arguments, e.g. -- patch docs --name p", show_default=False)],
    address: AddressOpt = DEFAULT_RAY_ADDRESS,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream the job's logs until it ends; exit 1 if it fails.")] = False,
    store: StoreOpt = None,
) -> None:
    """Run a blt-data command as a Ray job: blt-data submit --address http://HEAD:8265 -- COMMAND ARGS...

    The job gets this package's code (blt_data, blt_model, pipelines and cli as Ray py_modules; the cluster must have the dependencies installed) and the store settings: BLT_STORE (from --store or the environment; a local path must be one that the cluster's nodes share, use s3:// otherwise) and AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_S3, AWS_DEFAULT_REGION, AWS_REGION. Credentials are never sent: the cluster's workers use their own (environment, credentials file or instance role). Paths in the command are read on the cluster.

    The submission id is a hash of the command, its arguments and the store settings. Submitting the same job again prints the earlier submission if it is pending, running or succeeded; one that failed or was stopped is submitted again as ID-r1, ID-r2, ...
    """
    import os

    from pipelines.submit import SubmitError, build_job_spec, connect, submit as submit_job

    known = ctx.find_root().command.commands  # blt-data's commands, whichever module defines them
    if command[0] not in known or command[0] in ("submit", "jobs"):
        fail(f"{command[0]!r} is not a blt-data command that runs as a job (one of: "
             + ", ".join(sorted(set(known) - {"submit", "jobs"})) + ")")
    try:
        spec = build_job_spec(command, store, os.environ)
        cluster = connect(address)
        s = submit_job(cluster, spec)
    except SubmitError as e:
        fail(str(e))
    if s.submitted:
        retry = f" (retrying {s.replaces})" if s.replaces else ""
        typer.echo(f"submitted {s.submission_id}{retry}: {spec.entrypoint}")
    else:
        typer.echo(f"{s.submission_id}: already {s.status} (same command, arguments and store); not submitted again")
    if follow:
        try:
            follow_to_end(cluster, s.submission_id)
        except SubmitError as e:
            fail(str(e))
    else:
        typer.echo(f"follow with: blt-data jobs logs {s.submission_id} --follow --address {cluster.address}")


@jobs_app.command("status")
def jobs_status(
    submission_id: Annotated[str, typer.Argument(help="Submission id, e.g. blt-0123456789abcdef.")],
    address: AddressOpt = DEFAULT_RAY_ADDRESS,
    as_json: JsonOpt = False,
) -> None:
    """A job's status, entrypoint, times and message."""
    from pipelines.submit import SubmitError, connect, job_record

    try:
        r = job_record(connect(address), submission_id)
    except SubmitError as e:
        fail(str(e))
    print_record(r, as_json)


@jobs_app.command("logs")
def jobs_logs(
    submission_id: Annotated[str, typer.Argument(help="Submission id, e.g. blt-0123456789abcdef.")],
    address: AddressOpt = DEFAULT_RAY_ADDRESS,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream until the job ends; exit 1 if it fails.")] = False,
) -> None:
    """A job's logs so far, or (--follow) until it ends."""
    from pipelines.submit import SubmitError, connect, job_logs

    try:
        cluster = connect(address)
        if follow:
            follow_to_end(cluster, submission_id)
            return
        typer.echo(job_logs(cluster, submission_id), nl=False)
    except SubmitError as e:
        fail(str(e))


@jobs_app.command("stop")
def jobs_stop(
    submission_id: Annotated[str, typer.Argument(help="Submission id, e.g. blt-0123456789abcdef.")],
    address: AddressOpt = DEFAULT_RAY_ADDRESS,
) -> None:
    """Stop a running job (its finished units stay; submitting it again resumes)."""
    from pipelines.submit import SubmitError, connect, job_record, stop_job

    try:
        cluster = connect(address)
        if stop_job(cluster, submission_id):
            typer.echo(f"stop requested for {submission_id}")
        else:
            typer.echo(f"{submission_id} had already ended: {job_record(cluster, submission_id).status}")
    except SubmitError as e:
        fail(str(e))


@jobs_app.command("list")
def jobs_list(address: AddressOpt = DEFAULT_RAY_ADDRESS, as_json: JsonOpt = False) -> None:
    """Every job submitted to the cluster, oldest first."""
    from pipelines.submit import SubmitError, connect, list_jobs

    try:
        records = list_jobs(connect(address))
    except SubmitError as e:
        fail(str(e))
    if as_json:
        typer.echo(json.dumps([r.model_dump(mode="json") for r in records], indent=2))
        return
    if not records:
        typer.echo("no jobs submitted")
        return
    typer.echo(f"{'SUBMISSION ID':<28} {'STATUS':<10} {'STARTED (UTC)':<20} ENTRYPOINT")
    for r in records:
        started = f"{r.start_time:%Y-%m-%d %H:%M:%S}" if r.start_time else "-"
        typer.echo(f"{r.submission_id:<28} {r.status:<10} {started:<20} {r.entrypoint}")
