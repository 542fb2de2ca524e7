"""``blt-data train-entropy | import-entropy-model``: entropy models in the registry."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from cli.common import (
    EXPECTED_ERRORS, JsonOpt, QuietOpt, ResumeOpt, StoreOpt, describe_model, fail, new_app, open_registry,
    overrides_arg, report_training,
)

app = new_app("Train and import entropy models.")


@app.command("train-entropy")
def train_entropy(
    docs: Annotated[str, typer.Argument(help="Documents dataset to train on: NAME or NAME@vN.")],
    name: Annotated[str, typer.Option("--name", "-n", help="Name of the entropy model to register.")],
    overrides: Annotated[Optional[list[str]], overrides_arg("steps=2000 model.dim=256")] = None,
    config: Annotated[Optional[str], typer.Option("--config", "-c", help="YAML config file, or a preset name (debug, default, paper: blt_model/presets/entropy).")] = None,
    resume: ResumeOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved config and the job id; train nothing.")] = False,
    store: StoreOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Train an entropy model (next-byte LM) and register it; resumes an interrupted run.

    Runs under torchrun for several GPUs: torchrun --nproc-per-node N -m cli.blt_data train-entropy ...
    """
    from blt_model.train_entropy import TrainingError, build_train_entropy_config, plan_job, train_entropy as run_training

    try:
        cfg = build_train_entropy_config(config, overrides or [])
        reg = open_registry(store)
        if dry_run:
            docs_manifest, job_id = plan_job(reg, docs, name, cfg)
            typer.echo(json.dumps({"docs": docs_manifest.ref, "job_id": job_id, "config": cfg.model_dump(mode="json")}, indent=2))
            return
        result = run_training(reg, docs, name, cfg, progress=not quiet, resume=resume)
    except (TrainingError, *EXPECTED_ERRORS) as e:
        fail(str(e))
    report_training(result, cfg.steps, as_json, describe_model)


@app.command("import-entropy-model")
def import_entropy_model(
    source: Annotated[str, typer.Argument(help="Folder (local or s3://): Meta's params.json + consolidated.pth, Meta's hub layout (facebook/blt-entropy), a transformers BltPatcher, or a transformers BLT checkpoint (its patcher is taken).")],
    name: Annotated[str, typer.Option("--name", "-n", help="Name to register the model under.")],
    store: StoreOpt = None,
    quiet: QuietOpt = False,
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
