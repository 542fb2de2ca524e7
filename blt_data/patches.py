"""Patches datasets: Parquet parts (zstd), one row per document (DESIGN.md §4).

    id             string              the document id
    text           large_string        the document, unchanged
    patch_lengths  list<int32>         patch lengths over the UTF-8 bytes of `text` (they sum to its length)
    entropies      list<float16>       optional: H(byte j | BOS, bytes < j) in nats, one per byte

Key-value metadata of every part (Parquet footer, through the Arrow schema):

    blt.format          "patches"
    blt.format_version  "1"
    blt.dataset         the dataset name the part was written for
    blt.job_id          the job that wrote it

NOTE: DESIGN.md asks for "the id of the manifest it belongs to". A manifest id is
``name@vN:job_id`` and N is only known when the manifest wins its put-if-absent, after every part
is written, so a part carries the two stable halves (dataset name and job id); ``verify_patches``
checks them against the manifest. Writing a part is deterministic: the same rows, dataset and job
give the same bytes, so a recomputed unit has the same sha256.

Invariant: a part is published whole (``Store.create``); readers never see half a part.
"""

from __future__ import annotations

import io
import json
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from blt_data.patching import HISTOGRAM_BINS, patch_stats
from blt_data.registry import DatasetStats, Manifest, PartInfo, Registry
from blt_data.storage import Store

FORMAT = "patches"
FORMAT_VERSION = 1
PART_EXT = ".parquet"
ROW_GROUP_ROWS = 4096  # documents per row group: readers can stream parts of a few GB
# Entropy histogram (for quantiles that add over units): bins of 1/256 nat over [0, 6) nats,
# plus one overflow bin. ln(260) = 5.56 nats is the largest possible entropy over 260 ids.
ENTROPY_BINS_PER_NAT = 256
ENTROPY_MAX_NATS = 6
ENTROPY_BINS = ENTROPY_BINS_PER_NAT * ENTROPY_MAX_NATS + 1
QUANTILES = (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99)


def part_name(index: int) -> str:
    return f"part-{index:06d}{PART_EXT}"


def patches_schema(with_entropies: bool) -> pa.Schema:
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("text", pa.large_string(), nullable=False),
        pa.field("patch_lengths", pa.list_(pa.int32()), nullable=False),
    ]
    if with_entropies:
        fields.append(pa.field("entropies", pa.list_(pa.float16()), nullable=False))
    return pa.schema(fields)


def arrow_schema_summary(with_entropies: bool) -> dict[str, str]:
    """Column -> Arrow type, as manifests record it."""
    return {f.name: str(f.type) for f in patches_schema(with_entropies)}


def build_table(
    ids: list[str], text: pa.Array, patch_lengths: pa.ListArray, entropies: pa.ListArray | None
) -> pa.Table:
    """A part's rows; `text` is large_string, `entropies` list<float16> (or None: no column)."""
    columns = [pa.array(ids, pa.string()), text, patch_lengths]
    if entropies is not None:
        columns.append(entropies)
    return pa.Table.from_arrays(columns, schema=patches_schema(entropies is not None))


def entropies_array(per_document: list[np.ndarray]) -> pa.ListArray:
    """list<float16> from per-document float16 arrays."""
    lengths = np.fromiter((a.size for a in per_document), dtype=np.int64, count=len(per_document))
    offsets = np.zeros(len(per_document) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate(per_document) if per_document else np.zeros(0, np.float16)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.astype(np.float16, copy=False)))


def write_part(store: Store, rel: str, path_in_manifest: str, table: pa.Table, *, dataset: str, job_id: str, split: str = "train") -> PartInfo:
    """Publish one Parquet part whole and return its PartInfo (sha256 of the bytes written)."""
    metadata = {
        "blt.format": FORMAT,
        "blt.format_version": str(FORMAT_VERSION),
        "blt.dataset": dataset,
        "blt.job_id": job_id,
    }
    table = table.replace_schema_metadata(metadata)
    # Built in memory: a part is one bounded unit of work, and pyarrow's writer wants a seekable
    # sink that the store's streaming writer is not.
    buffer = io.BytesIO()
    pq.write_table(
        table, buffer, compression="zstd", row_group_size=ROW_GROUP_ROWS,
        write_statistics=["id"],  # min/max of whole documents would bloat the footer
    )
    with store.create(rel) as sink:
        sink.write(buffer.getbuffer())
    return PartInfo(path=path_in_manifest, rows=table.num_rows, bytes=sink.nbytes, sha256=sink.sha256, split=split)


def read_part(store: Store, rel: str, columns: list[str] | None = None) -> pa.Table:
    with store.open_input(rel) as f:
        return pq.read_table(f, columns=columns)


def part_metadata(store: Store, rel: str) -> dict[str, str]:
    with store.open_input(rel) as f:
        meta = pq.ParquetFile(f).schema_arrow.metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items()}


def iter_tables(registry: Registry, manifest: Manifest, columns: list[str] | None = None) -> Iterator[tuple[PartInfo, pa.Table]]:
    """Every part of a patches dataset, in manifest order."""
    check_patches(manifest)
    for part in manifest.parts:
        yield part, read_part(registry.store, registry.part_path(manifest, part), columns)


def read_patches(registry: Registry, manifest: Manifest, columns: list[str] | None = None) -> pa.Table:
    """A whole patches dataset as one table (small datasets and tests; stream `iter_tables` otherwise)."""
    tables = [t for _, t in iter_tables(registry, manifest, columns)]
    if tables:
        return pa.concat_tables(tables)
    empty = patches_schema(has_entropies(manifest)).empty_table()
    return empty.select(columns) if columns else empty


def check_patches(manifest: Manifest) -> None:
    if manifest.kind != "patches":
        raise ValueError(f"{manifest.ref} is a {manifest.kind} dataset, not patches")


def has_entropies(manifest: Manifest) -> bool:
    return "entropies" in manifest.arrow_schema


def byte_lengths(text: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return pc.binary_length(text).to_numpy(zero_copy_only=False).astype(np.int64)


class UnitStats(BaseModel):
    """Statistics of one unit's documents; units add (``a + b``) into the dataset's statistics.

    Everything is an integer count except ``entropy_sum``, whose float sum depends on order: the
    driver adds units in unit order, so resumed and uninterrupted jobs agree bit for bit.
    """

    model_config = ConfigDict(extra="forbid")

    documents: int = 0
    bytes: int = Field(0, description="UTF-8 bytes of text (= sum of patch lengths)")
    patches: int = 0
    patch_length_histogram: list[int] = Field(default_factory=lambda: [0] * HISTOGRAM_BINS)
    entropy_histogram: list[int] = Field(default_factory=list, description="empty when no entropies; else ENTROPY_BINS counts")
    entropy_sum: float = Field(0.0, description="nats, sum over bytes (for the mean)")

    @classmethod
    def of(cls, patch_lengths: pa.ListArray, entropies: np.ndarray | None) -> "UnitStats":
        """Stats of a table's patch_lengths column and its flat float16 entropies (or None)."""
        ps = patch_stats(
            patch_lengths.values.to_numpy(zero_copy_only=False), patch_lengths.value_lengths().to_numpy(zero_copy_only=False)
        )
        stats = cls(documents=ps.documents, bytes=ps.bytes, patches=ps.patches, patch_length_histogram=ps.patch_length_histogram)
        if entropies is not None:
            e = entropies.astype(np.float32)
            bins = np.clip(e * ENTROPY_BINS_PER_NAT, 0, ENTROPY_BINS - 1).astype(np.int64)
            stats.entropy_histogram = np.bincount(bins, minlength=ENTROPY_BINS).tolist()
            stats.entropy_sum = float(e.astype(np.float64).sum())
        return stats

    def __add__(self, other: "UnitStats") -> "UnitStats":
        if not self.entropy_histogram or not other.entropy_histogram:
            hist = self.entropy_histogram or other.entropy_histogram
        else:
            hist = [a + b for a, b in zip(self.entropy_histogram, other.entropy_histogram)]
        return UnitStats(
            documents=self.documents + other.documents,
            bytes=self.bytes + other.bytes,
            patches=self.patches + other.patches,
            patch_length_histogram=[a + b for a, b in zip(self.patch_length_histogram, other.patch_length_histogram)],
            entropy_histogram=hist,
            entropy_sum=self.entropy_sum + other.entropy_sum,
        )

    def entropy_quantiles(self) -> dict[str, float] | None:
        """Quantiles (nats) at the midpoint of their histogram bin (±1/512 nat), plus the mean."""
        if not self.entropy_histogram or not self.bytes:
            return None
        cumulative = np.cumsum(self.entropy_histogram)
        out = {}
        for q in QUANTILES:
            b = int(np.searchsorted(cumulative, q * cumulative[-1]))
            out[f"q{round(q * 100):02d}"] = round(min((b + 0.5) / ENTROPY_BINS_PER_NAT, ENTROPY_MAX_NATS), 6)
        out["mean"] = round(self.entropy_sum / self.bytes, 6)
        return out

    def dataset_stats(self, splits: dict[str, int]) -> DatasetStats:
        return DatasetStats(
            documents=self.documents,
            bytes=self.bytes,
            splits=splits,
            patches=self.patches,
            mean_patch_length=self.bytes / self.patches if self.patches else None,
            patch_length_histogram=self.patch_length_histogram,
            entropy_quantiles=self.entropy_quantiles(),
        )


def input_ids(registry: Registry, manifest: Manifest, chunks: list[int] | None = None) -> list[str]:
    """Document ids of a documents or patches dataset (or of some chunks of a shuffled
    documents dataset), in manifest order."""
    if manifest.kind == "patches":
        return [i for _, t in iter_tables(registry, manifest, ["id"]) for i in t.column("id").to_pylist()]
    from blt_data.documents import iter_lines
    from blt_data.shuffle import chunk_parts

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
    total = UnitStats()
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
        total = total + UnitStats.of(pl, entropies)
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
