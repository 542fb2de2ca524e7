"""Job configs: which fields decide a step's output, and so its job id (DESIGN.md §5).

A job id (``registry.job_hash``) hashes a step's resolved inputs and the fields of its config
that decide what it writes. Fields that only decide *how* it runs (workers, device, batch sizes,
cadences, progress bars) carry the ``EXECUTION`` marker, and ``output_fields`` leaves them out,
at any depth of nested configs::

    workers: int = Field(2, ge=1, description="scoring actors", json_schema_extra=EXECUTION)

Invariant: two runs whose configs differ only in execution fields have the same job id, so one
finishes what the other started (a patch job started on a laptop and finished on a GPU cluster,
a training run resumed with another checkpoint cadence). The marker also shows in each config's
JSON schema (``"execution": true``).
"""

from __future__ import annotations

from typing import Any, Iterable

from pydantic import BaseModel
from pydantic.fields import FieldInfo

EXECUTION: dict[str, Any] = {"execution": True}


def is_execution(field: FieldInfo) -> bool:
    extra = field.json_schema_extra
    return isinstance(extra, dict) and extra.get("execution") is True


def _execution_exclude(config: BaseModel) -> dict[str, Any]:
    """pydantic's nested ``exclude`` for every execution field of ``config`` and its sub-configs."""
    out: dict[str, Any] = {}
    for name, field in type(config).model_fields.items():
        if is_execution(field):
            out[name] = True
        elif isinstance(value := getattr(config, name), BaseModel) and (inner := _execution_exclude(value)):
            out[name] = inner
    return out


def output_fields(config: BaseModel, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The config as JSON without its execution fields, nor the top-level fields in ``exclude``
    (those a job hashes in another form, e.g. an input reference resolved to its manifest id)."""
    return config.model_dump(mode="json", exclude=_execution_exclude(config) | {k: True for k in exclude})
