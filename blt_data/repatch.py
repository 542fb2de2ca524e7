"""``blt-data repatch``: a new patches dataset from a patches dataset's stored entropies, with
another entropy rule (threshold, target patch size, scheme, max patch length). No model, no Ray.

Part k of the parent becomes part k of the child: same rows in the same order, same ``text``
and ``entropies``, new ``patch_lengths``. As the patch job applies its rule to the float16
entropies it stores, repatching a dataset with threshold θ gives exactly the patch lengths of
patching the documents again with the same model and θ.

Resumable like the patch job: part k is written, then its completion record
``_jobs/<job-id>/_done/unit-<k>.json``; the manifest is committed last. A target patch size is
calibrated once per job on the head of every parent part (``calibration.json`` in the job folder).

TODO(repatch-parallel): parts are independent; a process pool would use every core.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Literal

import numpy as np
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm import tqdm

from blt_data.calibrate import Calibration, calibrate_threshold
from blt_data.patch_units import UnitRecord, UnitSpec, load_records, record_path
from blt_data.patches import (
    arrow_schema_summary, build_table, has_entropies, part_name, read_part, write_part,
)
from blt_data.patching import PatchConfig, patch_lengths_arrow
from blt_data.registry import Manifest, Registry, check_name, job_hash
from blt_data.stats import DatasetStats

log = logging.getLogger(__name__)


class RepatchError(ValueError):
    """The parent cannot be repatched (not a patches dataset, or no stored entropies)."""


class RepatchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    patches: str = Field(description="parent patches dataset: NAME or NAME@vN")
    name: str = Field(description="name of the patches dataset to create")
    scheme: Literal["entropy", "monotonic"] = "entropy"
    threshold: float | None = Field(None, allow_inf_nan=False, description="nats")
    target_patch_size: float | None = Field(None, gt=0, description="bytes per patch: calibrate the threshold")
    max_patch_length: int | None = Field(None, ge=1)
    calibration_bytes: int = Field(10**6, ge=1024, description="sample size for target_patch_size")

    @model_validator(mode="after")
    def _one_rule(self) -> "RepatchConfig":
        check_name(self.name)
        if (self.threshold is None) == (self.target_patch_size is None):
            raise ValueError("repatch needs exactly one of threshold and target_patch_size")
        return self


def _sample_entropies(registry: Registry, parent: Manifest, sample_bytes: int) -> list[np.ndarray]:
    """The head of every parent part, an equal share of ``sample_bytes`` each."""
    share = max(1, sample_bytes // max(1, len(parent.parts)))
    sample = []
    for part in parent.parts:
        left = share
        with registry.store.open_input(registry.part_path(parent, part)) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=64, columns=["entropies"]):
                for e in batch.column(0).to_numpy(zero_copy_only=False):
                    if left <= 0:
                        break
                    if len(e):
                        sample.append(np.asarray(e)[:left])
                        left -= len(e)
                if left <= 0:
                    break
    return sample


def repatch(registry: Registry, cfg: RepatchConfig, progress: bool = False) -> Manifest:
    """Run (or resume, or reuse) a repatch; returns the committed manifest."""
    parent = registry.resolve(cfg.patches)
    if parent.kind != "patches":
        raise RepatchError(f"{parent.ref} is a {parent.kind} dataset; repatch takes a patches dataset (make one with blt-data patch)")
    if not has_entropies(parent):
        raise RepatchError(
            f"{parent.ref} has no stored entropies (patched with --no-entropies or without a model); "
            "repatch needs them: run blt-data patch again with entropies on"
        )
    job_id = job_hash({"step": "repatch", "input": parent.id, **cfg.model_dump(exclude={"patches", "name"})})
    existing = registry.find_job(cfg.name, job_id)
    if existing is not None:
        return existing
    spec = UnitSpec(
        input_dir=registry.dataset_dir(parent.name), output_dir=registry.dataset_dir(cfg.name), name=cfg.name,
        job_id=job_id, patch=PatchConfig(scheme=cfg.scheme, threshold=cfg.threshold, max_patch_length=cfg.max_patch_length),
        keep_entropies=True,
    )
    calibration = None
    if cfg.target_patch_size is not None:
        calibration = _calibration(registry, parent, cfg, spec)
        spec.patch = spec.patch.model_copy(update={"threshold": calibration.threshold})
    records = load_records(registry.store, spec)
    todo = [(i, p) for i, p in enumerate(parent.parts) if i not in records]
    with tqdm(total=len(parent.parts), initial=len(parent.parts) - len(todo), unit="part", desc=f"repatch {cfg.name}", disable=not progress) as bar:
        for index, part in todo:
            records[index] = _repatch_part(registry, parent, index, part, spec)
            bar.update()
    return _commit(registry, parent, cfg, spec, [records[i] for i in range(len(parent.parts))], calibration)


def _calibration(registry: Registry, parent: Manifest, cfg: RepatchConfig, spec: UnitSpec) -> Calibration:
    rel = f"{spec.job_dir}/calibration.json"
    if not registry.store.exists(rel):
        sample = _sample_entropies(registry, parent, cfg.calibration_bytes)
        calibration = calibrate_threshold(sample, cfg.target_patch_size, scheme=cfg.scheme, max_patch_length=cfg.max_patch_length)
        registry.store.put_if_absent(rel, calibration.model_dump_json(indent=2).encode())
    return Calibration.model_validate_json(registry.store.read_bytes(rel))


def _repatch_part(registry: Registry, parent: Manifest, index: int, part, spec: UnitSpec) -> UnitRecord:
    table = read_part(registry.store, registry.part_path(parent, part), ["id", "text", "entropies"])
    text = table.column("text").combine_chunks()
    entropies = table.column("entropies").combine_chunks()
    patch_lengths = patch_lengths_arrow(text, entropies, spec.patch)
    out = build_table(table.column("id").to_pylist(), text, patch_lengths, entropies)
    info = write_part(
        registry.store, f"{spec.job_dir}/{part_name(index)}", f"_jobs/{spec.job_id}/{part_name(index)}",
        out, dataset=spec.name, job_id=spec.job_id, split=part.split,
    )
    record = UnitRecord(unit=index, part=info, stats=DatasetStats.of(patch_lengths, entropies.values.to_numpy(zero_copy_only=False)))
    registry.store.write_bytes(record_path(spec, index), record.model_dump_json().encode())
    return record


def _commit(registry: Registry, parent: Manifest, cfg: RepatchConfig, spec: UnitSpec, ordered: list[UnitRecord], calibration: Calibration | None) -> Manifest:
    stats = sum((r.stats for r in ordered), DatasetStats())
    splits = Counter()
    for r in ordered:
        splits[r.part.split] += r.part.rows
    params = {
        "input": parent.ref,
        "input_id": parent.id,
        "repatched_from": parent.ref,
        "model": parent.params.get("model"),
        "scoring": parent.params.get("scoring"),
        "scheme": cfg.scheme,
        "threshold": spec.patch.threshold,
        "target_patch_size": cfg.target_patch_size,
        "calibration": calibration.model_dump() if calibration else None,
        "max_patch_length": cfg.max_patch_length,
        "entropies": True,
    }
    manifest = Manifest(
        name=cfg.name, kind="patches", job_id=spec.job_id, parents=[parent.ref], params=params,
        arrow_schema=arrow_schema_summary(True), parts=[r.part for r in ordered],
        stats=stats.model_copy(update={"splits": dict(sorted(splits.items()))}),
    )
    return registry.commit(manifest)
