"""Entropy scoring: documents in, per-byte next-byte entropies (nats, float32) out.

For a document of n bytes the model reads BOS as token 0 and byte j as token j + 1; then
`entropies[j]` = H(softmax(logits at token j)), the model's uncertainty about byte j. In every
layer token j sees tokens max(0, j - W + 1) ... j, W being the model's sliding window: Meta's
`local_block_causal` attention, applied per document (a full per-document forward).

The chain, with packing on a background thread so the device never waits for the CPU:

    texts -> pack_batches (CPU thread) -> queue -> model.hidden + chunked entropy head
          -> per-document arrays, in input order

Packing: documents are laid end to end into rows of `row_len` tokens. A document that does not
fit in what is left of a row is cut, and its next piece needs the keys and values of what came
before it. Two ways to give them:

- carry (default): rows are streams. The next piece opens a row of the *next* batch, and every
  layer takes over the last W keys/values of the row it continues (`Carry`; the model keeps
  them as `KVSlot`s), so a cut costs nothing: every computed position is a new byte, but for
  the padded tails of the last rows of a call. Exact by induction: the carried keys of layer l
  were computed from layer l - 1 states that had their full context in their own batch.
  Positions are the bytes' positions in the document, so RoPE lines up across the cut.
- re-read (`carry=False`): the next piece starts a new row and first re-reads the model's
  `context_tokens` preceding tokens (outputs discarded). NOTE: that is the receptive field of
  the stack, n_layers * (W - 1), not W - 1: with L layers of sliding windows a token's output
  depends on tokens up to L * (W - 1) back, so a W - 1 overlap would change entropies by O(1)
  nats and make them depend on where the cut fell. For the paper's model (14 layers, W 512)
  that is 7,154 tokens per cut; bench/packing.py measures what each way computes.

Invariant (batch invariance): a document's entropies depend only on the document. Attention
never crosses documents (per-token doc ids in the mask, carried keys included), every kept
output sees its full receptive field, and RoPE is relative, so where a piece lands changes
nothing but float rounding; the result equals `score_document_alone` within float tolerance.

A document of n bytes gives n scored positions (inputs BOS, bytes 0..n-2), or n + 1 with
`eos=True`: the last input is byte n-1 and its prediction's entropy is the end-of-document
entropy H(next | whole document), Meta's value n, which decides whether EOS joins the last patch
(an empty document then has one position, BOS). Packing, carry and unpacking count positions,
not bytes, so the extra one is scored exactly like the others.

This module does not import `blt_model`: any object satisfying `ScoringModel` can be scored,
e.g. `blt_model.entropy_model.EntropyModel`.

Length: the packer (carry and re-read modes) and the scoring loop keep one invariant together
(batch invariance), documented above; apart, each would need the other's layout.
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

HIDDEN_DOC_ID = -2  # doc id of carried keys no query may see (pads are -1, documents >= 0)


class ScoringModel(Protocol):
    """What the scorer needs from an entropy model.

    context_tokens: how many tokens back can influence a token's output (for stacked sliding
        windows, n_layers * (window - 1)); without carry each continued piece re-reads that many.
    window: the attention window; with carry each row takes over that many keys per layer.
    hidden(tokens, doc_ids, positions, carry=None): (B, S) int64 each -> (B, S, dim) final
        hidden states, attention limited to equal doc ids and causal over positions (the
        model's own window); with a `Carry`, also over the carried keys (see `Carry`).
    output: module mapping hidden states (N, dim) to logits (N, vocab); its parameters tell the
        default device.
    """

    context_tokens: int
    window: int
    output: torch.nn.Module

    def hidden(
        self,
        tokens: torch.Tensor,
        doc_ids: torch.Tensor,
        positions: torch.Tensor,
        carry: "Carry | None" = None,
    ) -> torch.Tensor: ...


def document_tokens(text: str | bytes, eos: bool = False) -> np.ndarray:
    """Input tokens for a document of n bytes: BOS then bytes 0..n-2 (length n: nothing after
    the last byte is scored), or with `eos` BOS then bytes 0..n-1 (length n + 1: the last
    prediction is the end-of-document entropy's). int16, as ids stay below 260 and a long
    document is held whole while its pieces are packed."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    inputs = data if eos else data[:-1]
    tokens = np.empty(len(inputs) + (1 if data or eos else 0), dtype=np.int16)
    if len(tokens):
        tokens[0] = BOS_ID
        tokens[1:] = np.frombuffer(inputs, dtype=np.uint8).astype(np.int16) + BYTE_OFFSET
    return tokens


@dataclass
class Piece:
    """Entropies [start, stop) of document `doc` (its index in the input stream)."""

    doc: int
    start: int
    stop: int


@dataclass
class Carry:
    """What each row of a batch takes over from the previous batch's rows (carry mode).

    rows: (R,) int64, the previous batch's row that row i continues; -1: none.
    doc_ids, positions: (R, W) for the W keys carried into each row (the last W tokens of the
        row it continues). The continued document's last min(W, start) tokens have the doc id
        of the row's first segment (0) and their positions in the document; the others have
        HIDDEN_DOC_ID, which no query has.
    layers: the model's per-layer keys/values, opaque here. The scorer sets the previous
        batch's before the forward pass; the model replaces them with this batch's.
    """

    rows: torch.Tensor
    doc_ids: torch.Tensor
    positions: torch.Tensor
    layers: list | None = None


@dataclass
class PackedBatch:
    """Rows ready for the model, and where their outputs go.

    tokens, doc_ids, positions: (rows, row_len) int64; pad tokens have doc id -1.
    output_index: flat indices into rows * row_len of the tokens whose entropies are kept,
        in the order of `pieces`.
    new_docs: (doc, num_bytes) of documents first met in this batch, in stream order
        (empty documents included, so the consumer can yield them in place).
    carry: in carry mode, what the rows take over from the previous batch.
    """

    tokens: torch.Tensor
    doc_ids: torch.Tensor
    positions: torch.Tensor
    output_index: torch.Tensor
    pieces: list[Piece] = field(default_factory=list)
    new_docs: list[tuple[int, int]] = field(default_factory=list)
    carry: Carry | None = None

    @property
    def num_tokens(self) -> int:
        return self.tokens.numel()

    @property
    def num_pad_tokens(self) -> int:
        return int((self.doc_ids < 0).sum())


class _BatchBuilder:
    def __init__(self, row_len: int, batch_rows: int, carried: int = 0):
        self.row_len = row_len
        self.batch_rows = batch_rows
        self.carried = carried
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
        if self.carried:
            self.carry_rows = np.full(self.batch_rows, -1, dtype=np.int64)
            self.carry_doc_ids = np.full((self.batch_rows, self.carried), HIDDEN_DOC_ID, np.int64)
            self.carry_positions = np.zeros((self.batch_rows, self.carried), dtype=np.int64)

    @property
    def full(self) -> bool:
        return self.row == self.batch_rows

    @property
    def free(self) -> int:
        return self.row_len - self.col

    def place(
        self,
        doc: int,
        tokens: np.ndarray,
        context: int,
        start: int,
        stop: int,
        first_position: int = 0,
    ) -> None:
        """Put `tokens` (context tokens, then the tokens producing entropies start..stop) at the
        current place of the current row, at positions from `first_position` on."""
        r, c, n = self.row, self.col, len(tokens)
        self.tokens[r, c : c + n] = tokens
        self.doc_ids[r, c : c + n] = self.segments_in_row
        self.positions[r, c : c + n] = np.arange(first_position, first_position + n)
        first = r * self.row_len + c + context
        self.output_index.append(np.arange(first, first + stop - start, dtype=np.int64))
        self.pieces.append(Piece(doc, start, stop))
        self.segments_in_row += 1
        self.col += n
        if self.col == self.row_len:
            self.row, self.col, self.segments_in_row = self.row + 1, 0, 0

    def continue_row(self, previous_row: int, start: int) -> None:
        """The current (empty) row continues a document cut at `start` at the end of the
        previous batch's `previous_row`, whose last `carried` tokens it takes over."""
        r, w = self.row, self.carried
        self.carry_rows[r] = previous_row
        self.carry_doc_ids[r, w - min(w, start) :] = 0  # the row's first segment
        self.carry_positions[r] = np.arange(start - w, start)

    def end_row(self) -> None:
        """Leave the rest of the current row as padding."""
        if self.col:
            self.row, self.col, self.segments_in_row = self.row + 1, 0, 0

    def take(self) -> PackedBatch:
        rows = self.row + (self.col > 0)
        index = np.concatenate(self.output_index) if self.output_index else np.zeros(0, np.int64)
        carry = None
        if self.carried:
            carry = Carry(
                rows=torch.from_numpy(self.carry_rows[:rows]),
                doc_ids=torch.from_numpy(self.carry_doc_ids[:rows]),
                positions=torch.from_numpy(self.carry_positions[:rows]),
            )
        batch = PackedBatch(
            tokens=torch.from_numpy(self.tokens[:rows]),
            doc_ids=torch.from_numpy(self.doc_ids[:rows]),
            positions=torch.from_numpy(self.positions[:rows]),
            output_index=torch.from_numpy(index),
            pieces=self.pieces,
            new_docs=self.new_docs,
            carry=carry,
        )
        self._reset()
        return batch


def pack_batches(
    texts: Iterable[str | bytes],
    *,
    context_tokens: int,
    row_len: int,
    batch_rows: int,
    carry: int | None = None,
    eos: bool = False,
) -> Iterator[PackedBatch]:
    """Pack documents into batches of at most `batch_rows` rows of `row_len` tokens.
    eos: score the end-of-document position too (see `document_tokens`).

    carry (the model's window W): a piece that continues a document opens a row of the next
    batch and takes over the last W keys of the row it continues (see `Carry`); only rows whose
    input ran out are padded. None: a piece that continues a document first re-reads up to
    `context_tokens` tokens before it, and only the tail of the last batch's last row is padded.
    """
    if carry is not None:
        yield from _pack_carried(texts, row_len, batch_rows, carry, eos)
        return
    if row_len <= context_tokens:
        raise ValueError(
            f"row_len {row_len} must exceed the model's context of {context_tokens} tokens"
        )
    builder = _BatchBuilder(row_len, batch_rows)
    for doc, text in enumerate(texts):
        tokens = document_tokens(text, eos)
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


def _pack_carried(
    texts: Iterable[str | bytes], row_len: int, batch_rows: int, window: int, eos: bool
) -> Iterator[PackedBatch]:
    if row_len < window:
        raise ValueError(f"row_len {row_len} must be at least the model's window of {window} tokens")
    builder = _BatchBuilder(row_len, batch_rows, carried=window)
    inputs = enumerate(texts)
    # (previous batch's row, doc, its tokens, first token not yet scored) of each cut document.
    pending: list[tuple[int, int, np.ndarray, int]] = []
    exhausted = False
    while pending or not exhausted:
        continuing, pending = pending, []
        for r in range(batch_rows):
            doc = None
            if r < len(continuing):
                previous_row, doc, tokens, start = continuing[r]
                builder.continue_row(previous_row, start)
            elif exhausted:
                break
            while True:  # fill row r
                if doc is None:
                    item = next(inputs, None)
                    if item is None:
                        exhausted = True
                        break
                    doc, text = item
                    tokens, start = document_tokens(text, eos), 0
                    builder.new_docs.append((doc, len(tokens)))
                    if not len(tokens):
                        doc = None
                        continue
                stop = min(len(tokens), start + builder.free)
                builder.place(doc, tokens[start:stop], 0, start, stop, first_position=start)
                if stop < len(tokens):  # the row is full; the rest goes on in the next batch
                    pending.append((r, doc, tokens, stop))
                    break
                doc = None
                if builder.col == 0:  # the document ended exactly at the row's end
                    break
            builder.end_row()
        if builder.row or builder.new_docs:
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
    if batch.carry is not None:
        for name in ("rows", "doc_ids", "positions"):
            setattr(batch.carry, name, getattr(batch.carry, name).pin_memory())
    return batch


def _forward(
    model: ScoringModel,
    batch: PackedBatch,
    device: torch.device,
    dtype: torch.dtype | None,
    chunk_tokens: int,
) -> torch.Tensor:
    """Entropies of the batch's kept tokens, on device (not synchronised). With a carry, its
    `layers` must hold the previous batch's; the model leaves this batch's there."""
    move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
    with torch.inference_mode(), _precision(device, dtype):
        inputs = (move(batch.tokens), move(batch.doc_ids), move(batch.positions))
        if batch.carry is None:
            hidden = model.hidden(*inputs)
        else:
            carry = batch.carry
            carry.rows, carry.doc_ids, carry.positions = (
                move(carry.rows), move(carry.doc_ids), move(carry.positions)
            )
            hidden = model.hidden(*inputs, carry=carry)
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
    carry: bool = True,
    eos: bool = False,
) -> Iterator[np.ndarray]:
    """Per-byte entropies (float32, nats) of each document, yielded in input order; with `eos`
    one more value at the end, the end-of-document entropy (n + 1 values for n bytes).

    Streams: texts are read on a background thread only as fast as batches are consumed.
    row_len: tokens per row (default: the model's `max_seqlen`, else 2048); at least the
        model's `window` with carry, more than its `context_tokens` without.
    carry: carry keys/values across batches (cuts cost nothing) rather than re-read context.
    device: where the inputs go; the model must be there already (default: where its
        parameters are).
    dtype: e.g. torch.bfloat16 to run under autocast; None or fp32 runs as the weights are.
    A str text is scored as its UTF-8 bytes; an empty document gives an empty array.
    """
    row_len = row_len or getattr(model, "max_seqlen", 2048)
    device = torch.device(device) if device is not None else _model_device(model)
    packed = pack_batches(
        texts,
        context_tokens=int(model.context_tokens),
        row_len=row_len,
        batch_rows=batch_rows,
        carry=int(model.window) if carry else None,
        eos=eos,
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
        carried_layers = None  # the model's keys/values of the last batch run (carry mode)
        for batch in batches:
            for doc, num_bytes in batch.new_docs:
                open_docs[doc] = [np.empty(num_bytes, dtype=np.float32), num_bytes]
            entropies = None
            if batch.pieces:
                if batch.carry is not None:
                    batch.carry.layers = carried_layers
                entropies = _forward(model, batch, device, dtype, chunk_tokens)
                if batch.carry is not None:
                    carried_layers = batch.carry.layers
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
    eos: bool = False,
) -> np.ndarray:
    """Reference: the whole document as one unpacked row with the sliding-window mask
    (with `eos`, n + 1 values as in `score_entropies`).

    Memory grows with the square of the document length on the SDPA path; use it for tests.
    """
    tokens = torch.from_numpy(document_tokens(text, eos).astype(np.int64))
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
