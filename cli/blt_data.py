"""``blt-data``: the data pipeline's command line. Thin: parse, validate, call a library, print.

One module per command group: ``datasets`` (download, shuffle, patch, repatch, inspect),
``models`` (train-entropy, import-entropy-model), ``meta_layout`` (export, import-preprocessed), ``demo``, ``registry`` and ``jobs`` (submit,
jobs); ``common`` holds the options and printing they share.
"""

from __future__ import annotations

from typing import Annotated

import typer

from cli import datasets, demo, jobs, meta_layout, models, registry
from cli.common import new_app, setup_logging

app = new_app(
    "Entropy-patched byte datasets for the Byte Latent Transformer: download, shuffle, "
    "score, patch and register datasets on a local folder or S3."
)
for group in (datasets.app, models.app, meta_layout.app, demo.app, jobs.app):
    app.add_typer(group)
app.add_typer(registry.app, name="registry")
app.add_typer(jobs.jobs_app, name="jobs")


@app.callback()
def main_options(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what happens.")] = False) -> None:
    setup_logging(verbose)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
