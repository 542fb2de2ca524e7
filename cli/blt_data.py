"""``blt-data``: the data pipeline's command line. Thin: parse, validate, call a library, print."""

from __future__ import annotations

import json
import logging
import sys
from typing import Annotated, Optional

import typer
from pydantic import ByteSize, TypeAdapter, ValidationError

from blt_data.registry import Manifest, Registry, RegistryError
from blt_data.storage import Store, StoreError

app = typer.Typer(
    help="Entropy-patched byte datasets for the Byte Latent Transformer: download, shuffle, "
    "score, patch and register datasets on a local folder or S3.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
registry_app = typer.Typer(help="List, show, verify and garbage-collect what the registry holds.", no_args_is_help=True)
app.add_typer(registry_app, name="registry")

StoreOpt = Annotated[
    Optional[str],
    typer.Option(
        "--store",
        envvar="BLT_STORE",
        help="Registry root: a folder, file:// or s3://bucket/prefix URL. [default: ./blt-store; env BLT_STORE]",
        show_default=False,
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]

EXPECTED_ERRORS = (RegistryError, StoreError, FileNotFoundError, ValueError, PermissionError)


def fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def open_registry(store: str | None, create: bool = False) -> Registry:
    st = Store.open(store)
    if create or not st.is_local:  # a missing local folder just means an empty registry
        st.check_reachable()
    return Registry(st)


def parse_size(text: str, option: str) -> int:
    """``512MB``, ``2GB``, ``1.5GiB``, or a plain number of bytes."""
    try:
        return int(TypeAdapter(ByteSize).validate_python(text))
    except ValidationError:
        fail(f"{option}: cannot read {text!r} as a size (examples: 512MB, 2GB, 1GiB)")
        raise  # unreachable; keeps type checkers happy


def describe(m: Manifest) -> str:
    if m.kind == "entropy-model":
        bpb = m.params.get("val_bpb")
        return (f"{m.ref} ({m.kind}): {m.params.get('num_params', 0):,} parameters"
                + (f", val {bpb:.3f} bits/byte" if bpb is not None else ""))
    s = m.stats
    parts = f"{len(m.parts)} part" + ("" if len(m.parts) == 1 else "s")
    line = f"{m.ref} ({m.kind}): {s.documents:,} documents, {s.bytes / 1e6:,.1f} MB of text in {parts}"
    if s.splits and set(s.splits) != {"train"}:
        line += " [" + ", ".join(f"{k}: {v:,}" for k, v in s.splits.items()) + "]"
    return line


def report(m: Manifest, registry: Registry, as_json: bool) -> None:
    if as_json:
        typer.echo(m.model_dump_json(indent=2))
        return
    typer.echo(describe(m))
    s = m.stats
    where = registry.store.uri(registry.dataset_dir(m.name))
    if s.quarantined:
        typer.secho(f"  {s.quarantined:,} lines quarantined (reasons and sources in {where}/_jobs/{m.job_id}/_quarantine/)", fg="yellow")
    if s.blank_lines:
        typer.echo(f"  {s.blank_lines:,} blank lines skipped")
    if s.duplicate_ids:
        typer.secho(f"  {s.duplicate_ids:,} duplicate ids got positional ids (e.g. {s.duplicate_id_examples[0]})", fg="yellow")
    for d in s.damaged_files:
        typer.secho(f"  damaged file {d['file']}: {d['error']} — kept the {d['lines_read']:,} lines read before it", fg="yellow")
    if s.skipped_files:
        typer.echo(f"  {len(s.skipped_files)} files of other types skipped (e.g. {s.skipped_files[0]})")


@app.callback()
def main_options(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what happens.")] = False) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@app.command()
def download(
    source: Annotated[str, typer.Argument(help="stdlib | hf:ORG/DATASET[:CONFIG] | a file, folder or glob (local or s3://) of .jsonl, .jsonl.zst, .jsonl.gz, .parquet, .txt")],
    name: Annotated[str, typer.Option("--name", "-n", help="Name of the documents dataset to create.")],
    split: Annotated[str, typer.Option(help="Split of a Hugging Face dataset.")] = "train",
    text_field: Annotated[str, typer.Option(help="Field that holds the text.")] = "text",
    id_field: Annotated[str, typer.Option(help="Field that holds the id; ids come from source and position when absent.")] = "id",
    limit: Annotated[Optional[int], typer.Option(help="Stop after this many documents.", min=1)] = None,
    part_size: Annotated[str, typer.Option(help="Rotate output parts at this much uncompressed JSONL.")] = "256MB",
    store: StoreOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Read a corpus into a documents dataset (zstd JSONL parts), resumably.

    Bad lines are quarantined with their source and reason, never dropped; an interrupted
    download started again keeps the parts it finished.
    """
    from blt_data.download import DownloadConfig, SourceError, download as run_download

    try:
        cfg = DownloadConfig(
            source=source, name=name, split=split, text_field=text_field, id_field=id_field,
            limit=limit, part_bytes=parse_size(part_size, "--part-size"),
        )
        reg = open_registry(store, create=True)
        m = run_download(reg, cfg, progress=not quiet)
    except (SourceError, *EXPECTED_ERRORS) as e:
        fail(str(e))
    report(m, reg, as_json)


@app.command()
def shuffle(
    ref: Annotated[str, typer.Argument(help="Documents dataset to shuffle: NAME or NAME@vN.")],
    name: Annotated[str, typer.Option("--name", "-n", help="Name of the shuffled dataset.")],
    chunks: Annotated[int, typer.Option(help="Number of train chunks to write.", min=1)] = 8,
    seed: Annotated[int, typer.Option(help="Shuffle seed; same input and seed give byte-identical output.")] = 0,
    memory: Annotated[str, typer.Option(help="Most document bytes held in RAM at once (e.g. 512MB, 2GB).")] = "1GB",
    val_docs: Annotated[int, typer.Option(help="Documents set aside as the 'val' split.", min=0)] = 0,
    store: StoreOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Global, uniform, seeded shuffle in bounded memory (external, on any store)."""
    from blt_data.shuffle import shuffle_documents

    try:
        reg = open_registry(store)
        m = shuffle_documents(
            reg, ref, name, num_chunks=chunks, seed=seed,
            memory_bytes=parse_size(memory, "--memory"), val_docs=val_docs, progress=not quiet,
        )
    except EXPECTED_ERRORS as e:
        fail(str(e))
    report(m, reg, as_json)



def describe_patches(m: Manifest, as_json: bool) -> None:
    if as_json:
        return
    s, p = m.stats, m.params
    line = f"  {s.patches or 0:,} patches, mean {s.mean_patch_length or 0:.2f} bytes ({p['scheme']}"
    if p.get("threshold") is not None:
        line += f", threshold {p['threshold']:.4g} nats"
    if p.get("calibration"):
        c = p["calibration"]
        line += f" calibrated for {c['target']:g} bytes on {c['sample_bytes']:,} sample bytes, reached {c['mean_patch_size_reached']:.3f}"
    typer.echo(line + ")")
    if p.get("model"):
        typer.echo(f"  model {p['model']['ref']} (sha256 {p['model']['sha256'][:16]}…)")


@app.command()
def patch(
    docs: Annotated[str, typer.Argument(help="Documents dataset to patch: NAME or NAME@vN.")],
    name: Annotated[str, typer.Option("--name", "-n", help="Name of the patches dataset to create.")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="Config overrides KEY=VALUE, e.g. cpus_per_worker=1 row_len=2048 retries=5.", show_default=False)] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Entropy model: 'default' (shipped) or NAME[@vN]. [default: 'default' for entropy schemes; none for others]", show_default=False)] = None,
    scheme: Annotated[str, typer.Option(help="entropy | monotonic | space | static | byte")] = "entropy",
    threshold: Annotated[Optional[float], typer.Option(help="Entropy threshold in nats (entropy schemes).")] = None,
    target_patch_size: Annotated[Optional[float], typer.Option(help="Calibrate the threshold for this mean patch size in bytes instead.")] = None,
    max_patch_length: Annotated[Optional[int], typer.Option(help="Cut longer patches into pieces of this many bytes.", min=1)] = None,
    entropies: Annotated[bool, typer.Option("--entropies/--no-entropies", help="Store the per-byte entropies (needed by repatch).")] = True,
    ray_address: Annotated[Optional[str], typer.Option(help="Ray cluster to run on. [default: a local Ray]", show_default=False)] = None,
    workers: Annotated[Optional[int], typer.Option(help="Scoring actors. [default: 2]", min=1, show_default=False)] = None,
    gpus_per_worker: Annotated[Optional[float], typer.Option(help="GPUs per actor; > 0 scores on CUDA. [default: 0]", min=0, show_default=False)] = None,
    unit_size: Annotated[Optional[str], typer.Option(help="Input bytes per unit of work (e.g. 16MB). [default: 16MB]", show_default=False)] = None,
    config: Annotated[Optional[str], typer.Option("--config", "-c", help="YAML file of PatchJobConfig fields.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved config, the job id and the planned units; write nothing.")] = False,
    store: StoreOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Patch a documents dataset with an entropy model on Ray (local, or a cluster); resumable.

    Each unit of work is scored, patched and written by an actor; finished units survive a
    crash, and running the same command again continues where it stopped.
    """
    from blt_model.configs import ConfigError, build_config
    from pipelines.patch_job import PatchJobConfig, PatchJobError, plan_patch_job, run_patch_job

    flags = {
        "docs": docs, "name": name, "model": model, "scheme": scheme, "threshold": threshold,
        "target_patch_size": target_patch_size, "max_patch_length": max_patch_length, "entropies": entropies,
        "ray_address": ray_address, "workers": workers, "gpus_per_worker": gpus_per_worker,
        "unit_bytes": parse_size(unit_size, "--unit-size") if unit_size else None,
    }
    given = [f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]
    try:
        cfg = build_config(PatchJobConfig, config, [*given, *(overrides or [])])
        reg = open_registry(store, create=not dry_run)
        if dry_run:
            typer.echo(json.dumps(plan_patch_job(reg, cfg).summary(), indent=2))
            return
        m = run_patch_job(reg, cfg, progress=not quiet)
    except ConnectionError as e:
        fail(f"cannot reach Ray at {ray_address}: {e}")
    except (ConfigError, PatchJobError, *EXPECTED_ERRORS) as e:
        fail(str(e))
    report(m, reg, as_json)
    describe_patches(m, as_json)


@app.command()
def repatch(
    patches: Annotated[str, typer.Argument(help="Patches dataset with stored entropies: NAME or NAME@vN.")],
    name: Annotated[str, typer.Option("--name", "-n", help="Name of the patches dataset to create.")],
    threshold: Annotated[Optional[float], typer.Option(help="Entropy threshold in nats.")] = None,
    target_patch_size: Annotated[Optional[float], typer.Option(help="Calibrate the threshold for this mean patch size in bytes instead.")] = None,
    scheme: Annotated[str, typer.Option(help="entropy | monotonic")] = "entropy",
    max_patch_length: Annotated[Optional[int], typer.Option(help="Cut longer patches into pieces of this many bytes.", min=1)] = None,
    store: StoreOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """New patches from stored entropies with another rule: CPU only, no model, no Ray."""
    from pydantic import ValidationError

    from blt_data.repatch import RepatchConfig, repatch as run_repatch

    try:
        cfg = RepatchConfig(patches=patches, name=name, scheme=scheme, threshold=threshold,
                            target_patch_size=target_patch_size, max_patch_length=max_patch_length)
    except ValidationError as e:
        fail("; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors()))
    try:
        reg = open_registry(store)
        m = run_repatch(reg, cfg, progress=not quiet)
    except EXPECTED_ERRORS as e:
        fail(str(e))
    report(m, reg, as_json)
    describe_patches(m, as_json)


@app.command("inspect")
def inspect_page(
    ref: Annotated[str, typer.Argument(help="Patches dataset to show: NAME or NAME@vN.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Folder to write index.html and its PNGs into.")],
    doc: Annotated[Optional[list[str]], typer.Option("--doc", help="Id of a document to show; repeat for several. [default: the first --docs documents]", show_default=False)] = None,
    docs: Annotated[int, typer.Option("--docs", help="How many documents to show when no --doc is given.", min=1)] = 3,
    max_bytes: Annotated[int, typer.Option(help="Show at most this many bytes of each document.", min=1)] = 2000,
    store: StoreOpt = None,
) -> None:
    """A static HTML page of a patches dataset: documents shaded by entropy with patch boundaries,
    entropy traces, the patch-length histogram, lineage and the manifest. Opens offline."""
    from blt_data.inspect import write_inspect_page

    try:
        index = write_inspect_page(open_registry(store), ref, out, doc_ids=doc, n_docs=docs, max_bytes=max_bytes)
    except EXPECTED_ERRORS as e:
        fail(str(e))
    typer.echo(f"wrote {index}")
    typer.echo(f"open {index.resolve().as_uri()}")

def resolve_any(reg: Registry, ref: str) -> Manifest:
    """A dataset reference, or failing that a model reference."""
    try:
        return reg.resolve(ref)
    except RegistryError as first:
        try:
            return reg.resolve(ref, area="models")
        except RegistryError:
            raise first from None


@registry_app.command("list")
def registry_list(store: StoreOpt = None, as_json: JsonOpt = False) -> None:
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
            f"{len(m.parts):>6}  {', '.join(m.parents) or '-'}"
        )


@registry_app.command("show")
def registry_show(
    ref: Annotated[str, typer.Argument(help="NAME or NAME@vN")],
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A manifest: lineage, parameters, parts and statistics."""
    try:
        reg = open_registry(store)
        m = resolve_any(reg, ref)
    except EXPECTED_ERRORS as e:
        fail(str(e))
    if as_json:
        typer.echo(m.model_dump_json(indent=2))
        return
    typer.echo(describe(m))
    typer.echo(f"  created   {m.created}  by blt-data {m.code_version}  (job {m.job_id})")
    typer.echo(f"  parents   {', '.join(m.parents) or '-'}")
    typer.echo("  params    " + json.dumps(m.params, sort_keys=True))
    for p in m.parts:
        typer.echo(f"  part      {p.path}  [{p.split}] {p.rows:,} rows, {p.bytes:,} bytes, sha256 {p.sha256[:16]}…")
    for p in m.quarantine:
        typer.echo(f"  quarantine {p.path}  {p.rows:,} lines")
    typer.echo("  stats     " + m.stats.model_dump_json(exclude_defaults=True))


@registry_app.command("gc")
def registry_gc(
    older_than: Annotated[str, typer.Option("--older-than", help="Spare jobs without a manifest that wrote something this recently (they may be running): 30m, 12h, 7d.")] = "7d",
    delete: Annotated[bool, typer.Option("--delete", help="Delete what is listed. Without it, only list.")] = False,
    store: StoreOpt = None,
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


def parse_duration(text: str, option: str) -> float:
    """``30m``, ``12h``, ``7d``, or a plain number of seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        value = float(number)
    except ValueError:
        fail(f"{option}: cannot read {text!r} as a duration (examples: 30m, 12h, 7d)")
    if value < 0:
        fail(f"{option}: a duration cannot be negative")
    return value * units[unit]


@registry_app.command("verify")
def registry_verify(
    ref: Annotated[str, typer.Argument(help="NAME or NAME@vN")],
    store: StoreOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Re-hash every part and recount its rows; exits 1 on any mismatch."""
    try:
        reg = open_registry(store)
        m = resolve_any(reg, ref)
        problems = reg.verify(m, progress=not quiet)
    except EXPECTED_ERRORS as e:
        fail(str(e))
    if problems:
        for p in problems:
            typer.secho(f"MISMATCH {m.ref}: {p}", err=True, fg="red")
        raise typer.Exit(1)
    typer.echo(f"{m.ref}: {len(m.parts) + len(m.quarantine)} parts verified, {m.stats.documents:,} documents")


@app.command("train-entropy")
def train_entropy(
    docs: Annotated[str, typer.Argument(help="Documents dataset to train on: NAME or NAME@vN.")],
    name: Annotated[str, typer.Option("--name", "-n", help="Name of the entropy model to register.")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="Config overrides KEY=VALUE, e.g. steps=2000 model.dim=256.", show_default=False)] = None,
    config: Annotated[Optional[str], typer.Option("--config", "-c", help="YAML config file, or a preset name (debug, default, paper: blt_model/presets/entropy).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved config and the job id; train nothing.")] = False,
    store: StoreOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Train an entropy model (next-byte LM) and register it; resumes an interrupted run.

    Runs under torchrun for several GPUs: torchrun --nproc-per-node N -m cli.blt_data train-entropy ...
    """
    from blt_model.configs import ConfigError
    from blt_model.train_entropy import (
        TrainingError, build_train_entropy_config, plan_job, train_entropy as run_training,
    )

    try:
        cfg = build_train_entropy_config(config, overrides or [])
        reg = open_registry(store)
        if dry_run:
            docs_manifest, job_id = plan_job(reg, docs, name, cfg)
            typer.echo(json.dumps({"docs": docs_manifest.ref, "job_id": job_id, "config": cfg.model_dump(mode="json")}, indent=2))
            return
        result = run_training(reg, docs, name, cfg, progress=not quiet)
    except (ConfigError, TrainingError, *EXPECTED_ERRORS) as e:
        fail(str(e))
    report_training(result, cfg.steps, as_json, describe_model)


def report_training(result, steps: int, as_json: bool, describe_manifest) -> None:
    """The end of a training command (entropy model or BLT); other torchrun ranks say nothing."""
    if not result.main_process:
        return
    if result.manifest is None:
        typer.echo(f"stopped at step {result.step}/{steps} (job {result.job_id}); run the same command again to resume")
        return
    if as_json:
        typer.echo(result.manifest.model_dump_json(indent=2))
        return
    describe_manifest(result.manifest)


def describe_model(m: Manifest) -> None:
    p = m.params
    line = f"{m.ref} (entropy-model): {p.get('num_params', 0):,} parameters, sha256 {p.get('sha256', '?')[:16]}…"
    if p.get("val_bpb") is not None:
        line += f", val {p['val_bpb']:.3f} bits/byte"
    if p.get("threshold") is not None:
        line += f", released threshold {p['threshold']:.4g} nats"
    typer.echo(line)
    typer.echo(f"  parents   {', '.join(m.parents) or '-'}")


@app.command("import-entropy-model")
def import_entropy_model(
    source: Annotated[str, typer.Argument(help="Folder (local or s3://): Meta's params.json + consolidated.pth, Meta's hub layout (facebook/blt-entropy), a transformers BltPatcher, or a transformers BLT checkpoint (its patcher is taken).")],
    name: Annotated[str, typer.Option("--name", "-n", help="Name to register the model under.")],
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Import a released BLT entropy model and register it (layout detected from the files;
    every tensor checked)."""
    from blt_model.entropy_model import CheckpointMismatchError
    from blt_model.entropy_registry import import_entropy_model as run_import

    try:
        reg = open_registry(store, create=True)
        m = run_import(reg, source, name)
    except (CheckpointMismatchError, *EXPECTED_ERRORS) as e:
        fail(str(e))
    if as_json:
        typer.echo(m.model_dump_json(indent=2))
        return
    describe_model(m)


@app.command()
def demo(
    overrides: Annotated[Optional[list[str]], typer.Argument(help="DemoConfig overrides KEY=VALUE, e.g. limit=200 'train=[steps=20]'.", show_default=False)] = None,
    store: StoreOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """The whole pipeline on the embedded defaults, in a few minutes on a CPU: the stdlib corpus →
    shuffle → patch with the shipped entropy model on local Ray → train a small BLT → bits per
    byte → a summary and an inspect page. A second run reuses everything already made."""
    from blt_model.configs import ConfigError, build_config
    from blt_model.distributed import TrainingError
    from pipelines.demo import DemoConfig, run_demo
    from pipelines.patch_job import PatchJobError

    try:
        cfg = build_config(DemoConfig, None, overrides or [])
        reg = open_registry(store, create=True)
        result = run_demo(reg, cfg, progress=not quiet)
    except (ConfigError, PatchJobError, TrainingError, *EXPECTED_ERRORS) as e:
        fail(str(e))
    typer.echo("")
    typer.echo(f"demo done: the registry at {reg.store.url} holds")
    header = f"  {'step':<9} {'made':<28} {'what':<44} {'time':>8} {'MB/s':>7}"
    typer.echo(header)
    for step in result.steps:
        m = step.manifest
        if m.kind == "blt-checkpoint":
            what = f"{m.params['num_params'] / 1e6:.1f}M params, {m.params['step']} steps"
            if m.params.get("val_bpb") is not None:
                what += f", val {m.params['val_bpb']:.3f} bpb"
        else:
            what = f"{m.stats.documents:,} docs, {m.stats.bytes / 1e6:.1f} MB"
            if m.kind == "patches":
                what += f", mean patch {m.stats.mean_patch_length:.2f} B"
        time_s = "reused" if step.reused else f"{step.seconds:.1f}s"
        rate = "" if step.reused or not step.input_bytes else f"{step.input_bytes / step.seconds / 1e6:.3f}"
        typer.echo(f"  {step.name:<9} {m.ref:<28} {what:<44} {time_s:>8} {rate:>7}")
    typer.echo("")
    typer.echo("next:")
    typer.echo(f"  blt-data registry list{_store_flag(store)}")
    typer.echo(f"  open {result.inspect_page.resolve().as_uri()}   (entropies and patches, byte by byte)")
    model = result.steps[-1].manifest.ref
    typer.echo(f"  blt-train generate {model} --prompt 'def '{_store_flag(store)}")


def _store_flag(store: str | None) -> str:
    return f" --store {store}" if store else ""


# Ray job submission. The library is imported inside each command: Ray loads only when used.
jobs_app = typer.Typer(help="Status, logs, stop and list of jobs submitted to a Ray cluster.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")

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

    known = typer.main.get_command(app).commands
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
