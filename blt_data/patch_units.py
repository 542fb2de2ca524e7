"""Units of work of the patch step (DESIGN.md §6): plan them, read one, patch one.

A *unit* is a run of consecutive lines of one documents part, of at most ``unit_size`` bytes of
JSON lines (a single longer document makes a unit of its own). Units are numbered in manifest
order, part by part, so the plan is a pure function of the input manifest and the unit size
(``unit_size``: the configured size, made smaller on small inputs so that every worker gets
several units). A job stores its plan once (``plan.json``, put-if-absent) so that a restart does
not read the input again.

Doing unit k (``patch_unit``) writes, in this order:

    <output>/_jobs/<job-id>/part-<k:06d>.parquet          the patched documents (one Parquet part)
    <output>/_jobs/<job-id>/_done/unit-<k:06d>.json       its completion record: PartInfo + DatasetStats

Invariant: a completion record exists only once its part is published whole, and the part is a
pure function of the unit's documents and the job's parameters; so a record can be trusted by
any later process, and a unit redone after a crash writes the same bytes again.

Compaction (``Completion``), in two levels (``BATCH_LEVELS``): once every unit of a block of 100
consecutive units has its record, the driver writes ``_done/batch-<first:06d>-<last:06d>.json``
(the block's parts, as columns, and its statistics summed in unit order), then deletes the
block's loose records; once 100 such blocks make a run of 10,000 units, it writes their batch
and deletes theirs. A crash between a write and its deletes leaves both, and they agree; readers
take the widest batch over what it covers. So a restart reads about units / 10,000 + 200
objects (at 10^6 units: 100 batches of 10,000, up to 99 of 100 and a few loose records, where
one object per 1,000 units would be over 1,000 objects: ~15 s of requests on a loopback S3),
and per-unit statistics (an entropy histogram of 1,537 bins each) are never read back once
their block is summed. A batch shorter than its level is never written: the job's last units
stay at a lower level, and the commit that follows reads them once.

When every unit has its record, ``commit_patches`` publishes the manifest (the one patches
commit, shared by ``patch`` and ``repatch``).

This module knows nothing of Ray: ``pipelines/patch_job.py`` runs ``patch_unit`` in actors and
hands it the scoring function (the entropy model stays outside ``blt_data``).

Length: a unit's whole life (plan, read, patch, record, compaction, commit) around one
invariant, the commit order above; ``patch`` and ``repatch`` share all of it.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass
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

# How units are cut: part of the job id, so that a job folder begun under another plan is never
# finished under this one (2: units shrink on small inputs, see `unit_size`).
PLAN_VERSION = 2
MIN_UNIT_BYTES = 64 * 1024  # smaller units cost more in per-unit overhead than they gain in balance
PLAN_FILE = "plan.json"
BATCH_LEVELS = (100, 10_000)  # units per compacted batch, level by level; each divides the next
_BATCH_RE = re.compile(r"batch-(\d+)-(\d+)\.json$")

# texts -> one float array of per-byte entropies (nats) per text, in order.
ScoreFn = Callable[[list[str]], Iterable[np.ndarray]]


@dataclass(slots=True)
class Unit:
    """Lines [start, stop) of input part ``part`` (its path relative to the input dataset).

    A dataclass, not a pydantic model: a restart makes one per unit of its stored plan, and a
    million pydantic models take tens of seconds to build (measured 40 us each)."""

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


def unit_size(unit_bytes: int, docs: Manifest, parts: list[PartInfo], min_units: int) -> int:
    """Bytes per unit: ``unit_bytes``, or less on a small input so that it makes about
    ``min_units`` units (never under MIN_UNIT_BYTES, unless ``unit_bytes`` itself is smaller).

    The input's size comes from its manifest, so no part is read: the documents' text bytes,
    times the share of the parts' stored bytes that ``parts`` hold (all of them unless the job
    patches some chunks only). JSON lines are a little longer than their text; an estimate is
    all that is needed here.
    """
    stored = int(docs.part_table().select().bytes.sum())  # columns: no object per part
    total = docs.stats.bytes * sum(p.bytes for p in parts) // stored if stored else 0
    return min(unit_bytes, max(MIN_UNIT_BYTES, math.ceil(total / min_units)))


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


def save_plan(store: Store, job_dir: str, units: list[Unit]) -> bool:
    """Store a job's plan once (put-if-absent); True if this call stored it. Columns, not one
    object per unit: a million units are ~20 MB and read back in about a second."""
    split = {u.part: u.split for u in units}
    parts = list(split)
    where = {p: i for i, p in enumerate(parts)}
    plan = {
        "plan_version": PLAN_VERSION, "parts": parts, "splits": [split[p] for p in parts],
        "part": [where[u.part] for u in units], "start": [u.start for u in units],
        "stop": [u.stop for u in units], "bytes": [u.bytes for u in units],
    }
    return store.put_if_absent(f"{job_dir}/{PLAN_FILE}", json.dumps(plan, separators=(",", ":")).encode())


def load_plan(store: Store, job_dir: str) -> list[Unit] | None:
    """The plan a job stored (`save_plan`), or None if it stored none yet."""
    rel = f"{job_dir}/{PLAN_FILE}"
    try:
        plan = json.loads(store.read_bytes(rel))
    except FileNotFoundError:
        return None
    if plan.get("plan_version") != PLAN_VERSION:  # the job id includes it: another version is a damaged folder
        raise ValueError(f"{store.uri(rel)} has plan version {plan.get('plan_version')}, expected {PLAN_VERSION}")
    where = plan["part"]
    # A million new objects set off the cyclic collector over and over (measured: 4.6 s with it,
    # 0.8 s without); these hold no cycles.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return list(map(
            Unit, range(len(where)), map(plan["parts"].__getitem__, where), map(plan["splits"].__getitem__, where),
            plan["start"], plan["stop"], plan["bytes"],
        ))
    finally:
        if enabled:
            gc.enable()


def iter_unit_lines(store: Store, input_dir: str, unit: Unit) -> Iterator[bytes]:
    yield from PartReader(store, input_dir).lines(unit)


class PartReader:
    """Reads units' lines, carrying on through a part across consecutive units.

    A part is one zstd frame, so reaching line ``start`` means decompressing what precedes it.
    A fresh read per unit made that quadratic in the units per part (half the per-unit cost of
    small units, measured); a worker that keeps one reader and is given consecutive units reads
    each part once.
    """

    def __init__(self, store: Store, input_dir: str):
        self.store, self.input_dir = store, input_dir
        self._part: str | None = None
        self._lines: Iterator[bytes] | None = None
        self._at = 0  # index of the next line self._lines yields

    def lines(self, unit: Unit) -> list[bytes]:
        """Lines [start, stop) of the unit's part (fewer if the part ends before)."""
        if self._lines is None or unit.part != self._part or unit.start < self._at:
            self.close()
            self._lines, self._part = iter_lines(self.store, f"{self.input_dir}/{unit.part}"), unit.part
        out = []
        try:
            for raw in self._lines:
                self._at += 1
                if self._at > unit.start:
                    out.append(raw)
                    if self._at == unit.stop:
                        break
        except BaseException:
            self.close()
            raise
        return out

    def close(self) -> None:
        if self._lines is not None:
            self._lines.close()  # type: ignore[attr-defined]
        self._lines, self._part, self._at = None, None, 0


def read_unit(store: Store, input_dir: str, unit: Unit, reader: PartReader | None = None) -> tuple[list[str], list[str]]:
    ids, texts = [], []
    where = store.uri(f"{input_dir}/{unit.part}")
    for i, raw in enumerate((reader or PartReader(store, input_dir)).lines(unit)):
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


def patch_unit(store: Store, unit: Unit, spec: UnitSpec, score: ScoreFn | None, reader: PartReader | None = None) -> UnitRecord:
    """Read, score (when ``score`` is given), patch and write one unit, then its record."""
    ids, texts = read_unit(store, spec.input_dir, unit, reader)
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


def read_records(store: Store, job_dir: str, model: type[R]) -> dict[int, R]:
    """Loose completion records (any model with a `unit` field) found in a job folder's `_done/`,
    by unit: one listing, then one read each. Compacted batches are `Completion`'s to read."""
    records = {}
    for rel in store.list(f"{job_dir}/_done"):
        if rel.rsplit("/", 1)[-1].startswith("unit-") and rel.endswith(".json"):
            record = model.model_validate_json(store.read_bytes(rel))
            records[record.unit] = record
    return records


class RecordBatch(BaseModel):
    """The compacted completion records of units first..last: their parts as columns (unit
    order), and their statistics summed in unit order. Columns, because a restart reads a
    thousand of these: as lists of PartInfo they would cost seconds more per million units."""

    model_config = ConfigDict(extra="forbid")
    first: int
    last: int
    path: list[str]
    rows: list[int]
    bytes: list[int]
    sha256: list[str]
    split: list[str]
    stats: DatasetStats

    @classmethod
    def of(cls, first: int, last: int, parts: list[PartInfo], stats: DatasetStats) -> "RecordBatch":
        return cls(first=first, last=last, stats=stats, **{k: [getattr(p, k) for p in parts] for k in ("path", "rows", "bytes", "sha256", "split")})

    def part(self, unit: int) -> PartInfo:
        i = unit - self.first
        return PartInfo(path=self.path[i], rows=self.rows[i], bytes=self.bytes[i], sha256=self.sha256[i], split=self.split[i])


def batch_path(job_dir: str, first: int, last: int) -> str:
    return f"{job_dir}/_done/batch-{first:06d}-{last:06d}.json"


class Completion:
    """What a job has finished: its completion records, loose and compacted, by unit.

    The units form a fixed tree: units in blocks of ``BATCH_LEVELS[0]``, blocks in blocks of
    ``BATCH_LEVELS[1]``. A node's statistics are its children's summed in order, whether they
    were summed when the node was compacted or are summed now from its children: so the job's
    float sums are the same however far its records were compacted (a resumed job's equal an
    uninterrupted one's).
    """

    def __init__(self, store: Store, job_dir: str, num_units: int):
        self.store, self.job_dir, self.num_units = store, job_dir, num_units
        self.levels = BATCH_LEVELS  # read when made, so a test can make them small
        self._batches: list[dict[int, RecordBatch]] = [{} for _ in self.levels]  # level -> node -> batch
        self._loose: dict[int, UnitRecord] = {}  # units no batch covers
        self._present: list[Counter[int]] = [Counter() for _ in self.levels]  # level -> node -> children present

    @classmethod
    def load(cls, store: Store, job_dir: str, num_units: int) -> "Completion":
        """Read `_done/`: one listing, then the batches and the loose records no batch covers,
        each kind read together. What a wider batch covers (left by a crash between a
        compaction's write and its deletes) is deleted now, unread."""
        done = cls(store, job_dir, num_units)
        batches: list[tuple[int, int, str]] = []
        loose: list[tuple[int, str]] = []
        for rel in store.list(f"{job_dir}/_done"):
            name = rel.rsplit("/", 1)[-1]
            if m := _BATCH_RE.fullmatch(name):
                first, last = int(m[1]), int(m[2])
                level = next((k for k, size in enumerate(done.levels) if last - first + 1 == size and first % size == 0), None)
                if level is None or last >= num_units:
                    raise ValueError(f"{store.uri(rel)} does not match this job's plan")
                batches.append((level, first, rel))
            elif name.startswith("unit-") and name.endswith(".json"):
                loose.append((int(name[5:-5]), rel))
        # Widest first: what a batch covers is known before anything under it is considered.
        live, stale = [], []
        for level, first, rel in sorted(batches, key=lambda b: (-b[0], b[1])):
            if done._covering(first, above=level) is not None:
                stale.append(rel)
                continue
            done._batches[level][first // done.levels[level]] = None  # type: ignore[assignment]  # read below
            if level + 1 < len(done.levels):
                done._present[level + 1][first // done.levels[level + 1]] += 1
            live.append((level, first, rel))
        for (level, first, rel), data in zip(live, store.read_many([rel for *_, rel in live])):
            batch = RecordBatch.model_validate_json(data)
            size = done.levels[level]
            if (batch.first, batch.last) != (first, first + size - 1) or not all(
                len(c) == size for c in (batch.path, batch.rows, batch.bytes, batch.sha256, batch.split)
            ):
                raise ValueError(f"{store.uri(rel)} does not match this job's plan")
            done._batches[level][first // size] = batch
        live_loose = []
        for index, rel in loose:
            (stale if done._covering(index) is not None else live_loose).append(rel)
        for data in store.read_many(live_loose):
            done._add(UnitRecord.model_validate_json(data))
        store.delete_many(stale)
        return done

    def _covering(self, unit: int, above: int = -1) -> int | None:
        """The widest level above ``above`` whose batch holds the unit, or None."""
        for level in range(len(self.levels) - 1, above, -1):
            if unit // self.levels[level] in self._batches[level]:
                return level
        return None

    def __contains__(self, unit: int) -> bool:
        return unit in self._loose or self._covering(unit) is not None

    def __len__(self) -> int:
        covered = sum(len(b) * self.levels[k] for k, b in enumerate(self._batches))
        return covered + len(self._loose)

    def part(self, unit: int) -> PartInfo | None:
        level = self._covering(unit)
        if level is not None:
            return self._batches[level][unit // self.levels[level]].part(unit)
        record = self._loose.get(unit)
        return record.part if record is not None else None

    def rows(self, unit: int) -> int | None:
        """The unit's part's row count (None if not done), without building its PartInfo."""
        level = self._covering(unit)
        if level is not None:
            batch = self._batches[level][unit // self.levels[level]]
            return batch.rows[unit - batch.first]
        record = self._loose.get(unit)
        return record.part.rows if record is not None else None

    def _add(self, record: UnitRecord) -> None:
        if record.unit not in self._loose and self._covering(record.unit) is None:
            self._present[0][record.unit // self.levels[0]] += 1
            self._loose[record.unit] = record

    def add(self, record: UnitRecord) -> None:
        """A unit's record (already written loose); compacts what it completes."""
        self._add(record)
        self._compact_above(record.unit)

    def _compact_above(self, unit: int) -> None:
        for level, size in enumerate(self.levels):
            node = unit // size
            if node in self._batches[level]:
                continue
            if self._present[level][node] != self._children(level) or (node + 1) * size > self.num_units:
                return  # incomplete, or the short last node (which stays at the level below)
            self._compact(level, node)

    def _children(self, level: int) -> int:
        return self.levels[0] if level == 0 else self.levels[level] // self.levels[level - 1]

    def compact_complete(self) -> None:
        """Compact whatever is complete and not compacted yet (left by a driver that stopped
        before it could)."""
        for unit in sorted({i // self.levels[0] * self.levels[0] for i in self._loose}):
            self._compact_above(unit)
        for level in range(len(self.levels) - 1):
            for node in sorted(self._batches[level]):
                self._compact_above(node * self.levels[level])

    def _compact(self, level: int, node: int) -> None:
        """Write the node's batch, then delete what it replaces (the order readers rely on)."""
        size = self.levels[level]
        first, last = node * size, (node + 1) * size - 1
        stats = self._stats(level, node)
        if level == 0:
            batch = RecordBatch.of(first, last, [self._loose[i].part for i in range(first, last + 1)], stats)
            replaced = [f"{self.job_dir}/_done/unit-{i:06d}.json" for i in range(first, last + 1)]
        else:
            below = self.levels[level - 1]
            children = [self._batches[level - 1][c] for c in range(first // below, last // below + 1)]
            batch = RecordBatch(first=first, last=last, stats=stats, **{
                k: [v for c in children for v in getattr(c, k)] for k in ("path", "rows", "bytes", "sha256", "split")})
            replaced = [batch_path(self.job_dir, c.first, c.last) for c in children]
        self.store.write_bytes(batch_path(self.job_dir, first, last), batch.model_dump_json().encode())
        if level == 0:
            for i in range(first, last + 1):
                del self._loose[i]
        else:
            for c in range(first // below, last // below + 1):
                del self._batches[level - 1][c]
        self._batches[level][node] = batch
        if level + 1 < len(self.levels):
            self._present[level + 1][first // self.levels[level + 1]] += 1
        self.store.delete_many(replaced)

    def _stats(self, level: int, node: int) -> DatasetStats:
        """A node's statistics: its batch's, or its children's summed in order."""
        if level >= 0 and node in self._batches[level]:
            return self._batches[level][node].stats
        if level < 0:
            return self._loose[node].stats
        size, below = self.levels[level], (self.levels[level - 1] if level else 1)
        first, stop = node * size, min((node + 1) * size, self.num_units)
        return sum((self._stats(level - 1, c) for c in range(first // below, (stop - 1) // below + 1)), DatasetStats())

    def ordered_parts(self) -> list[PartInfo]:
        parts = [self.part(i) for i in range(self.num_units)]
        missing = [i for i, p in enumerate(parts) if p is None]
        if missing:
            raise ValueError(f"{len(missing)} units have no completion record (the first: unit {missing[0]})")
        return parts  # type: ignore[return-value]

    def stats(self) -> DatasetStats:
        """The job's statistics: the top level's nodes, added in order."""
        top = len(self.levels) - 1
        return sum((self._stats(top, n) for n in range(math.ceil(self.num_units / self.levels[top]))), DatasetStats())


def commit_patches(
    registry: Registry, spec: UnitSpec, done: Completion, requested: PatchRule,
    calibration: Calibration | None, parents: list[str], params: dict,
) -> Manifest:
    """Commit a patches dataset from its completion records, in unit order (``patch`` and
    ``repatch``).

    Statistics add in a fixed order (`Completion.stats`), so the float sums of a resumed job
    equal an uninterrupted one's. ``params`` (input, model, scoring, ...) are completed with the
    rule as requested, its threshold as applied, and the calibration with the whole dataset's mean
    patch size (a warning is logged when that misses the target by more than the calibration's
    tolerance).
    """
    parts = done.ordered_parts()
    stats = done.stats()
    splits = Counter()
    for part in parts:
        splits[part.split] += part.rows
    rule = requested.params() | {"threshold": spec.patch.threshold}
    if calibration is not None:
        calibration = calibration.with_dataset_mean(stats.mean_patch_length)
        if (warning := calibration.warning()) is not None:
            log.warning("%s: %s", spec.name, warning)
    manifest = Manifest(
        name=spec.name, kind="patches", job_id=spec.job_id, parents=parents,
        params={**params, **rule, "calibration": calibration.model_dump() if calibration else None,
                "entropies": spec.keep_entropies, "eos_entropy": spec.keep_eos_entropy},
        arrow_schema=arrow_schema_summary(spec.keep_entropies, spec.keep_eos_entropy), parts=parts,
        stats=stats.model_copy(update={"splits": dict(sorted(splits.items()))}),
    )
    return registry.commit(manifest)
