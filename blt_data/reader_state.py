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
