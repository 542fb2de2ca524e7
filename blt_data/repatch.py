"""``blt-data repatch``: a new patches dataset from a patches dataset's stored entropies, with
another entropy rule (threshold, target patch size, scheme, max patch length). No model, no Ray.

Part k of the parent becomes part k of the child: same rows in the same order, same ``text``
and ``entropies``, new ``patch_lengths``. As the patch job applies its rule to the float16
entropies it stores, repatching a dataset with threshold θ gives exactly the patch lengths of
patching the documents again with the same model and θ.

Resumable like the patch job: part k is written, then its completion record
``_jobs/<job-id>/_done/unit-<k>.json`` (compacted by blocks as the patch job's are,
``patch_units.Completion``); the manifest is committed last. A target patch size is
calibrated once per job on whole documents drawn over every parent part, as the patch job draws
them (``calibrate.sample_rows``; ``calibration.json`` in the job folder).

TODO(repatch-parallel): parts are independent; a process pool would use every core.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm import tqdm

from blt_data.calibrate import CalibrationSample, calibrated, sample_rows
from blt_data.jobs import output_fields
from blt_data.patch_units import Completion, UnitRecord, UnitSpec, commit_patches, record_path
from blt_data.patches import PatchesPartWriter, build_table, has_entropies, has_eos_entropy, part_name, patches_schema, read_part
from blt_data.patching import ENTROPY_SCHEMES, PatchRule, patch_lengths_arrow
from blt_data.registry import Manifest, Registry, check_name, job_hash
from blt_data.stats import DatasetStats

log = logging.getLogger(__name__)


class RepatchError(ValueError):
    """The parent cannot be repatched (not a patches dataset, or no stored entropies)."""


class RepatchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    patches: str = Field(description="parent patches dataset: NAME or NAME@vN")
    name: str = Field(description="name of the patches dataset to create")
    rule: PatchRule = Field(default_factory=PatchRule, description="an entropy scheme, with a threshold or a target patch size")

    @model_validator(mode="after")
    def _one_rule(self) -> "RepatchConfig":
        check_name(self.name)
        if self.rule.scheme not in ENTROPY_SCHEMES:
            raise ValueError(f"repatch applies an entropy scheme ({' or '.join(ENTROPY_SCHEMES)}), not {self.rule.scheme!r}")
        self.rule.require_threshold_or_target()
        return self


def _sample_entropies(registry: Registry, parent: Manifest, rule: PatchRule, num: int | None) -> CalibrationSample:
    """Stored entropies of the first ``num`` documents ``sample_rows`` draws over every parent part
    (the patch job's draw, over parts instead of units); reads only the parts that hold one."""
    rows = [p.rows for p in parent.parts]
    picks = sample_rows(rows, parent.stats.bytes, rule.calibration_bytes, rule.calibration_seed, num)
    chosen = range(len(parent.parts)) if picks is None else sorted(picks)
    entropies = []
    for index in chosen:
        column = read_part(registry.store, registry.part_path(parent, parent.parts[index]), ["entropies"]).column(0)
        if picks is not None:
            column = column.take(picks[index])
        entropies.extend(e for e in column.to_numpy(zero_copy_only=False) if len(e))
    population = len(entropies) if picks is None else sum(p.rows for p in parent.parts)
    return CalibrationSample(entropies, population)


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
    # patch_size is left out: entropy schemes never use it (and job ids stay what they were).
    job_id = job_hash({"step": "repatch", "input": parent.id, **output_fields(cfg.rule, exclude={"patch_size"})})
    existing = registry.find_job(cfg.name, job_id)
    if existing is not None:
        return existing
    spec = UnitSpec(
        input_dir=registry.dataset_dir(parent.name), output_dir=registry.dataset_dir(cfg.name), name=cfg.name,
        job_id=job_id, patch=cfg.rule, keep_entropies=True, keep_eos_entropy=has_eos_entropy(parent),
    )
    rule, calibration = calibrated(registry.store, spec.job_dir, cfg.rule, lambda num: _sample_entropies(registry, parent, cfg.rule, num))
    spec.patch = rule
    done = Completion.load(registry.store, spec.job_dir, len(parent.parts))
    todo = [(i, p) for i, p in enumerate(parent.parts) if i not in done]
    with tqdm(total=len(parent.parts), initial=len(parent.parts) - len(todo), unit="part", desc=f"repatch {cfg.name}", disable=not progress) as bar:
        for index, part in todo:
            done.add(_repatch_part(registry, parent, index, part, spec))
            bar.update()
    params = {
        "input": parent.ref, "input_id": parent.id, "repatched_from": parent.ref,
        "model": parent.params.get("model"), "scoring": parent.params.get("scoring"),
    }
    return commit_patches(registry, spec, done, cfg.rule, calibration, [parent.ref], params)


def _repatch_part(registry: Registry, parent: Manifest, index: int, part, spec: UnitSpec) -> UnitRecord:
    """Row group by row group: read, patch, and hand to the part writer, which encodes on a
    worker thread while the next row group is read and patched."""
    eos = spec.keep_eos_entropy  # carried over: a repatch keeps everything but patch_lengths
    columns = ["id", "text", "entropies"] + (["eos_entropy"] if eos else [])
    writer = PatchesPartWriter(
        registry.store, f"{spec.job_dir}/{part_name(index)}", f"_jobs/{spec.job_id}/{part_name(index)}",
        patches_schema(True, eos), dataset=spec.name, job_id=spec.job_id, split=part.split, background=True,
    )
    all_patch_lengths, all_entropies = [], []
    with registry.store.open_input(registry.part_path(parent, part)) as f:
        pf = pq.ParquetFile(f)
        for group in range(pf.num_row_groups):
            table = pf.read_row_group(group, columns=columns)
            text = table.column("text").combine_chunks()
            entropies = table.column("entropies").combine_chunks()
            patch_lengths = patch_lengths_arrow(text, entropies, spec.patch)
            writer.write(build_table(table.column("id"), text, patch_lengths, entropies,
                                     table.column("eos_entropy").combine_chunks() if eos else None))
            all_patch_lengths.append(patch_lengths)
            all_entropies.append(entropies.flatten().to_numpy(zero_copy_only=False))
    info = writer.close()
    patch_lengths = pa.chunked_array(all_patch_lengths, pa.list_(pa.int32())).combine_chunks()
    flat = np.concatenate(all_entropies) if all_entropies else np.zeros(0, np.float16)
    record = UnitRecord(unit=index, part=info, stats=DatasetStats.of(patch_lengths, flat))  # one sum per part, as before
    registry.store.write_bytes(record_path(spec, index), record.model_dump_json().encode())
    return record
