import math

import pytest
import torch

from blt_model.layers import (
    Attention,
    KVSlot,
    RMSNorm,
    TransformerBlock,
    apply_rope,
    attend,
    build_attention_mask,
    ffn_hidden_dim,
    rope_cos_sin,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def packed_rows(num_rows: int, seq_len: int, seed: int = 0):
    """Random document segments per row; positions restart at 0 in each segment."""
    g = torch.Generator().manual_seed(seed)
    doc_ids = torch.empty(num_rows, seq_len, dtype=torch.int64)
    positions = torch.empty_like(doc_ids)
    for r in range(num_rows):
        col, doc = 0, 0
        while col < seq_len:
            n = min(seq_len - col, int(torch.randint(1, seq_len // 2, (1,), generator=g)))
            doc_ids[r, col : col + n] = doc
            positions[r, col : col + n] = torch.arange(n)
            col, doc = col + n, doc + 1
    return doc_ids, positions


def test_rms_norm_matches_formula():
    x = torch.randn(3, 5, 16)
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 16))
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected)


def test_rope_rotates_adjacent_pairs_like_llama_complex_form():
    head_dim, theta = 8, 10000.0
    positions = torch.tensor([[0, 1, 5, 100, 3000]])
    x = torch.randn(1, 5, 2, head_dim)
    got = apply_rope(x, rope_cos_sin(positions, head_dim, theta))

    # Meta Llama: dims (2i, 2i+1) are one complex number, multiplied by exp(i * pos * f_i).
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = positions[0].double()[:, None] * freqs
    as_complex = torch.view_as_complex(x.double().reshape(1, 5, 2, head_dim // 2, 2).contiguous())
    rotated = as_complex * torch.polar(torch.ones_like(angles), angles)[None, :, None, :]
    expected = torch.view_as_real(rotated).flatten(-2).float()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_rope_pairs_are_not_half_split():
    # A vector with only dim 0 set must, once rotated, spill into dim 1 (adjacent pairing),
    # never into dim head_dim/2 (the GPT-NeoX half split).
    x = torch.zeros(1, 1, 1, 8)
    x[..., 0] = 1.0
    out = apply_rope(x, rope_cos_sin(torch.tensor([[1]]), 8))
    assert out[..., 1].abs().item() > 0.5
    assert out[..., 4].abs().item() == 0.0


def test_rope_scores_depend_only_on_relative_position():
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(pq, pk):
        qr = apply_rope(q, rope_cos_sin(torch.tensor([[pq]]), 16))
        kr = apply_rope(k, rope_cos_sin(torch.tensor([[pk]]), 16))
        return (qr * kr).sum()

    torch.testing.assert_close(score(7, 3), score(10_007, 10_003), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "dim, multiplier, expected",
    [(768, 1.0, 2048), (768, None, 2048), (64, 1.0, 256), (256, None, 768), (4096, 1.3, 14336)],
)
def test_ffn_hidden_dim_rounds_like_meta(dim, multiplier, expected):
    # 4096 * 8/3 = 10922 -> *1.3 = 14198 -> next multiple of 256 = 14336.
    assert ffn_hidden_dim(dim, multiplier) == expected


def test_paper_block_has_2048_wide_ffn():
    block = TransformerBlock(768, 12, 1.0, 1e-5)
    assert block.feed_forward.w1.weight.shape == (2048, 768)
    assert block.feed_forward.w2.weight.shape == (768, 2048)


@pytest.mark.parametrize("window", [1, 4, 16, None])
def test_sdpa_mask_matches_explicit_loop(window):
    doc_ids, positions = packed_rows(3, 48, seed=window or 0)
    mask = build_attention_mask(doc_ids, positions, window, flex=False)
    assert mask.shape == (3, 1, 48, 48)
    for r in range(3):
        start = 0
        for j in range(48):
            if j > 0 and doc_ids[r, j] != doc_ids[r, j - 1]:
                start = j
            lo = start if window is None else max(start, j - window + 1)
            expected = torch.zeros(48, dtype=torch.bool)
            expected[lo : j + 1] = True
            assert torch.equal(mask[r, 0, j], expected), (r, j)


def test_attention_matches_loop_reference():
    torch.manual_seed(0)
    attention = Attention(32, 4)
    doc_ids, positions = packed_rows(2, 40, seed=1)
    x = torch.randn(2, 40, 32)
    rope = rope_cos_sin(positions, 8)
    window = 6
    with torch.no_grad():
        got = attention(x, rope, build_attention_mask(doc_ids, positions, window, flex=False))
        q = apply_rope(attention.wq(x).view(2, 40, 4, 8), rope)
        k = apply_rope(attention.wk(x).view(2, 40, 4, 8), rope)
        v = attention.wv(x).view(2, 40, 4, 8)
        out = torch.zeros(2, 40, 4, 8)
        for r in range(2):
            for j in range(40):
                keys = [
                    i
                    for i in range(j + 1)
                    if doc_ids[r, i] == doc_ids[r, j] and positions[r, j] - positions[r, i] < window
                ]
                scores = torch.einsum("hd,khd->hk", q[r, j], k[r, keys]) / math.sqrt(8)
                out[r, j] = torch.einsum("hk,khd->hd", scores.softmax(-1), v[r, keys])
        expected = attention.wo(out.reshape(2, 40, 32))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_agrees_with_sdpa_on_cpu():
    # Eager FlexAttention runs on CPU (an unfused reference path): enough to show that the
    # BlockMask and the boolean mask, both built from one mask_mod, attend to the same keys.
    doc_ids, positions = packed_rows(2, 256, seed=3)
    block_mask = build_attention_mask(doc_ids, positions, 32, flex=True)
    dense = build_attention_mask(doc_ids, positions, 32, flex=False)
    q, k, v = (torch.randn(2, 2, 256, 16) for _ in range(3))
    torch.testing.assert_close(
        attend(q, k, v, block_mask), attend(q, k, v, dense), atol=1e-5, rtol=1e-5
    )


@pytest.mark.gpu
@cuda
def test_flex_attention_equals_sdpa_on_cuda():
    torch.manual_seed(0)
    block = TransformerBlock(256, 4, 1.0, 1e-5).cuda()
    doc_ids, positions = (t.cuda() for t in packed_rows(4, 1024, seed=5))
    x = torch.randn(4, 1024, 256, device="cuda")
    rope = rope_cos_sin(positions, 64)
    with torch.no_grad():
        flex = block(x, rope, build_attention_mask(doc_ids, positions, 128, flex=True))
        sdpa = block(x, rope, build_attention_mask(doc_ids, positions, 128, flex=False))
    torch.testing.assert_close(flex, sdpa, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("seq_len,window", [(48, 4), (50, 8), (37, 5), (130, 16)])
def test_local_blocked_attention_matches_dense_sdpa(seq_len, window):
    """The O(S*W) blocked CPU path attends to exactly the keys of the dense mask: same outputs
    and gradients, on packed rows with document edges and a row length that is no multiple of W."""
    torch.manual_seed(seq_len)
    doc_ids, positions = packed_rows(2, seq_len, seed=window)
    attention = Attention(32, 4)
    x = torch.randn(2, seq_len, 32, requires_grad=True)
    rope = rope_cos_sin(positions, 8)
    outs, grads = [], []
    for local in (False, True):
        mask = build_attention_mask(doc_ids, positions, window, flex=False, local=local)
        out = attention(x, rope, mask)
        (grad,) = torch.autograd.grad(out.square().sum(), x)
        outs.append(out.detach())
        grads.append(grad)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-4, rtol=1e-4)


def continue_in_two(block, x, doc_ids, positions, window, first, head_dim, **options):
    """Run `block` over rows cut after `first` tokens, the second part carrying the first
    part's last `window` keys and values (KVSlot)."""
    num_rows = x.shape[0]
    slot = KVSlot(window)
    outs = []
    hidden = torch.full((num_rows, window), -2, device=x.device)
    carried = (hidden, torch.zeros_like(hidden))
    for part in (slice(0, first), slice(first, None)):
        mask = build_attention_mask(
            doc_ids[:, part],
            positions[:, part],
            window,
            carried_doc_ids=carried[0],
            carried_positions=carried[1],
            **options,
        )
        outs.append(block(x[:, part], rope_cos_sin(positions[:, part], head_dim), mask, slot))
        carried = (doc_ids[:, first - window : first], positions[:, first - window : first])
    assert slot.keys.shape == (num_rows, block.attention.n_heads, window, head_dim)
    return torch.cat(outs, 1)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("backend", ["dense", "local", "flex"])
def test_carried_keys_continue_rows_exactly(backend):
    """Rows cut in two, the second part taking over the first part's last W keys and values
    (KVSlot), give the outputs of the whole rows at once, on every mask backend."""
    torch.manual_seed(0)
    window = 8
    doc_ids, positions = packed_rows(2, 64, seed=7)
    block = TransformerBlock(32, 4, 1.0, 1e-5)
    x = torch.randn(2, 64, 32)
    options = {"flex": backend == "flex", "local": backend == "local"}
    with torch.no_grad():
        mask = build_attention_mask(doc_ids, positions, window, **options)
        whole = block(x, rope_cos_sin(positions, 8), mask)
        cut = continue_in_two(block, x, doc_ids, positions, window, 24, 8, **options)
    torch.testing.assert_close(cut, whole, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@cuda
def test_carried_keys_with_compiled_flex_on_cuda():
    torch.manual_seed(0)
    block = TransformerBlock(256, 4, 1.0, 1e-5).cuda()
    doc_ids, positions = (t.cuda() for t in packed_rows(4, 1536, seed=5))
    x = torch.randn(4, 1536, 256, device="cuda")
    with torch.no_grad():
        mask = build_attention_mask(doc_ids, positions, 128, flex=False)
        whole = block(x, rope_cos_sin(positions, 64), mask)
        cut = continue_in_two(block, x, doc_ids, positions, 128, 1024, 64, flex=True)
    torch.testing.assert_close(cut, whole, atol=2e-4, rtol=2e-4)


def test_local_mask_carries_at_most_a_window():
    doc_ids, positions = packed_rows(1, 32, seed=0)
    carried = torch.zeros(1, 9, dtype=torch.int64)
    with pytest.raises(ValueError, match="at most the window"):
        build_attention_mask(
            doc_ids, positions, 8, flex=False, local=True,
            carried_doc_ids=carried, carried_positions=carried,
        )


def test_cpu_default_mask_is_blocked_for_short_windows():
    from blt_model.layers import LocalMask

    doc_ids, positions = packed_rows(1, 64, seed=0)
    assert isinstance(build_attention_mask(doc_ids, positions, 8), LocalMask)
    assert isinstance(build_attention_mask(doc_ids, positions, 48), torch.Tensor)
    assert isinstance(build_attention_mask(doc_ids, positions, None), torch.Tensor)
