"""``blt-data export | import-preprocessed``: patches datasets out to and in from Meta's
preprocessed-entropy layout (Arrow IPC shards with ``.complete`` markers)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from cli.common import (
    EXPECTED_ERRORS, ConfigOpt, JsonOpt, QuietOpt, StoreOpt, describe_patches, fail, job_config, new_app, open_registry,
    overrides_arg, report,
)

app = new_app("Meta's preprocessed layout.")


@app.command("export")
def export(
    patches: Annotated[str, typer.Argument(help="Patches dataset to export: NAME or NAME@vN.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Folder to write into (local or s3://); it must not hold an earlier export.")],
    format: Annotated[str, typer.Option("--format", help="Layout to write: meta (Meta's bytelatent preprocessed-entropy Arrow shards).")],
    overrides: Annotated[Optional[list[str]], overrides_arg("batch_rows=500 shard_bytes=500000000")] = None,
    chunks: Annotated[Optional[int], typer.Option(help="Chunk files (Meta's loader needs a world size that is a multiple). [default: 1]", min=1, show_default=False)] = None,
    split: Annotated[Optional[str], typer.Option(help="Split to export. [default: train]", show_default=False)] = None,
    entropy_model_name: Annotated[Optional[str], typer.Option(help="Folder name for the entropy model in the layout. [default: the dataset's model, NAME_vN]", show_default=False)] = None,
    accept_monotonic_difference: Annotated[Optional[bool], typer.Option("--accept-monotonic-difference", help="Export a monotonic dataset although Meta's loader always starts a patch at byte 1.", show_default=False)] = None,
    config: ConfigOpt = None,
    store: StoreOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Write a patches dataset in Meta's preprocessed layout and print the `data:` config block
    with which Meta's training loop reads it and patches exactly as this dataset does."""
    from blt_data.meta_layout import MetaExportConfig, export_meta

    if format != "meta":
        fail(f"--format: {format!r} is not a layout blt-data writes (meta)")
    flags = {"patches": patches, "out": out, "chunks": chunks, "split": split, "entropy_model_name": entropy_model_name,
             "accept_monotonic_difference": accept_monotonic_difference}
    try:
        cfg = job_config(MetaExportConfig, config, flags, overrides)
        result = export_meta(open_registry(store), cfg, progress=not quiet)
    except EXPECTED_ERRORS as e:
        fail(str(e))
    if as_json:
        typer.echo(result.model_dump_json(indent=2))
        return
    typer.echo(f"{result.dataset}: {result.documents:,} documents, {result.bytes / 1e6:,.1f} MB of text in "
               f"{len(result.shards)} shards of {len(result.chunk_files)} chunks under {result.out}")
    if result.differing_documents:
        typer.secho(f"  {result.differing_documents:,} documents get other patch lengths in Meta's monotonic mode (accepted)", fg="yellow")
    typer.echo(f"  config block written to {result.config_file}:")
    typer.echo(result.config_yaml)


@app.command("import-preprocessed")
def import_preprocessed(
    source: Annotated[str, typer.Argument(help="Folder (local or s3://) of Meta's *.shard_*.arrow files with their .complete markers.")],
    name: Annotated[str, typer.Option("--name", "-n", help="Name of the patches dataset to create.")],
    overrides: Annotated[Optional[list[str]], overrides_arg("rule.calibration_bytes=2000000 part_bytes=100000000")] = None,
    threshold: Annotated[Optional[float], typer.Option(help="Entropy threshold in nats.")] = None,
    target_patch_size: Annotated[Optional[float], typer.Option(help="Calibrate the threshold for this mean patch size in bytes instead.")] = None,
    scheme: Annotated[Optional[str], typer.Option(help="entropy | monotonic. [default: entropy]", show_default=False)] = None,
    max_patch_length: Annotated[Optional[int], typer.Option(help="Cut longer patches into pieces of this many bytes.", min=1)] = None,
    model: Annotated[Optional[str], typer.Option(help="The entropy model that scored the shards: a registry model (lineage) or Meta's name for it.")] = None,
    skip_incomplete: Annotated[Optional[bool], typer.Option("--skip-incomplete", help="Import the shards that have a .complete marker and skip the others.", show_default=False)] = None,
    workers: Annotated[Optional[int], typer.Option(help="Shards converted at once (threads); the dataset is the same for any number. [default: 2]", min=1, show_default=False)] = None,
    config: ConfigOpt = None,
    store: StoreOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """A patches dataset from a Meta-preprocessed corpus, without running a model: patch lengths
    by our rule from the stored entropies, the end-of-document entropy kept."""
    from blt_data.meta_layout import MetaImportConfig, import_preprocessed as run_import

    flags = {"source": source, "name": name, "rule.threshold": threshold, "rule.target_patch_size": target_patch_size,
             "rule.scheme": scheme, "rule.max_patch_length": max_patch_length, "model": model, "skip_incomplete": skip_incomplete,
             "workers": workers}
    try:
        cfg = job_config(MetaImportConfig, config, flags, overrides)
        reg = open_registry(store, create=True)
        m = run_import(reg, cfg, progress=not quiet)
    except EXPECTED_ERRORS as e:
        fail(str(e))
    report(m, reg, as_json)
    describe_patches(m, as_json)
