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

State (``STATE_VERSION`` 1), a small JSON dict; ``ReaderState`` documents each field::

    {"version": 1, "dataset": "name@v3:<job-id>", "split": "train", "seed": 0,
     "block_documents": 4096, "world_size": 2, "rank": 0, "next_epoch": 1,
     "cursors": [{"epoch": 0, "shards": 2, "shard": 0, "document": 5120, "offset": 37}]}

A cursor is a position in one shard: ``document`` documents of the shard are done and the next
one continues at token ``offset`` of its BOS, bytes, EOS stream (0: from its BOS). After its
cursors a rank reads shard (e, world_size, rank) of every epoch e from ``next_epoch`` on.

Same world size: a rank's own state resumes exactly (bitwise-equal batches). A new world size:
`merge_states` joins every rank's state (``rank`` None) into the list of every shard some rank
has started and not finished (plus the unstarted default shards of lagging ranks), and each rank
of the new world takes its share of them: a shard made for the new world size goes to its own
rank, the others to the least-loaded rank by documents left. Resumed shards continue at their
cursor, so a document cut by the checkpoint continues at its byte offset, never from its start.
From ``next_epoch`` on, the new world size shards epochs as usual.

NOTE: in a finite pass (``epochs`` set, or the val reader) ranks may yield different numbers of
batches; an FSDP trainer must agree on when to stop (all-reduce a "have a batch" flag) and can
feed `empty_batch` on a rank that is done.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator, TypedDict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from blt_data.entropy import BOS_ID, BYTE_OFFSET, EOS_ID, PAD_ID
from blt_data.patches import FORMAT, FORMAT_VERSION, ROW_GROUP_ROWS
from blt_data.registry import FORMAT_VERSION as MANIFEST_FORMAT_VERSION
from blt_data.registry import Manifest, PartInfo, Registry, RegistryError
from blt_data.prefetch import in_background
from blt_data.storage import Store, StoreError

STATE_VERSION = 1
IGNORE_INDEX = -100  # target where there is nothing to predict (torch's cross_entropy default)
COLUMNS = ["id", "text", "patch_lengths"]  # entropies are never downloaded


class ReaderError(ValueError):
    """A dataset, split or state the reader cannot use; the message names the dataset."""


class ReaderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(description="patches dataset reference: NAME (latest) or NAME@vN")
    split: str = Field("train", description="split of the dataset's parts to read")
    seq_len: int = Field(8192, ge=1, description="T: tokens (bytes, BOS, EOS) per row")
    batch_size: int = Field(8, ge=1, description="B: rows per batch, per rank")
    seed: int = Field(0, ge=0, description="seed of the per-epoch block order")
    epochs: int | None = Field(None, ge=1, description="passes over the split; None = forever")
    prefetch: int = Field(4, ge=0, description="batches prepared ahead on a background thread; 0 = none")
    read_ahead: int = Field(2, ge=1, description="blocks downloaded and decoded concurrently ahead of the packer")
    block_documents: int = Field(
        ROW_GROUP_ROWS, ge=1,
        description="documents per shuffled block (a Parquet row group by default); part of the order: "
        "a state resumes only with the same value",
    )
    patches_multiple: int = Field(
        1, ge=1, description="round the patch_lengths width P up to a multiple of this (fewer shapes to compile)"
    )


class Batch(TypedDict):
    """What the model consumes. B rows of T tokens; the last batch of a finite pass may have fewer rows."""

    tokens: torch.Tensor  # int64 (B, T): byte b -> b + 4, PAD 0, BOS 1, EOS 2
    targets: torch.Tensor  # int64 (B, T): next token of the stream, or IGNORE_INDEX
    patch_lengths: torch.Tensor  # int32 (B, P): patches covering each row, zero-padded right; rows sum to T
    doc_ids: torch.Tensor  # int32 (B, T): 0, 1, 2, … per document segment along the row; pad its own
    documents: list[str]  # ids of the documents whose BOS is in this batch
    n_bytes: int  # byte tokens (not BOS, EOS, pad)
    n_patches: int  # patches over non-pad tokens, counting both pieces of a patch cut at a row edge


class Cursor(BaseModel):
    """A position in shard ``shard`` of ``shards`` of epoch ``epoch``'s block order."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epoch: int = Field(ge=0)
    shards: int = Field(ge=1, description="the world size the shard was made for")
    shard: int = Field(ge=0)
    document: int = Field(0, ge=0, description="documents of the shard already read")
    offset: int = Field(0, ge=0, description="tokens of the next document already read (0: from its BOS)")

    @property
    def key(self) -> tuple[int, int, int]:
        return self.epoch, self.shards, self.shard


class ReaderState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(description="STATE_VERSION of the reader that wrote it")
    dataset: str = Field(description="manifest id (name@vN:job-id) it was read from")
    split: str
    seed: int
    block_documents: int
    world_size: int = Field(ge=1)
    rank: int | None = Field(description="the rank it belongs to; None for a merged state of all ranks")
    next_epoch: int = Field(ge=0, description="first epoch whose default shard is not started")
    cursors: list[Cursor] = Field(description="shards started and not finished, in reading order")


@dataclass(frozen=True)
class Block:
    part: int  # index into the split's parts, in manifest order
    start: int  # first row in the part
    stop: int  # one past the last row


class EpochOrder:
    """The split's blocks and, per epoch, their order: a pure function of (manifest id, split,
    seed, block_documents, epoch). Blocks are sorted by a keyed hash rather than shuffled with
    a library RNG, so the order cannot change with a numpy version."""

    def __init__(self, manifest: Manifest, split: str, seed: int, block_documents: int):
        self.parts = manifest.parts_of(split)
        self.blocks = [
            Block(i, a, min(a + block_documents, part.rows))
            for i, part in enumerate(self.parts)
            for a in range(0, part.rows, block_documents)
        ]
        self.documents = sum(p.rows for p in self.parts)
        self._key = f"{manifest.id}|{split}|{seed}|{block_documents}".encode()
        self.order = lru_cache(maxsize=4)(self._order)
        self.shard = lru_cache(maxsize=64)(self._shard)

    def _order(self, epoch: int) -> list[Block]:
        def rank(b: Block) -> bytes:
            name = f"|{epoch}|{self.parts[b.part].path}|{b.start}".encode()
            return hashlib.blake2b(self._key + name, digest_size=16).digest()

        return sorted(self.blocks, key=rank)

    def _shard(self, epoch: int, shards: int, shard: int) -> tuple[list[Block], np.ndarray]:
        """The shard's blocks and the number of documents before each (plus the total, last)."""
        blocks = self.order(epoch)[shard::shards]
        sizes = np.fromiter((b.stop - b.start for b in blocks), np.int64, len(blocks))
        return blocks, np.concatenate([[0], np.cumsum(sizes)])

    def shard_documents(self, c: Cursor) -> int:
        return int(self.shard(c.epoch, c.shards, c.shard)[1][-1])


def epoch_order(
    manifest: Manifest, split: str, seed: int, epoch: int, block_documents: int = ROW_GROUP_ROWS
) -> list[Block]:
    """The blocks of one epoch in reading order (every rank reads a stride of it)."""
    return EpochOrder(manifest, split, seed, block_documents).order(epoch)


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
        if cfg.epochs is None and len(self.order.blocks) < world_size:
            raise ReaderError(
                f"{self.manifest.ref} split {cfg.split!r} has {len(self.order.blocks)} blocks of at most "
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

    def _streams(self) -> Iterator["_Stream"]:
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

    def _read_stream(self, j: int, block: Block, start: int, document: int, offset: int) -> "_Stream":
        where = f"{self.order.parts[block.part].path} rows {start}..{block.stop}"
        try:
            table = self._read_rows(block.part, start, block.stop)
        except (pa.ArrowException, OSError, ValueError) as e:
            if isinstance(e, (ReaderError, StoreError, FileNotFoundError)):
                raise  # already names the part or the object
            raise ReaderError(f"{self.manifest.ref}: {where}: unreadable Parquet: {type(e).__name__}: {e}") from None
        try:
            return _Stream.of(table, j, document, offset)
        except (ValueError, KeyError, pa.ArrowException) as e:
            raise ReaderError(f"{self.manifest.ref}: {where}: {e}") from None

    def _read_rows(self, index: int, start: int, stop: int) -> pa.Table:
        """Rows [start, stop) of a part, reading only the row groups that hold them."""
        part = self.order.parts[index]
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
        if meta.get("blt.format") != FORMAT or meta.get("blt.format_version") != str(FORMAT_VERSION):
            raise ReaderError(
                f"{where} is format {meta.get('blt.format')!r} version {meta.get('blt.format_version')!r}; "
                f"this reader reads {FORMAT!r} version {FORMAT_VERSION}"
            )
        if meta.get("blt.job_id") != self.manifest.job_id:
            raise ReaderError(f"{where} was written by job {meta.get('blt.job_id')!r}, not {self.manifest.job_id!r}")
        if pf.metadata.num_rows != part.rows:
            raise ReaderError(f"{where} has {pf.metadata.num_rows} rows, the manifest says {part.rows}")

    def _batches(self) -> Iterator[tuple[Batch, dict]]:
        packer = _Packer(self.cfg.seq_len, self.cfg.batch_size, self.cfg.patches_multiple)
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
    if manifest.format_version != MANIFEST_FORMAT_VERSION:
        raise ReaderError(
            f"{manifest.ref}: manifest format version {manifest.format_version}, "
            f"this reader knows {MANIFEST_FORMAT_VERSION}"
        )
    missing = [c for c in COLUMNS if manifest.arrow_schema and c not in manifest.arrow_schema]
    if missing:
        raise ReaderError(f"{manifest.ref} has no column {', '.join(missing)}")
    if not sum(p.rows for p in manifest.parts_of(split)):
        splits = ", ".join(f"{k}={v}" for k, v in manifest.stats.splits.items()) or "none"
        raise ReaderError(f"{manifest.ref} has no documents in split {split!r} (documents per split: {splits})")


def parse_state(raw: dict, dataset: str) -> ReaderState:
    if not isinstance(raw, dict):
        raise ReaderError(f"{dataset}: a reader state is a dict, not {type(raw).__name__}")
    if raw.get("version") != STATE_VERSION:
        raise ReaderError(f"{dataset}: reader state version {raw.get('version')!r}, this reader knows {STATE_VERSION}")
    try:
        return ReaderState.model_validate(raw)
    except ValidationError as e:
        raise ReaderError(f"{dataset}: malformed reader state: {e}") from None


def merge_states(states: list[dict]) -> dict:
    """One state from every rank's state (any order): what all ranks have started and not
    finished. Build readers of any world size from it (`Reader(..., state=merged)`)."""
    if not states:
        raise ReaderError("merge_states needs the state of every rank, got none")
    parsed = [parse_state(s, str(s.get("dataset")) if isinstance(s, dict) else "?") for s in states]
    first = parsed[0]
    for s in parsed:
        if s.rank is None:
            raise ReaderError(f"{s.dataset}: merge_states takes per-rank states, got a merged one")
        for field in ("dataset", "split", "seed", "block_documents", "world_size"):
            if getattr(s, field) != getattr(first, field):
                raise ReaderError(
                    f"{first.dataset}: states disagree on {field}: {getattr(first, field)!r} vs {getattr(s, field)!r}"
                )
    ranks = sorted(s.rank for s in parsed)
    if ranks != list(range(first.world_size)):
        raise ReaderError(f"{first.dataset}: need one state per rank 0..{first.world_size - 1}, got ranks {ranks}")
    next_epoch = max(s.next_epoch for s in parsed)
    cursors: dict[tuple[int, int, int], Cursor] = {}
    for s in parsed:
        # A rank behind the others has not started its default shard of the epochs up to theirs.
        lagging = [Cursor(epoch=e, shards=s.world_size, shard=s.rank) for e in range(s.next_epoch, next_epoch)]
        for c in [*s.cursors, *lagging]:
            if c.key in cursors:
                raise ReaderError(f"{first.dataset}: two ranks hold shard {c.key} (epoch, shards, shard)")
            cursors[c.key] = c
    return ReaderState(
        version=STATE_VERSION, dataset=first.dataset, split=first.split, seed=first.seed,
        block_documents=first.block_documents, world_size=first.world_size, rank=None,
        next_epoch=next_epoch, cursors=[cursors[k] for k in sorted(cursors)],
    ).model_dump()


def assign_cursors(cursors: list[Cursor], world_size: int, order: EpochOrder) -> list[list[Cursor]]:
    """Each rank's share of a merged state's cursors. A shard made for this world size goes to
    its own rank (so a merged state resumes a same-size run exactly); the rest, in (epoch,
    shards, shard) order, each to the rank with the fewest documents left so far (lowest rank on
    ties). A pure function of its arguments: every rank computes the same split."""
    shares: list[list[Cursor]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    own = [c for c in cursors if c.shards == world_size]
    for c in own + [c for c in cursors if c.shards != world_size]:
        r = c.shard if c.shards == world_size else min(range(world_size), key=lambda i: (load[i], i))
        shares[r].append(c)
        load[r] += order.shard_documents(c) - c.document
    return [sorted(s, key=lambda c: c.key) for s in shares]


def build_val_reader(cfg: ReaderConfig, registry: Registry | Store, rank: int = 0, world_size: int = 1) -> Reader:
    """One pass over split ``val``, sharded: each rank reads about 1/world_size of it. Blocks are
    made small enough (about four per rank) that small val splits still spread over every rank;
    a rank may then read a row group of which it keeps part."""
    registry = registry if isinstance(registry, Registry) else Registry(registry)
    try:
        manifest = registry.resolve(cfg.dataset)
    except RegistryError as e:
        raise ReaderError(f"dataset {cfg.dataset!r}: {e}") from None
    documents = sum(p.rows for p in manifest.parts_of("val"))
    block = min(cfg.block_documents, max(1, math.ceil(documents / (4 * world_size))))
    val = cfg.model_copy(update={"split": "val", "epochs": 1, "block_documents": block})
    return Reader(val, registry, rank, world_size)


def empty_batch(batch_size: int, seq_len: int) -> Batch:
    """An all-pad batch (every target ignored) for a rank whose finite pass ended before the others'."""
    return Batch(
        tokens=torch.zeros(batch_size, seq_len, dtype=torch.int64),
        targets=torch.full((batch_size, seq_len), IGNORE_INDEX, dtype=torch.int64),
        patch_lengths=torch.full((batch_size, 1), seq_len, dtype=torch.int32),
        doc_ids=torch.zeros(batch_size, seq_len, dtype=torch.int32),
        documents=[], n_bytes=0, n_patches=0,
    )


@dataclass
class _Stream:
    """Consecutive documents as one token stream. Token ``tokens[i]`` is at position
    ``origin + i``; positions in ``patch_ends`` and ``doc_ends`` are such positions, so taking a
    batch off the front moves ``origin`` and slices views, without rewriting the rest."""

    tokens: np.ndarray  # uint16 (N,)
    patch_ends: np.ndarray  # int64, end of every patch, increasing; the last is origin + N
    doc_ends: np.ndarray  # int64 (D,): end of each document's tokens; document k starts at doc_ends[k-1] (origin)
    doc_offset: np.ndarray  # int64 (D,): tokens of the document before its start here (0: starts with BOS)
    doc_cursor: np.ndarray  # int64 (D,): number of the cursor it was read under
    doc_index: np.ndarray  # int64 (D,): its index in that cursor's shard
    ids: np.ndarray  # object (D,): document ids
    origin: int = 0

    @classmethod
    def of(cls, table: pa.Table, j: int, first_document: int, offset: int) -> "_Stream":
        """Documents BOS, bytes + 4, EOS and patches 1, patch_lengths…, 1, built with a few
        vectorised passes; the first document starts ``offset`` tokens in (a resumed cursor)."""
        text = table.column("text").combine_chunks()
        patch_lengths = table.column("patch_lengths").combine_chunks()
        n = len(text)
        offset_type = np.int64 if pa.types.is_large_string(text.type) else np.int32
        text_offsets = np.frombuffer(text.buffers()[1], offset_type)[text.offset : text.offset + n + 1]
        text_offsets = text_offsets.astype(np.int64)
        data = text.buffers()[2]
        data = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
        data = data[text_offsets[0] : text_offsets[-1]]
        token_counts = np.diff(text_offsets) + 2
        doc_ends = np.cumsum(token_counts)
        tokens = _framed(data.astype(np.uint16) + BYTE_OFFSET, token_counts, BOS_ID, EOS_ID)

        num_patches = patch_lengths.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
        values = patch_lengths.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        patch_ends = np.cumsum(_framed(values, num_patches + 2, 1, 1))
        last_patch = np.cumsum(num_patches + 2) - 1
        bad = np.flatnonzero(patch_ends[last_patch] != doc_ends)
        if bad.size or (values.size and values.min() < 1):
            row = int(bad[0]) if bad.size else "?"
            raise ValueError(f"patch lengths do not cover the text bytes (first bad row {row})")

        if offset:
            if offset >= token_counts[0]:
                raise ValueError(f"state offset {offset} is past the document's {int(token_counts[0])} tokens")
            tokens = tokens[offset:]
            patch_ends = patch_ends[np.searchsorted(patch_ends, offset, side="right") :]
        doc_offset = np.zeros(n, np.int64)
        doc_offset[0] = offset
        return cls(
            tokens, patch_ends, doc_ends, doc_offset, np.full(n, j, np.int64),
            np.arange(first_document, first_document + n, dtype=np.int64),
            table.column("id").to_numpy(zero_copy_only=False), origin=offset,
        )

    @classmethod
    def concat(cls, streams: list["_Stream"]) -> "_Stream":
        """One stream, in the last one's positions (the earlier ones are a batch's worth or less,
        so only they are shifted)."""
        if len(streams) == 1:
            return streams[0]
        origin = position = streams[-1].origin - sum(len(s.tokens) for s in streams[:-1])
        shifts = []
        for s in streams:
            shifts.append(position - s.origin)
            position += len(s.tokens)
        return cls(
            np.concatenate([s.tokens for s in streams]),
            np.concatenate([s.patch_ends + d if d else s.patch_ends for s, d in zip(streams, shifts)]),
            np.concatenate([s.doc_ends + d if d else s.doc_ends for s, d in zip(streams, shifts)]),
            *(np.concatenate([getattr(s, f) for s in streams])
              for f in ("doc_offset", "doc_cursor", "doc_index", "ids")),
            origin=origin,
        )


def _framed(values: np.ndarray, counts: np.ndarray, first, last) -> np.ndarray:
    """Per group of counts[k] - 2 consecutive ``values``: ``first``, the values, ``last``."""
    ends = np.cumsum(counts)
    out = np.empty(int(ends[-1]) if ends.size else 0, values.dtype)
    inner = np.ones(out.size, bool)
    inner[ends - counts] = False
    inner[ends - 1] = False
    out[inner] = values
    out[ends - counts] = first
    out[ends - 1] = last
    return out


class _Packer:
    """Cuts a token stream into batches of B rows of T tokens (BLT paper §2: rows are fixed-size
    byte windows; patches are split where a row edge crosses them). Each batch costs O(B * T),
    whatever is pending."""

    def __init__(self, seq_len: int, batch_size: int, patches_multiple: int):
        self.T, self.B, self.multiple = seq_len, batch_size, patches_multiple
        self._streams: list[_Stream] = []
        self.num_tokens = 0
        self._last: tuple[int, int] = (0, 0)  # (cursor, document) of the last document fully taken

    def add(self, stream: _Stream) -> None:
        self._streams.append(stream)
        self.num_tokens += len(stream.tokens)

    def take(self) -> tuple[Batch, tuple[int, int, int]]:
        """The next batch and the stream position after it: (cursor, document, offset)."""
        s = _Stream.concat(self._streams)
        T, o = self.T, s.origin
        real = min(self.B * T, len(s.tokens))  # non-pad tokens in this batch
        rows = min(self.B, -(-real // T))  # only the end of a finite stream has fewer rows, and pad
        size = rows * T
        end = o + real

        # Starts of documents after the first, in batch coordinates, up to one just past the batch.
        starts = s.doc_ends[: np.searchsorted(s.doc_ends, o + size, side="right")] - o

        tokens = np.full(size, PAD_ID, np.int64)
        tokens[:real] = s.tokens[:real]
        targets = np.full(size, IGNORE_INDEX, np.int64)
        nxt = s.tokens[1 : real + 1]
        targets[: len(nxt)] = nxt
        targets[starts - 1] = IGNORE_INDEX  # the next token starts another document (or the stream ends)

        marks = np.zeros(size + 1, np.int32)  # 1 where a new segment starts along the row
        marks[starts] = 1
        marks[real] = 1  # the pad tail is a segment of its own
        marks = marks[:size].reshape(rows, T)
        marks[:, 0] = 0
        doc_ids = np.cumsum(marks, axis=1, dtype=np.int32)

        taken_patches = int(np.searchsorted(s.patch_ends, end, side="right"))
        is_cut = np.zeros(size + 1, bool)
        is_cut[s.patch_ends[:taken_patches] - o] = True
        is_cut[T::T] = True  # row edges split the patch across them
        is_cut[real] = True  # the pad tail is one patch
        cuts = np.flatnonzero(is_cut)
        patch_starts = np.concatenate([[0], cuts[:-1]])
        row = patch_starts // T
        per_row = np.bincount(row, minlength=rows)
        width = -(-int(per_row.max()) // self.multiple) * self.multiple
        col = np.arange(len(cuts)) - (np.cumsum(per_row) - per_row)[row]
        patch_lengths = np.zeros((rows, width), np.int32)
        patch_lengths[row, col] = cuts - patch_starts

        begun = 1 + int(np.searchsorted(s.doc_ends, end, side="left"))  # documents with a token in the batch
        documents = s.ids[:begun][s.doc_offset[:begun] == 0].tolist()
        batch = Batch(
            tokens=torch.from_numpy(tokens.reshape(rows, T)),
            targets=torch.from_numpy(targets.reshape(rows, T)),
            patch_lengths=torch.from_numpy(patch_lengths),
            doc_ids=torch.from_numpy(doc_ids),
            documents=documents,
            n_bytes=int(np.count_nonzero(s.tokens[:real] >= BYTE_OFFSET)),
            n_patches=int(np.count_nonzero(patch_starts < real)),
        )

        first = int(np.searchsorted(s.doc_ends, end, side="right"))  # first document not finished
        if first:
            self._last = (int(s.doc_cursor[first - 1]), int(s.doc_index[first - 1]))
        if first < len(s.doc_ends):
            doc_offset = s.doc_offset[first:].copy()
            doc_offset[0] += end - (int(s.doc_ends[first - 1]) if first else o)
            rest = _Stream(
                s.tokens[real:], s.patch_ends[taken_patches:], s.doc_ends[first:], doc_offset,
                s.doc_cursor[first:], s.doc_index[first:], s.ids[first:], origin=end,
            )
            position = (int(rest.doc_cursor[0]), int(rest.doc_index[0]), int(doc_offset[0]))
            self._streams, self.num_tokens = [rest], len(rest.tokens)
        else:
            position = (self._last[0], self._last[1] + 1, 0)
            self._streams, self.num_tokens = [], 0
        return batch, position
