import itertools
import math
import random
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from blt_data.entropy import (
    HIDDEN_DOC_ID,
    document_tokens,
    pack_batches,
    score_document_alone,
    score_entropies,
)
from blt_data.tokens import BOS_ID, BYTE_OFFSET
from blt_model.entropy_model import EntropyModel, EntropyModelConfig

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

ROW_LEN = 128


def tiny_model(n_layers=2, window=16, seed=0) -> EntropyModel:
    torch.manual_seed(seed)
    config = EntropyModelConfig(
        dim=64, n_layers=n_layers, n_heads=4, window=window, max_seqlen=ROW_LEN
    )
    return EntropyModel(config).eval()


@pytest.fixture(scope="module")
def model() -> EntropyModel:
    return tiny_model()


@pytest.fixture(scope="module")
def documents() -> list[str | bytes]:
    """Real text of mixed lengths: stdlib sources (several longer than a row, so they span
    rows), a few tiny ones, an empty one, non-ASCII text and raw bytes."""
    stdlib = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in stdlib[:60]]
    rng = random.Random(0)
    rng.shuffle(texts)
    # Cap lengths so the quadratic alone-reference stays cheap.
    docs: list[str | bytes] = [t[: rng.choice([40, 300, 900, 2500])] for t in texts[:14]]
    docs += ["", "x", "ab", "héllo wörld — ünïcödé ✓ " * 20, bytes(range(256)) * 2]
    rng.shuffle(docs)
    return docs


def as_bytes(doc: str | bytes) -> bytes:
    return doc.encode("utf-8") if isinstance(doc, str) else doc


def test_document_tokens_follow_blt_ids():
    assert document_tokens("").tolist() == []
    assert document_tokens("A").tolist() == [BOS_ID]
    assert document_tokens(b"\x00\xffz").tolist() == [BOS_ID, 0 + BYTE_OFFSET, 255 + BYTE_OFFSET]


def test_documents_span_rows(documents, model):
    lengths = [len(as_bytes(d)) for d in documents]
    assert 0 in lengths and max(lengths) > 4 * ROW_LEN and sum(n < 10 for n in lengths) >= 2
    pieces = [
        p
        for b in pack_batches(
            documents, context_tokens=model.context_tokens, row_len=ROW_LEN, batch_rows=4
        )
        for p in b.pieces
    ]
    assert any(p.start > 0 for p in pieces)


@pytest.mark.parametrize("carry", [True, False])
def test_packed_scoring_equals_scoring_alone(documents, model, carry):
    scored = list(score_entropies(model, documents, row_len=ROW_LEN, batch_rows=4, carry=carry))
    assert len(scored) == len(documents)
    for doc, entropies in zip(documents, scored, strict=True):
        assert entropies.dtype == np.float32 and entropies.shape == (len(as_bytes(doc)),)
        np.testing.assert_allclose(entropies, score_document_alone(model, doc), atol=1e-4, rtol=0)


@pytest.mark.parametrize("carry", [True, False])
def test_end_of_document_entropy(documents, model, carry):
    """With eos, n + 1 values: the n byte entropies unchanged, then H(next | whole document),
    checked against the model's own logits at the last byte (an independent forward)."""
    assert document_tokens("", eos=True).tolist() == [BOS_ID]
    assert document_tokens(b"\x00z", eos=True).tolist() == [BOS_ID, 0 + BYTE_OFFSET, ord("z") + BYTE_OFFSET]
    plain = list(score_entropies(model, documents, row_len=ROW_LEN, batch_rows=4, carry=carry))
    with_eos = list(score_entropies(model, documents, row_len=ROW_LEN, batch_rows=3, carry=carry, eos=True))
    for doc, entropies, full in zip(documents, plain, with_eos, strict=True):
        data = as_bytes(doc)
        assert full.shape == (len(data) + 1,)
        np.testing.assert_allclose(full[:-1], entropies, atol=1e-5, rtol=0)
        np.testing.assert_allclose(full, score_document_alone(model, doc, eos=True), atol=1e-4, rtol=0)
        if len(data) <= 3 * model.window:  # a full unpacked forward, cheap for short documents
            tokens = torch.tensor([[BOS_ID, *(b + BYTE_OFFSET for b in data)]])
            with torch.no_grad():
                log_probs = torch.log_softmax(model(tokens)[0, -1].float(), -1)
            assert abs(float(-(log_probs.exp() * log_probs).sum()) - full[-1]) < 1e-4


def test_batch_invariance(documents, model):
    """A document's entropies do not depend on its neighbours, row length or batch size."""
    reference = list(score_entropies(model, documents, row_len=ROW_LEN, batch_rows=4))
    order = list(range(len(documents)))
    random.Random(1).shuffle(order)
    for row_len, batch_rows in [(ROW_LEN, 1), (96, 7), (256, 2)]:
        shuffled = score_entropies(
            model, [documents[i] for i in order], row_len=row_len, batch_rows=batch_rows
        )
        for i, entropies in zip(order, shuffled, strict=True):
            np.testing.assert_allclose(entropies, reference[i], atol=1e-5, rtol=0)


def test_str_and_bytes_score_the_same(model):
    text = "naïve café — ω"
    as_str, as_raw = score_entropies(model, [text, text.encode("utf-8")], row_len=ROW_LEN)
    np.testing.assert_array_equal(as_str, as_raw)


def test_uniform_model_gives_log_vocab(documents):
    model = tiny_model()
    with torch.no_grad():
        model.output.weight.zero_()
    scored = list(score_entropies(model, documents, row_len=ROW_LEN))
    assert len(scored) == len(documents)
    for entropies in scored:
        np.testing.assert_allclose(entropies, math.log(260), rtol=1e-6)


def test_window_limits_what_a_byte_sees():
    # One layer, window W: byte j's entropy reads tokens j-W+1..j, i.e. BOS/bytes j-W..j-1.
    window = 8
    model = tiny_model(n_layers=1, window=window)
    doc = bytearray(b"the quick brown fox jumps over the lazy dog")
    j = 30
    base = score_document_alone(model, bytes(doc))
    inside, outside = bytearray(doc), bytearray(doc)
    inside[j - window] ^= 0x20
    outside[j - window - 1] ^= 0x20
    assert abs(score_document_alone(model, bytes(inside))[j] - base[j]) > 1e-4
    assert score_document_alone(model, bytes(outside))[j] == pytest.approx(base[j], abs=1e-6)


def test_packing_fills_rows_and_keeps_context(documents, model):
    context = model.context_tokens
    batches = list(pack_batches(documents, context_tokens=context, row_len=ROW_LEN, batch_rows=3))
    produced = {i: np.zeros(len(as_bytes(d)), dtype=int) for i, d in enumerate(documents)}
    for k, batch in enumerate(batches):
        assert batch.carry is None
        pads = (batch.doc_ids < 0).numpy()
        if k < len(batches) - 1:
            assert batch.tokens.shape == (3, ROW_LEN) and not pads.any()
        else:  # only the tail of the last row may be padded
            assert not pads[:-1].any()
            assert (np.diff(pads[-1].astype(int)) >= 0).all()
        flat = batch.tokens.flatten().numpy()
        offset = 0
        for piece in batch.pieces:
            n = piece.stop - piece.start
            index = batch.output_index[offset : offset + n].numpy()
            offset += n
            expected = document_tokens(documents[piece.doc])
            assert (flat[index] == expected[piece.start : piece.stop]).all()
            # The tokens before the kept ones are the document's own preceding context.
            lead = min(piece.start, context)
            row, col = divmod(int(index[0]), ROW_LEN)
            assert col >= lead
            assert (
                batch.tokens[row, col - lead : col].numpy()
                == expected[piece.start - lead : piece.start]
            ).all()
            assert (batch.positions[row, col - lead] == 0) and len(
                set(batch.doc_ids[row, col - lead : col + n].tolist())
            ) == 1
            produced[piece.doc][piece.start : piece.stop] += 1
    assert all((counts == 1).all() for counts in produced.values())


def test_streams_lazily_and_in_order(model):
    docs = ["alpha " * 50, "", "beta", "gamma " * 100]
    endless = itertools.cycle(docs)
    first = list(
        itertools.islice(score_entropies(model, endless, row_len=ROW_LEN, batch_rows=2), 9)
    )
    assert [len(e) for e in first] == [len(as_bytes(docs[i % 4])) for i in range(9)]
    np.testing.assert_array_equal(first[0], first[4])


def test_reader_errors_reach_the_caller(model):
    def broken():
        yield "fine"
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(score_entropies(model, broken(), row_len=ROW_LEN))


def test_row_must_exceed_context(model):
    with pytest.raises(ValueError, match="must exceed"):
        list(score_entropies(model, ["abc"], row_len=model.context_tokens, carry=False))


def test_carried_row_must_hold_a_window(model):
    with pytest.raises(ValueError, match="at least the model's window"):
        list(score_entropies(model, ["abc"], row_len=model.window - 1))


def test_paper_depth_scoring_equals_scoring_alone(documents):
    """The paper's 14 layers at a small width: the receptive field (14 x 7 = 98 tokens) is most
    of a row, documents are cut dozens of times, and the carried keys of every layer count."""
    torch.manual_seed(0)
    config = EntropyModelConfig(dim=32, n_layers=14, n_heads=2, window=8, max_seqlen=64)
    model = EntropyModel(config).eval()
    assert model.context_tokens == 98
    docs = [d for d in documents if len(as_bytes(d)) > 5 * 64] + ["", "x", "tiny doc"]
    for carry, row_len in [(True, 64), (False, 128)]:
        scored = list(score_entropies(model, docs, row_len=row_len, batch_rows=3, carry=carry))
        for doc, entropies in zip(docs, scored, strict=True):
            alone = score_document_alone(model, doc)
            np.testing.assert_allclose(entropies, alone, atol=1e-4, rtol=0)


def test_carry_packing_continues_rows_and_wastes_nothing(documents, model):
    """Carry mode: a cut document goes on at the start of a row of the next batch, whose
    carried keys are the last W tokens of the row it continues; every byte is scored once,
    nothing is re-read, and only rows whose input ran out are padded."""
    window = model.window
    batches = list(
        pack_batches(
            documents, context_tokens=model.context_tokens, row_len=ROW_LEN, batch_rows=3,
            carry=window,
        )
    )
    produced = {i: np.zeros(len(as_bytes(d)), dtype=int) for i, d in enumerate(documents)}
    continued = 0
    for k, batch in enumerate(batches):
        carry = batch.carry
        assert carry.doc_ids.shape == carry.positions.shape == (batch.tokens.shape[0], window)
        offset = 0
        for piece in batch.pieces:
            n = piece.stop - piece.start
            index = batch.output_index[offset : offset + n].numpy()
            offset += n
            expected = document_tokens(documents[piece.doc])
            row, col = divmod(int(index[0]), ROW_LEN)
            assert (batch.tokens.flatten().numpy()[index] == expected[piece.start : piece.stop]).all()
            assert (batch.positions[row, col : col + n].numpy() == np.arange(piece.start, piece.stop)).all()
            produced[piece.doc][piece.start : piece.stop] += 1
            if piece.start == 0:
                continue
            continued += 1
            assert col == 0 and k > 0
            previous = batches[k - 1]
            r = int(carry.rows[row])
            assert (previous.tokens[r, -window:].numpy() == expected[piece.start - window : piece.start]).all()
            seen = min(window, piece.start)
            assert (carry.doc_ids[row, window - seen :] == batch.doc_ids[row, 0]).all()
            assert (carry.doc_ids[row, : window - seen] == HIDDEN_DOC_ID).all()
            assert (carry.positions[row].numpy() == np.arange(piece.start - window, piece.start)).all()
        for row in range(batch.tokens.shape[0]):
            if carry.rows[row] < 0:
                assert (carry.doc_ids[row] == HIDDEN_DOC_ID).all()
        assert offset == batch.output_index.numel()
    assert continued > 5
    assert all((counts == 1).all() for counts in produced.values())
    # Nothing is re-read: every non-pad position is a scored byte.
    assert sum(b.num_tokens - b.num_pad_tokens for b in batches) == sum(produced[i].size for i in produced)
    # Rows are padded only once the input has run out (and empty rows are left out).
    last_read = max(k for k, b in enumerate(batches) if b.new_docs)
    assert all(b.num_pad_tokens == 0 for b in batches[:last_read])
    assert all(b.num_pad_tokens < ROW_LEN * b.tokens.shape[0] for b in batches)


@pytest.mark.gpu
@cuda
def test_cuda_bf16_packed_scoring_matches_alone(documents):
    model = tiny_model().cuda()
    packed = score_entropies(model, documents, row_len=ROW_LEN, batch_rows=4, dtype=torch.bfloat16)
    for doc, entropies in zip(documents, packed, strict=True):
        if not len(entropies):
            continue
        alone = score_document_alone(model, doc, dtype=torch.bfloat16)
        error = np.abs(entropies - alone)
        assert error.max() <= 0.05 and error.mean() <= 0.01


@pytest.mark.gpu
@cuda
def test_cuda_fp32_flex_scoring_matches_cpu_sdpa(documents, model):
    gpu_model = tiny_model().cuda()
    packed = score_entropies(gpu_model, documents, row_len=ROW_LEN, batch_rows=4)
    for doc, entropies in zip(documents, packed, strict=True):
        np.testing.assert_allclose(entropies, score_document_alone(model, doc), atol=1e-3, rtol=0)


def test_scoring_does_not_import_blt_model():
    code = "import sys, blt_data.entropy\n"
    code += "sys.exit(any(m.startswith('blt_model') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
