"""Entropy scoring: documents in, per-byte next-byte entropies (nats, float32) out.

For a document of n bytes the model reads BOS as token 0 and byte j as token j + 1; then
`entropies[j]` = H(softmax(logits at token j)), the model's uncertainty about byte j. In every
layer token j sees tokens max(0, j - W + 1) ... j, W being the model's sliding window: Meta's
`local_block_causal` attention, applied per document (a full per-document forward).

The chain, with packing on a background thread so the device never waits for the CPU:

    texts -> pack_batches (CPU thread) -> queue -> model.hidden + chunked entropy head
          -> per-document arrays, in input order

Packing: documents are laid end to end into rows of `row_len` tokens. A document that does not
fit in what is left of a row is cut; the next piece starts a new row and first re-reads the
model's `context_tokens` preceding tokens (outputs discarded). NOTE: that is the receptive field
of the stack, n_layers * (W - 1), not W - 1: with L layers of sliding windows a token's output
depends on tokens up to L * (W - 1) back, so a W - 1 overlap would change entropies by O(1) nats
and make them depend on where the cut fell. Cutting still never costs more than padding the
row's rest would (a piece cut after f tokens re-reads at most f). Only the tail of a batch's
last row is ever padded.

Invariant (batch invariance): a document's entropies depend only on the document. Attention
never crosses documents (per-token doc ids in the mask), every kept output sees its full
receptive field, and RoPE is relative, so where a piece lands in a row changes nothing but float
rounding; the result equals `score_document_alone` within float tolerance.

TODO(entropy-kv-carry): carrying each layer's last W - 1 keys/values from one batch to the next
(rows as streams) would make cuts free instead of re-reading `context_tokens`.

This module does not import `blt_model`: any object satisfying `ScoringModel` can be scored,
e.g. `blt_model.entropy_model.EntropyModel`.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Protocol

import numpy as np
import torch

from blt_data.prefetch import in_background
from blt_data.tokens import BOS_ID, BYTE_OFFSET, PAD_ID


class ScoringModel(Protocol):
    """What the scorer needs from an entropy model.

    context_tokens: how many tokens back can influence a token's output (for stacked sliding
        windows, n_layers * (window - 1)); each continued piece re-reads that many.
    hidden(tokens, doc_ids, positions): (B, S) int64 each -> (B, S, dim) final hidden states,
        attention limited to equal doc ids and causal over positions (the model's own window).
    output: module mapping hidden states (N, dim) to logits (N, vocab); its parameters tell the
        default device.
    """

    context_tokens: int
    output: torch.nn.Module

    def hidden(
        self, tokens: torch.Tensor, doc_ids: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor: ...


def document_tokens(text: str | bytes) -> np.ndarray:
    """Input tokens for a document of n bytes: BOS then bytes 0..n-2 (the last byte is never
    an input, as nothing after it is scored). Length n; int16, as ids stay below 260 and a
    long document is held whole while its pieces are packed."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    tokens = np.empty(len(data), dtype=np.int16)
    if data:
        tokens[0] = BOS_ID
        tokens[1:] = np.frombuffer(data, dtype=np.uint8)[:-1].astype(np.int16) + BYTE_OFFSET
    return tokens


@dataclass
class Piece:
    """Entropies [start, stop) of document `doc` (its index in the input stream)."""

    doc: int
    start: int
    stop: int


@dataclass
class PackedBatch:
    """Rows ready for the model, and where their outputs go.

    tokens, doc_ids, positions: (rows, row_len) int64; pad tokens have doc id -1.
    output_index: flat indices into rows * row_len of the tokens whose entropies are kept,
        in the order of `pieces`.
    new_docs: (doc, num_bytes) of documents first met in this batch, in stream order
        (empty documents included, so the consumer can yield them in place).
    """

    tokens: torch.Tensor
    doc_ids: torch.Tensor
    positions: torch.Tensor
    output_index: torch.Tensor
    pieces: list[Piece] = field(default_factory=list)
    new_docs: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return self.tokens.numel()

    @property
    def num_pad_tokens(self) -> int:
        return int((self.doc_ids < 0).sum())


class _BatchBuilder:
    def __init__(self, row_len: int, batch_rows: int):
        self.row_len = row_len
        self.batch_rows = batch_rows
        self._reset()

    def _reset(self) -> None:
        shape = (self.batch_rows, self.row_len)
        self.tokens = np.full(shape, PAD_ID, dtype=np.int64)
        self.doc_ids = np.full(shape, -1, dtype=np.int64)
        # Pads keep increasing positions so they attend only among themselves, never to nothing.
        self.positions = np.tile(np.arange(self.row_len, dtype=np.int64), (self.batch_rows, 1))
        self.output_index: list[np.ndarray] = []
        self.pieces: list[Piece] = []
        self.new_docs: list[tuple[int, int]] = []
        self.row = 0
        self.col = 0
        self.segments_in_row = 0

    @property
    def full(self) -> bool:
        return self.row == self.batch_rows

    @property
    def free(self) -> int:
        return self.row_len - self.col

    def place(self, doc: int, tokens: np.ndarray, context: int, start: int, stop: int) -> None:
        """Put `tokens` (context tokens, then the tokens producing entropies start..stop) at the
        current place of the current row."""
        r, c, n = self.row, self.col, len(tokens)
        self.tokens[r, c : c + n] = tokens
        self.doc_ids[r, c : c + n] = self.segments_in_row
        self.positions[r, c : c + n] = np.arange(n)
        first = r * self.row_len + c + context
        self.output_index.append(np.arange(first, first + stop - start, dtype=np.int64))
        self.pieces.append(Piece(doc, start, stop))
        self.segments_in_row += 1
        self.col += n
        if self.col == self.row_len:
            self.row, self.col, self.segments_in_row = self.row + 1, 0, 0

    def take(self) -> PackedBatch:
        rows = self.row + (self.col > 0)
        index = np.concatenate(self.output_index) if self.output_index else np.zeros(0, np.int64)
        batch = PackedBatch(
            tokens=torch.from_numpy(self.tokens[:rows]),
            doc_ids=torch.from_numpy(self.doc_ids[:rows]),
            positions=torch.from_numpy(self.positions[:rows]),
            output_index=torch.from_numpy(index),
            pieces=self.pieces,
            new_docs=self.new_docs,
        )
        self._reset()
        return batch


def pack_batches(
    texts: Iterable[str | bytes], *, context_tokens: int, row_len: int, batch_rows: int
) -> Iterator[PackedBatch]:
    """Pack documents into batches of `batch_rows` rows of `row_len` tokens (the last batch may
    have fewer rows, and its last row a padded tail). A piece that continues a document first
    re-reads up to `context_tokens` tokens before it."""
    if row_len <= context_tokens:
        raise ValueError(
            f"row_len {row_len} must exceed the model's context of {context_tokens} tokens"
        )
    builder = _BatchBuilder(row_len, batch_rows)
    for doc, text in enumerate(texts):
        tokens = document_tokens(text)
        builder.new_docs.append((doc, len(tokens)))
        start = 0
        while start < len(tokens):
            if builder.full:
                yield builder.take()
            context = min(start, context_tokens)
            # A continuation (start > 0) always opens a fresh row, where row_len > context_tokens
            # leaves room for at least one new token after its context.
            assert builder.free > context
            stop = min(len(tokens), start + builder.free - context)
            builder.place(doc, tokens[start - context : stop], context, start, stop)
            start = stop
    if builder.row or builder.col or builder.new_docs:
        yield builder.take()


def entropies_from_hidden(
    output: torch.nn.Module, hidden: torch.Tensor, chunk_tokens: int = 4096
) -> torch.Tensor:
    """Entropy (nats, fp32) of softmax(output(hidden)) for (N, dim) hidden states, taking
    `chunk_tokens` rows at a time so the (N, vocab) logits never exist at once."""
    entropies = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for i in range(0, hidden.shape[0], chunk_tokens):
        log_probs = torch.log_softmax(output(hidden[i : i + chunk_tokens]).float(), dim=-1)
        entropies[i : i + chunk_tokens] = -(log_probs.exp() * log_probs).sum(-1)
    return entropies


def _model_device(model: ScoringModel) -> torch.device:
    return next(model.output.parameters()).device


def _precision(device: torch.device, dtype: torch.dtype | None):
    # Weights stay as they are; lower precision is autocast, which keeps the residual stream fp32.
    if dtype is None or dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _pin(batch: PackedBatch) -> PackedBatch:
    for name in ("tokens", "doc_ids", "positions", "output_index"):
        setattr(batch, name, getattr(batch, name).pin_memory())
    return batch


def _forward(
    model: ScoringModel,
    batch: PackedBatch,
    device: torch.device,
    dtype: torch.dtype | None,
    chunk_tokens: int,
) -> torch.Tensor:
    """Entropies of the batch's kept tokens, on device (not synchronised)."""
    move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
    with torch.inference_mode(), _precision(device, dtype):
        hidden = model.hidden(move(batch.tokens), move(batch.doc_ids), move(batch.positions))
        # The head runs on every token, context and pads included (<2% of the FLOPs), so its
        # matmuls keep one shape from batch to batch. Heading only the kept tokens gave a new
        # shape per batch, and first calls per shape made CPU scoring ~4x slower.
        entropies = entropies_from_hidden(model.output, hidden.flatten(0, 1), chunk_tokens)
        return entropies[move(batch.output_index)]


def score_entropies(
    model: ScoringModel,
    texts: Iterable[str | bytes],
    *,
    row_len: int | None = None,
    batch_rows: int = 8,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    chunk_tokens: int = 4096,
    prefetch_batches: int = 2,
) -> Iterator[np.ndarray]:
    """Per-byte entropies (float32, nats) of each document, yielded in input order.

    Streams: texts are read on a background thread only as fast as batches are consumed.
    row_len: tokens per row (default: the model's `max_seqlen`, else 2048); must exceed the
        model's `context_tokens`.
    device: where the inputs go; the model must be there already (default: where its
        parameters are).
    dtype: e.g. torch.bfloat16 to run under autocast; None or fp32 runs as the weights are.
    A str text is scored as its UTF-8 bytes; an empty document gives an empty array.
    """
    row_len = row_len or getattr(model, "max_seqlen", 2048)
    device = torch.device(device) if device is not None else _model_device(model)
    packed = pack_batches(
        texts, context_tokens=int(model.context_tokens), row_len=row_len, batch_rows=batch_rows
    )
    if device.type == "cuda":
        packed = map(_pin, packed)
    batches = in_background(lambda: packed, prefetch_batches, "entropy-packer")

    # doc -> [entropies, bytes still to fill]; ordered, so documents leave in input order.
    open_docs: OrderedDict[int, list] = OrderedDict()

    def collect(batch: PackedBatch, entropies: torch.Tensor | None) -> Iterator[np.ndarray]:
        values = entropies.cpu().numpy() if entropies is not None else None
        offset = 0
        for piece in batch.pieces:
            n = piece.stop - piece.start
            state = open_docs[piece.doc]
            state[0][piece.start : piece.stop] = values[offset : offset + n]
            state[1] -= n
            offset += n
        while open_docs:
            doc, (array, remaining) = next(iter(open_docs.items()))
            if remaining:
                break
            del open_docs[doc]
            yield array

    try:
        in_flight = None
        for batch in batches:
            for doc, num_bytes in batch.new_docs:
                open_docs[doc] = [np.empty(num_bytes, dtype=np.float32), num_bytes]
            entropies = None
            if batch.pieces:
                entropies = _forward(model, batch, device, dtype, chunk_tokens)
            # Launch this batch before reading back the previous one, so that on CUDA the
            # device works while the host unpacks.
            if in_flight is not None:
                yield from collect(*in_flight)
            in_flight = (batch, entropies)
        if in_flight is not None:
            yield from collect(*in_flight)
        assert not open_docs, "every document is complete once all batches are read back"
    finally:
        batches.close()


def score_document_alone(
    model: ScoringModel,
    text: str | bytes,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> np.ndarray:
    """Reference: the whole document as one unpacked row with the sliding-window mask.

    Memory grows with the square of the document length on the SDPA path; use it for tests.
    """
    tokens = torch.from_numpy(document_tokens(text).astype(np.int64))
    if tokens.numel() == 0:
        return np.zeros(0, dtype=np.float32)
    device = torch.device(device) if device is not None else _model_device(model)
    n = tokens.numel()
    batch = PackedBatch(
        tokens=tokens[None],
        doc_ids=torch.zeros(1, n, dtype=torch.int64),
        positions=torch.arange(n)[None],
        output_index=torch.arange(n),
    )
    return _forward(model, batch, device, dtype, chunk_tokens=4096).cpu().numpy()
