"""Patches datasets: Parquet parts (zstd), one row per document (DESIGN.md §4).

    id             string              the document id
    text           large_string        the document, unchanged
    patch_lengths  list<int32>         patch lengths over the UTF-8 bytes of `text` (they sum to its length)
    entropies      list<float16>       optional: H(byte j | BOS, bytes < j) in nats, one per byte
    eos_entropy    float16 (nullable)  version 2, optional, present with entropies: H(EOS | whole
                                       document) in nats, which Meta's patch rule needs to decide
                                       whether EOS joins the last patch (``blt_data.meta_layout``)

Key-value metadata of every part (Parquet footer, through the Arrow schema):

    blt.format          "patches"
    blt.format_version  "2" (version 1 parts, without eos_entropy, still read)
    blt.dataset         the dataset name the part was written for
    blt.job_id          the job that wrote it

Encoding: zstd, row groups of ROW_GROUP_ROWS documents, dictionary encoding for patch_lengths
and eos_entropy only (parts written before used it for every column; both read the same).

NOTE: DESIGN.md asks for "the id of the manifest it belongs to". A manifest id is
``name@vN:job_id`` and N is only known when the manifest wins its put-if-absent, after every part
is written, so a part carries the two stable halves (dataset name and job id); ``blt_data.verify``
checks them against the manifest. Writing a part is deterministic: the same rows, dataset and job
give the same bytes, so a recomputed unit has the same sha256.

Invariant: a part is published whole (``Store.create``); readers never see half a part.
"""

from __future__ import annotations

import io
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from blt_data.registry import Manifest, PartInfo, Registry
from blt_data.storage import Store

FORMAT = "patches"
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = ("1", "2")  # as written in the footer; 1 is 2 without eos_entropy
PART_EXT = ".parquet"
ROW_GROUP_ROWS = 4096  # documents per row group: readers can stream parts of a few GB
# Dictionary encoding only where values repeat: patch lengths (small integers) and eos_entropy.
# A float16 entropy column has up to 65536 values, so Parquet never falls back to PLAIN for it,
# and encoding and decoding the dictionary cost 2-3x the rest of the part for ~1% of its size.
DICTIONARY_COLUMNS = ["patch_lengths.list.element", "eos_entropy"]


def part_name(index: int) -> str:
    return f"part-{index:06d}{PART_EXT}"


def patches_schema(with_entropies: bool, with_eos_entropy: bool = False) -> pa.Schema:
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("text", pa.large_string(), nullable=False),
        pa.field("patch_lengths", pa.list_(pa.int32()), nullable=False),
    ]
    if with_entropies:
        fields.append(pa.field("entropies", pa.list_(pa.float16()), nullable=False))
    if with_eos_entropy:
        fields.append(pa.field("eos_entropy", pa.float16(), nullable=True))
    return pa.schema(fields)


def arrow_schema_summary(with_entropies: bool, with_eos_entropy: bool = False) -> dict[str, str]:
    """Column -> Arrow type, as manifests record it."""
    return {f.name: str(f.type) for f in patches_schema(with_entropies, with_eos_entropy)}


def build_table(
    ids: list[str] | pa.Array, text: pa.Array, patch_lengths: pa.ListArray, entropies: pa.ListArray | None,
    eos_entropy: pa.Array | None = None,
) -> pa.Table:
    """A part's rows; `ids` a list or a string column (kept as it is: no per-row Python), `text`
    is large_string, `entropies` list<float16> (or None: no column), `eos_entropy` float16 (or
    None: no column; only with entropies)."""
    if eos_entropy is not None and entropies is None:
        raise ValueError("eos_entropy comes with entropies")
    ids = ids.cast(pa.string()) if isinstance(ids, (pa.Array, pa.ChunkedArray)) else pa.array(ids, pa.string())
    columns = [ids, text, patch_lengths]
    if entropies is not None:
        columns.append(entropies)
    if eos_entropy is not None:
        columns.append(eos_entropy)
    return pa.Table.from_arrays(columns, schema=patches_schema(entropies is not None, eos_entropy is not None))


def entropies_array(per_document: list[np.ndarray]) -> pa.ListArray:
    """list<float16> from per-document float16 arrays."""
    lengths = np.fromiter((a.size for a in per_document), dtype=np.int64, count=len(per_document))
    offsets = np.zeros(len(per_document) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate(per_document) if per_document else np.zeros(0, np.float16)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.astype(np.float16, copy=False)))


def write_part(store: Store, rel: str, path_in_manifest: str, table: pa.Table, *, dataset: str, job_id: str, split: str = "train") -> PartInfo:
    """Publish one Parquet part whole and return its PartInfo (sha256 of the bytes written)."""
    writer = PatchesPartWriter(store, rel, path_in_manifest, table.schema, dataset=dataset, job_id=job_id, split=split)
    writer.write(table)
    return writer.close()


class PatchesPartWriter:
    """One Parquet part written as its rows come, published whole on ``close`` (``write_part``
    is this with one ``write``).

    Rows are encoded a row group (ROW_GROUP_ROWS rows) at a time, so the row groups and the
    bytes are the same however the rows are split between ``write`` calls. ``background=True``
    encodes on a worker thread (Arrow's Parquet encoder releases the GIL), overlapping the
    caller's work on the next rows: encoding float16 entropies is the costliest step of a part.
    """

    def __init__(
        self, store: Store, rel: str, path_in_manifest: str, schema: pa.Schema, *,
        dataset: str, job_id: str, split: str = "train", background: bool = False,
    ):
        self.store, self.rel, self.path_in_manifest, self.split = store, rel, path_in_manifest, split
        self.schema = schema.with_metadata({
            "blt.format": FORMAT,
            "blt.format_version": str(FORMAT_VERSION),
            "blt.dataset": dataset,
            "blt.job_id": job_id,
        })
        # Built in memory: a part is one bounded unit of work, and pyarrow's writer wants a
        # seekable sink that the store's streaming writer is not.
        self._buffer = io.BytesIO()
        self._writer = pq.ParquetWriter(
            self._buffer, self.schema, compression="zstd", use_dictionary=DICTIONARY_COLUMNS,
            write_statistics=["id"],  # min/max of whole documents would bloat the footer
        )
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self.rows = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="parquet") if background else None
        self._inflight: list[Future] = []

    def write(self, table: pa.Table) -> None:
        """Append rows (a table of this part's schema, metadata aside)."""
        self._pending.append(table)
        self._pending_rows += table.num_rows
        self.rows += table.num_rows
        if self._pending_rows >= ROW_GROUP_ROWS:
            rows = pa.concat_tables(self._pending)
            full = rows.num_rows - rows.num_rows % ROW_GROUP_ROWS
            self._pending = [rows.slice(full)]
            self._pending_rows = rows.num_rows - full
            self._encode(rows.slice(0, full))

    def _encode(self, rows: pa.Table) -> None:
        rows = rows.cast(self.schema)  # the metadata, and a check that the columns are this part's
        if self._pool is None:
            self._encode_now(rows)
            return
        while len(self._inflight) >= 2:  # at most one waiting: memory stays bounded
            self._inflight.pop(0).result()
        self._inflight.append(self._pool.submit(self._encode_now, rows))

    def _encode_now(self, rows: pa.Table) -> None:
        # One chunk per column: Parquet pages depend on the chunks, the bytes then do not.
        self._writer.write_table(rows.combine_chunks(), row_group_size=ROW_GROUP_ROWS)

    def close(self) -> PartInfo:
        """Encode the last rows, publish the part, return its PartInfo."""
        try:
            if self._pending_rows or not self.rows:
                self._encode(pa.concat_tables(self._pending) if self._pending else self.schema.empty_table())
            for future in self._inflight:
                future.result()
            self._writer.close()
        finally:
            if self._pool is not None:
                self._pool.shutdown()
        with self.store.create(self.rel) as sink:
            sink.write(self._buffer.getbuffer())
        return PartInfo(path=self.path_in_manifest, rows=self.rows, bytes=sink.nbytes, sha256=sink.sha256, split=self.split)


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
    empty = patches_schema(has_entropies(manifest), has_eos_entropy(manifest)).empty_table()
    return empty.select(columns) if columns else empty


def check_patches(manifest: Manifest) -> None:
    if manifest.kind != "patches":
        raise ValueError(f"{manifest.ref} is a {manifest.kind} dataset, not patches")


def has_entropies(manifest: Manifest) -> bool:
    return "entropies" in manifest.arrow_schema


def has_eos_entropy(manifest: Manifest) -> bool:
    return "eos_entropy" in manifest.arrow_schema


def byte_lengths(text: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return pc.binary_length(text).to_numpy(zero_copy_only=False).astype(np.int64)
