"""``blt-train``: train the full BLT on a patches dataset, evaluate it, sample from it.

Several processes: ``torchrun --nproc-per-node N -m cli.blt_train train CONFIG ...`` (or the
``blt-train`` script under ``torchrun --no-python``); one process: ``blt-train train CONFIG``.
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Optional

import typer

from cli.common import (
    EXPECTED_ERRORS, JsonOpt, QuietOpt, ResumeOpt, StoreOpt, fail, new_app, open_registry, overrides_arg, report_training,
)

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
    resume: ResumeOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved config and the job id; train nothing.")] = False,
    store: StoreOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Train a BLT, checkpointing with DCP; rerunning the same command resumes where it stopped.

    The final checkpoint is registered as models/<name> (kind blt-checkpoint) with lineage to
    its patches dataset. Metrics go to <dump_dir>/metrics.jsonl (default runs/<name>).

    Continued training: init_from=NAME[@vN] starts from a registered checkpoint's weights
    (trained here or from blt-train import) with a fresh optimizer, as a job of its own; the
    config's model shape must be the checkpoint's (e.g. model_preset=blt-1b).
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
    p = m.params
    if p.get("format") == "safetensors":  # imported
        rule = p.get("patching") or {}
        threshold = f", threshold {rule['threshold']:.4g} nats" if rule.get("threshold") is not None else ""
        typer.echo(f"{m.ref} (blt-checkpoint): {p['num_params']:,} parameters, {p['dtype']}, imported from "
                   f"{p['source_layout']} {p['source']}")
        typer.echo(f"  patching  {rule.get('scheme', 'unknown')}{threshold}")
        typer.echo(f"  parents   {', '.join(m.parents) or '-'}")
        return
    bpb = f", val {p['val_bpb']:.3f} bits/byte" if p.get("val_bpb") is not None else ""
    typer.echo(f"{m.ref} (blt-checkpoint): {p['num_params']:,} parameters, step {p['step']}{bpb}")
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
    """Sample bytes from a BLT; patches are decided on the fly by the entropy model and rule that
    patched its training data (or, for an imported BLT, that it was released with)."""
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


@app.command("import")
def import_checkpoint(
    source: Annotated[str, typer.Argument(help="Folder (local or s3://) of a released BLT: Meta's consolidated folder (params.json + consolidated.pth + entropy_model/), Meta's hub layout (config.json {\"args\"} + model.safetensors [+ train_args.json]), or transformers' layout (config.json model_type \"blt\" + safetensors, sharded or not).")],
    name: Annotated[str, typer.Option("--name", "-n", help="Name to register the BLT under (models/<name>, kind blt-checkpoint).")],
    entropy_model: Annotated[Optional[str], typer.Option("--entropy-model", help="Folder of its entropy model, in any layout blt-data import-entropy-model reads (Meta's hub layout: facebook/blt-entropy). Default: the one the folder carries (entropy_model/, or transformers' patcher).")] = None,
    entropy_name: Annotated[Optional[str], typer.Option("--entropy-name", help="Name to register the entropy model under (default <name>-entropy).")] = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Register a released BLT checkpoint (and its entropy model) from its files.

    The layout is detected from the files. Every tensor is checked against the BLT its config
    describes (a missing, extra or misshapen tensor is an error naming it), Meta options this
    BLT does not compute are refused by name, pickles load with weights_only, and nothing is
    downloaded: fetch the folder first (e.g. huggingface-cli download facebook/blt-1b).

    The BLT is stored as model.safetensors + config.json (dtype as released) with the patch rule
    and threshold released with it; its entropy model is registered too (kind entropy-model,
    usable by blt-data patch --model) and is the BLT's parent. The result works with
    blt-train eval, generate, export and train init_from=NAME.
    """
    from blt_model.blt_registry import import_blt
    from blt_model.distributed import TrainingError

    try:
        reg = open_registry(store, create=True)
        blt, entropy = import_blt(reg, source, name, entropy_model, entropy_name)
    except (TrainingError, *EXPECTED_ERRORS) as e:
        fail(str(e))
    if as_json:
        typer.echo(json.dumps({"blt": blt.model_dump(mode="json"), "entropy_model": entropy.model_dump(mode="json") if entropy else None}, indent=2))
        return
    describe_checkpoint(blt)
    if entropy is None:
        typer.echo("  no entropy model: generate needs one for entropy patching (--entropy-model DIR)")


@app.command("export")
def export_checkpoint(
    model: Annotated[str, typer.Argument(help="Registered BLT checkpoint: NAME or NAME@vN (trained or imported).")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="hf: transformers' layout (BltForCausalLM.from_pretrained), with the patcher and threshold when the checkpoint patches by entropy; meta: Meta's hub layout (ByteLatentTransformer.from_pretrained), entropy model in entropy_model/.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Folder to write (local or s3://); files in it are overwritten.")],
    store: StoreOpt = None,
) -> None:
    """Write a registered BLT checkpoint as a folder transformers or Meta's code loads (safetensors)."""
    from blt_model.blt_registry import EXPORT_FORMATS, export_blt
    from blt_model.distributed import TrainingError

    if fmt not in EXPORT_FORMATS:
        fail(f"--format must be one of {', '.join(EXPORT_FORMATS)}, not {fmt!r}")
    try:
        files = export_blt(open_registry(store), model, fmt, out)
    except (TrainingError, *EXPECTED_ERRORS) as e:
        fail(str(e))
    typer.echo(f"{model} -> {out} ({fmt}): {', '.join(files)}")


@app.command()
def version() -> None:
    """Print the package version."""
    from blt_data.registry import code_version

    typer.echo(code_version())


def main() -> None:
    app()


if __name__ == "__main__":
    main()
