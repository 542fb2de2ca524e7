"""The run fields both trainers' configs share (BLT: `train.py`, entropy model: `train_entropy.py`).

Same names, defaults and markers in both, so a cadence or a device means the same thing to each.
Fields marked EXECUTION change how a run executes, not the weights it ends with: `output_fields`
leaves them out of the job id, so the same job resumes on another machine or cadence.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from blt_data.jobs import EXECUTION


class RunFields(BaseModel):
    """Seed, device and precision, cadences and stops (flat, so `log_every=5` overrides)."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(0, description="seeds the model initialisation")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available", json_schema_extra=EXECUTION)
    dtype: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on cuda, fp32 on cpu")
    log_every: int = Field(10, gt=0, description="steps between progress updates (and metrics lines)", json_schema_extra=EXECUTION)
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints; 0 = at stops only", json_schema_extra=EXECUTION)
    eval_every: int = Field(0, ge=0, description="steps between validations; 0 = at the end only", json_schema_extra=EXECUTION)
    max_steps_this_run: int | None = Field(None, gt=0, description="stop (with a checkpoint) after this many steps in this process", json_schema_extra=EXECUTION)
    progress: bool = Field(True, description="show a progress bar on rank 0", json_schema_extra=EXECUTION)
