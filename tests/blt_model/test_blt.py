import math

import pytest
import torch

from blt_model.blt import (
    BLT,
    BLTConfig,
    HASH_PRIMES,
    PRESET_DIR,
    bits_per_byte,
    byte_loss,
    hash_ngram_ids,
    load_blt_preset,
    patch_ids_from_lengths,
    segment_positions,
)
from blt_model.configs import ConfigError

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
flex_on_cpu = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Byte Latent Transformer: patches scale better than tokens.",
    "Na\u00efve caf\u00e9 \u2014 \u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8"
    ", emoji \U0001f600!",
    "def f(x):\n    return x * 2  # a line of code\n",
]
PAD, BOS, EOS = 0, 1, 2


def tiny_config(**overrides) -> BLTConfig:
    # window 8 < T / 2: the CPU default is the blocked LocalMask path.
    fields = dict(
        dim_local_encoder=32, dim_local_decoder=32, dim_global=64, n_heads_local_encoder=2,
        n_heads_local_decoder=2, cross_attn_nheads=2, n_heads_global=4,
        n_layers_local_encoder=1, n_layers_global=2, n_layers_local_decoder=1,
        local_attention_window_len=8, encoder_hash_byte_group_vocab=64,
    )
    return BLTConfig(**(fields | overrides))


def tiny_model(seed: int = 0, **overrides) -> BLT:
    torch.manual_seed(seed)
    return BLT(tiny_config(**overrides)).eval()


def document_patches(n: int, max_len: int = 5) -> list[int]:
    """Content patches: a new patch after a space-ish break, at most max_len bytes (a stand-in
    for entropy patching: lengths vary and patches never cross the document)."""
    lengths, i = [], 0
    while i < n:
        size = min(max_len, n - i, 1 + (i * 7 + 3) % max_len)
        lengths.append(size)
        i += size
    return lengths


def pack_row(docs: list[bytes | str], start_mid: bool = False) -> tuple[list, list, list]:
    """Tokens, patch lengths and doc ids of documents packed back to back: BOS bytes EOS, BOS
    and EOS their own patches. start_mid: the first document continues from a previous row
    (no BOS)."""
    tokens, lengths, doc_ids = [], [], []
    for d, doc in enumerate(docs):
        data = doc.encode() if isinstance(doc, str) else doc
        head = [] if (start_mid and d == 0) else [BOS]
        seq = head + [b + 4 for b in data] + [EOS]
        tokens += seq
        doc_ids += [d] * len(seq)
        lengths += [1] * len(head) + document_patches(len(data)) + [1]
    return tokens, lengths, doc_ids


def make_batch(rows: list[list], seq_len: int | None = None):
    """Stack rows (from pack_row) into a batch; shorter rows end with pad tokens forming one
    patch and one document of their own. Targets: the next token of the same document."""
    seq_len = seq_len or max(len(t) for t, _, _ in rows)
    num_patches = max(len(p) + 1 for _, p, _ in rows)
    tokens = torch.full((len(rows), seq_len), PAD)
    patch_lengths = torch.zeros(len(rows), num_patches, dtype=torch.int32)
    doc_ids = torch.zeros(len(rows), seq_len, dtype=torch.int32)
    for r, (t, p, d) in enumerate(rows):
        n = len(t)
        tokens[r, :n] = torch.tensor(t)
        patch_lengths[r, : len(p)] = torch.tensor(p)
        doc_ids[r, :n] = torch.tensor(d)
        if n < seq_len:
            patch_lengths[r, len(p)] = seq_len - n
            doc_ids[r, n:] = d[-1] + 1
    targets = torch.full_like(tokens, -100)
    same_doc = (doc_ids[:, 1:] == doc_ids[:, :-1]) & (tokens[:, 1:] != PAD)
    targets[:, :-1] = torch.where(same_doc, tokens[:, 1:], -100)
    return tokens, patch_lengths, doc_ids, targets


def test_forward_shapes_finite_loss_and_every_parameter_learns():
    model = tiny_model().train()
    rows = [pack_row(TEXTS[:2]), pack_row(TEXTS[2:], start_mid=True), pack_row([TEXTS[1]])]
    tokens, patch_lengths, doc_ids, targets = make_batch(rows)
    assert (tokens == PAD).any()  # the last row ends with a pad patch
    logits = model(tokens, patch_lengths, doc_ids)
    assert logits.shape == (3, tokens.shape[1], 260)
    loss, nats, num_targets = byte_loss(logits, targets)
    assert torch.isfinite(loss) and 4.0 < loss.item() < 7.0  # about ln(260) = 5.56 at init
    assert num_targets.item() == (targets != -100).sum().item()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_byte_loss_matches_manual_cross_entropy_and_bits_per_byte():
    logits = torch.randn(2, 5, 260, dtype=torch.bfloat16)
    targets = torch.tensor([[5, 6, -100, 7, 8], [-100, -100, 9, 10, 11]])
    loss, nats, n = byte_loss(logits, targets)
    keep = targets != -100
    manual = -torch.log_softmax(logits.float(), -1)[keep].gather(1, targets[keep][:, None]).sum()
    assert n.item() == 7 and loss.dtype == torch.float32
    torch.testing.assert_close(nats, manual)
    torch.testing.assert_close(loss, manual / 7)
    assert bits_per_byte(nats.item(), 7) == pytest.approx(manual.item() / math.log(2) / 7)
    empty_loss, _, empty_n = byte_loss(logits, torch.full_like(targets, -100))
    assert empty_n.item() == 0 and empty_loss.item() == 0.0


@pytest.mark.parametrize("local", [True, False])
def test_causal_in_bytes(local):
    model = tiny_model(seed=1)
    tokens, patch_lengths, doc_ids, _ = make_batch([pack_row(TEXTS[:2])])
    base = model(tokens, patch_lengths, doc_ids, local=local)
    starts = set((patch_lengths[0].long().cumsum(0) - patch_lengths[0]).tolist())
    second_doc = int((doc_ids[0] == 1).nonzero()[0])
    # A patch's first byte, a byte mid-patch, and bytes in the second document.
    for k in (7, 9, second_doc + 1, second_doc + 12, tokens.shape[1] - 3):
        changed = tokens.clone()
        changed[0, k] = 4 + (tokens[0, k] - 4 + 97) % 256
        out = model(changed, patch_lengths, doc_ids, local=local)
        torch.testing.assert_close(out[:, :k], base[:, :k], atol=1e-6, rtol=0)
        assert (out[:, k:] - base[:, k:]).abs().max() > 1e-4, (k, k in starts)


def test_document_logits_do_not_depend_on_row_neighbours():
    model = tiny_model(seed=2)
    doc = TEXTS[1]
    alone = model(*make_batch([pack_row([doc])])[:3])
    n = alone.shape[1]
    # Packed after another document (and, in row 1, before one), with a pad tail in row 2.
    tokens, patch_lengths, doc_ids, _ = make_batch(
        [
            pack_row([TEXTS[0], doc]),
            pack_row([TEXTS[3], doc, TEXTS[2]]),
            pack_row([TEXTS[2][:9], doc]),
        ]
    )
    packed = model(tokens, patch_lengths, doc_ids)
    for row in range(3):
        first = int((doc_ids[row] == 1).nonzero()[0])  # the document is the row's second
        torch.testing.assert_close(packed[row, first : first + n], alone[0], atol=1e-5, rtol=1e-5)


def test_dense_and_blocked_local_masks_agree():
    model = tiny_model(seed=3)
    batch = make_batch([pack_row(TEXTS[:2]), pack_row(TEXTS[2:], start_mid=True)])[:3]
    blocked = model(*batch, flex=False, local=True)
    dense = model(*batch, flex=False, local=False)
    torch.testing.assert_close(blocked, dense, atol=1e-5, rtol=1e-5)


@flex_on_cpu
def test_flex_attention_agrees_with_sdpa_on_cpu():
    model = tiny_model(seed=4)
    batch = make_batch([pack_row(TEXTS[:2]), pack_row([TEXTS[3]])])[:3]
    with torch.no_grad():
        flex = model(*batch, flex=True)
        sdpa = model(*batch, flex=False)
    torch.testing.assert_close(flex, sdpa, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@cuda
def test_flex_attention_equals_sdpa_on_cuda():
    model = tiny_model(seed=5, local_attention_window_len=64).cuda()
    rows = [pack_row(TEXTS * 4), pack_row(TEXTS[::-1] * 4, start_mid=True)]
    batch = [t.cuda() for t in make_batch(rows)[:3]]
    with torch.no_grad():
        flex = model(*batch, flex=True)
        sdpa = model(*batch, flex=False, local=False)
    torch.testing.assert_close(flex, sdpa, atol=2e-4, rtol=2e-4)


def test_patch_ids_match_naive_construction():
    g = torch.Generator().manual_seed(0)
    seq_len, rows = 50, []
    for _ in range(4):
        lengths = []
        while sum(lengths) < seq_len:
            lengths.append(min(int(torch.randint(1, 9, (1,), generator=g)), seq_len - sum(lengths)))
        rows.append(lengths)
    patch_lengths = torch.zeros(4, max(map(len, rows)) + 2, dtype=torch.int32)
    naive = torch.empty(4, seq_len, dtype=torch.long)
    for r, lengths in enumerate(rows):
        patch_lengths[r, : len(lengths)] = torch.tensor(lengths)
        naive[r] = torch.tensor([p for p, n in enumerate(lengths) for _ in range(n)])
    assert torch.equal(patch_ids_from_lengths(patch_lengths, seq_len), naive)


def test_segment_positions_restart_at_each_document():
    ids = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    assert segment_positions(ids).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]


def test_hash_ngram_ids_match_naive_and_stop_at_document_start():
    tokens = torch.tensor([[1, 10, 20, 30, 2, 1, 10, 20, 30, 2]])
    positions = segment_positions(torch.tensor([[0] * 5 + [1] * 5]))
    sizes, table = [1, 3, 4], 1000
    got = hash_ngram_ids(tokens, positions, sizes, table, nb_functions=2)
    for (f, n), ids in zip([(f, n) for f in range(2) for n in sizes], got):
        for t in range(10):
            # Meta's hash: oldest token first times prime^i, int64 wrap-around, then mod.
            window = [tokens[0, t - j].item() if positions[0, t] >= j else 0 for j in range(n)]
            h = sum(tok * HASH_PRIMES[f] ** i for i, tok in enumerate(reversed(window)))
            h = (h + 2**63) % 2**64 - 2**63
            assert ids[0, t].item() == h % table
        # The second document starts like the first: same n-grams, same rows.
        assert torch.equal(ids[0, :5], ids[0, 5:])


def test_masks_follow_metas_decoder_alignment_within_documents():
    model = tiny_model()
    k = model.config.cross_attn_k
    tokens, patch_lengths, doc_ids, _ = make_batch([pack_row(["ab cd", "xy"])], seq_len=14)
    masks = model.build_masks(patch_lengths, doc_ids, flex=False)
    ids = masks.patch_ids[0].tolist()
    dec = masks.decoder_cross[0, 0]  # (T, P*K)
    for t in range(11):  # the two documents; 11 ... 13 are padding
        # Byte t (predicting t + 1) sees the K slots of the patch before the patch of t + 1:
        # its own patch at a patch's last byte, else the previous one.
        last = ids[t + 1] != ids[t]
        seen = ids[t] if last else ids[t] - 1
        assert dec[t].tolist() == [j // k == seen for j in range(dec.shape[1])], t
        assert masks.decoder_keep[0, t, 0]  # every segment opens with a one-byte patch
    enc = masks.encoder_cross[0, 0]  # (P*K, T)
    for p in range(len(set(ids))):
        for slot in range(k):
            assert enc[p * k + slot].tolist() == [i == p for i in ids]
    # BOS sees its own patch; the byte before the second document's BOS (the EOS) too.
    assert dec[0, :k].all() and dec[0].sum() == k


def test_a_continuation_first_patch_sees_no_patch_until_its_last_byte():
    model = tiny_model()
    tokens, patch_lengths, doc_ids, _ = make_batch([pack_row(["abcdefgh"], start_mid=True)])
    first = int(patch_lengths[0, 0])
    assert first > 1
    masks = model.build_masks(patch_lengths, doc_ids, flex=False)
    keep = masks.decoder_keep[0, :, 0].tolist()
    assert keep == [False] * (first - 1) + [True] * (len(keep) - first + 1)


@pytest.mark.parametrize(
    "patch_lengths, doc_ids",
    [
        ([[2, 2, 1]], [[0, 0, 0, 0]]),  # sums to 5, not 4
        ([[2, 0, 2]], [[0, 0, 0, 0]]),  # a zero in the middle
        ([[1, 3, 0]], [[0, 0, 1, 1]]),  # a patch across two documents
    ],
)
def test_build_masks_rejects_bad_patch_lengths(patch_lengths, doc_ids):
    with pytest.raises(ValueError, match="patch_lengths"):
        tiny_model().build_masks(torch.tensor(patch_lengths), torch.tensor(doc_ids))


def test_meta_build_to_empty_init_weights_gives_sane_parameters():
    with torch.device("meta"):
        model = BLT(tiny_config())
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
        assert p.abs().sum() > 0, name
    logits = model(*make_batch([pack_row(TEXTS[:1])])[:3])
    assert torch.isfinite(logits).all()
    # Exposed for parallelize_blt: the blocks and the hash tables it shards.
    assert len(model.local_encoder.layers) == 1 and len(model.global_transformer.layers) == 2
    assert len(model.local_decoder.layers) == 1 and len(model.encoder_hash_tok_embedding) == 6


@pytest.mark.parametrize("name", sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
def test_every_preset_loads_and_builds(name):
    cfg = load_blt_preset(name)
    with torch.device("meta"):
        model = BLT(cfg)
    total = model.num_params()
    global_params = sum(p.numel() for p in model.global_transformer.parameters())
    assert model.flops_per_byte(4.5, 4096) > 6 * (total - global_params) / 10
    if name == "100m":
        assert 90e6 < total < 140e6 and global_params > total / 2
    elif name.startswith("blt-"):  # the released shapes (without the 500k-row hash tables)
        hash_params = sum(p.numel() for p in model.encoder_hash_tok_embedding.parameters())
        assert {"blt-1b": 1.0e9, "blt-7b": 7.0e9}[name] * 0.8 < total - hash_params < 8.2e9
    else:  # small enough to run here
        model = BLT(cfg)
        logits = model(*make_batch([pack_row(TEXTS[:2])])[:3])
        assert torch.isfinite(logits).all()


def test_presets_exist_and_config_is_strict():
    assert {"debug", "small", "100m", "blt-1b", "blt-7b"} <= {p.stem for p in PRESET_DIR.glob("*.yaml")}
    assert load_blt_preset("debug", ["n_layers_global=3"]).n_layers_global == 3
    with pytest.raises(ValueError, match="no BLT preset"):
        load_blt_preset("nope")
    with pytest.raises(ConfigError):
        load_blt_preset("debug", ["dim_lokal=3"])
    with pytest.raises(ValueError, match="heads of even size"):
        tiny_config(dim_global=60, n_heads_global=4)  # head dim 15
    with pytest.raises(ValueError):
        BLTConfig(unknown_field=1)


def test_flops_per_byte_falls_with_longer_patches():
    model = tiny_model()
    short, long = model.flops_per_byte(2.0, 1024), model.flops_per_byte(8.0, 1024)
    assert short > long > 6 * sum(p.numel() for p in model.local_decoder.layers.parameters())


def test_tiny_model_overfits_one_batch():
    model = tiny_model(seed=6).train()
    tokens, patch_lengths, doc_ids, targets = make_batch([pack_row(TEXTS[:2]), pack_row(TEXTS[2:])])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss, _, _ = byte_loss(model(tokens, patch_lengths, doc_ids), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses
