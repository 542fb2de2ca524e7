"""Training the full BLT on a patches dataset (`blt-train train`), under torchrun or alone.

The sequence (lingua's, STYLE.md §5): read the torchrun environment once; build the model on
CPU from the seed and initialise it (the same weights whatever the world size); apply
checkpointing / compile / FSDP2 from outside (`parallelize.py`); resume from the latest
checkpoint of this job if there is one; then loop: batch from the reader → forward/backward
(gradient accumulation) → clip → AdamW step → metrics line; validation bits-per-byte every
`eval_every` steps; a DCP checkpoint every `checkpoint_every` steps and at the end; finally the
last checkpoint is registered as a `blt-checkpoint` model with lineage to its patches dataset.

Job identity: the job id hashes the patches manifest id and the config's *result* fields (not
world size, device, logging or checkpoint cadence), so a rerun of the same command resumes
automatically, also on another number of processes. Where things go:

    <store>/models/<name>/_jobs/<job-id>/checkpoints/step-NNNNNNNN/   DCP + train_state.json
    <dump_dir>/metrics.jsonl, <dump_dir>/config.yaml                   local, rank 0

Exact resume: a step's batches come from the reader state saved with the checkpoint (the state
of the last batch stepped on, not of what was prefetched), its learning rate from the step, and
the weights and optimizer from DCP; on CPU (fp32) a resumed run's losses equal an uninterrupted
run's bit for bit. On another world size the gathered reader states let the new ranks read
exactly the documents of the epoch that remain.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import ConfigDict, Field, model_validator
from tqdm import tqdm

from blt_data.reader import Reader, ReaderConfig, build_val_reader, empty_batch, merge_states
from blt_data.jobs import EXECUTION, output_fields
from blt_data.registry import Manifest, PartInfo, Registry, job_hash
from blt_model.blt import BLT, BLTConfig, load_blt_preset
from blt_model.blt_registry import checkpoint_config, load_blt_weights
from blt_model.checkpoint import (
    checkpoint_files,
    load_checkpoint,
    restore_rng,
    resume_folder,
    save_checkpoint,
    step_dir,
)
from blt_model.configs import build_config, preset_file
from blt_model.distributed import Distributed, TrainingError, init_distributed  # noqa: F401  (TrainingError: re-exported)
from blt_model.evaluate import close_batches, forward_loss, next_batch, reader_bpb
from blt_model.optim import OptimFields
from blt_model.parallelize import ParallelConfig, parallelize_blt
from blt_model.run import RunFields

log = logging.getLogger(__name__)

PRESET_DIR = Path(__file__).resolve().parent / "presets" / "train"
# bf16 dense peak of the accelerators we know, for MFU; elsewhere MFU is not reported.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


class TrainConfig(OptimFields, RunFields):
    """Fields marked EXECUTION change how a run executes, not the weights it ends with: they stay
    out of the job id, so the same job resumes on another machine, world size or cadence."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("blt", description="registered name of the final checkpoint (models/<name>)")
    data: ReaderConfig = Field(description="the patches dataset and how it is packed")
    # Out of the job id as well: the preset's effect is already in `model`.
    model_preset: str | None = Field(None, description="a BLT preset (debug, small, 100m) under the `model` keys", json_schema_extra=EXECUTION)
    model: BLTConfig = Field(default_factory=BLTConfig, description="BLT shape")
    init_from: str | None = Field(
        None, description="registered blt-checkpoint NAME[@vN] to start from (its weights, a fresh optimizer)"
    )
    parallel: ParallelConfig = Field(default_factory=ParallelConfig, description="compile, checkpointing, FSDP2", json_schema_extra=EXECUTION)
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    eval_batches: int = Field(20, gt=0, description="val batches per rank per validation (from the split's start)")
    dump_dir: str | None = Field(None, description="local folder for metrics.jsonl and config.yaml; default runs/<name>", json_schema_extra=EXECUTION)
    log_documents: bool = Field(False, description="write the ids of the documents each rank reads to dump_dir (audits)", json_schema_extra=EXECUTION)
    peak_tflops: float | None = Field(None, gt=0, description="accelerator peak for MFU; default: known GPUs only", json_schema_extra=EXECUTION)

    @model_validator(mode="before")
    @classmethod
    def _preset_under_model(cls, data: Any) -> Any:
        """`model_preset: small` fills `model`; keys given under `model` override it."""
        if isinstance(data, dict) and data.get("model_preset"):
            try:
                base = load_blt_preset(data["model_preset"]).model_dump()
            except (FileNotFoundError, ValueError) as e:
                raise ValueError(f"model_preset {data['model_preset']!r}: {e}") from None
            data = {**data, "model": {**base, **(data.get("model") or {})}}
        return data


def preset_path(name_or_path: str) -> str:
    """`blt-train train debug` means blt_model/presets/train/debug.yaml; else a path or URL."""
    return preset_file(PRESET_DIR, name_or_path)


def build_train_config(path: str, overrides: list[str]) -> TrainConfig:
    return build_config(TrainConfig, preset_path(path), overrides)


@dataclass
class TrainResult:
    job_id: str
    step: int
    finished: bool
    val_bpb: float | None
    manifest: Manifest | None
    run_dir: str
    main_process: bool = True


class Metrics:
    """metrics.jsonl on rank 0; a resumed run first drops lines past the step it resumes at."""

    def __init__(self, dump_dir: Path, active: bool, resume_step: int):
        self.path = dump_dir / "metrics.jsonl"
        self.active = active
        if active:
            dump_dir.mkdir(parents=True, exist_ok=True)
            kept = []
            if self.path.exists():
                kept = [l for l in self.path.read_text().splitlines() if l and json.loads(l).get("step", 0) <= resume_step]
            self.path.write_text("".join(f"{l}\n" for l in kept))

    def write(self, record: dict) -> None:
        if self.active:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def resolve_init(registry: Registry, cfg: TrainConfig) -> Manifest | None:
    """The checkpoint `init_from` names, checked to have the config's model shape."""
    if cfg.init_from is None:
        return None
    init = registry.resolve(cfg.init_from, area="models", kind="blt-checkpoint")
    have = checkpoint_config(init).model_dump()
    # init_std_factor only shapes a fresh initialisation, which init_from replaces.
    for field, want in cfg.model.model_dump().items():
        if field != "init_std_factor" and have[field] != want:
            raise TrainingError(
                f"init_from {init.ref}: model.{field} is {want!r} in the config but {have[field]!r} in the "
                f"checkpoint (set model.{field}={have[field]!r}, or a model_preset of that shape)"
            )
    return init


def job_config(cfg: TrainConfig) -> dict:
    """The config as the job id hashes it (and the manifest records it): no execution fields, and
    no `init_from`, which enters the id as the manifest it resolves to."""
    return output_fields(cfg, exclude={"init_from"})


def plan_job(registry: Registry, cfg: TrainConfig) -> tuple[Manifest, str]:
    """The patches manifest and the job id; fails early on a bad reference, kind or name."""
    data = registry.resolve(cfg.data.dataset, kind="patches")
    registry.dataset_dir(cfg.name, area="models")  # checks the name
    # init_from enters the job id as the manifest it resolves to, not as text, and only when set,
    # so the job ids of runs from scratch do not change.
    payload = {"step": "blt-train", "data": data.id, "config": job_config(cfg)}
    init = resolve_init(registry, cfg)
    if init is not None:
        payload["init_from"] = init.id
    return data, job_hash(payload)


def _bf16(env: Distributed, cfg: TrainConfig) -> bool:
    return cfg.dtype == "bf16" or (cfg.dtype == "auto" and env.device.type == "cuda")


def _peak_flops(env: Distributed, cfg: TrainConfig) -> float | None:
    if cfg.peak_tflops:
        return cfg.peak_tflops * 1e12
    if env.device.type == "cuda":
        name = torch.cuda.get_device_name(env.device)
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


def evaluate_bpb(model, registry: Registry, data: Manifest, cfg: TrainConfig, env: Distributed, max_batches: int | None) -> float | None:
    """Bits per byte over the `val` split of `data`, sharded over ranks; None without a val split."""
    if not data.parts_of("val"):
        return None
    reader = build_val_reader(cfg.data, registry, env.rank, env.world_size)
    return reader_bpb(model, reader, env, _bf16(env, cfg) and env.world_size == 1, max_batches)[0]


def build_model(cfg: TrainConfig, env: Distributed, registry: Registry | None = None, init: Manifest | None = None) -> BLT:
    """The BLT, initialised from the seed or, with `init`, from a registered checkpoint's
    weights (loaded into the plain model by every rank, before parallelizing)."""
    torch.manual_seed(cfg.seed)
    model = BLT(cfg.model)  # initialised once, by BLT.__init__ (Meta's init_weights)
    if init is not None:
        load_blt_weights(registry, init, model)
    model = model.to(env.device)
    return parallelize_blt(model, env, cfg.parallel, bf16=_bf16(env, cfg))


def train(registry: Registry, cfg: TrainConfig, resume: str | None = None) -> TrainResult:
    """Train (or resume, or find already registered) the BLT `cfg.name` on `cfg.data.dataset`.

    `resume`: a checkpoint folder (relative to the store) to start from instead of this job's
    latest; "none" starts over even when checkpoints exist.
    """
    data, job_id = plan_job(registry, cfg)
    init_from = resolve_init(registry, cfg)
    run_dir = registry.job_dir(cfg.name, job_id, area="models")
    done = registry.find_job(cfg.name, job_id, area="models")
    if done is not None:
        return TrainResult(job_id, cfg.steps, True, done.params.get("val_bpb"), done, run_dir)
    env = init_distributed(cfg.device)
    store = registry.store
    dump_dir = Path(cfg.dump_dir or f"runs/{cfg.name}")

    folder = resume_folder(store, run_dir, resume)
    # A run that resumes takes its weights from its own checkpoint, not from init_from.
    init = init_from if folder is None else None
    if env.is_main and init is not None:
        log.info("%s starts from the weights of %s", cfg.name, init.ref)
    model = build_model(cfg, env, registry, init)
    optimizer = cfg.optimizer(model)
    step, reader_state, history = 0, None, []
    if folder is not None:
        state = load_checkpoint(store, folder, model, optimizer, job_id)
        step, history = state["step"], state.get("history", [])
        same_world = restore_rng(state, env)
        reader_state = state["reader"][env.rank] if same_world else merge_states(state["reader"])
        if env.is_main:
            log.info("resumed %s from %s (step %d, %d -> %d processes)", cfg.name, store.uri(folder), step,
                     state["world_size"], env.world_size)
    if env.is_main:
        dump_dir.mkdir(parents=True, exist_ok=True)
        (dump_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    metrics = Metrics(dump_dir, env.is_main, step)
    documents_log = (dump_dir / f"documents-rank{env.rank}.txt").open("a") if cfg.log_documents else None

    reader = Reader(cfg.data, registry, env.rank, env.world_size, state=reader_state)
    reader_state = reader.start_state  # what a checkpoint saves for a rank that has no batch yet
    batches = iter(reader)
    model.train()
    autocast = _bf16(env, cfg) and env.world_size == 1  # FSDP2 casts through its policy
    peak = _peak_flops(env, cfg)
    stop_at = cfg.steps if cfg.max_steps_this_run is None else min(cfg.steps, step + cfg.max_steps_this_run)
    val_bpb = history[-1]["val_bpb"] if history else None

    def checkpoint() -> None:
        save_checkpoint(store, run_dir, step, model, optimizer, {
            "job_id": job_id, "reader": env.gather(reader_state), "history": history, "data": data.id,
        }, env)

    bar = tqdm(total=cfg.steps, initial=step, desc=f"blt-train {cfg.name}", unit="step",
               disable=not (cfg.progress and env.is_main), dynamic_ncols=True)
    timer = time.perf_counter()
    window = {"bytes": 0.0, "patches": 0.0}
    out_of_data = False
    while step < stop_at:
        lr = cfg.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        nats = count = n_bytes = n_patches = 0.0
        for micro in range(cfg.grad_accum):
            batch, state, any_left = next_batch(batches, env)
            if not any_left:
                break
            if batch is None:
                batch = empty_batch(cfg.data.batch_size, cfg.data.seq_len)
            else:
                reader_state = state
            if documents_log is not None:
                documents_log.write("".join(f"{step}\t{d}\n" for d in batch["documents"]))
            if env.world_size > 1:
                model.set_requires_gradient_sync(micro == cfg.grad_accum - 1)
            loss, n, c = forward_loss(model, batch, env, autocast)
            (loss / cfg.grad_accum).backward()
            nats, count = nats + n, count + c
            n_bytes, n_patches = n_bytes + batch["n_bytes"], n_patches + batch["n_patches"]
        if not any_left:
            # The epochs asked for are read: the run ends here, before a step without data.
            if env.is_main:
                log.info("%s: end of data (epochs=%s) at step %d of %d", data.ref, cfg.data.epochs, step, cfg.steps)
            out_of_data = True
            break
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        optimizer.step()
        step += 1
        nats, count, n_bytes, n_patches = env.all_sum([nats, count, n_bytes, n_patches])
        window["bytes"] += n_bytes
        window["patches"] += n_patches
        record = {"step": step, "loss": nats / max(count, 1), "bpb": nats / max(count, 1) / math.log(2),
                  "lr": lr, "grad_norm": float(grad_norm)}
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            val_bpb = evaluate_bpb(model, registry, data, cfg, env, cfg.eval_batches)
            history.append({"step": step, "val_bpb": val_bpb})
            record["val_bpb"] = val_bpb
        if step % cfg.log_every == 0 or step == stop_at:
            elapsed = time.perf_counter() - timer
            bytes_per_s = window["bytes"] / elapsed
            record.update(bytes_per_s=bytes_per_s, patches_per_s=window["patches"] / elapsed)
            if peak is not None and window["bytes"]:
                mean_patch = window["bytes"] / max(window["patches"], 1)
                record["mfu"] = bytes_per_s * model.flops_per_byte(mean_patch, cfg.data.seq_len) / (peak * env.world_size)
            postfix = {"loss": f"{record['loss']:.3f}", "bpb": f"{record['bpb']:.3f}", "KB/s": f"{bytes_per_s / 1e3:.1f}"}
            if val_bpb is not None:
                postfix["val_bpb"] = f"{val_bpb:.3f}"
            bar.set_postfix(postfix, refresh=False)
            bar.update(step - bar.n)
            timer, window = time.perf_counter(), {"bytes": 0.0, "patches": 0.0}
        metrics.write(record)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < stop_at:
            checkpoint()
    bar.close()
    close_batches(batches)
    if documents_log is not None:
        documents_log.close()

    if step < cfg.steps and not out_of_data:
        checkpoint()
        return TrainResult(job_id, step, False, val_bpb, None, run_dir, env.is_main)

    val_bpb = evaluate_bpb(model, registry, data, cfg, env, None)
    history.append({"step": step, "val_bpb": val_bpb})
    metrics.write({"step": step, "val_bpb": val_bpb, "final": True})
    checkpoint()
    manifest = None
    if env.is_main:
        manifest = register_checkpoint(registry, cfg, data, job_id, step, val_bpb, history, env.world_size, model,
                                       init_from)
    env.barrier()
    if manifest is None:
        manifest = registry.find_job(cfg.name, job_id, area="models")
    return TrainResult(job_id, step, True, val_bpb, manifest, run_dir, env.is_main)


def register_checkpoint(registry: Registry, cfg: TrainConfig, data: Manifest, job_id: str, step: int,
                        val_bpb: float | None, history: list, world_size: int, model,
                        init: Manifest | None = None) -> Manifest:
    """Commit the final checkpoint as kind `blt-checkpoint`: its files are the manifest's parts."""
    store = registry.store
    model_dir = registry.dataset_dir(cfg.name, area="models")
    parts = []
    for rel in checkpoint_files(store, step_dir(registry.job_dir(cfg.name, job_id, area="models"), step)):
        sha, size = store.sha256(rel)
        parts.append(PartInfo(path=rel[len(model_dir) + 1:], rows=0, bytes=size, sha256=sha, split="checkpoint"))
    params = {
        "format": "dcp",
        "config": job_config(cfg),
        "init_from": init.ref if init is not None else None,
        "data": data.id,
        "step": step,
        "val_bpb": val_bpb,
        "val_history": history,
        "world_size": world_size,
        "num_params": sum(p.numel() for p in model.parameters()),
        "model": cfg.model.model_dump(mode="json"),
        "checkpoint": f"_jobs/{job_id}/checkpoints/step-{step:08d}",
    }
    parents = [data.ref] + ([init.ref] if init is not None else [])  # the data first: generate/eval read parents[0]
    manifest = Manifest(name=cfg.name, kind="blt-checkpoint", job_id=job_id, parents=parents, params=params, parts=parts)
    return registry.commit(manifest)
