"""Bits per byte of a registered BLT checkpoint on a patches dataset (`blt-train eval`)."""

from __future__ import annotations

import torch

from blt_data.reader import Reader, ReaderConfig
from blt_data.registry import Registry, RegistryError
from blt_model.distributed import Distributed
from blt_model.train import load_trained_blt, reader_bpb


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
