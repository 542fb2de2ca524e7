"""`blt-train import` / `export`: released BLT folders in (Meta's consolidated folder, Meta's hub
layout, transformers' layout) and out (transformers', Meta's hub), checked against transformers'
`BltForCausalLM` itself: Meta -> ours -> HF and HF -> ours -> Meta give the same logits (fp32,
CPU, eager attention), HF's patcher patches in forward as ours does, and refusals name what is
wrong. Tiny random models; nothing is downloaded.
"""

from __future__ import annotations

import json

import fsspec
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from blt_data.entropy import score_document_alone
from blt_data.patching import PatchRule, patch_lengths
from blt_data.registry import Registry
from blt_data.storage import Store
from blt_data.tokens import BOS_ID, BYTE_OFFSET
from blt_data.verify import verify
from blt_model.blt import BLT
from blt_model.blt_registry import checkpoint_state_dict, import_blt
from blt_model.entropy_model import import_official_entropy_model
from blt_model.entropy_registry import load_registered_entropy_model
from blt_model.interop import InteropError, meta_args_from_config
from blt_model.blt_registry import load_trained_blt
from tests.blt_model.test_entropy_model import official_params, official_state_dict, write_official

transformers = pytest.importorskip("transformers")
from transformers import BltConfig, BltForCausalLM  # noqa: E402

from blt_model.interop import hf_config_from_config  # noqa: E402
from tests.blt_model.test_blt_oracle import CONFIGS, TOL, config, document, hf_logits, ours_logits  # noqa: E402
from tests.blt_model.test_entropy_import import PATCHER, hf_entropies, randomize  # noqa: E402
from tests.blt_model.test_train import blt_train  # noqa: E402

TEXT = "The quick brown fox jumps over the lazy dog; Byte Latent Transformer! naïve café, once more."


def random_blt(cfg, seed: int) -> BLT:
    """Seeded weights, norms perturbed so they are tested too."""
    torch.manual_seed(seed)
    model = BLT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    return model


def entropy_threshold(entropy_dir: str) -> float:
    """The median entropy of TEXT's bytes: patches of varied lengths, none on a tie."""
    values = np.sort(score_document_alone(import_official_entropy_model(entropy_dir), TEXT))
    mid = len(values) // 2
    return float((values[mid - 1] + values[mid]) / 2)


def write_meta_consolidated(folder, cfg, model: BLT, patcher_args: dict | None = None, beside: bool = False) -> float:
    """Meta's consolidated layout: params.json {model, data.patcher_args}, consolidated.pth, and
    entropy_model/ inside (or beside, as in Meta's snapshot); returns the patch threshold."""
    entropy_dir = (folder.parent if beside else folder) / "entropy_model"
    entropy_dir.mkdir(parents=True, exist_ok=True)
    folder.mkdir(exist_ok=True)
    write_official(entropy_dir, official_params(), official_state_dict(dim=64, hidden=256, seed=5))
    threshold = entropy_threshold(str(entropy_dir))
    args = meta_args_from_config(cfg) | {"seed": 777, "patch_size": 6, "patching_threshold": 3.1}
    patcher = {"patching_mode": "entropy", "threshold": threshold, "realtime_patching": True,
               "patching_device": "cuda", "entropy_model_checkpoint_dir": "/ckpt/entropy_model"}  # fmt: skip
    params = {"name": "blt_1b", "model": args, "data": {"patcher_args": patcher | (patcher_args or {})}}
    (folder / "params.json").write_text(json.dumps(params))
    torch.save({"model": model.state_dict(), "optim": {}}, folder / "consolidated.pth")
    return threshold


def load_hf(folder) -> BltForCausalLM:
    model = BltForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()
    for sub in ("encoder_config", "decoder_config", "global_config"):
        getattr(model.config, sub)._attn_implementation = "eager"
    return model


def assert_same_logits(ours: BLT, hf: BltForCausalLM, text: bytes = TEXT.encode()) -> None:
    tokens, lengths = document(text)
    want = hf_logits(hf, tokens, lengths)
    got = ours_logits(ours, tokens, lengths, [0] * len(tokens), flex=False)
    assert (got - want).abs().max() < TOL, (got - want).abs().max()
    assert want.abs().max() > 0.1


@pytest.fixture
def store(tmp_path):
    return str(tmp_path / "store")


def test_meta_consolidated_to_hf_gives_the_same_logits_and_patches(tmp_path, store):
    cfg = config(**CONFIGS["global_projection"])
    model = random_blt(cfg, seed=1)
    threshold = write_meta_consolidated(tmp_path / "blt_1b", cfg, model)

    out = blt_train("import", str(tmp_path / "blt_1b"), "--name", "meta", "--store", store)
    assert "meta@v1 (blt-checkpoint)" in out and "meta-consolidated" in out and "entropy" in out
    registry = Registry(Store.open(store))
    m = registry.resolve("meta", area="models", kind="blt-checkpoint")
    assert m.parents == ["meta-entropy@v1"] and m.params["entropy_model"] == "meta-entropy@v1"
    assert m.params["patching"] == {"scheme": "entropy", "threshold": threshold, "max_patch_length": None, "patch_size": 4}
    assert registry.resolve("meta-entropy", area="models").kind == "entropy-model"
    assert verify(registry, m) == []
    stored = checkpoint_state_dict(registry, m)
    assert all(torch.equal(stored[k], v) for k, v in model.state_dict().items())
    # The same release again is the same version, entropy model included.
    again = blt_train("import", str(tmp_path / "blt_1b"), "--name", "meta", "--store", store)
    assert "meta@v1" in again and "v2" not in again

    blt_train("export", "meta", "--format", "hf", "--out", str(tmp_path / "hf"), "--store", store)
    hf = load_hf(tmp_path / "hf")
    assert hf.config.patch_in_forward and hf.config.patching_threshold == threshold
    assert_same_logits(model, hf)

    # transformers patches in forward with the exported patcher and threshold exactly as we
    # patch with the registered entropy model and rule (the data's rule, DESIGN.md §4).
    entropy = load_registered_entropy_model(registry, "meta-entropy")
    rule = PatchRule(**m.params["patching"])
    # BOS as a patch of its own, then the document's patches (the reader's rows, generate's too).
    ours_lengths = np.concatenate([[1], patch_lengths(TEXT.encode(), score_document_alone(entropy, TEXT), rule)])
    ids = torch.tensor([[BOS_ID, *(b + BYTE_OFFSET for b in TEXT.encode())]])
    with torch.no_grad():
        entropies, hf_lengths, _ = hf.model.patcher(ids, patch_size=4, threshold=threshold)
    np.testing.assert_allclose(entropies[0, :-1].numpy(), score_document_alone(entropy, TEXT), atol=1e-4, rtol=0)
    assert hf_lengths[0].tolist() == ours_lengths.tolist()
    assert 8 < len(ours_lengths) < len(TEXT.encode())  # varied patches, not bytes
    with torch.no_grad():
        patched_in_forward = hf(input_ids=ids, use_cache=False).logits[0]
    got = ours_logits(model, ids[0].tolist(), ours_lengths.tolist(), [0] * ids.shape[1], flex=False)
    # All but the row's final byte, where transformers' alignment differs from Meta's
    # (tests/blt_model/test_blt_oracle.py).
    assert (got[:-1] - patched_in_forward[:-1]).abs().max() < TOL


def test_hf_to_ours_to_meta_gives_the_same_logits(tmp_path, store):
    cfg = config(**CONFIGS["base"])
    torch.manual_seed(2)
    hf_config = BltConfig(**(hf_config_from_config(cfg, PATCHER) | {"patching_threshold": 1.5}))
    hf = BltForCausalLM(hf_config).eval()
    randomize(hf, seed=3)  # norms around 1, other weights large enough to matter
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    hf = load_hf(tmp_path / "hf")

    out = blt_train("import", str(tmp_path / "hf"), "--name", "fromhf", "--store", store)
    assert "hf-blt" in out and "threshold 1.5" in out
    registry = Registry(Store.open(store))
    ours, m = load_trained_blt(registry, "fromhf")
    assert m.params["entropy_model"] == "fromhf-entropy@v1"
    assert_same_logits(ours, hf)

    blt_train("export", "fromhf", "--format", "meta", "--out", str(tmp_path / "meta"), "--store", store)
    meta = json.loads((tmp_path / "meta" / "config.json").read_text())
    assert set(meta) == {"args"} and meta["args"]["dim_global"] == cfg.dim_global
    train_args = json.loads((tmp_path / "meta" / "train_args.json").read_text())
    assert train_args["data"]["patcher_args"] == {
        "patching_mode": "entropy", "threshold": 1.5, "monotonicity": False, "max_patch_length": None}  # fmt: skip
    assert json.loads((tmp_path / "meta" / "entropy_model" / "config.json").read_text())["args"]["sliding_window"] == 8

    # Meta's hub layout back in: the same function, the same patcher, the same threshold.
    blt_train("import", str(tmp_path / "meta"), "--name", "back", "--store", store)
    back, bm = load_trained_blt(registry, "back")
    assert bm.params["source_layout"] == "meta-hub" and bm.params["patching"]["threshold"] == 1.5
    assert_same_logits(back, hf)
    entropy = load_registered_entropy_model(registry, bm.params["entropy_model"])
    np.testing.assert_allclose(
        score_document_alone(entropy, TEXT), hf_entropies(hf.model.patcher, TEXT), atol=1e-4, rtol=0
    )
    # And out to transformers again: the same tensors as the original checkpoint.
    blt_train("export", "back", "--format", "hf", "--out", str(tmp_path / "hf2"), "--store", store)
    again = load_hf(tmp_path / "hf2")
    original = hf.state_dict()
    assert again.state_dict().keys() == original.keys()
    assert all(torch.equal(again.state_dict()[k], v) for k, v in original.items())
    assert again.config.patching_threshold == 1.5


def test_meta_hub_from_s3_with_a_separate_entropy_folder(tmp_path, s3_bucket):
    cfg = config(**CONFIGS["k1"])
    model = random_blt(cfg, seed=4)
    hub = tmp_path / "blt-1b"
    hub.mkdir()
    (hub / "config.json").write_text(json.dumps({"args": meta_args_from_config(cfg)}))
    save_file({k: v.bfloat16().contiguous() for k, v in model.state_dict().items()}, hub / "model.safetensors")
    entropy = tmp_path / "blt-entropy"  # facebook/blt-entropy: LMTransformer's hub layout
    entropy.mkdir()
    (entropy / "config.json").write_text(json.dumps({"args": official_params()["entropy_model"]}))
    save_file(official_state_dict(dim=64, hidden=256), entropy / "model.safetensors")
    fs = fsspec.filesystem("s3")
    for folder in (hub, entropy):
        fs.put(str(folder), f"{s3_bucket}/release/{folder.name}", recursive=True)

    store = f"{s3_bucket}/reg"
    out = blt_train("import", f"{s3_bucket}/release/blt-1b", "--name", "hub", "--entropy-model",
                    f"{s3_bucket}/release/blt-entropy", "--entropy-name", "hub-ent", "--store", store)  # fmt: skip
    assert "bfloat16" in out and "meta-hub" in out
    registry = Registry(Store.open(store))
    ours, m = load_trained_blt(registry, "hub")
    assert m.parents == ["hub-ent@v1"] and m.params["patching"] is None  # no train_args.json
    for key, value in model.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value.bfloat16().float()), key


def test_generate_patches_with_the_imported_entropy_model(tmp_path, store):
    cfg = config()
    # Meta's snapshot (python download_blt_weights.py): hf-weights/{blt_1b, entropy_model}
    write_meta_consolidated(tmp_path / "hf-weights" / "blt_1b", cfg, random_blt(cfg, seed=5), beside=True)
    out = blt_train("import", str(tmp_path / "hf-weights" / "blt_1b"), "--name", "gen", "--store", store)
    assert "gen-entropy@v1" in out
    text = blt_train("generate", "gen", "--prompt", "The ", "--max-bytes", "6", "--temperature", "0", "--store", store)
    assert text.startswith("The ")
    out = blt_train("eval", "gen", "--store", store, code=2)
    assert "--data" in out


def test_refusals_name_what_is_wrong(tmp_path, store):
    cfg = config()
    model = random_blt(cfg, seed=6)
    folder = tmp_path / "blt"
    write_meta_consolidated(folder, cfg, model)

    def refused(path=folder, *extra: str) -> str:
        return blt_train("import", str(path), "--name", "x", *extra, "--store", store, code=2)

    assert "no folder" in refused(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    assert "params.json + consolidated.pth" in refused(tmp_path / "empty")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert "'llama'" in refused(tmp_path / "llama")
    assert "no 'model' section" in refused(folder / "entropy_model")  # an entropy model's params.json

    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "config.json").write_text(json.dumps({"args": meta_args_from_config(cfg)}))
    assert "no model.safetensors" in refused(tmp_path / "hub")

    params = json.loads((folder / "params.json").read_text())
    for name, value in [("n_kv_heads", 4), ("cross_attn_decoder", False), ("downsampling_by_pooling", "avg")]:
        (folder / "params.json").write_text(json.dumps(params | {"model": params["model"] | {name: value}}))
        assert name in refused()
    patcher = params["data"]["patcher_args"]
    (folder / "params.json").write_text(json.dumps(params | {"data": {"patcher_args": patcher | {"threshold_add": 0.1}}}))
    assert "threshold_add" in refused()
    (folder / "params.json").write_text(json.dumps(params))

    state = model.state_dict()
    torch.save({"model": state | {"local_encoder.norm.weight": torch.ones(33)}}, folder / "consolidated.pth")
    out = refused()
    assert "local_encoder.norm.weight" in out and "(33,)" in out
    torch.save({"model": {k: v for k, v in state.items() if k != "local_decoder.output.weight"}}, folder / "consolidated.pth")
    assert "missing tensor local_decoder.output.weight" in refused()
    torch.save({"model": state | {"extra.weight": torch.ones(2)}}, folder / "consolidated.pth")
    assert "unexpected tensor extra.weight" in refused()
    torch.save({"model": state | {"local_encoder.norm.weight": torch.ones(32, dtype=torch.int64)}}, folder / "consolidated.pth")
    assert "local_encoder.norm.weight" in refused()
    (folder / "consolidated.pth").write_bytes(b"not a checkpoint")
    assert "not a readable torch checkpoint" in refused()
    (folder / "consolidated.pth").unlink()
    assert "no consolidated.pth" in refused()
    assert Registry(Store.open(store)).versions("x", area="models") == []  # nothing half-registered

    out = blt_train("export", "x", "--format", "hf", "--out", str(tmp_path / "o"), "--store", store, code=2)
    assert "x" in out
    out = blt_train("export", "x", "--format", "onnx", "--out", str(tmp_path / "o"), "--store", store, code=2)
    assert "hf, meta" in out


def test_hf_export_refuses_what_transformers_cannot_compute(tmp_path, store):
    cfg = config(cross_attn_nheads=4, n_heads_local_encoder=2)
    folder = tmp_path / "blt"
    write_meta_consolidated(folder, cfg, random_blt(cfg, seed=7))
    blt_train("import", str(folder), "--name", "heads", "--store", store)
    out = blt_train("export", "heads", "--format", "hf", "--out", str(tmp_path / "o"), "--store", store, code=2)
    assert "cross_attn_nheads" in out
    blt_train("export", "heads", "--format", "meta", "--out", str(tmp_path / "m"), "--store", store)
    (tmp_path / "m" / "model.safetensors.index.json").write_text("{}")  # an older sharded export
    out = blt_train("export", "heads", "--format", "meta", "--out", str(tmp_path / "m"), "--store", store, code=2)
    assert "sharded" in out
    with pytest.raises(InteropError, match="entropy model in Meta's hub layout"):
        import_blt(Registry(Store.open(store)), str(tmp_path / "m" / "entropy_model"), "y")
