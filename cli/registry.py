"""``blt-data registry list | show | gc | verify``: what the registry holds."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from blt_data.calibrate import Calibration
from blt_data.registry import area_of
from blt_data.verify import verify
from cli.common import (
    EXPECTED_ERRORS, JsonOpt, QuietOpt, StoreOpt, describe, fail, new_app, open_registry, parse_duration,
)

RefArg = Annotated[str, typer.Argument(help="A dataset or model: NAME or NAME@vN.")]

app = new_app("List, show, verify and garbage-collect what the registry holds.")


@app.command("list")
def registry_list(store: StoreOpt = None, quiet: QuietOpt = False, as_json: JsonOpt = False) -> None:
    """The latest version of every dataset and model."""
    try:
        reg = open_registry(store)
        manifests = reg.list()
    except EXPECTED_ERRORS as e:
        fail(str(e))
    if as_json:
        typer.echo(json.dumps([m.model_dump(mode="json") for m in manifests], indent=2))
        return
    if not manifests:
        typer.echo(f"the registry at {reg.store.url} is empty")
        return
    typer.echo(f"{'REF':<32} {'KIND':<14} {'DOCUMENTS':>12} {'MB':>10} {'PARTS':>6}  PARENTS")
    for m in manifests:
        typer.echo(
            f"{m.ref:<32} {m.kind:<14} {m.stats.documents:>12,} {m.stats.bytes / 1e6:>10,.1f} "
            f"{m.part_count:>6}  {', '.join(m.parents) or '-'}"
        )


@app.command("show")
def registry_show(
    ref: RefArg,
    store: StoreOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """A manifest: lineage, parameters, parts and statistics. A manifest of more than a thousand
    parts keeps them in a Parquet part list, which is named, not read."""
    try:
        reg = open_registry(store)
        m = reg.resolve_any(ref)
    except EXPECTED_ERRORS as e:
        fail(str(e))
    if as_json:
        typer.echo(m.model_dump_json(indent=2))
        return
    typer.echo(describe(m))
    typer.echo(f"  created   {m.created}  by blt-data {m.code_version}  (job {m.job_id})")
    typer.echo(f"  parents   {', '.join(m.parents) or '-'}")
    typer.echo("  params    " + json.dumps(m.params, sort_keys=True))
    if m.params.get("calibration"):
        calibration = Calibration.model_validate(m.params["calibration"])
        typer.echo(f"  threshold {calibration.threshold:.4g} nats, {calibration.describe()}")
        if warning := calibration.warning():
            typer.secho(f"  warning   {warning}", fg="yellow")
    if m.parts_file is not None:
        f = m.parts_file
        where = reg.store.uri(f"{reg.version_dir(m.name, m.version, area_of(m.kind))}/{f.path}")
        typer.echo(f"  parts     {f.count:,} parts and {f.quarantine:,} quarantine parts listed in {where} "
                   f"({f.bytes:,} bytes, sha256 {f.sha256[:16]}…)")
    else:
        for p in m.parts:
            typer.echo(f"  part      {p.path}  [{p.split}] {p.rows:,} rows, {p.bytes:,} bytes, sha256 {p.sha256[:16]}…")
        for p in m.quarantine:
            typer.echo(f"  quarantine {p.path}  {p.rows:,} lines")
    typer.echo("  stats     " + m.stats.model_dump_json(exclude_defaults=True))


@app.command("gc")
def registry_gc(
    older_than: Annotated[str, typer.Option("--older-than", help="Spare jobs without a manifest that wrote something this recently (they may be running): 30m, 12h, 7d.")] = "7d",
    delete: Annotated[bool, typer.Option("--delete", help="Delete what is listed. Without it, only list.")] = False,
    store: StoreOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Job files that no manifest references: leftovers of committed jobs, abandoned jobs."""
    import time

    from blt_data.registry import delete_garbage, find_garbage

    try:
        seconds = parse_duration(older_than, "--older-than")
        reg = open_registry(store)
        garbage = find_garbage(reg, seconds, time.time())
        if delete:
            delete_garbage(reg, garbage)
    except EXPECTED_ERRORS as e:
        fail(str(e))
    if as_json:
        typer.echo(json.dumps([{"job_dir": g.job_dir, "files": list(g.files), "bytes": g.bytes, "reason": g.reason}
                               for g in garbage], indent=2))
        return
    for g in garbage:
        what = "the whole folder" if g.whole_job else f"{len(g.files)} files"
        typer.echo(f"  {g.job_dir}: {what}, {g.bytes / 1e6:,.1f} MB ({g.reason})")
    total = sum(g.bytes for g in garbage)
    files = sum(len(g.files) for g in garbage)
    if not garbage:
        typer.echo(f"nothing to collect in {reg.store.url}")
    elif delete:
        typer.echo(f"deleted {files:,} files, {total / 1e6:,.1f} MB")
    else:
        typer.echo(f"{files:,} files, {total / 1e6:,.1f} MB to collect; run again with --delete to delete them")


@app.command("verify")
def registry_verify(
    ref: RefArg,
    sample: Annotated[Optional[int], typer.Option("--sample", min=0, help="Check N parts drawn deterministically (the same N on every run) instead of all; skips the whole-dataset content checks.")] = None,
    store: StoreOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Check the part list, re-hash every part and recount its rows, then check the content its
    kind promises; exits 1 on any mismatch."""
    try:
        reg = open_registry(store)
        m = reg.resolve_any(ref)
        problems = verify(reg, m, progress=not quiet, sample=sample)
    except EXPECTED_ERRORS as e:
        fail(str(e))
    if as_json:
        typer.echo(json.dumps({"ref": m.ref, "sample": sample, "problems": problems}, indent=2))
        if problems:
            raise typer.Exit(1)
        return
    if problems:
        for p in problems:
            typer.secho(f"MISMATCH {m.ref}: {p}", err=True, fg="red")
        raise typer.Exit(1)
    count = m.part_count + m.quarantine_count
    if sample is not None:
        typer.echo(f"{m.ref}: {min(sample, count):,} of {count:,} parts verified (a deterministic sample; "
                   "content checks need a full verify)")
        return
    typer.echo(f"{m.ref}: {count:,} parts verified, {m.stats.documents:,} documents")
