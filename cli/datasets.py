"""``blt-data download | shuffle | patch | repatch | inspect``: the commands that make and show datasets."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from cli.common import (
    EXPECTED_ERRORS, ConfigOpt, JsonOpt, QuietOpt, StoreOpt, describe_patches, fail, job_config, new_app,
    open_registry, overrides_arg, parse_size, report,
)

app = new_app("Make and show datasets.")


@app.command()
def download(
    source: Annotated[str, typer.Argument(help="stdlib | hf:ORG/DATASET[:CONFIG] | a file, folder or glob (local or s3://) of .jsonl, .jsonl.zst, .jsonl.gz, .parquet, .txt")],
    name: Annotated[str, typer.Option("--name", "-n", help="Name of the documents dataset to create.")],
    overrides: Annotated[Optional[list[str]], overrides_arg("limit=1000 text_field=content")] = None,
    split: Annotated[Optional[str], typer.Option(help="Split of a Hugging Face dataset. [default: train]", show_default=False)] = None,
    text_field: Annotated[Optional[str], typer.Option(help="Field that holds the text. [default: text]", show_default=False)] = None,
    id_field: Annotated[Optional[str], typer.Option(help="Field that holds the id; ids come from source and position when absent. [default: id]", show_default=False)] = None,
    limit: Annotated[Optional[int], typer.Option(help="Stop after this many documents.", min=1)] = None,
    part_size: Annotated[Optional[str], typer.Option(help="Rotate output parts at this much uncompressed JSONL. [default: 256MB]", show_default=False)] = None,
    config: ConfigOpt = None,
    store: StoreOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Read a corpus into a documents dataset (zstd JSONL parts), resumably.

    Bad lines are quarantined with their source and reason, never dropped; an interrupted
    download started again keeps the parts it finished.
    """
    from blt_data.download import DownloadConfig, SourceError, download as run_download

    flags = {
        "source": source, "name": name, "split": split, "text_field": text_field, "id_field": id_field,
        "limit": limit, "part_bytes": parse_size(part_size, "--part-size") if part_size else None,
    }
    try:
        cfg = job_config(DownloadConfig, config, flags, overrides)
        reg = open_registry(store, create=True)
        m = run_download(reg, cfg, progress=not quiet)
    except (SourceError, *EXPECTED_ERRORS) as e:
        fail(str(e))
    report(m, reg, as_json)


@app.command()
def shuffle(
    ref: Annotated[str, typer.Argument(help="Documents dataset to shuffle: NAME or NAME@vN.")],
    name: Annotated[str, typer.Option("--name", "-n", help="Name of the shuffled dataset.")],
    overrides: Annotated[Optional[list[str]], overrides_arg("num_chunks=16 target_part_bytes=100000000")] = None,
    chunks: Annotated[Optional[int], typer.Option(help="Number of train chunks to write. [default: 8]", min=1, show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Shuffle seed; same input and seed give byte-identical output. [default: 0]", show_default=False)] = None,
    memory: Annotated[Optional[str], typer.Option(help="Most document bytes held in RAM at once (e.g. 512MB, 2GB). [default: 1GB]", show_default=False)] = None,
    val_docs: Annotated[Optional[int], typer.Option(help="Documents set aside as the 'val' split. [default: 0]", min=0, show_default=False)] = None,
    config: ConfigOpt = None,
    store: StoreOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Global, uniform, seeded shuffle in bounded memory (external, on any store)."""
    from blt_data.shuffle import ShuffleConfig, shuffle_documents

    flags = {
        "num_chunks": chunks, "seed": seed, "val_docs": val_docs,
        "memory_bytes": parse_size(memory, "--memory") if memory else None,
    }
    if config is None:  # the command's own defaults, kept from before it took a config file
        flags = {"num_chunks": 8, "memory_bytes": 10**9} | {k: v for k, v in flags.items() if v is not None}
    try:
        cfg = job_config(ShuffleConfig, config, flags, overrides)
        reg = open_registry(store)
        m = shuffle_documents(reg, ref, name, **cfg.model_dump(), progress=not quiet)
    except EXPECTED_ERRORS as e:
        fail(str(e))
    report(m, reg, as_json)


@app.command()
def patch(
    docs: Annotated[str, typer.Argument(help="Documents dataset to patch: NAME or NAME@vN.")],
    name: Annotated[str, typer.Option("--name", "-n", help="Name of the patches dataset to create.")],
    overrides: Annotated[Optional[list[str]], overrides_arg("cpus_per_worker=1 row_len=2048 retries=5 rule.patch_size=6")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Entropy model: 'default' (shipped) or NAME[@vN]. [default: 'default' for entropy schemes; none for others]", show_default=False)] = None,
    scheme: Annotated[Optional[str], typer.Option(help="entropy | monotonic | space | static | byte. [default: entropy]", show_default=False)] = None,
    threshold: Annotated[Optional[float], typer.Option(help="Entropy threshold in nats (entropy schemes). [default: the threshold recorded with the model]", show_default=False)] = None,
    target_patch_size: Annotated[Optional[float], typer.Option(help="Calibrate the threshold for this mean patch size in bytes instead.")] = None,
    max_patch_length: Annotated[Optional[int], typer.Option(help="Cut longer patches into pieces of this many bytes.", min=1)] = None,
    entropies: Annotated[Optional[bool], typer.Option("--entropies/--no-entropies", help="Store the per-byte entropies (needed by repatch). [default: entropies]", show_default=False)] = None,
    ray_address: Annotated[Optional[str], typer.Option(help="Ray cluster to run on. [default: a local Ray]", show_default=False)] = None,
    workers: Annotated[Optional[int], typer.Option(help="Scoring actors. [default: 2]", min=1, show_default=False)] = None,
    gpus_per_worker: Annotated[Optional[float], typer.Option(help="GPUs per actor; > 0 scores on CUDA. [default: 0]", min=0, show_default=False)] = None,
    unit_size: Annotated[Optional[str], typer.Option(help="Input bytes per unit of work (e.g. 16MB). [default: 16MB]", show_default=False)] = None,
    config: ConfigOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved config, the job id and the planned units; write nothing.")] = False,
    store: StoreOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Patch a documents dataset with an entropy model on Ray (local, or a cluster); resumable.

    Each unit of work is scored, patched and written by an actor; finished units survive a
    crash, and running the same command again continues where it stopped. An entropy scheme
    without --threshold or --target-patch-size uses the threshold recorded with the model.
    """
    from pipelines.patch_job import PatchJobConfig, PatchJobError, plan_patch_job, run_patch_job, with_recorded_threshold

    flags = {
        "docs": docs, "name": name, "model": model, "rule.scheme": scheme, "rule.threshold": threshold,
        "rule.target_patch_size": target_patch_size, "rule.max_patch_length": max_patch_length, "entropies": entropies,
        "ray_address": ray_address, "workers": workers, "gpus_per_worker": gpus_per_worker,
        "unit_bytes": parse_size(unit_size, "--unit-size") if unit_size else None,
    }
    try:
        asked = job_config(PatchJobConfig, config, flags, overrides)
        reg = open_registry(store, create=not dry_run)
        cfg = with_recorded_threshold(reg, asked)
        if cfg.rule.threshold != asked.rule.threshold and not as_json:
            typer.echo(f"using threshold {cfg.rule.threshold:g} nats, recorded with entropy model {cfg.model_ref} "
                       "(--threshold or --target-patch-size choose another)", err=True)
        if dry_run:
            typer.echo(json.dumps(plan_patch_job(reg, cfg).summary(), indent=2))
            return
        m = run_patch_job(reg, cfg, progress=not quiet)
    except ConnectionError as e:
        fail(f"cannot reach Ray at {ray_address}: {e}")
    except (PatchJobError, *EXPECTED_ERRORS) as e:
        fail(str(e))
    report(m, reg, as_json)
    describe_patches(m, as_json)


@app.command()
def repatch(
    patches: Annotated[str, typer.Argument(help="Patches dataset with stored entropies: NAME or NAME@vN.")],
    name: Annotated[str, typer.Option("--name", "-n", help="Name of the patches dataset to create.")],
    overrides: Annotated[Optional[list[str]], overrides_arg("rule.calibration_bytes=2000000")] = None,
    threshold: Annotated[Optional[float], typer.Option(help="Entropy threshold in nats.")] = None,
    target_patch_size: Annotated[Optional[float], typer.Option(help="Calibrate the threshold for this mean patch size in bytes instead.")] = None,
    scheme: Annotated[Optional[str], typer.Option(help="entropy | monotonic. [default: entropy]", show_default=False)] = None,
    max_patch_length: Annotated[Optional[int], typer.Option(help="Cut longer patches into pieces of this many bytes.", min=1)] = None,
    config: ConfigOpt = None,
    store: StoreOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """New patches from stored entropies with another rule: CPU only, no model, no Ray."""
    from blt_data.repatch import RepatchConfig, repatch as run_repatch

    flags = {
        "patches": patches, "name": name, "rule.scheme": scheme, "rule.threshold": threshold,
        "rule.target_patch_size": target_patch_size, "rule.max_patch_length": max_patch_length,
    }
    try:
        cfg = job_config(RepatchConfig, config, flags, overrides)
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
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """A static HTML page of a patches dataset: documents shaded by entropy with patch boundaries,
    entropy traces, the patch-length histogram, lineage and the manifest. Opens offline."""
    from blt_data.inspection import write_inspect_page

    try:
        index = write_inspect_page(open_registry(store), ref, out, doc_ids=doc, n_docs=docs, max_bytes=max_bytes)
    except EXPECTED_ERRORS as e:
        fail(str(e))
    if as_json:
        typer.echo(json.dumps({"index": str(index), "uri": index.resolve().as_uri()}, indent=2))
        return
    typer.echo(f"wrote {index}")
    if not quiet:
        typer.echo(f"open {index.resolve().as_uri()}")
