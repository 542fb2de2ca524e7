"""Training the entropy model (BLT paper §2.3): next-byte cross-entropy on a documents dataset.

Data: the `train` split in manifest order (shuffled datasets are shuffled already) is one
stream of documents; document j contributes inputs BOS, b_0 .. b_{n-2} and targets b_0 ..
b_{n-1}, the scorer's convention (`blt_data.entropy.document_tokens`), so the training loss is
the scorer's cross-entropy. The stream is cut into rows of `row_len` tokens with per-token
document ids and positions; attention never crosses documents, and a document that crosses a
row edge continues in the next row. The stream cycles over epochs; nothing is padded.
Not `blt_data.packing`'s packer: its BLT framing (BOS, bytes, EOS; patch lengths; no positions)
would change the loss, which must stay the scorer's (no EOS, positions per document).

Several processes (torchrun, DDP): every rank packs the same global row stream and trains rows
rank*batch_rows ... of each global batch, so the data position is one global cursor
(epoch, document, token offset), and no document is repeated or skipped whatever the world size.

Resume: the job id hashes the documents manifest and the config's result fields. Every
`checkpoint_every` steps and at every stop, all ranks save a checkpoint as the BLT trainer does
(`blt_model.checkpoint`: DCP model and optimizer, then `train_state.json` with the step, data
cursor, RNG and validation history), under `models/<name>/_jobs/<job-id>/checkpoints/step-N/`;
a run with the same job id resumes from the latest (or from the folder `resume` names; "none"
starts over), as the BLT trainer does. A step's batch is a pure function of the cursor and its
learning rate of the step, so on CPU a resumed run ends with the same weights, bit for bit, as an
uninterrupted one. A job folder of an earlier version holds one `checkpoint.pt`
instead: that job starts again from step 0, with a warning. The file is not read, so there is
one checkpoint format to keep, not two (only a job interrupted under that version loses its
progress); it stays until `registry gc` removes it with the job's other leftovers.

Invariant: the model becomes visible only when its manifest is committed, last (see
`blt_model.entropy_registry`).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from tqdm import tqdm

from blt_data.documents import iter_lines
from blt_data.entropy import document_tokens
from blt_data.jobs import EXECUTION, output_fields
from blt_data.registry import Manifest, Registry, RegistryError, job_hash
from blt_data.tokens import BYTE_OFFSET, IGNORE_INDEX
from blt_model.blt import bits_per_byte, byte_loss
from blt_model.checkpoint import load_checkpoint, restore_rng, resume_folder, save_checkpoint
from blt_model.configs import build_config, preset_file
from blt_model.distributed import Distributed, TrainingError, init_distributed
from blt_model.entropy_model import EntropyModel, EntropyModelConfig
from blt_model.entropy_registry import register_entropy_model
from blt_model.optim import OptimFields
from blt_model.run import RunFields

log = logging.getLogger(__name__)

PRESET_DIR = Path(__file__).resolve().parent / "presets" / "entropy"  # package data: works installed
LEGACY_CHECKPOINT = "checkpoint.pt"  # an earlier version's single-file checkpoint (not read)


class TrainEntropyConfig(OptimFields, RunFields):
    """Fields marked EXECUTION change how a run executes, not the weights it ends with: they stay
    out of the job id."""

    model_config = ConfigDict(extra="forbid")

    model: EntropyModelConfig = Field(default_factory=EntropyModelConfig, description="model shape")
    batch_rows: int = Field(8, gt=0, description="rows per step on each rank")
    row_len: int = Field(2048, ge=2, description="tokens per training row")
    # Cadences on by default here (RunFields: off): an entropy model trains for many cheap steps.
    eval_every: int = Field(200, ge=0, description="steps between validations; 0 = at the end only", json_schema_extra=EXECUTION)
    eval_bytes: int = Field(1_000_000, gt=0, description="val bytes per evaluation (first of the split)")
    holdout_docs: int = Field(200, gt=0, description="train docs held out as val when there is no val split")
    checkpoint_every: int = Field(200, ge=0, description="steps between checkpoints; 0 = at stops only", json_schema_extra=EXECUTION)


def preset_path(name_or_path: str) -> str:
    """`--config debug` means blt_model/presets/entropy/debug.yaml; anything else is a path or URL."""
    return preset_file(PRESET_DIR, name_or_path)


def build_train_entropy_config(path: str | None, overrides: list[str]) -> TrainEntropyConfig:
    return build_config(TrainEntropyConfig, preset_path(path) if path else None, overrides)


# --- data -------------------------------------------------------------------------------------


@dataclass
class Rows:
    """(R, S) int64 arrays: inputs, targets (IGNORE_INDEX on pads), doc ids, positions."""

    tokens: np.ndarray
    targets: np.ndarray
    doc_ids: np.ndarray
    positions: np.ndarray

    def to(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        return tuple(torch.from_numpy(a).to(device) for a in (self.tokens, self.targets, self.doc_ids, self.positions))


def document_texts(registry: Registry, manifest: Manifest, split: str, start: int = 0) -> Iterator[bytes]:
    """UTF-8 texts of one split from document `start` on; parts wholly before it are not read."""
    skip = start
    for part in manifest.parts_of(split):
        if skip >= part.rows:
            skip -= part.rows
            continue
        lines = iter_lines(registry.store, registry.part_path(manifest, part))
        for line in itertools.islice(lines, skip, None):
            yield json.loads(line)["text"].encode("utf-8")
        skip = 0


def _empty_rows(num_rows: int, row_len: int) -> Rows:
    return Rows(
        tokens=np.zeros((num_rows, row_len), np.int64),
        targets=np.full((num_rows, row_len), IGNORE_INDEX, np.int64),
        doc_ids=np.full((num_rows, row_len), -1, np.int64),
        # Pads keep increasing positions so they attend among themselves, never to nothing.
        positions=np.tile(np.arange(row_len, dtype=np.int64), (num_rows, 1)),
    )


def training_rows(
    open_texts: Callable[[int], Iterator[bytes]], row_len: int, cursor: dict | None = None
) -> Iterator[tuple[Rows, dict]]:
    """Endless (1-row Rows, cursor after it). `open_texts(j)` yields the epoch's documents from
    document j on; the cursor {epoch, doc, offset} is where the next row starts."""
    cursor = dict(cursor or {"epoch": 0, "doc": 0, "offset": 0})
    epoch, doc, offset = cursor["epoch"], cursor["doc"], cursor["offset"]
    texts = open_texts(doc)
    current = None  # (inputs, targets) of document `doc`
    while True:
        row = _empty_rows(1, row_len)
        col = segment = 0
        while col < row_len:
            if current is None:
                text = next(texts, None)
                if text is None:
                    if doc == 0:
                        raise TrainingError("the training split holds no text")
                    epoch, doc, offset, texts = epoch + 1, 0, 0, open_texts(0)
                    continue
                if not text:
                    doc += 1
                    continue
                targets = np.frombuffer(text, dtype=np.uint8).astype(np.int64) + BYTE_OFFSET
                current = (document_tokens(text).astype(np.int64), targets)
            inputs, targets = current
            n = min(len(inputs) - offset, row_len - col)
            row.tokens[0, col : col + n] = inputs[offset : offset + n]
            row.targets[0, col : col + n] = targets[offset : offset + n]
            row.doc_ids[0, col : col + n] = segment
            row.positions[0, col : col + n] = np.arange(offset, offset + n)
            col, offset, segment = col + n, offset + n, segment + 1
            if offset == len(inputs):
                current, doc, offset = None, doc + 1, 0
        yield row, {"epoch": epoch, "doc": doc, "offset": offset}


def validation_rows(texts: Iterator[bytes], row_len: int, max_bytes: int) -> Rows:
    """The first `max_bytes` bytes of `texts` (whole documents, the last one cut), packed once;
    the last row's tail is padded with IGNORE_INDEX targets."""
    taken, left = [], max_bytes
    for text in texts:
        if left <= 0:
            break
        if text:
            taken.append(text[:left])
            left -= len(taken[-1])
    if not taken:
        raise TrainingError("the validation documents hold no text")
    num_tokens = sum(len(t) for t in taken)
    num_rows = -(-num_tokens // row_len)
    stream = training_rows(lambda start: iter(taken[start:]), row_len)
    rows = [row for row, _ in itertools.islice(stream, num_rows)]
    out = Rows(*(np.concatenate([getattr(r, f) for r in rows]) for f in ("tokens", "targets", "doc_ids", "positions")))
    # The stream wrapped into a second epoch to fill the last row: turn that tail into pads.
    tail = slice(num_tokens, None)
    flat = [a.reshape(-1) for a in (out.tokens, out.targets, out.doc_ids, out.positions)]
    flat[0][tail], flat[1][tail], flat[2][tail] = 0, IGNORE_INDEX, -1
    flat[3][tail] = np.arange(flat[3][tail].size)
    return out


# --- optimisation -----------------------------------------------------------------------------


def learning_rate(step: int, cfg: TrainEntropyConfig) -> float:
    return cfg.lr_at(step)


def _autocast(device: torch.device, cfg: TrainEntropyConfig):
    bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def next_byte_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, ...], reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy (nats) of the targets; pads (IGNORE_INDEX) do not count."""
    tokens, targets, doc_ids, positions = batch
    logits = model(tokens, doc_ids, positions)
    return F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction
    )


@torch.no_grad()
def evaluate_bpb(model, rows: Rows, batch_rows: int, env: Distributed, cfg: TrainEntropyConfig) -> float:
    """Bits per byte on validation rows; ranks split the rows and sum nats and target counts
    (`byte_loss`, `bits_per_byte`), as the BLT's validation does (`evaluate.reader_bpb`)."""
    was_training = model.training
    model.eval()
    nats = count = 0.0
    mine = np.arange(env.rank, len(rows.tokens), env.world_size)
    for i in range(0, len(mine), batch_rows):
        pick = mine[i : i + batch_rows]
        part = Rows(rows.tokens[pick], rows.targets[pick], rows.doc_ids[pick], rows.positions[pick])
        tokens, targets, doc_ids, positions = part.to(env.device)
        with _autocast(env.device, cfg):
            logits = model(tokens, doc_ids, positions)
        _, n, c = byte_loss(logits, targets)
        nats, count = nats + float(n), count + int(c)
    nats, count = env.all_sum([nats, count])
    model.train(was_training)
    return bits_per_byte(nats, count)


# --- the run ----------------------------------------------------------------------------------


@dataclass
class TrainEntropyResult:
    job_id: str
    step: int
    finished: bool
    val_bpb: float | None
    manifest: Manifest | None  # set once the model is registered
    main_process: bool = True  # False on torchrun ranks other than 0 (they report nothing)


def plan_job(registry: Registry, docs_ref: str, name: str, cfg: TrainEntropyConfig) -> tuple[Manifest, str]:
    """The documents manifest and the job id; fails early on a bad reference or kind."""
    docs = registry.resolve(docs_ref, kind="documents")
    registry.dataset_dir(name, area="models")  # checks the name
    job_id = job_hash({"step": "train-entropy", "docs": docs.id, "config": output_fields(cfg)})
    return docs, job_id


def train_entropy(
    registry: Registry,
    docs_ref: str,
    name: str,
    cfg: TrainEntropyConfig,
    progress: bool | None = None,
    resume: str | None = None,
) -> TrainEntropyResult:
    """Train (or resume, or find already registered) the entropy model `name` on `docs_ref`.
    `progress`, when given, overrides `cfg.progress`. `resume`: a checkpoint folder (relative to
    the store) to start from instead of this job's latest; "none" starts over."""
    docs, job_id = plan_job(registry, docs_ref, name, cfg)
    done = registry.find_job(name, job_id, area="models")
    if done is not None:
        return TrainEntropyResult(job_id, cfg.steps, True, done.params.get("val_bpb"), done)
    env = init_distributed(cfg.device)
    store = registry.store
    job_dir = registry.job_dir(name, job_id, area="models")

    # Validation: the val split, else a deterministic holdout from the head of train.
    train_start = 0
    if docs.parts_of("val"):
        val_texts = document_texts(registry, docs, "val")
        val_source = "val split"
    else:
        train_docs = sum(p.rows for p in docs.parts_of("train"))
        train_start = min(cfg.holdout_docs, max(1, train_docs // 10))
        val_texts = itertools.islice(document_texts(registry, docs, "train"), train_start)
        val_source = f"first {train_start} train documents (held out of training; no val split)"
        if env.is_main:
            log.warning("%s has no val split: validating on the %s", docs.ref, val_source)
    val_rows = validation_rows(val_texts, cfg.row_len, cfg.eval_bytes)

    torch.manual_seed(cfg.seed)
    model = EntropyModel(cfg.model).to(env.device)
    optimizer = cfg.optimizer(model)
    step, cursor, history = 0, None, []
    folder = resume_folder(store, job_dir, resume)
    if folder is not None:
        state = load_checkpoint(store, folder, model, optimizer, job_id)
        step, cursor, history = state["step"], state["cursor"], state["history"]
        if not restore_rng(state, env) and env.is_main:
            log.warning("resuming a %d-process run on %d: same data, different batches per rank", state["world_size"], env.world_size)
        if env.is_main:
            log.info("resumed %s from %s (step %d)", name, store.uri(folder), step)
    elif resume is None and env.is_main and store.exists(f"{job_dir}/{LEGACY_CHECKPOINT}"):
        log.warning("%s is an earlier version's checkpoint, which this version does not read: the job "
                    "starts again from step 0", store.uri(f"{job_dir}/{LEGACY_CHECKPOINT}"))
    train_model = model
    if env.world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(model)
    model.train()

    rows = training_rows(
        lambda start: document_texts(registry, docs, "train", train_start + start), cfg.row_len, cursor
    )
    global_rows = cfg.batch_rows * env.world_size
    mine = slice(env.rank * cfg.batch_rows, (env.rank + 1) * cfg.batch_rows)
    stop_at = cfg.steps if cfg.max_steps_this_run is None else min(cfg.steps, step + cfg.max_steps_this_run)

    def checkpoint() -> None:
        save_checkpoint(store, job_dir, step, model, optimizer,
                        {"job_id": job_id, "cursor": cursor, "history": history, "data": docs.id}, env)

    bar = tqdm(total=cfg.steps, initial=step, desc=f"train-entropy {name}", unit="step",
               disable=not ((cfg.progress if progress is None else progress) and env.is_main), dynamic_ncols=True)
    val_bpb = history[-1]["val_bpb"] if history else None
    timer, timed_bytes = time.perf_counter(), 0
    while step < stop_at:
        taken = list(itertools.islice(rows, global_rows))
        cursor = taken[-1][1]
        batch_rows = taken[mine]
        batch = Rows(*(np.concatenate([getattr(r, f) for r, _ in batch_rows]) for f in ("tokens", "targets", "doc_ids", "positions")))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        with _autocast(env.device, cfg):
            loss = next_byte_loss(train_model, batch.to(env.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        step += 1
        timed_bytes += global_rows * cfg.row_len
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            val_bpb = evaluate_bpb(model, val_rows, cfg.batch_rows, env, cfg)
            history.append({"step": step, "val_bpb": val_bpb})
        if step % cfg.log_every == 0 or step == stop_at:
            elapsed = time.perf_counter() - timer
            postfix = {"loss": f"{loss.item():.3f}", "bpb": f"{loss.item() / math.log(2):.3f}",
                       "KB/s": f"{timed_bytes / elapsed / 1e3:.1f}"}
            if val_bpb is not None:
                postfix["val_bpb"] = f"{val_bpb:.3f}"
            bar.set_postfix(postfix, refresh=False)
            bar.update(step - bar.n)
            timer, timed_bytes = time.perf_counter(), 0
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < stop_at:
            checkpoint()
    bar.close()
    rows.close()

    if step < cfg.steps:
        checkpoint()
        return TrainEntropyResult(job_id, step, False, val_bpb, None, env.is_main)

    val_bpb = evaluate_bpb(model, val_rows, cfg.batch_rows, env, cfg)
    history.append({"step": step, "val_bpb": val_bpb})
    checkpoint()  # a crash during registration must not lose the training
    manifest = None
    if env.is_main:
        params = {
            "config": output_fields(cfg),
            "val_bpb": val_bpb,
            "val_source": val_source,
            "val_history": history,
            "docs": docs.id,
            "world_size": env.world_size,
            "train_tokens": cfg.steps * global_rows * cfg.row_len,
            "final_cursor": cursor,
        }
        manifest = register_entropy_model(registry, model.cpu(), name, job_id, [docs.ref], params)
    env.barrier()
    if manifest is None:
        manifest = registry.find_job(name, job_id, area="models")
    if manifest is None:
        raise RegistryError(f"training of {name} finished but its manifest is not in the registry")
    return TrainEntropyResult(job_id, step, True, val_bpb, manifest, env.is_main)
