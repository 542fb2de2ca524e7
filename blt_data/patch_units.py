"""Units of work of the patch step (DESIGN.md §6): plan them, read one, patch one.

A *unit* is a run of consecutive lines of one documents part, of at most ``unit_bytes`` bytes of
JSON lines (a single longer document makes a unit of its own). Units are numbered in manifest
order, part by part, so the plan is a pure function of the input manifest and ``unit_bytes``.

Doing unit k (``patch_unit``) writes, in this order:

    <output>/_jobs/<job-id>/part-<k:06d>.parquet          the patched documents (one Parquet part)
    <output>/_jobs/<job-id>/_done/unit-<k:06d>.json       its completion record: PartInfo + DatasetStats

Invariant: a completion record exists only once its part is published whole, and the part is a
pure function of the unit's documents and the job's parameters; so a record can be trusted by
any later process, and a unit redone after a crash writes the same bytes again.

When every unit has its record, ``commit_patches`` publishes the manifest (the one patches
commit, shared by ``patch`` and ``repatch``).

This module knows nothing of Ray: ``pipelines/patch_job.py`` runs ``patch_unit`` in actors and
hands it the scoring function (the entropy model stays outside ``blt_data``).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from blt_data.calibrate import Calibration, sample_rows
from blt_data.documents import iter_lines, parse_document
from blt_data.patches import arrow_schema_summary, build_table, entropies_array, part_name, write_part
from blt_data.patching import PatchRule, patch_lengths_arrow
from blt_data.registry import Manifest, PartInfo, Registry
from blt_data.stats import DatasetStats
from blt_data.storage import Store

R = TypeVar("R", bound=BaseModel)
log = logging.getLogger(__name__)

# texts -> one float array of per-byte entropies (nats) per text, in order.
ScoreFn = Callable[[list[str]], Iterable[np.ndarray]]


class Unit(BaseModel):
    """Lines [start, stop) of input part ``part`` (its path relative to the input dataset)."""

    model_config = ConfigDict(extra="forbid")
    index: int
    part: str
    split: str
    start: int
    stop: int
    bytes: int  # JSON line bytes, for planning and progress


class UnitSpec(BaseModel):
    """What every unit of one job shares. Folders are relative to the store root."""

    model_config = ConfigDict(extra="forbid")
    input_dir: str
    output_dir: str
    name: str
    job_id: str
    patch: PatchRule  # as applied: a calibrated threshold is set
    keep_entropies: bool
    keep_eos_entropy: bool = False  # patches format 2: with the entropies, the end-of-document one

    @property
    def job_dir(self) -> str:
        return f"{self.output_dir}/_jobs/{self.job_id}"


class UnitRecord(BaseModel):
    """The completion record of one unit."""

    model_config = ConfigDict(extra="forbid")
    unit: int
    part: PartInfo
    stats: DatasetStats


def record_path(spec: UnitSpec, index: int) -> str:
    return f"{spec.job_dir}/_done/unit-{index:06d}.json"


def plan_units(registry: Registry, docs: Manifest, unit_bytes: int, parts: list[PartInfo] | None = None) -> list[Unit]:
    """Every unit of a documents dataset (or of some of its `parts`). Reads each part once
    (line lengths only), checking it against its manifest entry (size and sha256)."""
    units: list[Unit] = []
    for part in docs.parts if parts is None else parts:
        start = size = 0
        line = -1
        for line, raw in enumerate(iter_lines(registry.store, registry.part_path(docs, part), part)):
            n = len(raw) + 1
            if size and size + n > unit_bytes:
                units.append(Unit(index=len(units), part=part.path, split=part.split, start=start, stop=line, bytes=size))
                start, size = line, 0
            size += n
        if line + 1 > start:
            units.append(Unit(index=len(units), part=part.path, split=part.split, start=start, stop=line + 1, bytes=size))
    return units


def iter_unit_lines(store: Store, input_dir: str, unit: Unit) -> Iterator[bytes]:
    # A part is one zstd frame, so reaching line `start` means decompressing what precedes it;
    # that costs far less than scoring the unit (GB/s against MB/s).
    for i, raw in enumerate(iter_lines(store, f"{input_dir}/{unit.part}")):
        if i >= unit.stop:
            return
        if i >= unit.start:
            yield raw


def read_unit(store: Store, input_dir: str, unit: Unit) -> tuple[list[str], list[str]]:
    ids, texts = [], []
    where = store.uri(f"{input_dir}/{unit.part}")
    for i, raw in enumerate(iter_unit_lines(store, input_dir, unit)):
        doc = parse_document(raw, where, unit.start + i + 1)
        ids.append(doc["id"])
        texts.append(doc["text"])
    if len(ids) != unit.stop - unit.start:
        raise RuntimeError(f"unit {unit.index}: {unit.part} has {unit.start + len(ids)} lines, expected at least {unit.stop}")
    return ids, texts


def calibration_sample(
    store: Store, input_dir: str, units: list[Unit], sample_bytes: int, seed: int, num_documents: int | None = None,
) -> tuple[dict[tuple[str, int], str], int]:
    """The texts of the calibration sample by (part, line), and the number of documents it was
    drawn from.

    Whole documents that ``calibrate.sample_rows`` draws over every unit of the plan (all of
    them for a small dataset), empty ones left out (they have no patch: when the sample is
    everything, the population is its non-empty documents). Reads only the parts that hold a
    drawn document, each once and only up to its last drawn line.
    """
    rows = [u.stop - u.start for u in units]
    picks = sample_rows(rows, sum(u.bytes for u in units), sample_bytes, seed, num_documents)
    everything = picks is None
    if everything:
        picks = {i: np.arange(n) for i, n in enumerate(rows)}
    wanted: dict[str, set[int]] = {}  # part -> line numbers, parts in plan order
    for index, unit_rows in sorted(picks.items()):
        unit = units[index]
        wanted.setdefault(unit.part, set()).update((unit.start + unit_rows).tolist())
    texts = {}
    for part, lines in wanted.items():
        last, where = max(lines), store.uri(f"{input_dir}/{part}")
        for i, raw in enumerate(iter_lines(store, f"{input_dir}/{part}")):
            if i in lines and (text := parse_document(raw, where, i + 1)["text"]):
                texts[part, i] = text
            if i == last:
                break
    return texts, len(texts) if everything else sum(rows)


def patch_unit(store: Store, unit: Unit, spec: UnitSpec, score: ScoreFn | None) -> UnitRecord:
    """Read, score (when ``score`` is given), patch and write one unit, then its record."""
    ids, texts = read_unit(store, spec.input_dir, unit)
    entropies = eos_entropy = None
    if score is not None:
        # Rounded to float16 before patching: the rule sees exactly what is stored, so a repatch
        # from the stored entropies reproduces this job (DESIGN.md §4 stores float16).
        scored = [np.asarray(e).astype(np.float16) for e in score(texts)]
        if spec.keep_eos_entropy:  # each document's last value is its end-of-document entropy
            eos_entropy = pa.array(np.array([e[-1] for e in scored], dtype=np.float16))
            scored = [e[:-1] for e in scored]
        entropies = entropies_array(scored)
    text = pa.array(texts, pa.large_string())
    patch_lengths = patch_lengths_arrow(text, entropies, spec.patch)
    keep = spec.keep_entropies
    table = build_table(ids, text, patch_lengths, entropies if keep else None, eos_entropy if keep else None)
    info = write_part(
        store, f"{spec.job_dir}/{part_name(unit.index)}", f"_jobs/{spec.job_id}/{part_name(unit.index)}",
        table, dataset=spec.name, job_id=spec.job_id, split=unit.split,
    )
    flat = entropies.values.to_numpy(zero_copy_only=False) if entropies is not None else None
    record = UnitRecord(unit=unit.index, part=info, stats=DatasetStats.of(patch_lengths, flat))
    store.write_bytes(record_path(spec, unit.index), record.model_dump_json().encode())
    return record


def load_records(store: Store, spec: UnitSpec) -> dict[int, UnitRecord]:
    return read_records(store, spec.job_dir, UnitRecord)


def read_records(store: Store, job_dir: str, model: type[R]) -> dict[int, R]:
    """Completion records (any model with a `unit` field) found in a job folder's `_done/`, by
    unit: one listing, then one read each."""
    records = {}
    for rel in store.list(f"{job_dir}/_done"):
        if rel.endswith(".json"):
            record = model.model_validate_json(store.read_bytes(rel))
            records[record.unit] = record
    return records


def commit_patches(
    registry: Registry, spec: UnitSpec, records: list[UnitRecord], requested: PatchRule,
    calibration: Calibration | None, parents: list[str], params: dict,
) -> Manifest:
    """Commit a patches dataset from its unit records, in unit order (``patch`` and ``repatch``).

    Statistics add in unit order, so the float sums of a resumed job equal an uninterrupted
    one's. ``params`` (input, model, scoring, ...) are completed with the rule as requested, its
    threshold as applied, and the calibration with the whole dataset's mean patch size (a warning
    is logged when that misses the target by more than the calibration's tolerance).
    """
    stats = sum((r.stats for r in records), DatasetStats())
    splits = Counter()
    for r in records:
        splits[r.part.split] += r.part.rows
    rule = requested.params() | {"threshold": spec.patch.threshold}
    if calibration is not None:
        calibration = calibration.with_dataset_mean(stats.mean_patch_length)
        if (warning := calibration.warning()) is not None:
            log.warning("%s: %s", spec.name, warning)
    manifest = Manifest(
        name=spec.name, kind="patches", job_id=spec.job_id, parents=parents,
        params={**params, **rule, "calibration": calibration.model_dump() if calibration else None,
                "entropies": spec.keep_entropies, "eos_entropy": spec.keep_eos_entropy},
        arrow_schema=arrow_schema_summary(spec.keep_entropies, spec.keep_eos_entropy), parts=[r.part for r in records],
        stats=stats.model_copy(update={"splits": dict(sorted(splits.items()))}),
    )
    return registry.commit(manifest)
