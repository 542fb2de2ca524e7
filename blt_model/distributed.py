"""Where a training process runs: rank, world size and device, read once from torchrun's
environment (STYLE.md §5: nothing else reads RANK or WORLD_SIZE).

Several processes: NCCL on CUDA, gloo on CPU; one process: no process group at all, so the
same code runs as a plain script, under `torchrun --nproc-per-node N`, or on several nodes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


class TrainingError(RuntimeError):
    """A run that cannot start or continue (unreadable checkpoint, no documents, ...)."""


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        """Sums over ranks (float64), for counters such as loss sums and byte counts."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank (small JSON-able objects only)."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def init_distributed(device: str) -> Distributed:
    """The one place that reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK)."""
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise TrainingError("device=cuda but no CUDA device is available")
    torch_device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(torch_device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Distributed(rank, world_size, torch_device)
