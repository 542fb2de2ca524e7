"""AdamW with linear warmup and cosine decay, shared by the entropy-model and BLT trainers."""

from __future__ import annotations

import math

import torch


def cosine_lr(step: int, *, lr: float, warmup_steps: int, steps: int, min_lr_ratio: float) -> float:
    """Learning rate of update `step` (0-based): linear warmup, then cosine to lr * min_lr_ratio."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * cosine)


def adamw(
    model: torch.nn.Module, *, lr: float, betas: tuple[float, float], weight_decay: float
) -> torch.optim.AdamW:
    """Matrices and embeddings decay; norm weights (1-D) do not."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # fused: one kernel for all parameters; on CPU the per-tensor ops of small models cost more
    # than their maths. (Sharded DTensor parameters take the same path.)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
