"""Entropy models from Hugging Face's layouts (transformers' `BltPatcher`, the patcher inside a
`BltForCausalLM` checkpoint) and Meta's hub layout, checked against transformers itself."""

from __future__ import annotations

import json

import fsspec
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from blt_data.entropy import BOS_ID, BYTE_OFFSET, score_document_alone
from blt_data.registry import Registry
from blt_data.storage import Store
from blt_model.entropy_model import (
    CheckpointMismatchError,
    detect_layout,
    import_official_entropy_model,
    read_entropy_model_source,
)
from blt_model.entropy_registry import import_entropy_model, load_registered_entropy_model
from tests.blt_model.test_entropy_model import official_params, official_state_dict, write_official

transformers = pytest.importorskip("transformers")
from transformers import BltConfig, BltPatcherConfig  # noqa: E402
from transformers.models.blt.modeling_blt import BltForCausalLM, BltPatcher  # noqa: E402

PATCHER = dict(
    vocab_size=260,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=256,  # what our SwiGLU gives for dim 32 (multiple_of 256)
    sliding_window=8,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)
# Longer than several windows of 8, with multi-byte characters.
TEXT = "The patcher looks back 8 bytes per layer; naïve café ünïcödé, then some more text to go."


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Weights large enough that entropies spread far from log(260) (HF's init is std 0.02)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5 * (4 if "embed" in name or "lm_head" in name else 1))


def hf_entropies(patcher, text: str) -> np.ndarray:
    """HF's entropies for our byte j: the prediction at input position j over BOS, byte ids + 4."""
    utf8 = text.encode()
    ids = torch.tensor([[BOS_ID, *(b + BYTE_OFFSET for b in utf8)]])
    with torch.no_grad():
        entropies, _, _ = patcher(ids)
    return entropies[0, : len(utf8)].numpy()


def save_patcher(folder, seed=0) -> BltPatcher:
    patcher = BltPatcher(BltPatcherConfig(**PATCHER))
    randomize(patcher, seed)
    patcher.save_pretrained(folder)
    return patcher


def save_blt(folder, threshold=1.25, max_shard_size="60KB") -> BltForCausalLM:
    small = dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=1, intermediate_size=64)
    config = BltConfig(
        patcher_config=PATCHER,
        encoder_config=small,
        decoder_config=small,
        global_config=dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=1, intermediate_size=128),
        encoder_hash_byte_group_vocab=50,
        patching_threshold=threshold,
    )
    model = BltForCausalLM(config)
    randomize(model.model.patcher, seed=1)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    return model


def eager(folder, cls):
    return cls.from_pretrained(folder, attn_implementation="eager").eval()


def test_standalone_patcher_matches_hf_entropies(tmp_path):
    save_patcher(tmp_path / "patcher")
    reference = eager(tmp_path / "patcher", BltPatcher)
    source = read_entropy_model_source(str(tmp_path / "patcher"))
    assert source.layout == "hf-blt-patcher" and source.threshold is None
    assert source.model.config.window == 8 and source.model.config.ffn_dim_multiplier == 1.0
    ours = score_document_alone(source.model, TEXT)
    expected = hf_entropies(reference, TEXT)
    assert len(TEXT.encode()) > 8 * 8
    assert expected.std() > 0.3  # the oracle is not a flat log(260)
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)


def test_blt_checkpoint_gives_its_patcher_sharded(tmp_path, local_store_url):
    save_blt(tmp_path / "blt")
    files = sorted(p.name for p in (tmp_path / "blt").iterdir())
    assert "model.safetensors.index.json" in files and len([f for f in files if f.startswith("model-")]) > 2
    reference = eager(tmp_path / "blt", BltForCausalLM).model.patcher
    registry = Registry(Store.open(local_store_url))
    manifest = import_entropy_model(registry, str(tmp_path / "blt"), "hf")
    assert manifest.kind == "entropy-model" and manifest.params["format"] == "hf-blt"
    assert manifest.params["threshold"] == 1.25
    assert manifest.params["patching"]["patching_mode"] == "entropy"
    # Only the shards holding patcher tensors were read.
    index = json.loads((tmp_path / "blt" / "model.safetensors.index.json").read_text())
    patcher_shards = {s for k, s in index["weight_map"].items() if k.startswith("model.patcher.")}
    assert set(manifest.params["source_files"][2:]) == patcher_shards
    assert len(patcher_shards) < len(set(index["weight_map"].values()))
    model = load_registered_entropy_model(registry, "hf")
    np.testing.assert_allclose(score_document_alone(model, TEXT), hf_entropies(reference, TEXT), atol=1e-4, rtol=0)
    # The same checkpoint again is the same version.
    assert import_entropy_model(registry, str(tmp_path / "blt"), "hf").version == manifest.version


def test_blt_checkpoint_single_file_from_s3(tmp_path, s3_bucket):
    save_blt(tmp_path / "blt", threshold=0.9, max_shard_size="100MB")
    assert (tmp_path / "blt" / "model.safetensors").exists()
    reference = eager(tmp_path / "blt", BltForCausalLM).model.patcher
    fs = fsspec.filesystem("s3")
    fs.put(str(tmp_path / "blt"), f"{s3_bucket}/release/blt", recursive=True)
    registry = Registry(Store.open(f"{s3_bucket}/store"))
    manifest = import_entropy_model(registry, f"{s3_bucket}/release/blt", "hf")
    assert manifest.params["threshold"] == 0.9
    model = load_registered_entropy_model(registry, "hf")
    np.testing.assert_allclose(score_document_alone(model, TEXT), hf_entropies(reference, TEXT), atol=1e-4, rtol=0)


def test_meta_hub_layout_equals_consolidated(tmp_path):
    sd = official_state_dict()
    (tmp_path / "meta").mkdir()
    consolidated = import_official_entropy_model(write_official(tmp_path / "meta", official_params(), sd))
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "config.json").write_text(json.dumps({"args": official_params()["entropy_model"]}))
    save_file({k: v.contiguous() for k, v in sd.items()}, hub / "model.safetensors")
    source = read_entropy_model_source(str(hub))
    assert source.layout == "meta-hub" and source.model.config == consolidated.config
    for key, value in consolidated.state_dict().items():
        assert torch.equal(source.model.state_dict()[key], value), key


def test_consolidated_layout_is_still_detected(tmp_path):
    source = read_entropy_model_source(write_official(tmp_path, official_params(), official_state_dict()))
    assert source.layout == "meta-consolidated" and source.files == ["params.json", "consolidated.pth"]


def test_unknown_patcher_tensor_is_named(tmp_path):
    save_patcher(tmp_path / "p")
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "p" / "model.safetensors")
    tensors["layers.0.self_attn.q_norm.weight"] = torch.ones(8)
    save_file(tensors, tmp_path / "p" / "model.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"unknown patcher tensor 'layers\.0\.self_attn\.q_norm\.weight'"):
        read_entropy_model_source(str(tmp_path / "p"))


def test_wrong_shape_and_missing_tensor_are_named(tmp_path):
    save_patcher(tmp_path / "p")
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "p" / "model.safetensors")
    tensors["layers.1.mlp.up_proj.weight"] = torch.zeros(128, 32)
    del tensors["norm.weight"]
    save_file(tensors, tmp_path / "p" / "model.safetensors")
    with pytest.raises(CheckpointMismatchError) as e:
        read_entropy_model_source(str(tmp_path / "p"))
    assert "missing key 'norm.weight'" in str(e.value)
    assert "'layers.1.feed_forward.w3.weight': checkpoint (128, 32), model (256, 32)" in str(e.value)


def test_unsupported_shapes_are_refused(tmp_path):
    folder = tmp_path / "p"
    save_patcher(folder)
    config = json.loads((folder / "config.json").read_text())
    for change, message in (
        ({"num_key_value_heads": 2}, "grouped-query attention"),
        ({"sliding_window": None}, "sliding_window is null"),
        ({"intermediate_size": 100}, "intermediate_size 100"),
    ):
        (folder / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(CheckpointMismatchError, match=message):
            read_entropy_model_source(str(folder))


def test_layouts_that_are_not_entropy_models(tmp_path):
    (tmp_path / "blt").mkdir()
    (tmp_path / "blt" / "config.json").write_text(json.dumps({"args": {"dim_global": 64, "patch_size": 4}}))
    with pytest.raises(CheckpointMismatchError, match="BLT in Meta's hub layout"):
        detect_layout(str(tmp_path / "blt"))
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointMismatchError, match="model_type 'llama'"):
        detect_layout(str(tmp_path / "llama"))
    with pytest.raises(FileNotFoundError, match="no consolidated.pth"):
        detect_layout(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps({**PATCHER, "model_type": "blt_patcher"}))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        read_entropy_model_source(str(tmp_path / "empty"))


def test_blt_without_patcher_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "blt", "patch_in_forward": False}))
    with pytest.raises(CheckpointMismatchError, match="carries no patcher"):
        read_entropy_model_source(str(tmp_path))


def test_truncated_shard_is_a_clear_error(tmp_path):
    save_patcher(tmp_path / "p")
    weights = tmp_path / "p" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointMismatchError, match="file ends inside tensor"):
        read_entropy_model_source(str(tmp_path / "p"))
