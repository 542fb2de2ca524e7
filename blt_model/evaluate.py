"""Bits per byte of a BLT over what a reader yields: the trainer's validation, and a registered
checkpoint on a patches dataset (`blt-train eval`). Bits per byte are always summed the same way,
nats and target counts over batches and ranks, then `bits_per_byte` (`blt.byte_loss`)."""

from __future__ import annotations

import torch

from blt_data.reader import Batch, Reader, ReaderConfig, empty_batch
from blt_data.registry import Registry, RegistryError
from blt_model.blt import bits_per_byte, byte_loss
from blt_model.blt_registry import load_trained_blt
from blt_model.distributed import Distributed


def forward_loss(model, batch: Batch, env: Distributed, autocast: bool) -> tuple[torch.Tensor, float, int]:
    tokens, targets = batch["tokens"].to(env.device), batch["targets"].to(env.device)
    with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(tokens, batch["patch_lengths"].to(env.device), batch["doc_ids"].to(env.device))
    loss, nats, count = byte_loss(logits, targets)
    return loss, float(nats), int(count)


def next_batch(batches, env: Distributed) -> tuple[Batch | None, dict | None, bool]:
    """(batch, state, any rank has data). Ranks must run the same number of forwards (FSDP
    gathers weights collectively), so a rank whose finite pass has ended gets an all-pad batch
    while others still have data, and everyone stops together when all are done."""
    try:
        batch, state = next(batches)
    except StopIteration:
        batch, state = None, None
    ranks_with_data = env.all_sum([0.0 if batch is None else 1.0])[0]
    return batch, state, ranks_with_data > 0


@torch.no_grad()
def reader_bpb(model, reader: Reader, env: Distributed, autocast: bool, max_batches: int | None) -> tuple[float | None, int]:
    """(bits per byte, targets counted) over what `reader` yields (at most `max_batches` batches
    per rank), summed over ranks; bits per byte is None when there are no targets."""
    batches = iter(reader)
    was_training = model.training
    model.eval()
    nats = count = 0.0
    done = 0
    while max_batches is None or done < max_batches:
        batch, _, any_left = next_batch(batches, env)
        if not any_left:
            break
        _, n, c = forward_loss(model, batch or empty_batch(reader.cfg.batch_size, reader.cfg.seq_len), env, autocast)
        nats, count, done = nats + n, count + c, done + 1
    close_batches(batches)
    nats, count = env.all_sum([nats, count])
    model.train(was_training)
    return (bits_per_byte(nats, count) if count else None), int(count)


def close_batches(batches) -> None:
    close = getattr(batches, "close", None)
    if close is not None:
        close()


@torch.no_grad()
def evaluate_checkpoint(
    registry: Registry, model_ref: str, data_ref: str | None = None, split: str = "val", max_batches: int | None = None
) -> dict:
    """One process, one pass over `split`, rows packed as in training (the trained seq_len)."""
    model, manifest = load_trained_blt(registry, model_ref)
    if "config" in manifest.params:
        trained = ReaderConfig.model_validate(manifest.params["config"]["data"])
        data = data_ref or manifest.parents[0]
    elif data_ref is None:
        raise RegistryError(f"{manifest.ref} was imported, not trained on a dataset here: name one with --data")
    else:  # an imported checkpoint: rows of the reader's default length
        trained, data = ReaderConfig(dataset=data_ref), data_ref
    cfg = trained.model_copy(update={"dataset": data, "split": split, "epochs": 1})
    env = Distributed(0, 1, torch.device("cpu"))
    reader = Reader(cfg, registry, 0, 1)
    bpb, count = reader_bpb(model, reader, env, autocast=False, max_batches=max_batches)
    return {
        "model": manifest.ref, "data": registry.resolve(data, kind="patches").ref, "split": split,
        "bpb": float("nan") if bpb is None else bpb, "bytes": count,
    }
