import json
import math

import pytest
import torch
import torch.nn.functional as F

from blt_model.entropy_model import (
    CheckpointMismatchError,
    EntropyModel,
    EntropyModelConfig,
    import_official_entropy_model,
    load_entropy_model,
    save_entropy_model,
)

TINY = dict(dim=64, n_layers=2, n_heads=4, window=8, max_seqlen=128)


def official_params(**overrides) -> dict:
    """A params.json shaped like Meta's release: a full LMTransformerArgs dump plus other
    sections we must ignore."""
    entropy_model = {
        "dim": 64,
        "n_layers": 2,
        "head_dim": None,
        "n_heads": 4,
        "n_kv_heads": None,
        "ffn_dim_multiplier": 1.0,
        "multiple_of": 256,
        "norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "init_base_std": None,
        "init_std_factor": "disabled",
        "max_seqlen": 128,
        "seed": 42,
        "vocab_size": 260,
        "weight_tying": False,
        "sliding_window": 8,
        "attn_impl": "xformers",
        "attn_bias_type": "local_block_causal",
    }
    entropy_model.update(overrides)
    return {"entropy_model": entropy_model, "data": {"seq_len": 8192}}


def official_state_dict(dim=64, n_layers=2, hidden=256, vocab=260, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def w(*shape, scale=None):
        t = torch.randn(*shape, generator=g) * (scale or shape[-1] ** -0.5)
        return t.bfloat16()  # released weights are bf16

    sd = {"tok_embeddings.weight": w(vocab, dim, scale=1.0)}
    for i in range(n_layers):
        p = f"layers.{i}."
        for name in ("wq", "wk", "wv", "wo"):
            sd[p + f"attention.{name}.weight"] = w(dim, dim)
        sd[p + "feed_forward.w1.weight"] = w(hidden, dim)
        sd[p + "feed_forward.w3.weight"] = w(hidden, dim)
        sd[p + "feed_forward.w2.weight"] = w(dim, hidden)
        sd[p + "attention_norm.weight"] = (1 + 0.1 * torch.randn(dim, generator=g)).bfloat16()
        sd[p + "ffn_norm.weight"] = (1 + 0.1 * torch.randn(dim, generator=g)).bfloat16()
    sd["norm.weight"] = (1 + 0.1 * torch.randn(dim, generator=g)).bfloat16()
    sd["output.weight"] = w(vocab, dim)
    return sd


def write_official(tmp_path, params: dict, state_dict: dict, nested=True):
    (tmp_path / "params.json").write_text(json.dumps(params))
    folder = tmp_path / "consolidated" if nested else tmp_path
    folder.mkdir(exist_ok=True)
    torch.save({"model": state_dict, "optim": {}}, folder / "consolidated.pth")
    return str(tmp_path)


def meta_reference_logits(
    sd: dict, tokens: torch.Tensor, n_layers, n_heads, window, theta=1e4, eps=1e-5
):
    """One document, written from Meta's arithmetic (base_transformer.py): 2x2 rotation
    matrices per pair, fp32 freqs, RMSNorm, explicit local-causal softmax, SwiGLU."""
    sd = {k: v.float() for k, v in sd.items()}
    seq_len = tokens.shape[0]
    dim = sd["tok_embeddings.weight"].shape[1]
    head_dim = dim // n_heads

    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(seq_len).float(), freqs)
    cos, sin = angles.cos(), angles.sin()
    freqs_cis = torch.stack((cos, -sin, sin, cos), dim=-1).view(seq_len, head_dim // 2, 2, 2)

    def rope(x):  # S H D
        pairs = x.reshape(seq_len, n_heads, head_dim // 2, 1, 2)
        return (pairs * freqs_cis[:, None]).sum(-1).flatten(2)

    def rms(x, weight):
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * weight

    i = torch.arange(seq_len)
    allowed = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)

    h = sd["tok_embeddings.weight"][tokens]
    for layer in range(n_layers):
        p = f"layers.{layer}."
        x = rms(h, sd[p + "attention_norm.weight"])
        q = rope((x @ sd[p + "attention.wq.weight"].T).view(seq_len, n_heads, head_dim))
        k = rope((x @ sd[p + "attention.wk.weight"].T).view(seq_len, n_heads, head_dim))
        v = (x @ sd[p + "attention.wv.weight"].T).view(seq_len, n_heads, head_dim)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(head_dim)
        scores = scores.masked_fill(~allowed, float("-inf"))
        attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(seq_len, dim)
        h = h + attn @ sd[p + "attention.wo.weight"].T
        x = rms(h, sd[p + "ffn_norm.weight"])
        gated = F.silu(x @ sd[p + "feed_forward.w1.weight"].T) * (
            x @ sd[p + "feed_forward.w3.weight"].T
        )
        h = h + gated @ sd[p + "feed_forward.w2.weight"].T
    return rms(h, sd["norm.weight"]) @ sd["output.weight"].T


def test_config_forbids_unknown_keys():
    with pytest.raises(ValueError):
        EntropyModelConfig(dim=64, n_heads=4, hidden_dim=3)
    with pytest.raises(ValueError):
        EntropyModelConfig(dim=64, n_heads=5)


def test_paper_shape():
    model = EntropyModel(EntropyModelConfig())
    assert model.layers[0].feed_forward.w1.weight.shape == (2048, 768)
    assert len(model.layers) == 14 and model.window == 512
    non_embedding = sum(p.numel() for n, p in model.named_parameters() if "tok_embeddings" not in n)
    assert 99e6 < non_embedding + 260 * 768 < 100e6


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = EntropyModel(EntropyModelConfig(**TINY)).eval()
    save_entropy_model(model, str(tmp_path / "model"))
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    loaded = load_entropy_model(str(tmp_path / "model"))
    assert loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    tokens = torch.randint(0, 260, (2, 50))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))


def test_import_official_layout_matches_meta_arithmetic(tmp_path):
    sd = official_state_dict()
    model = import_official_entropy_model(write_official(tmp_path, official_params(), sd))
    assert model.config == EntropyModelConfig(**TINY, ffn_dim_multiplier=1.0)
    tokens = torch.randint(0, 260, (40,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(tokens[None])[0]
    expected = meta_reference_logits(sd, tokens, n_layers=2, n_heads=4, window=8)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_import_reads_top_level_consolidated(tmp_path):
    model = import_official_entropy_model(
        write_official(tmp_path, official_params(), official_state_dict(), nested=False)
    )
    assert model.window == 8


def test_import_without_window_falls_back_to_512_like_meta(tmp_path):
    params = official_params(sliding_window=None, max_seqlen=1024)
    model = import_official_entropy_model(write_official(tmp_path, params, official_state_dict()))
    assert model.window == 512


def test_import_refuses_missing_key(tmp_path):
    sd = official_state_dict()
    del sd["layers.1.ffn_norm.weight"]
    with pytest.raises(
        CheckpointMismatchError, match=r"missing key 'layers\.1\.ffn_norm\.weight'.*\(64,\)"
    ):
        import_official_entropy_model(write_official(tmp_path, official_params(), sd))


def test_import_refuses_unknown_key(tmp_path):
    sd = official_state_dict()
    sd["layers.2.attention.wq.weight"] = torch.zeros(64, 64)
    with pytest.raises(
        CheckpointMismatchError, match=r"unknown key 'layers\.2\.attention\.wq\.weight'"
    ):
        import_official_entropy_model(write_official(tmp_path, official_params(), sd))


def test_import_refuses_wrong_shape(tmp_path):
    sd = official_state_dict()
    sd["layers.0.feed_forward.w1.weight"] = torch.zeros(170, 64)
    with pytest.raises(
        CheckpointMismatchError,
        match=r"shape mismatch for 'layers\.0\.feed_forward\.w1\.weight': "
        r"checkpoint \(170, 64\), model \(256, 64\)",
    ):
        import_official_entropy_model(write_official(tmp_path, official_params(), sd))


def test_import_refuses_grouped_query_attention(tmp_path):
    params = official_params(n_kv_heads=2)
    with pytest.raises(CheckpointMismatchError, match="n_kv_heads"):
        import_official_entropy_model(write_official(tmp_path, params, official_state_dict()))


def test_load_refuses_tampered_safetensors(tmp_path):
    from safetensors.torch import save_file

    model = EntropyModel(EntropyModelConfig(**TINY))
    save_entropy_model(model, str(tmp_path))
    sd = model.state_dict()
    sd["output.weight"] = torch.zeros(259, 64)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(
        CheckpointMismatchError,
        match=r"'output\.weight': checkpoint \(259, 64\), model \(260, 64\)",
    ):
        load_entropy_model(str(tmp_path))
