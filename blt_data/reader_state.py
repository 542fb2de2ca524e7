"""The reader's epoch order and resumable state: which documents a rank reads, and where it is.

    manifest ─▶ blocks: (part, rows a..b), a row group each by default
             ─▶ epoch order: the blocks sorted by a hash of (manifest id, split, seed, epoch, block)
             ─▶ shard (epoch, S, s) = order[s::S]; a rank's work is a queue of cursors into shards,
                then its default shard (e, world_size, rank) for e = next_epoch, next_epoch + 1, …

Invariant (exactly once): every document of an epoch lies in exactly one shard of that epoch's
order, and every shard is read by exactly one rank, from its cursor on; so every document is
read once per epoch, also across a change of world size.

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
of the new world takes its share of them (`assign_cursors`): a shard made for the new world size
goes to its own rank, the others to the least-loaded rank by documents left. Resumed shards
continue at their cursor, so a document cut by the checkpoint continues at its byte offset, never
from its start. From ``next_epoch`` on, the new world size shards epochs as usual.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from blt_data.patches import ROW_GROUP_ROWS
from blt_data.registry import Manifest

STATE_VERSION = 1


class ReaderError(ValueError):
    """A dataset, split or state the reader cannot use; the message names the dataset."""


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
    a library RNG, so the order cannot change with a numpy version.

    The hash of a block depends on the manifest's format. Format 1 (inline parts): blake2b of
    the part's path and the block's first row, one call per block, as readers always did, so
    saved states keep resuming. Format 2 (10^6 parts, millions of blocks): a splitmix64 mix of
    (part index, block index) keyed by blake2b of the epoch, computed on whole numpy columns;
    the part index is as stable as the path, since the manifest id fixes the part list."""

    def __init__(self, manifest: Manifest, split: str, seed: int, block_documents: int):
        self.parts = manifest.part_table().select(split)
        rows = self.parts.rows
        per_part = -(-rows // block_documents)
        total = int(per_part.sum())
        self.block_part = np.repeat(np.arange(len(rows), dtype=np.int64), per_part)
        self.block_ordinal = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(per_part) - per_part, per_part)
        self.block_start = self.block_ordinal * block_documents
        self.block_stop = np.minimum(self.block_start + block_documents, rows[self.block_part])
        self.num_blocks = total
        self.documents = int(rows.sum())
        self._hashed_paths = manifest.format_version < 2
        self._key = f"{manifest.id}|{split}|{seed}|{block_documents}".encode()
        self.permutation = lru_cache(maxsize=4)(self._permutation)
        self.shard = lru_cache(maxsize=64)(self._shard)

    def _permutation(self, epoch: int) -> np.ndarray:
        """Block indices in epoch ``epoch``'s reading order."""
        if self._hashed_paths:
            paths = self.parts.paths()
            keys = [
                hashlib.blake2b(self._key + f"|{epoch}|{paths[p]}|{a}".encode(), digest_size=16).digest()
                for p, a in zip(self.block_part.tolist(), self.block_start.tolist())
            ]
            return np.array(sorted(range(len(keys)), key=keys.__getitem__), dtype=np.int64)
        seed = np.uint64(int.from_bytes(hashlib.blake2b(self._key + f"|{epoch}".encode(), digest_size=8).digest(), "little"))
        ids = (self.block_part.astype(np.uint64) << np.uint64(32)) | self.block_ordinal.astype(np.uint64)
        return np.argsort(_splitmix64(_splitmix64(ids) ^ seed), kind="stable")

    def _blocks(self, indices: np.ndarray) -> list[Block]:
        return [Block(p, a, b) for p, a, b in zip(self.block_part[indices].tolist(), self.block_start[indices].tolist(),
                                                  self.block_stop[indices].tolist())]

    def order(self, epoch: int) -> list[Block]:
        return self._blocks(self.permutation(epoch))

    def _shard(self, epoch: int, shards: int, shard: int) -> tuple[list[Block], np.ndarray]:
        """The shard's blocks and the number of documents before each (plus the total, last)."""
        indices = self.permutation(epoch)[shard::shards]
        sizes = self.block_stop[indices] - self.block_start[indices]
        return self._blocks(indices), np.concatenate([[0], np.cumsum(sizes)])

    def shard_documents(self, c: Cursor) -> int:
        return int(self.shard(c.epoch, c.shards, c.shard)[1][-1])


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise (uint64 arithmetic wraps, as the algorithm wants)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def epoch_order(
    manifest: Manifest, split: str, seed: int, epoch: int, block_documents: int = ROW_GROUP_ROWS
) -> list[Block]:
    """The blocks of one epoch in reading order (every rank reads a stride of it)."""
    return EpochOrder(manifest, split, seed, block_documents).order(epoch)


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
