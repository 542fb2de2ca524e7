"""``blt-data demo``: the whole pipeline on the embedded defaults, and its summary table."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from cli.common import EXPECTED_ERRORS, ConfigOpt, JsonOpt, QuietOpt, StoreOpt, fail, job_config, new_app, open_registry, overrides_arg

app = new_app("The whole pipeline in a few minutes.")


@app.command()
def demo(
    overrides: Annotated[Optional[list[str]], overrides_arg("limit=200 'train=[steps=20]'")] = None,
    config: ConfigOpt = None,
    store: StoreOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """The whole pipeline on the embedded defaults, in a few minutes on a CPU: the stdlib corpus →
    shuffle → patch with the shipped entropy model on local Ray → train a small BLT → bits per
    byte → a summary and an inspect page. A second run reuses everything already made."""
    from blt_model.distributed import TrainingError
    from pipelines.demo import DemoConfig, run_demo
    from pipelines.patch_job import PatchJobError

    try:
        cfg = job_config(DemoConfig, config, {}, overrides)
        reg = open_registry(store, create=True)
        result = run_demo(reg, cfg, progress=not quiet)
    except (PatchJobError, TrainingError, *EXPECTED_ERRORS) as e:
        fail(str(e))
    if as_json:
        typer.echo(json.dumps([{"step": s.name, "ref": s.manifest.ref, "reused": s.reused, "seconds": s.seconds}
                               for s in result.steps] + [{"inspect_page": str(result.inspect_page)}], indent=2))
        return
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
