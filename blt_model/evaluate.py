"""Bits per byte of a registered BLT checkpoint on a patches dataset (`blt-train eval`)."""

from __future__ import annotations

import math

import torch

from blt_data.reader import Reader, ReaderConfig
from blt_data.registry import Registry
from blt_model.blt import byte_loss
from blt_model.train import load_trained_blt


@torch.no_grad()
def evaluate_checkpoint(
    registry: Registry, model_ref: str, data_ref: str | None = None, split: str = "val", max_batches: int | None = None
) -> dict:
    """One process, one pass over `split`, rows packed as in training (the trained seq_len)."""
    model, manifest = load_trained_blt(registry, model_ref)
    trained = ReaderConfig.model_validate(manifest.params["config"]["data"])
    data = data_ref or manifest.parents[0]
    cfg = trained.model_copy(update={"dataset": data, "split": split, "epochs": 1})
    batches = iter(Reader(cfg, registry, 0, 1))
    nats = count = 0.0
    for i, (batch, _) in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        logits = model(batch["tokens"], batch["patch_lengths"], batch["doc_ids"])
        _, n, c = byte_loss(logits, batch["targets"])
        nats, count = nats + float(n), count + int(c)
    close = getattr(batches, "close", None)
    if close is not None:
        close()
    return {
        "model": manifest.ref, "data": registry.resolve(data, kind="patches").ref, "split": split,
        "bpb": nats / count / math.log(2) if count else float("nan"), "bytes": int(count),
    }
