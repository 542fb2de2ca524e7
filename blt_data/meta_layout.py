"""Meta's preprocessed-entropy layout (``bytelatent``): patches datasets out and in.

Meta's training loop (``bytelatent/args.py`` DataloaderArgs -> ``data/iterators/arrow_iterator.py``
-> ``preprocess_iterator.py``) reads, for each source of its ``data:`` block::

    <root_dir>/<source>/<X>.chunk.<NN>.jsonl           globbed; only the names matter in Arrow mode
    <preprocess_dir>/<X>/<entropy_model_name>/<X>.chunk.<NN>.jsonl.shard_<K>.arrow   ordered by K
    <the shard's name>.complete                         beside each shard, or the reader refuses it

A shard is an Arrow IPC *file* of ~1000-row record batches with non-nullable ``sample_id: string``,
``text: string`` and ``entropies: list<float16>``. ``entropies`` holds n + 2 values for a text of
n UTF-8 bytes (the tokens BOS, bytes, EOS): value j < n is H(byte j | BOS, bytes < j), our
``entropies[j]``; value n is H(EOS | document), our ``eos_entropy``; value n + 1 is the prediction
made at EOS, which Meta's loader drops (``include_next_token=False``) and which we write as 0.

Meta's rule on those values (``data/patcher.py``, ``find_entropy_patch_start_ids``): tokens 0
(BOS) and 1 (byte 0) start patches; token p >= 2 starts one when value p-1 > threshold, compared
in float32; with ``monotonicity``, when value p-1 - value p-2 > threshold (float32) for p >= 3,
token 2 being forced (our rule decides byte 1 by its difference: the "byte-1 difference"); then
``max_patch_length`` cuts longer patches from their start. So Meta's patch lengths are ours with
BOS as a patch of its own in front, and EOS either a patch of its own (value n > threshold) or
joined to the last patch (which the cut splits again when that makes it longer than m).
``meta_patch_lengths`` emulates that rule, and export checks every document with it.

Export invariant: every object is published whole (``Store.create``); shards first, then the chunk
files and the config block, the ``.complete`` markers last, so Meta's loader never accepts a
shard that is not whole. Import invariant: nothing of the source is dropped without a trace: a
row that cannot be a document is quarantined, a damaged shard is reported with the rows read
before the damage (which are kept, as ``download`` keeps a damaged file's lines). The unit of an
import is one shard: its parts, then its completion record ``_jobs/<job-id>/_done/unit-<k>.json``,
then (after every shard) the manifest; so an import started again redoes only unfinished shards.

Length: one format both ways (the writer, the reader, Meta's rule replayed to check an export,
and the import job); the two halves share the schema, the naming and the rule.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from typing import Iterator, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm import tqdm

from blt_data.calibrate import CalibrationSample, calibrated, head_sample
from blt_data.documents import PartWriter, encode_line, quarantine_record
from blt_data.documents import part_name as documents_part_name
from blt_data.jobs import EXECUTION
from blt_data.patch_units import read_records
from blt_data.patches import (
    PatchesPartWriter, arrow_schema_summary, build_table, has_entropies, has_eos_entropy, read_part,
)
from blt_data.patching import (
    ENTROPY_SCHEMES, PatchedBatch, PatchRule, above, nan_mask, patch_lengths_arrow, patches_from_starts, round_down,
)
from blt_data.prefetch import in_background
from blt_data.registry import Manifest, PartInfo, Registry, RegistryError, check_name, job_hash
from blt_data.stats import DatasetStats
from blt_data.storage import Store

log = logging.getLogger(__name__)

META_SCHEMA = pa.schema([
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("text", pa.string(), nullable=False),
    pa.field("entropies", pa.list_(pa.float16()), nullable=False),
])
BATCH_ROWS = 1000  # Meta's preprocessing writes record batches of 1000 rows
BATCH_TEXT_BYTES = 256 << 20  # and we also cut at this much text: `string` offsets are int32
COMPLETE = ".complete"
CONFIG_FILE = "meta_data.yaml"
ROOT_DIR = "data"  # <out>/data/<X>/<X>.chunk.<NN>.jsonl
PREPROCESS_DIR = "preprocess"  # <out>/preprocess/<X>/<model>/<shards>
_SHARD_RE = re.compile(r"^(?P<chunk>.+)\.shard_(?P<k>[0-9]+)\.arrow$")
_CHUNK_RE = re.compile(r"^(?P<dataset>.+)\.chunk\.(?P<nn>[0-9]+)\.jsonl$")  # Meta's, in arrow_iterator.py


class MetaLayoutError(ValueError):
    """A dataset Meta's loader cannot reproduce, or a folder that is not Meta's layout."""


# --- Meta's patch rule ---------------------------------------------------------------------


def meta_threshold(threshold: float) -> float:
    """The threshold to write for Meta's float32 comparison: the largest float16 <= θ. For every
    float16 x, ``x > t`` iff ``x > θ``, and a float16 is exact in float32 and in YAML's decimal."""
    return float(round_down(threshold, np.dtype(np.float16)))


def meta_patch_lengths(
    values: np.ndarray, num_tokens: np.ndarray, threshold: float,
    monotonicity: bool = False, max_patch_length: int | None = None,
) -> PatchedBatch:
    """Meta's patch lengths over each document's tokens BOS, bytes, EOS (n + 2 tokens, n + 2
    values, documents end to end), as ``Patcher.patch(include_next_token=False)`` computes them
    from stored entropies: comparisons in float32 (see the module docstring)."""
    num_tokens = np.asarray(num_tokens, dtype=np.int64)
    v = np.asarray(values)
    t = np.float32(threshold)
    offsets = np.zeros(num_tokens.size + 1, dtype=np.int64)
    np.cumsum(num_tokens, out=offsets[1:])
    starts = np.zeros(v.size, dtype=bool)
    forced = [0, 1]
    if monotonicity:
        v = v.astype(np.float32)
        if v.size > 2:
            np.greater(v[1:-1] - v[:-2], t, out=starts[2:])  # token p: v[p-1] - v[p-2]
        forced.append(2)
    elif v.size > 1:
        # token p: v[p-1] > t in float32; every float16 is exact in float32, so comparing the
        # values as real numbers against t (what `above` does) gives the same decisions.
        starts[1:] = above(v[:-1], float(t)) if v.dtype in (np.float16, np.float32) else v[:-1].astype(np.float32) > t
    for k in forced:  # values across a document edge are never used: these overwrite them
        starts[offsets[:-1][num_tokens > k] + k] = True
    return patches_from_starts(starts, offsets, num_tokens, max_patch_length)


def with_bos_eos(ours: PatchedBatch, eos_own_patch: np.ndarray, max_patch_length: int | None = None) -> PatchedBatch:
    """Our patch lengths (bytes only) as Meta's tokens see them: BOS a patch of its own in front,
    EOS its own patch where ``eos_own_patch`` (always for an empty document) or else joined to the
    last patch, cut again where that makes it longer than ``max_patch_length``."""
    num = ours.num_patches
    D = num.size
    last = np.zeros(D, dtype=np.int64)
    ends = np.cumsum(num) - 1
    has = num > 0
    last[has] = ours.patch_lengths[ends[has]]
    extra = np.asarray(eos_own_patch, dtype=bool) | ~has
    if max_patch_length is not None:
        extra |= last >= max_patch_length  # last + 1 > m: the cut leaves EOS as a piece of 1
    out_num = num + 1 + extra
    out_offsets = np.zeros(D + 1, dtype=np.int64)
    np.cumsum(out_num, out=out_offsets[1:])
    out = np.empty(int(out_offsets[-1]), dtype=np.int32)
    tail = out_offsets[1:] - 1
    ours_at = np.ones(out.size, dtype=bool)  # our patches fill every slot but BOS and an own EOS
    ours_at[out_offsets[:-1]] = False
    ours_at[tail[extra]] = False
    out[ours_at] = ours.patch_lengths
    out[out_offsets[:-1]] = 1  # BOS
    out[tail[extra]] = 1
    out[tail[~extra]] += 1
    return PatchedBatch(out, out_num)


def differing_documents(a: PatchedBatch, b: PatchedBatch) -> np.ndarray:
    """Indices of the documents whose patch lengths differ between two batches."""
    if np.array_equal(a.num_patches, b.num_patches) and np.array_equal(a.patch_lengths, b.patch_lengths):
        return np.zeros(0, dtype=np.int64)
    return np.array([i for i, (x, y) in enumerate(zip(a.split(), b.split())) if not np.array_equal(x, y)], dtype=np.int64)


def to_meta_entropies(byte_lengths: np.ndarray, entropies: np.ndarray, eos_entropy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Meta's values (float16, n + 2 per document) and their list offsets, from our entropies
    (all documents end to end) and eos_entropy; value n + 1 is written as 0 (never read)."""
    byte_lengths = np.asarray(byte_lengths, dtype=np.int64)
    offsets = np.zeros(byte_lengths.size + 1, dtype=np.int64)
    np.cumsum(byte_lengths + 2, out=offsets[1:])
    values = np.zeros(int(offsets[-1]), dtype=np.float16)
    is_byte = np.ones(values.size, dtype=bool)
    eos_at = offsets[:-1] + byte_lengths
    is_byte[eos_at] = False
    is_byte[eos_at + 1] = False
    values[is_byte] = entropies
    values[eos_at] = eos_entropy
    return values, offsets


# --- the data: block -----------------------------------------------------------------------


def data_block(
    root_dir: str, source: str, preprocess_dir: str, entropy_model_name: str,
    threshold: float, max_patch_length: int | None, monotonicity: bool,
) -> dict:
    """Meta's ``data:`` config (bytelatent DataloaderArgs fields) that reads an export."""
    return {"data": {
        "root_dir": root_dir,
        "sources": {source: 1.0},
        "preprocess_dir": preprocess_dir,
        "entropy_model_name": entropy_model_name,
        "file_format": "arrow",
        "tokenizer_args": {"name": "blt"},  # bytes + 4, BOS and EOS: the n + 2 tokens of the shards
        "patcher_args": {
            "patching_mode": "entropy",
            "realtime_patching": False,
            "threshold": threshold,
            "max_patch_length": max_patch_length,
            "monotonicity": monotonicity,
        },
    }}


# --- export --------------------------------------------------------------------------------


class MetaExportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    patches: str = Field(description="patches dataset to export: NAME or NAME@vN")
    out: str = Field(description="folder URL (local or s3://) to write the layout into")
    chunks: int = Field(1, ge=1, description="chunk files (shard groups); documents split evenly, in order")
    split: str | None = Field("train", description="split to export; None exports every part")
    entropy_model_name: str | None = Field(None, description="folder name for the model [default: from the manifest]")
    shard_bytes: int = Field(1 << 30, ge=1, description="start the next shard of a chunk after this many Arrow bytes")
    batch_rows: int = Field(BATCH_ROWS, ge=1, description="rows per record batch")
    accept_monotonic_difference: bool = Field(
        False, description="export a monotonic dataset although Meta's loader always starts a patch at byte 1")


class MetaExport(BaseModel):
    """What an export wrote (URLs), and how many documents Meta's loader patches differently."""

    model_config = ConfigDict(extra="forbid")
    dataset: str
    out: str
    config_file: str
    config_yaml: str
    chunk_files: list[str]
    shards: list[str]
    documents: int
    bytes: int
    differing_documents: int = Field(0, description="monotonic only: documents whose lengths differ at byte 1 or EOS")


def _url(store: Store, rel: str) -> str:
    """What Meta's loader is given: an absolute path on a local disk, else the URL."""
    return store.path(rel) if store.is_local else store.uri(rel)


def _export_rule(manifest: Manifest, cfg: MetaExportConfig) -> tuple[float, int | None, bool]:
    """(threshold, max_patch_length, monotonic) of an exportable dataset, or a clear refusal."""
    p = manifest.params
    scheme = p.get("scheme")
    if scheme not in ("entropy", "monotonic"):
        raise MetaLayoutError(
            f"{manifest.ref} was patched with the {scheme!r} scheme; Meta's loader patches only from entropies "
            "(export a dataset made with --scheme entropy, or repatch this one if it has entropies)")
    if scheme == "monotonic" and not cfg.accept_monotonic_difference:
        raise MetaLayoutError(
            f"{manifest.ref} is monotonic: Meta's loader always starts a patch at byte 1 (and at EOS of a 1-byte "
            "document), our rule decides it by the entropy difference, so some patch lengths would differ; "
            "pass --accept-monotonic-difference to export anyway")
    if not has_entropies(manifest):
        raise MetaLayoutError(f"{manifest.ref} has no stored entropies, which Meta's layout needs: run blt-data patch again with --entropies")
    if not has_eos_entropy(manifest):
        raise MetaLayoutError(
            f"{manifest.ref} has no end-of-document entropy (patches format version 1), which Meta's rule needs to "
            "place EOS; repatch cannot make it: run blt-data patch again")
    if p.get("threshold") is None:
        raise MetaLayoutError(f"{manifest.ref} records no threshold")
    return float(p["threshold"]), p.get("max_patch_length"), scheme == "monotonic"


def default_entropy_model_name(manifest: Manifest) -> str:
    model = manifest.params.get("model") or {}
    name = model.get("ref") or manifest.params.get("entropy_model_name")
    if not name:
        raise MetaLayoutError(f"{manifest.ref} records no entropy model; name it with --entropy-model-name")
    return name.replace("@", "_")


class _ShardWriter:
    """Arrow IPC files, one open at a time: a new shard per chunk, and after ``shard_bytes``."""

    def __init__(self, store: Store, folder: str, dataset: str, chunks: int, shard_bytes: int):
        self.store, self.folder, self.dataset, self.shard_bytes = store, folder, dataset, shard_bytes
        self.width = max(2, len(str(chunks - 1)))  # zero-padded so a glob lists chunks in order
        self.shards: list[str] = []
        self.chunk = -1
        self.k = 0
        self._stack: ExitStack | None = None

    def chunk_name(self, chunk: int) -> str:
        return f"{self.dataset}.chunk.{chunk:0{self.width}d}.jsonl"

    def write(self, chunk: int, batch: pa.RecordBatch) -> None:
        if chunk != self.chunk or self._sink.nbytes >= self.shard_bytes:
            self.k = 0 if chunk != self.chunk else self.k + 1
            self.close()
            self.chunk = chunk
            rel = f"{self.folder}/{self.chunk_name(chunk)}.shard_{self.k:02d}.arrow"
            self._stack = ExitStack()
            self._sink = self._stack.enter_context(self.store.create(rel, hashed=False))  # no manifest records it
            self._writer = self._stack.enter_context(pa.ipc.new_file(self._sink, META_SCHEMA))
            self.shards.append(rel)
        self._writer.write_batch(batch)

    def close(self) -> None:
        if self._stack is not None:
            self._stack.close()  # writer footer, then the object is published whole
            self._stack = None

    def abort(self, exc: BaseException) -> None:
        if self._stack is not None:
            self._stack.__exit__(type(exc), exc, exc.__traceback__)  # the temp file goes, nothing is published
            self._stack = None


def _record_batches(table: pa.RecordBatch | pa.Table, rows: int) -> Iterator[pa.RecordBatch]:
    """Slices of at most ``rows`` rows and about BATCH_TEXT_BYTES of text (one row may exceed it)."""
    n = table.num_rows
    sizes = pc.binary_length(table.column("text")).to_numpy(zero_copy_only=False).astype(np.int64)
    start = 0
    while start < n:
        cum = np.cumsum(sizes[start:start + rows])
        stop = start + max(1, int(np.searchsorted(cum, BATCH_TEXT_BYTES, side="right")))
        yield table.slice(start, stop - start)
        start = stop


def _list_parts(array: pa.ListArray) -> tuple[np.ndarray, np.ndarray]:
    """Flat values and per-row lengths of a (possibly sliced) list array."""
    return array.flatten().to_numpy(zero_copy_only=False), array.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)


def _meta_batch(piece: pa.RecordBatch, threshold: float, t_meta: float, max_len: int | None, monotonic: bool) -> tuple[pa.RecordBatch, np.ndarray]:
    """One batch in Meta's schema, and the rows whose lengths Meta's loader would not reproduce."""
    if piece.column("eos_entropy").null_count:
        row = int(np.flatnonzero(piece.column("eos_entropy").is_null().to_numpy(zero_copy_only=False))[0])
        raise MetaLayoutError(f"document {piece.column('id')[row].as_py()!r} has no eos_entropy; run blt-data patch again")
    entropies, n = _list_parts(piece.column("entropies"))
    eos = piece.column("eos_entropy").to_numpy(zero_copy_only=False).astype(np.float16)
    values, offsets = to_meta_entropies(n, entropies, eos)
    pl, num = _list_parts(piece.column("patch_lengths"))
    ours = PatchedBatch(pl.astype(np.int32), num)
    # Where our rule puts EOS (real-number comparisons, as patching.py): its own patch or not.
    last = np.zeros(n.size)
    last[n > 0] = entropies[np.cumsum(n)[n > 0] - 1]
    eos64 = eos.astype(np.float64)
    eos_own = (eos64 - last > threshold) & (n > 0) if monotonic else eos64 > threshold
    expected = with_bos_eos(ours, eos_own, max_len)
    meta = meta_patch_lengths(values, n + 2, t_meta, monotonic, max_len)
    differing = differing_documents(expected, meta)
    batch = pa.RecordBatch.from_arrays(
        [piece.column("id").cast(pa.string()), piece.column("text").cast(pa.string()),
         pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, pa.float16()))],
        schema=META_SCHEMA,
    )
    return batch, differing


def export_meta(registry: Registry, cfg: MetaExportConfig, progress: bool = False) -> MetaExport:
    """Write a patches dataset in Meta's layout (see the module docstring) and its data: block."""
    manifest = registry.resolve(cfg.patches, kind="patches")
    threshold, max_len, monotonic = _export_rule(manifest, cfg)
    t_meta = meta_threshold(threshold) if not monotonic else float(round_down(threshold, np.dtype(np.float32)))
    model_name = cfg.entropy_model_name or default_entropy_model_name(manifest)
    if "/" in model_name or model_name in ("", ".", ".."):
        raise MetaLayoutError(f"entropy model name {model_name!r} must be one folder name")
    parts = manifest.parts_of(cfg.split)
    total = sum(p.rows for p in parts)
    if total == 0:
        splits = ", ".join(f"{k}: {v}" for k, v in manifest.stats.splits.items()) or "none"
        raise MetaLayoutError(f"{manifest.ref} has no documents in split {cfg.split!r} (splits: {splits})")
    if cfg.chunks > total:
        raise MetaLayoutError(f"--chunks {cfg.chunks} is more than the {total} documents to export; every chunk needs one")

    out = Store.open(cfg.out)
    out.check_reachable()
    X = manifest.name
    shard_dir = f"{PREPROCESS_DIR}/{X}/{model_name}"
    chunk_dir = f"{ROOT_DIR}/{X}"
    # Meta's loader globs these folders: files left by another export would be read as ours.
    for folder in (shard_dir, chunk_dir):
        if out.find(folder):
            raise MetaLayoutError(f"{out.uri(folder)} already holds files; export into an empty --out (or delete them)")

    bounds = np.array([c * total // cfg.chunks for c in range(cfg.chunks + 1)], dtype=np.int64)
    writer = _ShardWriter(out, shard_dir, X, cfg.chunks, cfg.shard_bytes)
    columns = ["id", "text", "patch_lengths", "entropies", "eos_entropy"]
    doc = text_bytes = differing = 0

    def read_batches() -> Iterator[pa.RecordBatch]:
        for part in parts:
            with registry.store.open_input(registry.part_path(manifest, part)) as f:
                yield from pq.ParquetFile(f).iter_batches(batch_size=cfg.batch_rows, columns=columns)

    try:
        with tqdm(total=total, unit="doc", desc=f"export {manifest.ref} -> meta", disable=not progress) as bar:
            # Reading (decoding Parquet) runs ahead on a thread, overlapping the conversion.
            for batch in in_background(read_batches, depth=4, name="export-read"):
                for piece in _record_batches(batch, cfg.batch_rows):
                    start = 0
                    while start < piece.num_rows:  # cut at chunk edges
                        chunk = int(np.searchsorted(bounds, doc, side="right")) - 1
                        stop = min(piece.num_rows, start + int(bounds[chunk + 1]) - doc)
                        meta_batch, bad = _meta_batch(piece.slice(start, stop - start), threshold, t_meta, max_len, monotonic)
                        if bad.size and not monotonic:
                            row = piece.column("id")[start + int(bad[0])].as_py()
                            raise MetaLayoutError(
                                f"{manifest.ref}: document {row!r} has patch lengths its recorded rule (threshold "
                                f"{threshold}, max_patch_length {max_len}) does not give, so Meta's loader would "
                                "not reproduce them; verify the dataset (blt-data registry verify)")
                        differing += bad.size
                        writer.write(chunk, meta_batch)
                        text_bytes += int(pc.sum(pc.binary_length(meta_batch.column("text"))).as_py() or 0)
                        doc += stop - start
                        start = stop
                        bar.update(meta_batch.num_rows)
    except BaseException as e:
        writer.abort(e)
        raise
    writer.close()

    chunk_files = [f"{chunk_dir}/{writer.chunk_name(c)}" for c in range(cfg.chunks)]
    for rel in chunk_files:
        out.write_bytes(rel, b"")  # Meta's loader only globs their names in Arrow mode
    block = data_block(_url(out, ROOT_DIR), X, _url(out, PREPROCESS_DIR), model_name, t_meta, max_len, monotonic)
    header = (
        f"# Meta bytelatent `data:` block for {manifest.ref} ({manifest.id}), exported by blt-data.\n"
        f"# threshold {t_meta!r} is our {threshold!r} as Meta's float32 comparison needs it: same decisions.\n"
        f"# Chunk files under root_dir are empty: in Arrow mode Meta's loader only reads their names.\n"
    )
    if monotonic:
        header += f"# monotonic: {differing} of {total} documents get other patch lengths (byte 1 / EOS), accepted.\n"
    config_yaml = header + yaml.safe_dump(block, sort_keys=False)
    out.write_bytes(CONFIG_FILE, config_yaml.encode())
    for rel in writer.shards:  # last: a marker says its shard is whole and the export done
        out.write_bytes(rel + COMPLETE, b"")
    return MetaExport(
        dataset=manifest.ref, out=out.url, config_file=_url(out, CONFIG_FILE), config_yaml=config_yaml,
        chunk_files=[_url(out, r) for r in chunk_files], shards=[_url(out, r) for r in writer.shards],
        documents=total, bytes=text_bytes, differing_documents=differing,
    )


# --- import --------------------------------------------------------------------------------


class MetaImportConfig(BaseModel):
    """``import-preprocessed``: Meta's shards into a patches dataset, patched by our rule."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="folder URL (local or s3://) holding *.shard_*.arrow files (searched recursively)")
    name: str = Field(description="name of the patches dataset to create")
    rule: PatchRule = Field(default_factory=PatchRule, description="an entropy scheme, with a threshold or a target patch size")
    model: str | None = Field(None, description="the entropy model: a registry model (NAME[@vN]) or Meta's name for it")
    skip_incomplete: bool = Field(False, description="import the shards that have a .complete marker, skip the rest")
    part_bytes: int = Field(256 * 10**6, ge=1, description="text bytes per Parquet part")
    workers: int = Field(2, ge=1, description="shards converted at once (threads; each holds one part in memory)",
                         json_schema_extra=EXECUTION)

    @model_validator(mode="after")
    def _one_rule(self) -> "MetaImportConfig":
        check_name(self.name)
        if self.rule.scheme not in ENTROPY_SCHEMES:
            raise ValueError(f"import-preprocessed applies an entropy scheme ({' or '.join(ENTROPY_SCHEMES)}), not {self.rule.scheme!r}")
        self.rule.require_threshold_or_target()
        return self


def find_shards(store: Store) -> tuple[list[tuple[str, int]], list[str]]:
    """(shard, bytes) in reading order (folder, chunk file, K as a number, as Meta sorts), and the
    shards without a ``.complete`` marker."""
    files = store.find_detail()
    names = {p for p, _, _ in files}
    shards = []
    for path, size, _ in files:
        m = _SHARD_RE.match(posixpath.basename(path))
        if m:
            chunk = _CHUNK_RE.match(m.group("chunk"))
            key = (posixpath.dirname(path), chunk.group("dataset") if chunk else m.group("chunk"),
                   int(chunk.group("nn")) if chunk else -1, m.group("chunk"), int(m.group("k")))
            shards.append((key, path, size))
    shards.sort()
    missing = [p for _, p, _ in shards if p + COMPLETE not in names]
    return [(p, s) for _, p, s in shards], missing


class _Damage(Exception):
    pass


def read_shard(store: Store, rel: str, damage: list[dict]) -> Iterator[pa.RecordBatch]:
    """A shard's record batches. A damaged file yields the batches before the damage and adds
    ``{file, error, lines_read, bytes_read}`` to ``damage``; a file of other columns is refused."""
    rows = 0
    with store.open_input(rel) as f:
        try:
            try:
                reader = pa.ipc.open_file(f)
            except (pa.ArrowInvalid, OSError) as e:
                # No footer (truncated): the file format is a stream after 8 bytes of magic, so
                # the whole batches before the damage can still be read.
                first_error = e
                f.seek(8)
                try:
                    stream = pa.ipc.open_stream(f)
                except (pa.ArrowInvalid, OSError):
                    raise _Damage(f"{type(first_error).__name__}: {first_error}") from None
                _check_schema(rel, stream.schema)
                while True:
                    try:
                        batch = stream.read_next_batch()
                        batch.validate(full=True)
                    except (StopIteration, pa.ArrowInvalid, OSError):
                        break  # the end of what was written whole
                    rows += batch.num_rows
                    yield batch
                raise _Damage(f"{type(first_error).__name__}: {first_error}")
            _check_schema(rel, reader.schema)
            for i in range(reader.num_record_batches):
                try:
                    batch = reader.get_batch(i)
                    batch.validate(full=True)
                except (pa.ArrowInvalid, OSError) as e:
                    raise _Damage(f"record batch {i}: {type(e).__name__}: {e}") from None
                rows += batch.num_rows
                yield batch
        except _Damage as e:
            damage.append({"file": store.uri(rel), "error": str(e), "lines_read": rows, "bytes_read": -1})
            log.warning("%s is damaged after %d rows: %s", store.uri(rel), rows, e)


def _check_schema(rel: str, schema: pa.Schema) -> None:
    def ok(name, test):
        return name in schema.names and test(schema.field(name).type)

    def is_str(t):
        return pa.types.is_string(t) or pa.types.is_large_string(t)

    def is_floats(t):
        return (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_floating(t.value_type)

    if not (ok("sample_id", lambda t: True) and ok("text", is_str) and ok("entropies", is_floats)):
        raise MetaLayoutError(f"{rel} is not a Meta preprocessed shard: columns {schema} (expected sample_id, text: string, entropies: list<float16>)")


class _Rows(NamedTuple):
    """The good rows of a Meta batch, converted; and the bad ones with their reasons."""

    rows: np.ndarray  # int64, the good rows' indices in the batch
    ids: pa.Array  # string
    text: pa.Array  # large_string
    entropies: pa.ListArray  # list<float16>, one per byte
    eos_entropy: pa.Array  # float16
    bad: list[tuple[int, str]]  # (row in batch, reason)


def from_meta_batch(batch: pa.RecordBatch) -> _Rows:
    """Split Meta's n + 2 values into our entropies (values < n) and eos_entropy (value n);
    rows without text or id or with another number of entropies are returned as bad.

    Whole-column work only: the good rows' values are the flat values less each row's last two
    (a mask), the texts and ids are the batch's own buffers; rows are looked at one by one only
    where one is bad."""
    text = batch.column("text").cast(pa.large_string())
    sample_id = batch.column("sample_id")
    ent = batch.column("entropies")
    n = pc.binary_length(text).to_numpy(zero_copy_only=False)
    counts = ent.value_lengths().to_numpy(zero_copy_only=False)
    flat_all = np.asarray(ent.flatten().to_numpy(zero_copy_only=False), dtype=np.float16)  # no copy when float16
    bad = []
    ok = np.ones(batch.num_rows, dtype=bool)
    for column, reason in ((text, "no text"), (sample_id, "no sample_id"), (ent, "no entropies")):
        if column.null_count:
            for i in np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False) & ok):
                bad.append((int(i), reason))
            ok &= ~column.is_null().to_numpy(zero_copy_only=False)
    n = np.nan_to_num(n.astype(np.float64), nan=-1).astype(np.int64)
    counts = np.nan_to_num(counts.astype(np.float64), nan=-1).astype(np.int64)
    wrong = ok & (counts != n + 2)
    for i in np.flatnonzero(wrong):
        bad.append((int(i), f"{counts[i]} entropies for {n[i]} bytes (Meta's layout has n + 2)"))
    ok &= ~wrong
    # Per-row starts in the flat values (null rows hold none).
    sizes = np.where(counts > 0, counts, 0)
    starts = np.zeros(batch.num_rows + 1, dtype=np.int64)
    np.cumsum(sizes, out=starts[1:])
    nan = nan_mask(flat_all)
    if nan.any():
        row_of = np.repeat(np.arange(batch.num_rows), sizes)
        pos = np.arange(flat_all.size) - starts[row_of]
        used = nan & (pos <= n[row_of])  # value n + 1 is never read
        for i in np.flatnonzero(np.bincount(row_of[used], minlength=batch.num_rows).astype(bool) & ok):
            bad.append((int(i), "entropies contain NaN"))
            ok[i] = False
    bad.sort()
    keep = np.flatnonzero(ok)
    good_n = n[keep]
    # The kept rows' values < n: every value of a kept row but its last two (value n, value n + 1).
    take = np.ones(flat_all.size, dtype=bool) if ok.all() else np.repeat(ok, sizes)
    ends = starts[1:][keep]
    take[ends - 1] = False
    take[ends - 2] = False
    byte_values = flat_all[take]
    eos = flat_all[ends - 2]
    offsets = np.zeros(keep.size + 1, dtype=np.int32)
    np.cumsum(good_n, out=offsets[1:])
    if keep.size == batch.num_rows:
        ids, text = sample_id, text
    else:
        keep_arr = pa.array(keep)
        ids, text = sample_id.take(keep_arr), text.take(keep_arr)
    return _Rows(
        rows=keep,
        ids=ids.cast(pa.string()),
        text=text,
        entropies=pa.ListArray.from_arrays(pa.array(offsets), pa.array(byte_values, pa.float16())),
        eos_entropy=pa.array(eos, pa.float16()),
        bad=bad,
    )


def _source_names(shards: list[tuple[str, int]]) -> dict[str, str | None]:
    """Meta's dataset and entropy model names, when the paths follow <X>/<model>/<X>.chunk.NN.jsonl.shard_K.arrow."""
    datasets, models = set(), set()
    for path, _ in shards:
        parts = path.split("/")
        chunk = _CHUNK_RE.match(_SHARD_RE.match(parts[-1]).group("chunk"))
        datasets.add(chunk.group("dataset") if chunk else None)
        models.add(parts[-2] if len(parts) >= 3 and chunk and parts[-3] == chunk.group("dataset") else None)
    one = lambda s: next(iter(s)) if len(s) == 1 else None  # noqa: E731
    return {"dataset": one(datasets), "entropy_model_name": one(models)}


class ShardRecord(BaseModel):
    """The completion record of one shard (the unit of an import), written after its parts."""

    model_config = ConfigDict(extra="forbid")
    unit: int
    shard: str
    parts: list[PartInfo]
    quarantine: PartInfo | None = None
    stats: DatasetStats
    quarantined: int = 0
    damaged: list[dict] = Field(default_factory=list)
    duplicate_ids: int = 0
    duplicate_id_examples: list[str] = Field(default_factory=list)


class _Converted(NamedTuple):
    record: ShardRecord
    ids: set[int]  # hashes of the ids its documents got (a repeat renamed)
    asked: set[int]  # hashes of the ids its rows came with


def _import_shard(
    registry: Registry, src: Store, unit: int, path: str, job_id: str, cfg: MetaImportConfig, patch: PatchRule, seen: set[int],
) -> _Converted:
    """Shard ``unit`` into parts ``part-<unit>-<j>.parquet`` (of about ``part_bytes`` of text)
    and a quarantine part; the caller writes its completion record. ``seen`` holds the ids of
    the shards before it; it is only read here (other shards may be converting meanwhile)."""
    job_dir = registry.job_dir(cfg.name, job_id)
    record = ShardRecord(unit=unit, shard=src.uri(path), parts=[], stats=DatasetStats())
    mine: set[int] = set()
    asked: set[int] = set()
    part: PatchesPartWriter | None = None  # encodes on a worker thread while the next batches convert
    pending_bytes = 0
    quarantine: PartWriter | None = None

    def flush() -> None:
        nonlocal part, pending_bytes
        if part is not None:
            record.parts.append(part.close())
            part, pending_bytes = None, 0

    row = 0
    for batch in read_shard(src, path, record.damaged):
        rows = from_meta_batch(batch)
        for i, reason in rows.bad:
            if quarantine is None:
                q = f"_quarantine/{documents_part_name(unit)}"
                quarantine = PartWriter(registry.store, f"{job_dir}/{q}", f"_jobs/{job_id}/{q}", split="quarantine")
            e = batch.column("entropies")[i]
            raw = {"sample_id": batch.column("sample_id")[i].as_py(), "text": batch.column("text")[i].as_py(),
                   "entropies": len(e.values) if e.is_valid else None}  # their count, not the values
            quarantine.write_line(encode_line(quarantine_record(src.uri(path), row + i + 1, reason, json.dumps(raw, ensure_ascii=False))))
            record.quarantined += 1
        ids = rows.ids
        hashes = [hash(sid) for sid in ids.to_pylist()]
        asked.update(hashes)
        if len(set(hashes)) < len(hashes) or not seen.isdisjoint(hashes) or not mine.isdisjoint(hashes):
            ids = ids.to_pylist()
            for j, sid in enumerate(ids):  # ids are unique in a dataset: a repeat gets a positional id
                if hash(sid) in seen or hash(sid) in mine:
                    ids[j] = f"{sid}#{posixpath.basename(path)}:{row + int(rows.rows[j]) + 1}"
                    record.duplicate_ids += 1
                    if len(record.duplicate_id_examples) < 20:
                        record.duplicate_id_examples.append(sid)
                mine.add(hash(ids[j]))
        else:
            mine.update(hashes)
        row += batch.num_rows
        patch_lengths = patch_lengths_arrow(rows.text, rows.entropies, patch)
        table = build_table(ids, rows.text, patch_lengths, rows.entropies, rows.eos_entropy)
        if part is None:
            name = f"part-{unit:06d}-{len(record.parts):03d}.parquet"
            part = PatchesPartWriter(registry.store, f"{job_dir}/{name}", f"_jobs/{job_id}/{name}", table.schema,
                                     dataset=cfg.name, job_id=job_id, background=True)
        part.write(table)
        record.stats = record.stats + DatasetStats.of(patch_lengths, rows.entropies.values.to_numpy(zero_copy_only=False))
        pending_bytes += int(pc.sum(pc.binary_length(rows.text)).as_py() or 0)
        if pending_bytes >= cfg.part_bytes:
            flush()
    flush()
    if quarantine is not None:
        record.quarantine = quarantine.close()
    return _Converted(record, mine, asked)


def _import_shards(
    registry: Registry, src: Store, shards: list[tuple[str, int]], job_id: str, cfg: MetaImportConfig, patch: PatchRule,
    records: dict[int, ShardRecord], seen: set[int], bar: tqdm,
) -> None:
    """Convert the shards not in ``records``, ``cfg.workers`` at a time (Arrow IPC reading and
    Parquet encoding release the GIL), committing each in shard order: its completion record,
    its ids added to ``seen``. The result is the one-at-a-time result: a shard converted while
    earlier ones were still running saw only part of their ids, so when it shares an id with
    them (a repeat that then needs a positional id) it is converted again, after them."""
    pending = [u for u in range(len(shards)) if u not in records]
    job_dir = registry.job_dir(cfg.name, job_id)
    committed: dict[int, set[int]] = {}  # commit index -> that shard's ids, while a running shard may need them
    count = 0  # shards committed by this call
    workers = max(1, min(cfg.workers, len(pending)))
    with ThreadPoolExecutor(workers, thread_name_prefix="import") as pool:
        queue = iter(pending)
        running: dict[int, tuple[Future, int]] = {}  # unit -> (its conversion, len(committed) when it started)

        def start() -> None:
            unit = next(queue, None)
            if unit is not None:
                running[unit] = (pool.submit(_import_shard, registry, src, unit, shards[unit][0], job_id, cfg, patch, seen),
                                 count)

        for _ in range(workers):
            start()
        for unit in pending:
            future, mark = running.pop(unit)
            done = future.result()
            if any(not ids.isdisjoint(done.asked) or not ids.isdisjoint(done.ids) for i, ids in committed.items() if i >= mark):
                ds = registry.dataset_dir(cfg.name)
                registry.store.delete_many([f"{ds}/{p.path}" for p in done.record.parts + [done.record.quarantine] if p])
                done = _import_shard(registry, src, unit, shards[unit][0], job_id, cfg, patch, seen)
            seen.update(done.ids)
            committed[count] = done.ids
            count += 1
            first = min((m for _, m in running.values()), default=count)
            for i in [i for i in committed if i < first]:  # only shards still running can need them
                del committed[i]
            registry.store.write_bytes(f"{job_dir}/_done/unit-{unit:06d}.json", done.record.model_dump_json().encode())
            records[unit] = done.record
            bar.update(shards[unit][1])
            start()


def import_preprocessed(registry: Registry, cfg: MetaImportConfig, progress: bool = False) -> Manifest:
    """Import Meta-preprocessed shards as a patches dataset (no model runs); returns its manifest."""
    src = Store.open(cfg.source)
    if not src.is_local:
        src.check_reachable()
    shards, missing = find_shards(src)
    if not shards:
        raise MetaLayoutError(f"no *.shard_*.arrow files under {src.url}")
    if missing and not cfg.skip_incomplete:
        listed = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise MetaLayoutError(
            f"{len(missing)} of {len(shards)} shards have no .complete marker (unfinished, or their preprocessing "
            f"failed): {listed}; pass --skip-incomplete to import the others")
    skipped = [src.uri(p) for p in missing]
    shards = [(p, s) for p, s in shards if p not in set(missing)]
    if not shards:
        raise MetaLayoutError(f"every shard under {src.url} lacks its .complete marker")

    model_info, parents, model_name = None, [], None
    if cfg.model:
        try:
            m = registry.resolve(cfg.model, area="models", kind="entropy-model")
            model_info, parents = {"ref": m.ref, "sha256": m.params["sha256"]}, [m.ref]
        except RegistryError:
            model_name = cfg.model  # a name from Meta's side (its entropy_model_name), not in this registry
    names = _source_names(shards)
    job_id = job_hash({"step": "import-preprocessed", "source": src.url, "shards": shards, "model": model_info or model_name,
                       **cfg.model_dump(exclude={"source", "name", "model", "part_bytes", "workers"})})
    existing = registry.find_job(cfg.name, job_id)
    if existing is not None:
        return existing
    job_dir = registry.job_dir(cfg.name, job_id)
    patch, calibration = calibrated(registry.store, job_dir, cfg.rule, lambda num: _calibration_sample(src, shards, cfg.rule))

    records = read_records(registry.store, job_dir, ShardRecord)
    seen: set[int] = set()  # hashes of the ids so far: 8 bytes and a set slot per document
    for unit in sorted(records):  # resumed: the ids of the shards done are taken already
        for part in records[unit].parts:
            ids = read_part(registry.store, f"{registry.dataset_dir(cfg.name)}/{part.path}", ["id"]).column("id")
            seen.update(hash(i) for i in ids.to_pylist())
    with tqdm(total=sum(s for _, s in shards), unit="B", unit_scale=True, desc=f"import {cfg.name}", disable=not progress) as bar:
        bar.update(sum(size for unit, (_, size) in enumerate(shards) if unit in records))
        _import_shards(registry, src, shards, job_id, cfg, patch, records, seen, bar)
    ordered = [records[u] for u in range(len(shards))]
    stats = sum((r.stats for r in ordered), DatasetStats())  # in shard order: float sums are reproducible
    dataset_stats = stats.model_copy(update={
        "splits": {"train": stats.documents},
        "quarantined": sum(r.quarantined for r in ordered),
        "damaged_files": [d for r in ordered for d in r.damaged],
        "skipped_files": skipped,
        "duplicate_ids": sum(r.duplicate_ids for r in ordered),
        "duplicate_id_examples": [x for r in ordered for x in r.duplicate_id_examples][:20],
    })
    params = {
        "imported_from": "meta-preprocessed",
        "source": src.url,
        "shards": len(shards),
        "source_dataset": names["dataset"],
        "entropy_model_name": model_name or names["entropy_model_name"],
        "model": model_info,
        **cfg.rule.params(),
        "threshold": patch.threshold,
        "calibration": calibration.with_dataset_mean(dataset_stats.mean_patch_length).model_dump() if calibration else None,
        "entropies": True,
        "eos_entropy": True,
    }
    manifest = Manifest(
        name=cfg.name, kind="patches", job_id=job_id, parents=parents, params=params,
        arrow_schema=arrow_schema_summary(True, True), parts=[p for r in ordered for p in r.parts],
        quarantine=[r.quarantine for r in ordered if r.quarantine], stats=dataset_stats,
    )
    return registry.commit(manifest)


def _shard_entropies(src: Store, path: str) -> Iterator[np.ndarray]:
    for batch in read_shard(src, path, []):
        yield from from_meta_batch(batch).entropies.to_numpy(zero_copy_only=False)


def _calibration_sample(src: Store, shards: list[tuple[str, int]], rule: PatchRule) -> CalibrationSample:
    """Entropies to calibrate a target patch size on: the head of every shard (an equal share each).

    TODO(calibration-meta-sample): draw whole documents with ``calibrate.sample_rows`` as patch
    and repatch do; it needs each shard's row count, which an Arrow IPC file gives only by
    reading its record batches' headers."""
    share = max(1, rule.calibration_bytes // len(shards))
    return CalibrationSample(head_sample((_shard_entropies(src, path) for path, _ in shards), share))
