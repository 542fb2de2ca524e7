"""AdamW with linear warmup and cosine decay, shared by the entropy-model and BLT trainers."""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator


class OptimFields(BaseModel):
    """The optimisation fields both trainers' configs share (flat, so `lr=3e-3` overrides)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(1000, gt=0, description="optimizer steps in total")
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    warmup_steps: int = Field(100, ge=0, description="linear warmup from 0 to lr")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decays lr to lr * this")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decay of matrices (not norms)")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2")
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm; 0 = no clipping")

    @model_validator(mode="after")
    def _warmup_within_steps(self):
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps {self.warmup_steps} exceeds steps {self.steps}")
        return self

    def lr_at(self, step: int) -> float:
        return cosine_lr(step, lr=self.lr, warmup_steps=self.warmup_steps, steps=self.steps, min_lr_ratio=self.min_lr_ratio)

    def optimizer(self, model: torch.nn.Module) -> torch.optim.AdamW:
        return adamw(model, lr=self.lr, betas=(self.beta1, self.beta2), weight_decay=self.weight_decay)


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
