"""What every command of ``blt-data`` and ``blt-train`` shares: the options every command that
touches the store takes (``--store``, ``-q``, ``--json``), how a job command builds its config
(``--config FILE``, then its flags, then ``key=value`` overrides), errors and printing.

Invariant: a user never sees a traceback for a mistake of theirs: ``fail`` prints one line and
exits 2 (a check that fails exits 1).
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated, Any, Optional, TypeVar

import typer
from pydantic import BaseModel, ByteSize, TypeAdapter, ValidationError

from blt_data.calibrate import Calibration
from blt_data.registry import Manifest, Registry, RegistryError
from blt_data.storage import Store, StoreError
from blt_model.configs import build_config

C = TypeVar("C", bound=BaseModel)


def new_app(help: str, **kwargs: Any) -> typer.Typer:
    """A Typer app as every command group makes it. Plain help (no rich markup): Click rewraps
    each docstring paragraph to the terminal, so a sentence never breaks where the source wraps."""
    return typer.Typer(help=help, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                       rich_markup_mode=None, **kwargs)


StoreOpt = Annotated[
    Optional[str],
    typer.Option(
        "--store",
        envvar="BLT_STORE",
        help="Registry root: a folder, file:// or s3://bucket/prefix URL. [default: ./blt-store; env BLT_STORE]",
        show_default=False,
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or notes.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
ResumeOpt = Annotated[Optional[str], typer.Option("--resume", help="Checkpoint folder (relative to the store) to start from; 'none' starts over. Default: this job's latest checkpoint.")]

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
    parts = f"{m.part_count:,} part" + ("" if m.part_count == 1 else "s")
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


ConfigOpt = Annotated[Optional[str], typer.Option("--config", "-c", help="YAML file of the command's config fields (flags and KEY=VALUE overrides go on top).")]


def overrides_arg(example: str) -> Any:
    return typer.Argument(help=f"Config overrides KEY=VALUE, e.g. {example}.", show_default=False)


def job_config(cls: type[C], config: str | None, flags: dict[str, Any], overrides: list[str] | None) -> C:
    """A job's config: the YAML file, then the flags given (None: not given), then the
    ``key=value`` overrides, validated once. Raises ConfigError."""
    import json

    given = [f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]
    return build_config(cls, config, [*given, *(overrides or [])])


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


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


def describe_patches(m: Manifest, as_json: bool) -> None:
    if as_json:
        return
    s, p = m.stats, m.params
    line = f"  {s.patches or 0:,} patches, mean {s.mean_patch_length or 0:.2f} bytes ({p['scheme']}"
    if p.get("threshold") is not None:
        line += f", threshold {p['threshold']:.4g} nats"
    calibration = Calibration.model_validate(p["calibration"]) if p.get("calibration") else None
    if calibration is not None:
        line += f" {calibration.describe()}"
    typer.echo(line + ")")
    if calibration is not None and (warning := calibration.warning()):
        typer.secho(f"  warning: {warning}", fg="yellow")
    if p.get("model"):
        typer.echo(f"  model {p['model']['ref']} (sha256 {p['model']['sha256'][:16]}…)")


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


