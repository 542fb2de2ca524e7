"""``blt-train``: train the full BLT on a patches dataset, evaluate it, sample from it.

Several processes: ``torchrun --nproc-per-node N -m cli.blt_train train CONFIG ...`` (or the
``blt-train`` script under ``torchrun --no-python``); one process: ``blt-train train CONFIG``.
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Optional

import typer

from cli.common import EXPECTED_ERRORS, JsonOpt, QuietOpt, StoreOpt, fail, new_app, open_registry, overrides_arg, report_training

app = new_app("Train the Byte Latent Transformer on precomputed patches datasets (torchrun, FSDP2).")


class _EchoHandler(logging.Handler):
    """Writes to whatever stderr is at the time (typer.echo), never to a stream kept from
    an earlier call."""

    def emit(self, record: logging.LogRecord) -> None:
        typer.echo(self.format(record), err=True)


def _show_notes(quiet: bool) -> None:
    """The trainer's notes (resumed from …, end of data) on stderr, once per process."""
    logger = logging.getLogger("blt_model")
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    if not any(isinstance(h, _EchoHandler) for h in logger.handlers):
        logger.addHandler(_EchoHandler())


@app.command()
def train(
    config: Annotated[str, typer.Argument(help="Training config YAML (local or s3://), or a preset name: debug, demo, 100m (blt_model/presets/train).")],
    overrides: Annotated[Optional[list[str]], overrides_arg("steps=2000 data.dataset=web-patches model.dim_global=512")] = None,
    resume: Annotated[Optional[str], typer.Option("--resume", help="Checkpoint folder (relative to the store) to start from; 'none' starts over. Default: this job's latest checkpoint.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved config and the job id; train nothing.")] = False,
    store: StoreOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Train a BLT, checkpointing with DCP; rerunning the same command resumes where it stopped.

    The final checkpoint is registered as models/<name> (kind blt-checkpoint) with lineage to
    its patches dataset. Metrics go to <dump_dir>/metrics.jsonl (default runs/<name>).
    """
    from blt_data.reader import ReaderError
    from blt_model.train import TrainingError, build_train_config, plan_job, train as run_training

    _show_notes(quiet)
    try:
        cfg = build_train_config(config, overrides or [])
        if quiet:
            cfg = cfg.model_copy(update={"progress": False})
        reg = open_registry(store)
        if dry_run:
            data, job_id = plan_job(reg, cfg)
            typer.echo(json.dumps({"data": data.ref, "job_id": job_id, "config": cfg.model_dump(mode="json")}, indent=2))
            return
        result = run_training(reg, cfg, resume=resume)
    except (TrainingError, ReaderError, *EXPECTED_ERRORS) as e:
        fail(str(e))
    report_training(result, cfg.steps, as_json, describe_checkpoint)


def describe_checkpoint(m) -> None:
    bpb = f", val {m.params['val_bpb']:.3f} bits/byte" if m.params.get("val_bpb") is not None else ""
    typer.echo(f"{m.ref} (blt-checkpoint): {m.params['num_params']:,} parameters, step {m.params['step']}{bpb}")
    typer.echo(f"  parents   {', '.join(m.parents)}")


@app.command("eval")
def evaluate(
    model: Annotated[str, typer.Argument(help="Registered BLT checkpoint: NAME or NAME@vN.")],
    data: Annotated[Optional[str], typer.Option("--data", "-d", help="Patches dataset to measure on (default: the one it was trained on).")] = None,
    split: Annotated[str, typer.Option("--split", help="Split of the dataset.")] = "val",
    max_batches: Annotated[Optional[int], typer.Option("--max-batches", min=1, help="Stop after this many batches.")] = None,
    store: StoreOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Bits per byte of a trained BLT on a patches dataset."""
    from blt_data.reader import ReaderError
    from blt_model.evaluate import evaluate_checkpoint
    from blt_model.train import TrainingError

    try:
        result = evaluate_checkpoint(open_registry(store), model, data, split, max_batches)
    except (TrainingError, ReaderError, *EXPECTED_ERRORS) as e:
        fail(str(e))
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(f"{result['model']} on {result['data']} [{result['split']}]: {result['bpb']:.4f} bits/byte "
               f"over {result['bytes']:,} bytes")


@app.command()
def generate(
    model: Annotated[str, typer.Argument(help="Registered BLT checkpoint: NAME or NAME@vN.")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to continue.")] = "",
    max_bytes: Annotated[int, typer.Option("--max-bytes", min=1, help="Bytes to generate.")] = 200,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="0 = greedy.")] = 0.8,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed.")] = 0,
    store: StoreOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Sample bytes from a trained BLT; patches are decided on the fly by the entropy model (and
    rule) that patched its training data."""
    from blt_model.generate import generate_text
    from blt_model.train import TrainingError

    try:
        text = generate_text(open_registry(store), model, prompt, max_bytes, temperature, seed)
    except (TrainingError, *EXPECTED_ERRORS) as e:
        fail(str(e))
    if as_json:
        typer.echo(json.dumps({"model": model, "prompt": prompt, "text": text}, indent=2))
        return
    typer.echo(prompt + text)


@app.command()
def version() -> None:
    """Print the package version."""
    from blt_data.registry import code_version

    typer.echo(code_version())


def main() -> None:
    app()


if __name__ == "__main__":
    main()
