"""Our BLT against an independent implementation: transformers' `BltForCausalLM` (which agrees
with Meta's `bytelatent` to ~2e-6). Tiny random models in fp32 on CPU, HF's eager attention;
the same weights must give logits within 1e-4, for one document and for every document of a
packed row.

NOTE: transformers aligns the decoder by `patch_lengths[:, 1:]` with patch starts, which at the
row's final byte picks the patch before the last one, where Meta's `patch_ids_from_lengths`
picks the last one (the patch that byte completes). So HF is run with one extra byte in a patch
of its own after the document, and compared on the document's bytes: causality makes the
extra byte invisible to them, and every byte then sees Meta's patch.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import BltConfig, BltForCausalLM  # noqa: E402
from transformers.models.blt.modeling_blt import byte_group_hash_function  # noqa: E402

from blt_model.blt import BLT, BLTConfig, HASH_PRIMES, hash_ngram_ids  # noqa: E402
from blt_model.interop import (  # noqa: E402
    InteropError,
    config_from_hf_config,
    config_from_meta_args,
    hf_config_from_config,
    meta_args_from_config,
    state_dict_from_hf,
    state_dict_to_hf,
)

BOS, EOS = 1, 2
TOL = 1e-4
TEXT = "The quick brown fox jumps over the lazy dog; Byte Latent Transformer!".encode()

BASE = dict(
    vocab_size=260, dim_global=64, dim_local_encoder=32, dim_local_decoder=32,
    n_layers_global=2, n_layers_local_encoder=1, n_layers_local_decoder=2,
    n_heads_global=4, n_heads_local_encoder=2, n_heads_local_decoder=2, cross_attn_k=2,
    cross_attn_nheads=2, encoder_hash_byte_group_vocab=101, local_attention_window_len=512,
    rope_theta=500000.0,
)  # fmt: skip
CONFIGS = {
    # released 1B shape in small: K*D_local == D_global, decoder cross-attends at every layer
    "base": {},
    # K = 1 (then K*D_local != D_global: the global input projection too)
    "k1": dict(cross_attn_k=1),
    # encoder cross-attention at every layer, decoder at the first only
    "enc_all_dec_first": dict(cross_attn_all_layers_encoder=True, cross_attn_all_layers_decoder=False),
    # two hash functions per n
    "nb_functions_2": dict(encoder_hash_byte_group_nb_functions=2, encoder_hash_byte_group_size=[2, 3, 5]),
    # the 7B's shape: K*D_local = 64 != D_global = 96, projected into the global transformer
    "global_projection": dict(dim_global=96, n_heads_global=4),
    # local window far shorter than the documents
    "window_8": dict(local_attention_window_len=8, n_layers_local_encoder=2),
}  # fmt: skip


def config(**overrides) -> BLTConfig:
    return BLTConfig(**(BASE | overrides))


def build_pair(cfg: BLTConfig, seed: int = 0) -> tuple[BLT, BltForCausalLM]:
    """A seeded random HF model (norms perturbed too, so they are tested) and ours with its
    weights, converted by interop."""
    torch.manual_seed(seed)
    hf_config = BltConfig(**hf_config_from_config(cfg))
    hf_config._attn_implementation = "eager"
    for sub in ("encoder_config", "decoder_config", "global_config"):
        getattr(hf_config, sub)._attn_implementation = "eager"
    hf = BltForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                param.mul_(1 + 0.2 * torch.randn_like(param))
    ours = BLT(cfg).eval()
    converted, patcher = state_dict_from_hf(hf.state_dict(), cfg)
    assert not patcher
    ours.load_state_dict(converted, strict=True)
    return ours, hf


def hf_logits(hf: BltForCausalLM, tokens: list[int], patch_lengths: list[int]) -> torch.Tensor:
    """HF's logits (T, V) for one document, with Meta's alignment at its last byte (module doc)."""
    ids = torch.tensor([tokens + [EOS]])
    lengths = torch.tensor([patch_lengths + [1]])
    with torch.no_grad():
        return hf(input_ids=ids, patch_lengths=lengths, use_cache=False).logits[0, :-1]


def ours_logits(model: BLT, tokens, patch_lengths, doc_ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(
            torch.tensor([tokens]), torch.tensor([patch_lengths]), torch.tensor([doc_ids]), **kwargs
        )[0]


def document(data: bytes, max_len: int = 6, bos: bool = True, first: int = 1):
    """Tokens and patch lengths of one document: [BOS] bytes EOS; BOS and EOS are patches of
    their own (our reader's rows); content patches vary in length (a stand-in for entropy
    patching). Without BOS the first patch has `first` bytes."""
    tokens = ([BOS] if bos else []) + [b + 4 for b in data] + [EOS]
    lengths = [1] if bos else [first]
    i = 0 if bos else first
    while i < len(data):
        size = min(max_len, len(data) - i, 1 + (i * 5 + 2) % max_len)
        lengths.append(size)
        i += size
    return tokens, lengths + [1]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_one_document_matches_transformers(name):
    cfg = config(**CONFIGS[name])
    ours, hf = build_pair(cfg, seed=len(name))
    tokens, lengths = document(TEXT)
    want = hf_logits(hf, tokens, lengths)
    for local in (False, True):  # dense and blocked sliding-window masks
        got = ours_logits(ours, tokens, lengths, [0] * len(tokens), flex=False, local=local)
        assert (got - want).abs().max() < TOL, (name, local, (got - want).abs().max())
    assert want.abs().max() > 0.1  # not trivially small


@pytest.mark.parametrize("name", ["base", "window_8", "global_projection"])
def test_each_document_of_a_packed_row_matches_transformers_alone(name):
    cfg = config(**CONFIGS[name])
    ours, hf = build_pair(cfg, seed=3)
    docs = [
        document(TEXT[20:47], bos=False),  # continues a document cut at the row start
        document(TEXT[:31]),
        document("caf\u00e9 \u65e5\u672c\u8a9e, emoji \U0001f600".encode(), max_len=3),
    ]
    tokens = [t for doc, _ in docs for t in doc]
    lengths = [n for _, doc_lengths in docs for n in doc_lengths]
    doc_ids = [d for d, (doc, _) in enumerate(docs) for _ in doc]
    tokens, lengths, doc_ids = tokens + [0] * 5, lengths + [5], doc_ids + [len(docs)] * 5  # pad
    got = ours_logits(ours, tokens, lengths + [0, 0], doc_ids, flex=False)  # zero patches too
    start = 0
    for doc_tokens, doc_lengths in docs:
        want = hf_logits(hf, doc_tokens, doc_lengths)
        part = got[start : start + len(doc_tokens)]
        assert (part - want).abs().max() < TOL, (name, start, (part - want).abs().max())
        start += len(doc_tokens)


def test_encoder_cross_attention_at_every_layer_is_metas():
    """With several encoder layers and `cross_attn_all_layers_encoder`, transformers re-pools
    the patch queries before each cross-attention, while Meta pools once (before the first) and
    carries them on (`patch_embeds = patch_embeds + cross(patch_embeds, h)`). HF's encoder with
    Meta's loop is the oracle here."""
    cfg = config(n_layers_local_encoder=3, cross_attn_all_layers_encoder=True)
    hf_dict = hf_config_from_config(config(n_layers_local_encoder=3))
    hf_dict["encoder_config"]["cross_attn_all_layers"] = True
    hf_config = BltConfig(**hf_dict)
    for c in (hf_config, hf_config.encoder_config, hf_config.decoder_config, hf_config.global_config):
        c._attn_implementation = "eager"
    torch.manual_seed(7)
    hf = BltForCausalLM(hf_config).eval()
    ours = BLT(cfg).eval()
    ours.load_state_dict(state_dict_from_hf(hf.state_dict(), cfg)[0], strict=True)
    encoder = hf.model.local_encoder

    def meta_encoder_forward(input_ids=None, inputs_embeds=None, attention_mask=None,
                             position_ids=None, encoder_attention_mask=None, num_patches=None,
                             patch_ids=None, **kwargs):  # fmt: skip
        h = inputs_embeds
        rope = encoder.rotary_emb(h, position_ids)
        patches = None
        for i, layer in enumerate(encoder.layers):
            h = layer(h, position_embeddings=rope, attention_mask=attention_mask)
            if patches is None:
                pooled = encoder.patch_reduce(h, num_patches, patch_ids)
                patches = encoder.patch_embedding_projection(pooled)
                patches = patches.reshape(h.shape[0], -1, h.shape[-1])
            out, _ = encoder.cross_attn_layers[i](
                hidden_states=patches, cross_attention_states=h, attention_mask=encoder_attention_mask
            )
            patches = patches + out
        return h, patches

    tokens, lengths = document(TEXT)
    want_hf = hf_logits(hf, tokens, lengths)
    encoder.forward = meta_encoder_forward
    want = hf_logits(hf, tokens, lengths)
    got = ours_logits(ours, tokens, lengths, [0] * len(tokens), flex=False)
    assert (got - want).abs().max() < TOL
    assert (got - want_hf).abs().max() > 1e-3  # the two codes do differ here


def test_continuation_with_a_long_first_patch_stays_causal():
    """Meta asserts a one-byte first patch; HF accepts a longer one but then lets its bytes see
    the global state of the whole patch (future bytes). Ours: those bytes see no patch, so
    changing a later byte of the patch changes nothing before it."""
    ours, _ = build_pair(config(), seed=4)
    tokens, lengths = document(TEXT[:30], bos=False, first=5)
    base = ours_logits(ours, tokens, lengths, [0] * len(tokens))
    changed = list(tokens)
    changed[4] = changed[4] + 1 if changed[4] < 259 else 4
    after = ours_logits(ours, changed, lengths, [0] * len(tokens))
    assert torch.equal(base[:4], after[:4])
    assert not torch.equal(base[4:], after[4:])


@pytest.mark.parametrize("nb_functions", [1, 3])
def test_hash_ids_are_metas(nb_functions):
    """Against transformers' copy of Meta's hash (prime powers, unfold, int64 wrap-around)."""
    torch.manual_seed(0)
    tokens = torch.randint(0, 260, (2, 50))
    sizes, vocab = [1, 3, 8], 500002
    got = hash_ngram_ids(tokens, torch.arange(50).expand(2, 50), sizes, vocab, nb_functions)
    want = [
        byte_group_hash_function(tokens, n, HASH_PRIMES[f], vocab)
        for f in range(nb_functions)
        for n in sizes
    ]
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    # Within a document starting at 10, tokens before its start count as Meta's zero padding.
    positions = torch.arange(50).expand(2, 50) - 10
    got = hash_ngram_ids(tokens, positions, sizes, vocab, nb_functions)
    alone = [byte_group_hash_function(tokens[:, 10:], n, HASH_PRIMES[f], vocab)
             for f in range(nb_functions) for n in sizes]  # fmt: skip
    for g, w in zip(got, alone):
        assert torch.equal(g[:, 10:], w)


def test_state_dict_round_trips_and_meta_layout_is_ours():
    cfg = config(**CONFIGS["global_projection"])
    torch.manual_seed(0)
    model = BLT(cfg)
    state = model.state_dict()
    back, _ = state_dict_from_hf(state_dict_to_hf(state, cfg), cfg)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    # Meta's names: hash tables at the top, one per (function, n); the 7B's projection.
    assert "encoder_hash_tok_embedding.5.weight" in state
    assert state["global_transformer.token_embedding_projection.weight"].shape == (96, 64)
    assert state["local_decoder.patch_embedding_projection.weight"].shape == (64, 96)
    assert state["local_encoder.cross_attn_layers.0.cross_attn_norm_q.weight"].shape == (32,)
    broken = dict(state_dict_to_hf(state, cfg))
    broken["model.local_decoder.norm.weight"] = torch.ones(33)
    with pytest.raises(InteropError, match="local_decoder.norm.weight"):
        state_dict_from_hf(broken, cfg)
    del broken["lm_head.weight"]
    with pytest.raises(InteropError, match="local_decoder.output.weight"):
        state_dict_from_hf(broken, cfg)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_configs_round_trip_through_meta_and_hf(name):
    cfg = config(**CONFIGS[name])
    assert config_from_meta_args(meta_args_from_config(cfg)) == cfg
    assert config_from_hf_config(hf_config_from_config(cfg)) == cfg
    # transformers reads it back to the same dict of sub-configs
    hf = BltConfig(**hf_config_from_config(cfg)).to_dict()
    assert config_from_hf_config(hf) == cfg


def test_unsupported_options_are_refused_by_name():
    args = meta_args_from_config(config())
    for name, value in [("n_kv_heads", 1), ("cross_attn_decoder", False), ("downsampling_by_pooling", "avg")]:
        with pytest.raises(InteropError, match=name):
            config_from_meta_args(args | {name: value})
    with pytest.raises(ValueError, match="dim_local_decoder"):
        config(dim_local_decoder=64)  # Meta's code cannot compute it either
    with pytest.raises(InteropError, match="cross_attn_nheads"):
        hf_config_from_config(config(cross_attn_nheads=4))


def test_entropy_model_matches_transformers_patcher_and_rides_in_the_blt_checkpoint():
    from transformers import BltPatcherConfig
    from transformers.models.blt.modeling_blt import BltPatcher

    from blt_model.entropy_model import EntropyModel, EntropyModelConfig, load_checked_state_dict
    from blt_model.interop import (
        entropy_config_from_hf_patcher,
        entropy_state_dict_from_hf,
        entropy_state_dict_to_hf,
        hf_patcher_config,
    )

    ecfg = EntropyModelConfig(dim=32, n_layers=2, n_heads=2, window=8, max_seqlen=64)
    assert entropy_config_from_hf_patcher(hf_patcher_config(ecfg)) == ecfg
    patcher_config = BltPatcherConfig(**hf_patcher_config(ecfg))
    patcher_config._attn_implementation = "eager"
    torch.manual_seed(1)
    patcher = BltPatcher(patcher_config).eval()
    ours = EntropyModel(ecfg).eval()
    load_checked_state_dict(ours, entropy_state_dict_from_hf(patcher.state_dict()), "hf")
    tokens = torch.tensor([[BOS] + [b + 4 for b in TEXT[:40]]])
    with torch.no_grad():
        entropies, _, want = patcher(input_ids=tokens)
        got = ours(tokens)
    assert (got - want).abs().max() < TOL
    # In a BLT checkpoint: model.patcher.* next to the BLT's tensors, and back out again.
    cfg = config()
    blt = BLT(cfg)
    patcher_sd = entropy_state_dict_to_hf(ours.state_dict())
    hf_sd = state_dict_to_hf(blt.state_dict(), cfg, patcher_sd)
    assert "model.patcher.lm_head.weight" in hf_sd and "model.patcher.embed_tokens.weight" in hf_sd
    hf_config = BltConfig(**hf_config_from_config(cfg, hf_patcher_config(ecfg)))
    hf = BltForCausalLM(hf_config)
    assert hf.state_dict().keys() == hf_sd.keys()
    hf.load_state_dict(hf_sd, strict=True)
    back, back_patcher = state_dict_from_hf(hf.state_dict(), cfg)
    assert all(torch.equal(back[k], v) for k, v in blt.state_dict().items())
    assert all(torch.equal(back_patcher[k], v) for k, v in patcher_sd.items())
