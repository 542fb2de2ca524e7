"""The trainer's reader: a patches dataset in, fixed-shape batches of BLT tokens and patches out.

    manifest ─▶ blocks: (part, rows a..b), a row group each by default
             ─▶ epoch order: the blocks sorted by a hash of (manifest id, split, seed, epoch, block)
             ─▶ shard (epoch, S, s) = order[s::S]; a rank's work is a queue of cursors into shards,
                then its default shard (e, world_size, rank) for e = next_epoch, next_epoch + 1, …
             ─▶ block reads (thread pool, `read_ahead` blocks ahead; only id, text, patch_lengths)
             ─▶ stream: per document BOS, bytes + 4, EOS, and patches [1, patch_lengths…, 1]
             ─▶ packer: rows of `seq_len` tokens, `batch_size` rows a batch; patches cut at row edges
             ─▶ prefetch thread ─▶ (batch, state)

Invariant (exactly once, exact resume): a rank's token stream is a pure function of its start
state, and the state yielded with a batch is the stream position right after that batch. Every
document of an epoch lies in exactly one shard of that epoch's order, and every shard is read
by exactly one rank, from its cursor on; so every document is read once per epoch.

The reader is put together from three modules, one concept each: ``reader_state`` (epoch order,
shards, cursors, the saved state and resharding), ``packing`` (token stream and batches) and this
one (block reads from the store, the iterator, the val reader). The trainer imports from here.

NOTE: in a finite pass (``epochs`` set, or the val reader) ranks may yield different numbers of
batches; an FSDP trainer must agree on when to stop (all-reduce a "have a batch" flag) and can
feed `empty_batch` on a rank that is done.
"""

from __future__ import annotations

import math
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from blt_data.jobs import EXECUTION
from blt_data.packing import Batch, Packer, TokenStream, empty_batch
from blt_data.patches import FORMAT, READABLE_FORMAT_VERSIONS, ROW_GROUP_ROWS
from blt_data.prefetch import in_background
from blt_data.reader_state import (
    STATE_VERSION, Block, Cursor, EpochOrder, ReaderError, ReaderState, assign_cursors, epoch_order, merge_states,
    parse_state,
)
from blt_data.registry import FORMAT_VERSION as MANIFEST_FORMAT_VERSION
from blt_data.registry import Manifest, PartInfo, Registry, RegistryError
from blt_data.storage import Store, StoreError
from blt_data.tokens import IGNORE_INDEX

# The public face: the trainer imports these from here.
__all__ = [
    "Batch", "IGNORE_INDEX", "Reader", "ReaderConfig", "ReaderError", "build_val_reader", "empty_batch",
    "epoch_order", "merge_states",
]

COLUMNS = ["id", "text", "patch_lengths"]  # entropies are never downloaded


class ReaderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(description="patches dataset reference: NAME (latest) or NAME@vN")
    split: str = Field("train", description="split of the dataset's parts to read")
    seq_len: int = Field(8192, ge=1, description="T: tokens (bytes, BOS, EOS) per row")
    batch_size: int = Field(8, ge=1, description="B: rows per batch, per rank")
    seed: int = Field(0, ge=0, description="seed of the per-epoch block order")
    epochs: int | None = Field(None, ge=1, description="passes over the split; None = forever")
    prefetch: int = Field(4, ge=0, description="batches prepared ahead on a background thread; 0 = none", json_schema_extra=EXECUTION)
    read_ahead: int = Field(2, ge=1, description="blocks downloaded and decoded concurrently ahead of the packer")
    block_documents: int = Field(
        ROW_GROUP_ROWS, ge=1,
        description="documents per shuffled block (a Parquet row group by default); part of the order: "
        "a state resumes only with the same value",
    )
    patches_multiple: int = Field(
        1, ge=1, description="round the patch_lengths width P up to a multiple of this (fewer shapes to compile)"
    )


class Reader:
    """Iterate to get ``(batch, state)``; ``state`` resumes right after ``batch``.

    ``state``: None (start of epoch 0), this rank's own state from a run at the same world size,
    or a `merge_states` result from a run at any world size.
    """

    def __init__(
        self, cfg: ReaderConfig, registry: Registry | Store, rank: int = 0, world_size: int = 1,
        state: dict | None = None,
    ):
        self.cfg = cfg
        self.registry = registry if isinstance(registry, Registry) else Registry(registry)
        if not 0 <= rank < world_size:
            raise ReaderError(f"rank {rank} is not in a world of {world_size}")
        self.rank, self.world_size = rank, world_size
        try:
            self.manifest = self.registry.resolve(cfg.dataset)
        except RegistryError as e:
            raise ReaderError(f"dataset {cfg.dataset!r}: {e}") from None
        check_manifest(self.manifest, cfg.split)
        self.order = EpochOrder(self.manifest, cfg.split, cfg.seed, cfg.block_documents)
        if cfg.epochs is None and self.order.num_blocks < world_size:
            raise ReaderError(
                f"{self.manifest.ref} split {cfg.split!r} has {self.order.num_blocks} blocks of at most "
                f"{cfg.block_documents} documents for {world_size} ranks: every rank needs a block per "
                "epoch (lower block_documents)"
            )
        self._queue, self._next_epoch = self._load(state) if state is not None else ([], 0)
        self._footers: dict[int, tuple[pq.FileMetaData, np.ndarray]] = {}

    @property
    def start_state(self) -> dict:
        """The state this reader starts from, as this rank's own state."""
        return self._state(self._queue, self._next_epoch)

    def __iter__(self) -> Iterator[tuple[Batch, dict]]:
        if self.cfg.prefetch == 0:
            return self._batches()
        return in_background(self._batches, self.cfg.prefetch, f"blt-reader-{self.rank}")

    # --- state -------------------------------------------------------------------------------

    def _state(self, cursors: list[Cursor], next_epoch: int) -> dict:
        return ReaderState(
            version=STATE_VERSION, dataset=self.manifest.id, split=self.cfg.split, seed=self.cfg.seed,
            block_documents=self.cfg.block_documents, world_size=self.world_size, rank=self.rank,
            next_epoch=next_epoch, cursors=cursors,
        ).model_dump()

    def _load(self, raw: dict) -> tuple[list[Cursor], int]:
        state = parse_state(raw, f"{self.cfg.dataset} ({self.manifest.id})")
        expected = {"dataset": self.manifest.id, "split": self.cfg.split, "seed": self.cfg.seed,
                    "block_documents": self.cfg.block_documents}
        for field, value in expected.items():
            if getattr(state, field) != value:
                raise ReaderError(
                    f"{self.cfg.dataset}: the state was saved with {field}={getattr(state, field)!r}, "
                    f"this reader has {field}={value!r} (dataset {self.manifest.id})"
                )
        for c in state.cursors:
            if c.shard >= c.shards or c.document > self.order.shard_documents(c):
                raise ReaderError(
                    f"{self.cfg.dataset}: state cursor {c.model_dump()} is outside the {self.cfg.split} split"
                )
            if self.cfg.epochs is not None and c.epoch >= self.cfg.epochs:
                raise ReaderError(
                    f"{self.cfg.dataset}: state cursor is in epoch {c.epoch}, but epochs={self.cfg.epochs}"
                )
        if state.rank is not None:
            if (state.rank, state.world_size) != (self.rank, self.world_size):
                raise ReaderError(
                    f"{self.cfg.dataset}: state of rank {state.rank} of {state.world_size} given to rank "
                    f"{self.rank} of {self.world_size}; to change the world size pass merge_states(all ranks' states)"
                )
            return list(state.cursors), state.next_epoch
        shares = assign_cursors(state.cursors, self.world_size, self.order)
        return shares[self.rank], state.next_epoch

    def _work(self) -> Iterator[tuple[int, Cursor]]:
        """This rank's cursors, numbered: the queue, then its default shard of each epoch."""
        yield from enumerate(self._queue)
        j, epoch = len(self._queue), self._next_epoch
        while self.cfg.epochs is None or epoch < self.cfg.epochs:
            yield j, Cursor(epoch=epoch, shards=self.world_size, shard=self.rank)
            j, epoch = j + 1, epoch + 1

    def _state_at(self, j: int, document: int, offset: int) -> dict:
        """The state whose next token is token ``offset`` of document ``document`` of cursor j."""
        if j < len(self._queue):
            cursor, rest, next_epoch = self._queue[j], self._queue[j + 1 :], self._next_epoch
        else:
            epoch = self._next_epoch + j - len(self._queue)
            cursor, rest, next_epoch = Cursor(epoch=epoch, shards=self.world_size, shard=self.rank), [], epoch + 1
        cursor = cursor.model_copy(update={"document": document, "offset": offset})
        done = document >= self.order.shard_documents(cursor)
        return self._state(([] if done else [cursor]) + list(rest), next_epoch)

    # --- reading -----------------------------------------------------------------------------

    def _tasks(self) -> Iterator[tuple[int, Block, int, int, int]]:
        """(cursor number, block, first row, first document in shard, token offset) to read, in order."""
        for j, c in self._work():
            blocks, before = self.order.shard(c.epoch, c.shards, c.shard)
            if c.document >= before[-1]:
                continue
            k = int(np.searchsorted(before, c.document, side="right")) - 1
            skip, offset = c.document - int(before[k]), c.offset
            for block, first in zip(blocks[k:], before[k:-1]):
                yield j, block, block.start + skip, int(first) + skip, offset
                skip = offset = 0

    def _streams(self) -> Iterator[TokenStream]:
        """Decoded blocks in reading order, `read_ahead` of them in flight."""
        pool = ThreadPoolExecutor(self.cfg.read_ahead, thread_name_prefix=f"blt-reader-io-{self.rank}")
        pending: deque[Future] = deque()
        tasks = self._tasks()
        try:
            while True:
                while len(pending) < self.cfg.read_ahead and (task := next(tasks, None)) is not None:
                    pending.append(pool.submit(self._read_stream, *task))
                if not pending:
                    return
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()
            pool.shutdown(wait=True)

    def _read_stream(self, j: int, block: Block, start: int, document: int, offset: int) -> TokenStream:
        where = f"{self.order.parts.path(block.part)} rows {start}..{block.stop}"
        try:
            table = self._read_rows(block.part, start, block.stop)
        except (pa.ArrowException, OSError, ValueError) as e:
            if isinstance(e, (ReaderError, StoreError, FileNotFoundError)):
                raise  # already names the part or the object
            raise ReaderError(f"{self.manifest.ref}: {where}: unreadable Parquet: {type(e).__name__}: {e}") from None
        try:
            return TokenStream.of(table, j, document, offset)
        except (ValueError, KeyError, pa.ArrowException) as e:
            raise ReaderError(f"{self.manifest.ref}: {where}: {e}") from None

    def _read_rows(self, index: int, start: int, stop: int) -> pa.Table:
        """Rows [start, stop) of a part, reading only the row groups that hold them."""
        part = self.order.parts.info(index)
        # Its size is checked against the manifest on open (sha256 needs a whole read: `verify`).
        with self.registry.store.open_checked(self.registry.part_path(self.manifest, part), part.bytes, part.sha256) as f:
            cached = self._footers.get(index)
            pf = pq.ParquetFile(f, metadata=cached[0] if cached else None)
            if cached is None:
                self._check_footer(part, pf)
                sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
                bounds = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])  # first row of each group
                cached = self._footers[index] = (pf.metadata, bounds)
            bounds = cached[1]
            first = int(np.searchsorted(bounds, start, side="right")) - 1
            last = int(np.searchsorted(bounds, stop, side="left"))
            table = pf.read_row_groups(list(range(first, last)), columns=COLUMNS)
        return table.slice(start - int(bounds[first]), stop - start)

    def _check_footer(self, part: PartInfo, pf: pq.ParquetFile) -> None:
        meta = {k.decode(): v.decode() for k, v in (pf.schema_arrow.metadata or {}).items()}
        where = f"{self.manifest.ref}: part {part.path}"
        if meta.get("blt.format") != FORMAT or meta.get("blt.format_version") not in READABLE_FORMAT_VERSIONS:
            raise ReaderError(
                f"{where} is format {meta.get('blt.format')!r} version {meta.get('blt.format_version')!r}; "
                f"this reader reads {FORMAT!r} version {' or '.join(READABLE_FORMAT_VERSIONS)}"
            )
        if meta.get("blt.job_id") != self.manifest.job_id:
            raise ReaderError(f"{where} was written by job {meta.get('blt.job_id')!r}, not {self.manifest.job_id!r}")
        if pf.metadata.num_rows != part.rows:
            raise ReaderError(f"{where} has {pf.metadata.num_rows} rows, the manifest says {part.rows}")

    def _batches(self) -> Iterator[tuple[Batch, dict]]:
        packer = Packer(self.cfg.seq_len, self.cfg.batch_size, self.cfg.patches_multiple)
        need = self.cfg.seq_len * self.cfg.batch_size + 1  # one token past the batch: the last target
        for stream in self._streams():
            packer.add(stream)
            while packer.num_tokens >= need:
                batch, position = packer.take()
                yield batch, self._state_at(*position)
        while packer.num_tokens:
            batch, position = packer.take()
            yield batch, self._state_at(*position)


def check_manifest(manifest: Manifest, split: str) -> None:
    if manifest.kind != "patches":
        raise ReaderError(f"{manifest.ref} is a {manifest.kind} dataset; the reader needs a patches dataset")
    if manifest.format_version > MANIFEST_FORMAT_VERSION:  # the registry refuses these first
        raise ReaderError(
            f"{manifest.ref}: manifest format version {manifest.format_version}, "
            f"this reader knows up to {MANIFEST_FORMAT_VERSION}"
        )
    missing = [c for c in COLUMNS if manifest.arrow_schema and c not in manifest.arrow_schema]
    if missing:
        raise ReaderError(f"{manifest.ref} has no column {', '.join(missing)}")
    try:
        rows = int(manifest.part_table().select(split).rows.sum())
    except RegistryError as e:
        raise ReaderError(f"{manifest.ref}: {e}") from None
    if not rows:
        splits = ", ".join(f"{k}={v}" for k, v in manifest.stats.splits.items()) or "none"
        raise ReaderError(f"{manifest.ref} has no documents in split {split!r} (documents per split: {splits})")


def build_val_reader(cfg: ReaderConfig, registry: Registry | Store, rank: int = 0, world_size: int = 1) -> Reader:
    """One pass over split ``val``, sharded: each rank reads about 1/world_size of it. Blocks are
    made small enough (about four per rank) that small val splits still spread over every rank;
    a rank may then read a row group of which it keeps part."""
    registry = registry if isinstance(registry, Registry) else Registry(registry)
    try:
        manifest = registry.resolve(cfg.dataset)
    except RegistryError as e:
        raise ReaderError(f"dataset {cfg.dataset!r}: {e}") from None
    documents = int(manifest.part_table().select("val").rows.sum())
    block = min(cfg.block_documents, max(1, math.ceil(documents / (4 * world_size))))
    val = cfg.model_copy(update={"split": "val", "epochs": 1, "block_documents": block})
    return Reader(val, registry, rank, world_size)
