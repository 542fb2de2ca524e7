"""Dataset verification: does what a manifest promises still hold on the store?

    verify(registry, manifest)
        the part list (format 2: its file's size, sha256, columns and counts, as the manifest records)
        -> every part and quarantine part: present, size and sha256 as recorded, rows recounted
        -> the kind's own content checks (``CHECKS[kind]``), once the files themselves are sound

    verify(registry, manifest, sample=N)
        the part list, then N parts drawn deterministically (seeded by the manifest id): O(N)
        reads whatever the part count; the whole-dataset content checks are not run

This step sits above the registry and the format modules (``documents``, ``patches``): it reads
manifests through the registry and parts through each format's readers, and neither of them
imports it, so a new kind registers its checks here without touching the registry.

Invariant: verification only reads; it returns the problems found (empty = good) and never
changes the store.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import pyarrow.parquet as pq
from tqdm import tqdm

from blt_data.documents import count_rows, iter_lines
from blt_data.patches import byte_lengths, iter_tables, part_metadata, read_part
from blt_data.registry import Manifest, PartInfo, Registry, RegistryError
from blt_data.shuffle import chunk_parts
from blt_data.stats import DatasetStats
from blt_data.storage import sha256_of

VERIFY_THREADS = 8  # parts checked at once (each waits on the store, not the CPU)
# Kinds whose parts hold one document per row (model files have no rows to count).
ROW_KINDS = ("documents", "patches")

Check = Callable[[Registry, Manifest], list[str]]


def verify(registry: Registry, manifest: Manifest, progress: bool = False, sample: int | None = None) -> list[str]:
    """Check the part list, re-hash every part (or ``sample`` of them) and recount its rows,
    then (all parts only) run the kind's content checks."""
    try:
        table = manifest.part_table()  # a format-2 list is checked against the manifest here
    except RegistryError as e:
        return [str(e)]
    indices = sample_parts(manifest, len(table), sample) if sample is not None else range(len(table))
    problems: list[str] = []
    # Each part is a few round trips to the store: overlap them (results stay in part order).
    with (ThreadPoolExecutor(VERIFY_THREADS, thread_name_prefix="blt-verify") as pool,
          tqdm(total=len(indices), desc=f"verify {manifest.ref}", unit="part", disable=not progress) as bar):
        for a in range(0, len(indices), 64 * VERIFY_THREADS):  # a bounded number of futures at a time
            for found in pool.map(lambda i: _check_part(registry, manifest, table.info(int(i))), indices[a:a + 64 * VERIFY_THREADS]):
                problems += found
                bar.update()
    total = int(table.select().rows.sum())
    if manifest.kind in ROW_KINDS and total != manifest.stats.documents:
        problems.append(f"parts hold {total} rows but stats say {manifest.stats.documents} documents")
    check = CHECKS.get(manifest.kind)
    if check is not None and not problems and sample is None:
        problems += check(registry, manifest)
    return problems


def _check_part(registry: Registry, manifest: Manifest, part: PartInfo) -> list[str]:
    """A part's problems: missing, size or sha256 not as recorded, rows miscounted."""
    rel = registry.part_path(manifest, part)
    rows = None
    try:
        with registry.store.open_input(rel) as f:
            sha, size = sha256_of(f)
            if sha == part.sha256 and manifest.kind in ROW_KINDS and rel.endswith(".parquet"):
                # The footer through the same handle: its last block is still buffered, so no
                # second open and read (on an object store, half the requests of a part).
                rows = pq.ParquetFile(f).metadata.num_rows
    except FileNotFoundError:
        return [f"{part.path}: missing"]
    problems = []
    if size != part.bytes:
        problems.append(f"{part.path}: size {size} != manifest {part.bytes}")
    if sha != part.sha256:
        return problems + [f"{part.path}: sha256 {sha[:12]}… != manifest {part.sha256[:12]}…"]
    if manifest.kind in ROW_KINDS:
        rows = count_rows(registry.store, rel) if rows is None else rows
        if rows != part.rows:
            problems.append(f"{part.path}: {rows} rows != manifest {part.rows}")
    return problems


def sample_parts(manifest: Manifest, count: int, sample: int) -> np.ndarray:
    """``sample`` indices of ``count`` parts (quarantine included), sorted; the same for a
    manifest on every run, different between manifests."""
    if sample < 0:
        raise ValueError(f"a sample of {sample} parts: give a count >= 0")
    seed = int.from_bytes(hashlib.sha256(manifest.id.encode()).digest()[:8], "little")
    return np.sort(np.random.default_rng(seed).choice(count, size=min(sample, count), replace=False))


def input_ids(registry: Registry, manifest: Manifest, chunks: list[int] | None = None) -> list[str]:
    """Document ids of a documents or patches dataset (or of some chunks of a shuffled
    documents dataset), in manifest order."""
    if manifest.kind == "patches":
        return [i for _, t in iter_tables(registry, manifest, ["id"]) for i in t.column("id").to_pylist()]
    return [
        json.loads(line)["id"]
        for part in chunk_parts(manifest, chunks)
        for line in iter_lines(registry.store, registry.part_path(manifest, part))
    ]


def verify_patches(registry: Registry, manifest: Manifest) -> list[str]:
    """Content checks of a patches dataset beyond hashes and row counts: the footer names this
    job, patch lengths are positive and sum to each text's UTF-8 length, entropies (when stored)
    count one per byte, ids are unique and equal to the input dataset's, statistics add up."""
    problems: list[str] = []
    ids: list[str] = []
    total = DatasetStats()
    for part in manifest.parts:
        rel = registry.part_path(manifest, part)
        meta = part_metadata(registry.store, rel)
        if meta.get("blt.job_id") != manifest.job_id or meta.get("blt.dataset") != manifest.name:
            problems.append(f"{part.path}: footer names {meta.get('blt.dataset')}/{meta.get('blt.job_id')}, not {manifest.name}/{manifest.job_id}")
        table = read_part(registry.store, rel)
        lengths = byte_lengths(table.column("text"))
        pl = table.column("patch_lengths").combine_chunks()
        values = pl.values.to_numpy(zero_copy_only=False).astype(np.int64)
        offsets = pl.offsets.to_numpy()
        # One zero past the values: an empty last row starts there (reduceat needs a valid index).
        padded = np.append(values, 0)
        sums = np.add.reduceat(padded, offsets[:-1]) if len(offsets) > 1 else np.zeros(0, np.int64)
        sums[offsets[:-1] == offsets[1:]] = 0  # reduceat gives the next value for an empty list
        if values.size and values.min() < 1:
            problems.append(f"{part.path}: a patch length < 1")
        bad = np.flatnonzero(sums != lengths)
        if bad.size:
            problems.append(f"{part.path}: row {int(bad[0])}: patch lengths sum to {int(sums[bad[0]])}, text has {int(lengths[bad[0]])} bytes ({bad.size} such rows)")
        entropies = None
        if "entropies" in table.column_names:
            ent = table.column("entropies").combine_chunks()
            bad = np.flatnonzero(ent.value_lengths().to_numpy(zero_copy_only=False) != lengths)
            if bad.size:
                problems.append(f"{part.path}: row {int(bad[0])}: entropies do not count one per byte ({bad.size} such rows)")
            entropies = ent.values.to_numpy(zero_copy_only=False)
        total = total + DatasetStats.of(pl, entropies)
        ids.extend(table.column("id").to_pylist())
    if len(set(ids)) != len(ids):
        problems.append(f"{len(ids) - len(set(ids))} duplicate ids")
    s = manifest.stats
    for field, found in (("documents", total.documents), ("bytes", total.bytes), ("patches", total.patches)):
        if getattr(s, field) != found:
            problems.append(f"stats say {getattr(s, field)} {field}, parts hold {found}")
    if s.patch_length_histogram is not None and s.patch_length_histogram != total.patch_length_histogram:
        problems.append("patch length histogram does not match the parts")
    parent = manifest.params.get("input")
    if parent:
        expected = input_ids(registry, registry.resolve(parent), manifest.params.get("chunks"))
        if sorted(expected) != sorted(ids):
            missing = set(expected) - set(ids)
            extra = set(ids) - set(expected)
            problems.append(
                f"ids differ from {parent}: {len(missing)} missing (e.g. {sorted(missing)[:1]}), "
                f"{len(extra)} not in the input (e.g. {sorted(extra)[:1]}), {len(ids)} rows vs {len(expected)}"
            )
    return problems


# Content checks by manifest kind, run once hashes and row counts hold.
CHECKS: dict[str, Check] = {"patches": verify_patches}
