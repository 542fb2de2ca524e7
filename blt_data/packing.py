"""Packing: documents in, fixed-shape batches of BLT tokens and patches out (BLT paper §2).

    rows of (id, text, patch_lengths)
        ─▶ stream: per document BOS, bytes + 4, EOS, and patches [1, patch_lengths…, 1]
        ─▶ packer: rows of `seq_len` tokens, `batch_size` rows a batch; patches cut at row edges

Invariant: no byte is dropped or repeated. A patch that crosses a row edge is split in two; the
stream position after each batch, (cursor, document, token offset), is exact, so a reader can
save it and continue the same stream later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict

import numpy as np
import pyarrow as pa
import torch

from blt_data.tokens import BOS_ID, BYTE_OFFSET, EOS_ID, IGNORE_INDEX, PAD_ID


class Batch(TypedDict):
    """What the model consumes. B rows of T tokens; the last batch of a finite pass may have fewer rows."""

    tokens: torch.Tensor  # int64 (B, T): byte b -> b + 4, PAD 0, BOS 1, EOS 2
    targets: torch.Tensor  # int64 (B, T): next token of the stream, or IGNORE_INDEX
    patch_lengths: torch.Tensor  # int32 (B, P): patches covering each row, zero-padded right; rows sum to T
    doc_ids: torch.Tensor  # int32 (B, T): 0, 1, 2, … per document segment along the row; pad its own
    documents: list[str]  # ids of the documents whose BOS is in this batch
    n_bytes: int  # byte tokens (not BOS, EOS, pad)
    n_patches: int  # patches over non-pad tokens, counting both pieces of a patch cut at a row edge


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
class TokenStream:
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
    def of(cls, table: pa.Table, j: int, first_document: int, offset: int) -> "TokenStream":
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
    def concat(cls, streams: list["TokenStream"]) -> "TokenStream":
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


class Packer:
    """Cuts a token stream into batches of B rows of T tokens (BLT paper §2: rows are fixed-size
    byte windows; patches are split where a row edge crosses them). Each batch costs O(B * T),
    whatever is pending."""

    def __init__(self, seq_len: int, batch_size: int, patches_multiple: int):
        self.T, self.B, self.multiple = seq_len, batch_size, patches_multiple
        self._streams: list[TokenStream] = []
        self.num_tokens = 0
        self._last: tuple[int, int] = (0, 0)  # (cursor, document) of the last document fully taken

    def add(self, stream: TokenStream) -> None:
        self._streams.append(stream)
        self.num_tokens += len(stream.tokens)

    def take(self) -> tuple[Batch, tuple[int, int, int]]:
        """The next batch and the stream position after it: (cursor, document, offset)."""
        s = TokenStream.concat(self._streams)
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
        # Meta's convention (bytelatent train.py/eval.py count every non-pad target): the BOS
        # that follows an EOS is predicted and counted like a byte; only a next document that
        # resumes mid-text (a cursor offset), or the stream's end, leaves nothing to predict.
        follows = np.zeros(len(starts), bool)
        inside = starts < len(s.tokens)
        follows[inside] = s.tokens[starts[inside]] == BOS_ID
        targets[(starts - 1)[~follows]] = IGNORE_INDEX

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
            rest = TokenStream(
                s.tokens[real:], s.patch_ends[taken_patches:], s.doc_ends[first:], doc_offset,
                s.doc_cursor[first:], s.doc_index[first:], s.ids[first:], origin=end,
            )
            position = (int(rest.doc_cursor[0]), int(rest.doc_index[0]), int(doc_offset[0]))
            self._streams, self.num_tokens = [rest], len(rest.tokens)
        else:
            position = (self._last[0], self._last[1] + 1, 0)
            self._streams, self.num_tokens = [], 0
        return batch, position
