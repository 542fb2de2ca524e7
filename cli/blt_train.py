"""``blt-train``: train the full BLT on a patches dataset (arrives with the trainer issue)."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Train the Byte Latent Transformer on precomputed patches datasets (torchrun, FSDP2).",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
def train(config: str = typer.Argument(..., help="Training config YAML.")) -> None:
    """Train a BLT from a config (not built yet)."""
    typer.secho("error: blt-train train is not built yet (see the trainer issue)", err=True, fg="red")
    raise typer.Exit(2)


@app.command()
def version() -> None:
    """Print the package version."""
    from blt_data.registry import code_version

    typer.echo(code_version())


def main() -> None:
    app()
